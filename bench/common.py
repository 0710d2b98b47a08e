"""Shared pieces: repetition and medians, the benchmark's own PostgreSQL server, machine facts."""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.paths import project_root
from ops.provision import DatabaseServer, provision_database

LOCAL_INVENTORY = project_root() / "inventory" / "local.yml"
# The account that the role runs a user-mode server as when the benchmark runs as root.
SERVER_ACCOUNT = "tunefleet"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class BenchServer:
    """A user-mode PostgreSQL server that the project's playbook installed for one benchmark run."""

    server: DatabaseServer
    prefix: Path
    base_dir: Path

    def storage_url(self) -> str:
        """Return the unmasked storage URL; callers pass it only through environments and files."""
        return self.server.storage_url(masked=False)

    @property
    def data_dir(self) -> Path:
        return self.prefix / "data"

    @property
    def account(self) -> str:
        """The account that runs the server: SERVER_ACCOUNT under root, else the current user."""
        return SERVER_ACCOUNT if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def run_as_account(self, script: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run shell `script` as the server's account, with env.sh sourced; the result is unchecked."""
        script = f". '{self.prefix}/env.sh' && {script}"
        argv = ["sh", "-c", script]
        if os.geteuid() == 0:
            argv = ["su", self.account, "-s", "/bin/sh", "-c", script]
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)

    def shut_down(self) -> None:
        """Stop the server with a shutdown checkpoint, so that its data directory is consistent."""
        completed = self.run_as_account("pg_ctl stop --mode=fast --wait")
        if completed.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {(completed.stdout + completed.stderr).strip()[-500:]}")

    def start(self) -> None:
        """Start the server again, with its settings from the data directory, as the role's start script does."""
        completed = self.run_as_account(f"pg_ctl start --wait --timeout=60 --log='{self.prefix}/log/postgresql.log'")
        if completed.returncode != 0:
            raise RuntimeError(f"starting the server failed: {(completed.stdout + completed.stderr).strip()[-500:]}")

    def stop(self) -> None:
        """Stop the server, if it has a data directory, and remove everything under base_dir."""
        if (self.data_dir / "PG_VERSION").exists():
            self.run_as_account("pg_ctl stop --mode=fast --wait")
        shutil.rmtree(self.base_dir, ignore_errors=True)


def provision_bench_server(**extravars: Any) -> BenchServer:
    """Install and start a PostgreSQL server with the project's own playbook, in user mode.

    The prefix sits under a 0711 directory in /tmp because the server's account must
    traverse it when the benchmark runs as root, and because a Unix socket path is
    limited to 107 bytes.
    """
    base_dir = Path(tempfile.mkdtemp(prefix="tunefleet-bench-", dir="/tmp"))
    base_dir.chmod(0o711)
    prefix = base_dir / "pg"
    variables = {
        "postgresql_prefix": str(prefix),
        "postgresql_port": free_port(),
        # An @reboot entry in the account's crontab would outlive the benchmark.
        "postgresql_start_on_boot": False,
        **extravars,
    }
    result, server = provision_database(LOCAL_INVENTORY, no_sudo=True, extravars=variables)
    bench_server = BenchServer(server, prefix, base_dir)
    if not result.ok:
        bench_server.stop()
        raise RuntimeError("provisioning the benchmark's PostgreSQL server failed: " + "; ".join(result.failures))
    return bench_server


def use_private_state_dir() -> Path:
    """Point TUNEFLEET_HOME at a fresh 0700 directory so that no run touches the operator's state."""
    home = Path(tempfile.mkdtemp(prefix="tunefleet-bench-home-"))
    os.environ["TUNEFLEET_HOME"] = str(home)
    return home


def machine_facts() -> dict[str, str]:
    """Describe the machine and the software versions that the figures were measured with."""
    import optuna
    import torch

    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_memory_gib():.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "PostgreSQL": _postgresql_version(),
        "Optuna": optuna.__version__,
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _postgresql_version() -> str:
    # The server's own report is more exact than the client's; bench.storage records it
    # when it runs, and this fallback names the installed client.
    found = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if not found:
        return "not installed"
    output = subprocess.run([str(found), "--version"], capture_output=True, text=True, check=False).stdout
    return output.strip() or "unknown"


def python_executable() -> str:
    return sys.executable
