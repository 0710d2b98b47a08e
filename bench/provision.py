"""Provisioning: a fresh Debian host to a ready database, against installing the packages alone.

Each repetition starts two identical fresh hosts from the test suite's cached debootstrap
tree (sshd in a chroot, no systemd). On one, ``provision_database(..., no_sudo=False)``
runs the project's playbook in system mode, the same call as ``tunefleet provision``, and
the database is ready when it accepts the storage role's login. On the other, one SSH
command runs ``apt-get update`` and ``apt-get install -y postgresql`` through sudo. Host
set-up is outside both timings. Both download the packages from this machine's Debian
mirror, so the order alternates between repetitions.

This part needs root, because the hosts create accounts, chroots and mounts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2

from ops.paths import project_root
from ops.provision import DatabaseServer, provision_database
from ops.secrets import read_secret_file

sys.path.insert(0, str(project_root() / "tests"))
from support.sshd_hosts import (  # noqa: E402
    FreshDebianHost,
    cache_dir_for_tests,
    find_free_port,
    make_debootstrap_tree,
    write_inventory,
)

# Loopback addresses 127.0.0.40 and .41, away from those that the test suite uses.
PROVISION_ADDRESS_INDEX = 40
PACKAGES_ADDRESS_INDEX = 41
INSTALL_TIMEOUT_S = 1200
# Slowest playbook tasks listed in the report, by mean seconds per run.
TASKS_REPORTED = 8
PACKAGES_COMMAND = ("sudo env DEBIAN_FRONTEND=noninteractive sh -c "
                    "'apt-get update -qq && apt-get install -y -qq postgresql'")


def time_provision(host: FreshDebianHost, workdir: Path, task_seconds: Counter[str]) -> float:
    """Time the playbook run, adding each task's duration from Ansible's events to `task_seconds`."""
    port = find_free_port(host.address)
    inventory = write_inventory(workdir / f"inventory-{host.host_id}.yml", {"db": [host]},
                                host_vars={host.name: {"postgresql_port": port}})

    def record(event: dict[str, Any]) -> None:
        data = event.get("event_data", {})
        if event.get("event", "").startswith("runner_on_") and "duration" in data:
            task_seconds[data.get("task", "?")] += float(data["duration"])

    started = time.monotonic()
    result, server = provision_database(inventory, no_sudo=False, on_event=record)
    if not result.ok:
        raise RuntimeError("tunefleet provision failed on a fresh host: " + "; ".join(result.failures))
    wait_until_ready(server)
    return time.monotonic() - started


def wait_until_ready(server: DatabaseServer, timeout_s: float = 60) -> None:
    """Return once the storage role can log in and run a query."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg2.connect(host=server.host, port=server.port, user=server.role,
                                  password=read_secret_file(server.password_file),
                                  dbname=server.database, connect_timeout=5) as connection:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def time_packages(host: FreshDebianHost) -> float:
    started = time.monotonic()
    completed = host.run(PACKAGES_COMMAND, timeout_s=INSTALL_TIMEOUT_S)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"apt-get install postgresql failed with exit code {completed.returncode}: "
                           f"{(completed.stdout + completed.stderr)[-1000:]}")
    return seconds


def run(repetitions: int, log: Any) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError("the provisioning benchmark needs root, because it starts fresh Debian hosts in chroots; run it with sudo")
    tarball = make_debootstrap_tree(cache_dir_for_tests())
    roots_dir = cache_dir_for_tests() / "roots"
    runs: dict[str, list[float]] = {"provision": [], "packages": []}
    task_seconds: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="tunefleet-bench-provision-") as workdir:
        for repetition in range(repetitions):
            order = ("provision", "packages") if repetition % 2 == 0 else ("packages", "provision")
            for mode in order:
                index = PROVISION_ADDRESS_INDEX if mode == "provision" else PACKAGES_ADDRESS_INDEX
                host = FreshDebianHost(f"bench-{mode}", index, Path(workdir), tarball, roots_dir)
                try:
                    host.setup()
                    seconds = time_provision(host, Path(workdir), task_seconds) if mode == "provision" else time_packages(host)
                finally:
                    host.close()
                runs[mode].append(seconds)
            log(f"provision: repetition {repetition + 1}: tunefleet provision {runs['provision'][-1]:.1f} s, "
                f"apt-get install postgresql {runs['packages'][-1]:.1f} s")
    slowest = {task: seconds / repetitions for task, seconds in task_seconds.most_common(TASKS_REPORTED)}
    return {"repetitions": repetitions, "seconds": runs, "slowest_tasks": slowest}
