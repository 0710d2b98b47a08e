"""Provisioning over SSH without sudo: real sshd hosts, real Ansible, real PostgreSQL.

The module shares one unprivileged loopback host for the installs and a spare host for
the connection failures, so that the whole module runs in a few minutes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml

from ops.errors import TunefleetError
from ops.paths import state_dir
from ops.provision import SSH_CONNECT_TIMEOUT_S, DatabaseServer, PlaybookResult, provision_database
from ops.secrets import read_secret_file
from support.sshd_hosts import SshHost, generate_ed25519_key, known_hosts_line, network_namespace
from tests.conftest import free_port

# The operator's locale, sent over SSH as an OpenSSH client does with SendEnv. SetEnv
# sends the same variables without needing the locale on the machine running the tests.
FORWARDED_LOCALE = "de_DE.UTF-8"
ALLOWED_NAMESPACE_INDEX = 31
OTHER_NAMESPACE_INDEX = 32
# Workers the inventory below can run: 16 GPUs x 2 workers plus 4 CPU workers.
EXPECTED_WORKERS = 16 * 2 + 4


@dataclass
class Run:
    result: PlaybookResult
    server: DatabaseServer
    events: list[dict[str, Any]]
    seconds: float
    inventory: Path


def provision(inventory: Path, *, no_sudo: bool = True, check: bool = False, **extravars: Any) -> Run:
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    result, server = provision_database(
        inventory, no_sudo=no_sudo, check=check, extravars={"postgresql_start_on_boot": False, **extravars},
        on_event=events.append,
    )
    return Run(result, server, events, time.monotonic() - started, inventory)


def write_yaml_inventory(path: Path, groups: dict[str, dict[str, dict[str, Any]]]) -> Path:
    path.write_text(yaml.safe_dump({"all": {"children": {name: {"hosts": hosts} for name, hosts in groups.items()}}}))
    return path


def connect(server: DatabaseServer, **overrides: Any):
    arguments = {
        "host": server.host, "port": server.port, "user": server.role, "dbname": server.database,
        "password": read_secret_file(server.password_file), "connect_timeout": 10,
    }
    return psycopg2.connect(**{**arguments, **overrides})


def query(server: DatabaseServer, sql: str) -> Any:
    connection = connect(server)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]
    finally:
        connection.close()


class ProcessWatcher:
    """Sample every process's command line while a block runs."""

    def __init__(self) -> None:
        self.listings: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=False)
            self.listings.append(listing.stdout)
            self._stop.wait(0.2)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# --- one unprivileged host, provisioned once ---------------------------------------


@pytest.fixture(scope="module")
def namespaces():
    with network_namespace(ALLOWED_NAMESPACE_INDEX) as allowed, network_namespace(OTHER_NAMESPACE_INDEX) as other:
        yield allowed, other


@pytest.fixture(scope="module")
def db_host(ssh_host_factory) -> SshHost:
    host = ssh_host_factory("pgdb", 21, accept_env=["LANG", "LC_*"])
    forwarded = ["-o", f"SetEnv=LC_ALL={FORWARDED_LOCALE} LANG={FORWARDED_LOCALE}"]
    host.extra_inventory_vars["ansible_ssh_common_args"] = shlex.join(host.ssh_options + forwarded)
    return host


@pytest.fixture(scope="module")
def db_inventory(db_host, namespaces, tmp_path_factory) -> Path:
    allowed, _ = namespaces
    return write_yaml_inventory(tmp_path_factory.mktemp("ssh-inventory") / "fleet.yml", {
        "db": {db_host.name: db_host.inventory_vars()},
        "gpu": {
            # Never contacted: the play runs on the db group only, and pg_hba.conf takes
            # the address from here.
            "gpu-allowed": {"ansible_host": allowed.namespace_address, "gpus": 16, "workers_per_gpu": 2},
            "cpu-box": {"ansible_host": "127.0.0.250", "gpus": 0, "cpu_workers": 4},
        },
    })


@pytest.fixture(scope="module")
def db_port(db_host) -> int:
    return free_port()


@pytest.fixture(scope="module")
def listen_addresses(db_host, namespaces) -> str:
    allowed, other = namespaces
    # A client in a network namespace reaches the root namespace only at its side of the
    # veth pair, so the server listens there too.
    return f"127.0.0.1,{db_host.address},{allowed.root_address},{other.root_address}"


@pytest.fixture(scope="module")
def first_run(tunefleet_home, db_inventory, db_port, listen_addresses) -> Run:
    run = provision(db_inventory, postgresql_port=db_port, postgresql_listen_addresses=listen_addresses)
    assert run.result.ok, run.result.failures
    return run


@pytest.fixture(scope="module")
def second_run(first_run, db_inventory, db_port, listen_addresses):
    with ProcessWatcher() as watcher:
        run = provision(db_inventory, postgresql_port=db_port, postgresql_listen_addresses=listen_addresses)
    return run, watcher.listings


@pytest.mark.slow
def test_no_sudo_install_serves_password_login(first_run, db_host):
    assert first_run.result.changed > 0
    assert first_run.server.host == db_host.address
    assert query(first_run.server, "SELECT current_user") == "optuna"


@pytest.mark.slow
def test_default_prefix_under_account_home(first_run, db_host):
    data_dir = db_host.home / ".tunefleet" / "postgresql" / "data"
    assert (data_dir / "PG_VERSION").read_text().strip() == str(query(first_run.server, "SHOW server_version_num"))[:2]
    assert data_dir.stat().st_uid == db_host.account_ids()[0]


@pytest.mark.slow
def test_second_run_changes_nothing(second_run):
    run, _ = second_run
    assert run.result.ok, run.result.failures
    assert run.result.changed == 0, run.result.recap


@pytest.mark.slow
def test_forwarded_locale_does_not_reach_cluster(first_run, db_host):
    ssh = ["ssh", "-F", "/dev/null", *shlex.split(db_host.inventory_vars()["ansible_ssh_common_args"]),
           "-o", "BatchMode=yes", "-i", str(db_host.client_key), "-p", str(db_host.port),
           f"{db_host.user}@{db_host.address}", "--", "echo $LC_ALL"]
    echoed = subprocess.run(ssh, capture_output=True, text=True, timeout=30, check=False)
    assert echoed.stdout.strip() == FORWARDED_LOCALE, echoed.stderr
    assert query(first_run.server, "SELECT datcollate FROM pg_database WHERE datname = 'optuna'") in ("C.UTF-8", "C")


@pytest.mark.slow
def test_gpu_host_address_connects(first_run, namespaces):
    allowed, _ = namespaces
    result = login_from(allowed, first_run.server, allowed.root_address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "optuna"


@pytest.mark.slow
def test_unlisted_address_rejected(first_run, namespaces):
    _, other = namespaces
    result = login_from(other, first_run.server, other.root_address)
    assert result.returncode != 0
    assert "no pg_hba.conf entry" in result.stderr
    assert other.namespace_address in result.stderr


def login_from(namespace, server: DatabaseServer, address: str) -> subprocess.CompletedProcess[str]:
    # The password travels in the environment of the client, never in its argv.
    script = (
        "import os, psycopg2\n"
        f"c = psycopg2.connect(host={address!r}, port={server.port}, user={server.role!r}, "
        f"dbname={server.database!r}, password=os.environ['TEST_PASSWORD'], connect_timeout=10)\n"
        "cur = c.cursor(); cur.execute('SELECT current_user'); print(cur.fetchone()[0])\n"
    )
    environment = {**os.environ, "TEST_PASSWORD": read_secret_file(server.password_file)}
    return namespace.run_in_netns([sys.executable, "-c", script], env=environment, timeout=60)


@pytest.mark.slow
def test_hba_has_no_trust_and_peer_only_for_owner(first_run, db_host, namespaces):
    allowed, _ = namespaces
    rules = [line.split() for line in
             (db_host.home / ".tunefleet/postgresql/data/pg_hba.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(rule[-1] != "trust" for rule in rules)
    # The owner's replication rule lets pg_basebackup take backups over the socket.
    assert [rule for rule in rules if rule[-1] == "peer"] == [
        ["local", "all", db_host.user, "peer"],
        ["local", "replication", db_host.user, "peer"],
    ]
    assert ["host", "optuna", "optuna", f"{allowed.namespace_address}/32", "scram-sha-256"] in rules


@pytest.mark.slow
def test_tuning_follows_inventory_and_memory(first_run):
    memtotal_mb = _memtotal_mb()
    assert int(query(first_run.server, "SHOW max_connections")) == EXPECTED_WORKERS * 3 + 10 + 3
    expected_shared_buffers = max(128, min(8192, memtotal_mb // 4))
    assert query(first_run.server, "SELECT setting::bigint * 8 / 1024 FROM pg_settings WHERE name = 'shared_buffers'") \
        == expected_shared_buffers
    assert query(first_run.server, "SHOW password_encryption") == "scram-sha-256"


def _memtotal_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.mark.slow
def test_password_absent_from_output_artifacts_and_ps(first_run, second_run, db_host):
    run, listings = second_run
    password = read_secret_file(run.server.password_file)
    assert listings, "ps was never sampled during the run"
    assert not [listing for listing in listings if password in listing]
    for events in (first_run.events, run.events):
        assert password not in json.dumps(events, default=str)
    leaks = [path for path in (state_dir() / "runs").rglob("*")
             if path.is_file() and password.encode() in path.read_bytes()]
    assert leaks == []
    prefix = db_host.home / ".tunefleet" / "postgresql"
    host_leaks = [path for path in prefix.iterdir()
                  if path.is_file() and password.encode() in path.read_bytes()]
    assert host_leaks == []


@pytest.mark.slow
def test_provision_command_reports_url_and_no_change(second_run, db_inventory, db_port, listen_addresses,
                                                      tmp_path):
    """``tunefleet provision`` as a user types it, on the already provisioned host."""
    inventory = yaml.safe_load(db_inventory.read_text())
    for host_vars in inventory["all"]["children"]["db"]["hosts"].values():
        host_vars.update(postgresql_port=db_port, postgresql_listen_addresses=listen_addresses,
                         postgresql_start_on_boot=False)
    typed = tmp_path / "hosts.yml"
    typed.write_text(yaml.safe_dump(inventory))

    command = subprocess.run(
        [sys.executable, "-m", "ops.cli", "provision", "-i", str(typed), "--no-sudo"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
    )
    assert command.returncode == 0, command.stderr[-2000:]
    run, _ = second_run
    assert f"storage URL: {run.server.storage_url(masked=True)}" in command.stdout
    assert f"password file: {run.server.password_file}" in command.stdout
    assert "0 change(s)" in command.stderr
    assert "recap" in command.stderr
    password = read_secret_file(run.server.password_file)
    assert password not in command.stdout + command.stderr
    env_file = state_dir() / "storage.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert run.server.storage_url(masked=False) in env_file.read_text()


@pytest.mark.slow
def test_provision_command_bad_inventory_exits_1(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "provision", "-i", str(tmp_path / "missing.yml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: inventory")
    assert "not found" in result.stderr


@pytest.mark.slow
def test_reload_only_setting_keeps_server_running(second_run, db_inventory, db_port, listen_addresses):
    run, _ = second_run
    started = query(run.server, "SELECT pg_postmaster_start_time()")
    changed = provision(db_inventory, postgresql_port=db_port, postgresql_listen_addresses=listen_addresses,
                        postgresql_work_mem_mb=7)
    assert changed.result.ok, changed.result.failures
    assert query(run.server, "SHOW work_mem") == "7MB"
    assert query(run.server, "SELECT pg_postmaster_start_time()") == started


@pytest.mark.slow
def test_max_connections_change_restarts(second_run, db_inventory, db_port, listen_addresses):
    run, _ = second_run
    started = query(run.server, "SELECT pg_postmaster_start_time()")
    changed = provision(db_inventory, postgresql_port=db_port, postgresql_listen_addresses=listen_addresses,
                        postgresql_max_connections=160)
    assert changed.result.ok, changed.result.failures
    assert query(run.server, "SHOW max_connections") == "160"
    assert query(run.server, "SELECT pg_postmaster_start_time()") > started


# --- PostgreSQL 12 from a binary archive, on the same host -------------------------


@pytest.fixture(scope="module")
def pg12_run(tunefleet_home, db_host, postgresql12_archive, tmp_path_factory) -> Run:
    inventory = write_yaml_inventory(tmp_path_factory.mktemp("pg12") / "pg12.yml",
                                     {"db": {db_host.name: db_host.inventory_vars()}})
    run = provision(inventory, postgresql_prefix="~/pg12", postgresql_port=free_port(),
                    postgresql_binary_archive=str(postgresql12_archive))
    assert run.result.ok, run.result.failures
    return run


@pytest.mark.slow
def test_binary_archive_serves_postgresql_12(pg12_run, db_host):
    assert query(pg12_run.server, "SELECT version()").startswith("PostgreSQL 12.")
    assert (db_host.home / "pg12" / "data" / "PG_VERSION").read_text().strip() == "12"
    assert query(pg12_run.server, "SHOW password_encryption") == "scram-sha-256"


@pytest.mark.slow
def test_other_major_data_dir_fails_untouched(pg12_run, db_host):
    data_dir = db_host.home / "pg12" / "data"
    pg_ctl = next((db_host.home / "pg12" / "binaries").glob("*/bin/pg_ctl"))
    stopped = db_host.run(f"{pg_ctl} stop --pgdata={data_dir} --mode=fast --wait")
    assert stopped.returncode == 0, stopped.stderr
    before = _snapshot(data_dir)

    run = provision(pg12_run.inventory, postgresql_prefix="~/pg12", postgresql_port=pg12_run.server.port)

    assert not run.result.ok
    assert len(run.result.failures) == 1, run.result.failures
    assert f"data directory {data_dir} holds PostgreSQL 12 data, but this run installs" in run.result.failures[0]
    assert _snapshot(data_dir) == before


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in directory.rglob("*") if path.is_file()}


# --- inventory checks: no host is contacted -----------------------------------------


def test_db_group_without_host_rejected(tunefleet_home, tmp_path):
    inventory = write_yaml_inventory(tmp_path / "empty.yml", {"db": {}, "gpu": {"gpu1": {}}})
    with pytest.raises(TunefleetError) as raised:
        provision_database(inventory, no_sudo=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "group 'db'" in message
    assert "keep only the database server under db" in message or "add a db group" in message


def test_db_group_with_two_hosts_rejected(tunefleet_home, tmp_path):
    inventory = write_yaml_inventory(tmp_path / "two.yml", {"db": {"db1": {}, "db2": {}}})
    with pytest.raises(TunefleetError) as raised:
        provision_database(inventory, no_sudo=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "must hold exactly one host, but holds 2 (db1, db2)" in message


def test_limit_naming_unknown_host_rejected(tunefleet_home, tmp_path):
    inventory = write_yaml_inventory(tmp_path / "one.yml", {"db": {"db1": {}}})
    with pytest.raises(TunefleetError) as raised:
        provision_database(inventory, no_sudo=True, limit="db9")
    message = str(raised.value)
    assert "\n" not in message
    assert "host db9 in --limit not found in inventory" in message


# --- connection failures, on a spare host --------------------------------------------


# Ansible keeps each SSH connection open for 60 s (ControlPersist) and reuses it, so the
# tests that must fail to connect run before the first one that connects.
@pytest.fixture(scope="module")
def spare_host(ssh_host_factory) -> SshHost:
    return ssh_host_factory("spare", 22)


def spare_inventory(host: SshHost, path: Path, **overrides: Any) -> Path:
    return write_yaml_inventory(path, {"db": {host.name: {**host.inventory_vars(), **overrides}}})


@pytest.mark.slow
def test_wrong_key_one_line(tunefleet_home, spare_host, tmp_path):
    other_key = tmp_path / "other_key"
    generate_ed25519_key(other_key, "not authorized")
    run = provision(spare_inventory(spare_host, tmp_path / "key.yml", ansible_ssh_private_key_file=str(other_key)))
    assert not run.result.ok
    assert run.result.failures == [
        f"{spare_host.name}: SSH login as {spare_host.user} refused; check ansible_user and the key"
    ]


@pytest.mark.slow
def test_changed_host_key_one_line(tunefleet_home, spare_host, tmp_path):
    impostor_key = tmp_path / "impostor_host_key"
    impostor = generate_ed25519_key(impostor_key, "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(spare_host.address, spare_host.port, impostor))
    # ssh takes the first value of an option, so the pinned known_hosts must go.
    options = [f"UserKnownHostsFile={known_hosts}" if option.startswith("UserKnownHostsFile=") else option
               for option in spare_host.ssh_options]
    common_args = shlex.join(options)
    run = provision(spare_inventory(spare_host, tmp_path / "hostkey.yml", ansible_ssh_common_args=common_args))
    assert not run.result.ok
    assert run.result.failures == [
        f"{spare_host.name}: host key of {spare_host.address}:{spare_host.port} changed or is unknown; "
        "check it and update known_hosts"
    ]


@pytest.mark.slow
def test_blackholed_host_times_out_in_one_line(tunefleet_home, spare_host, tmp_path):
    with spare_host.blackholed():
        run = provision(spare_inventory(spare_host, tmp_path / "blackhole.yml"))
    assert not run.result.ok
    assert len(run.result.failures) == 1, run.result.failures
    assert f"{spare_host.address}:{spare_host.port} unreachable" in run.result.failures[0]
    assert run.seconds < SSH_CONNECT_TIMEOUT_S + 20


@pytest.mark.slow
def test_check_mode_on_fresh_host_changes_nothing(tunefleet_home, spare_host, tmp_path):
    run = provision(spare_inventory(spare_host, tmp_path / "check.yml"), check=True,
                    postgresql_port=free_port())
    assert run.result.ok, run.result.failures
    assert not (spare_host.home / ".tunefleet").exists()


@pytest.mark.slow
def test_stopped_sshd_one_line(tunefleet_home, spare_host, tmp_path):
    spare_host.stop()
    run = provision(spare_inventory(spare_host, tmp_path / "stopped.yml"))
    assert not run.result.ok
    assert len(run.result.failures) == 1, run.result.failures
    assert run.result.failures[0].startswith(
        f"{spare_host.name}: {spare_host.address}:{spare_host.port} unreachable (Connection refused)"
    )
    assert run.seconds < SSH_CONNECT_TIMEOUT_S + 20


@pytest.mark.slow
def test_host_key_checked_right_after_good_run(tunefleet_home, ssh_host_factory, tmp_path):
    """A connection kept open by the previous run must not skip the next run's host key check."""
    spare_host = ssh_host_factory("keycheck", 23)
    good = provision(spare_inventory(spare_host, tmp_path / "good.yml"), check=True, postgresql_port=free_port())
    assert good.result.ok, good.result.failures

    impostor = generate_ed25519_key(tmp_path / "impostor_host_key", "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(spare_host.address, spare_host.port, impostor))
    options = [f"UserKnownHostsFile={known_hosts}" if option.startswith("UserKnownHostsFile=") else option
               for option in spare_host.ssh_options]
    run = provision(spare_inventory(spare_host, tmp_path / "swapped.yml", ansible_ssh_common_args=shlex.join(options)),
                    check=True, postgresql_port=free_port())
    assert not run.result.ok
    assert "host key of" in run.result.failures[0]
