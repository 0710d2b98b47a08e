"""Provisioning: run tunefleet's playbooks through ansible-runner and read their results."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ansible_runner

from ops.errors import TunefleetError
from ops.paths import playbook_dir, secrets_dir, state_dir
from ops.secrets import ensure_password, read_secret_file

EventHandler = Callable[[dict[str, Any]], None]

# Settings for every run. Pipelining saves a file transfer per task, and the role's
# become tasks use su as root, which needs no tty.
RUNNER_ENVVARS = {
    "ANSIBLE_PIPELINING": "True",
    "ANSIBLE_NOCOLOR": "True",
    "ANSIBLE_RETRY_FILES_ENABLED": "False",
    "ANSIBLE_DEPRECATION_WARNINGS": "False",
}

# Artifact folders of earlier runs kept under state_dir()/runs. They hold no secret,
# because the password reaches Ansible only as a file path and is read in no_log tasks.
RUNS_KEPT = 20

DATABASE_GROUP = "db"


@dataclass
class HostRecap:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0


@dataclass
class PlaybookResult:
    status: str
    rc: int
    recap: dict[str, HostRecap] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    artifact_dir: Path | None = None

    @property
    def changed(self) -> int:
        return sum(host.changed for host in self.recap.values())

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0


def run_playbook(
    playbook: str,
    inventory: Path,
    extravars: dict[str, Any],
    *,
    limit: str | None = None,
    check: bool = False,
    on_event: EventHandler | None = None,
) -> PlaybookResult:
    """Run `playbook` from playbooks/ against `inventory`, quietly, and return its result.

    Events go to `on_event` as ansible-runner's event dicts; nothing is printed.
    """
    private_data_dir = _new_private_data_dir(playbook)
    failures: list[str] = []

    def handle_event(event: dict[str, Any]) -> bool:
        failure = _failure_line(event)
        if failure:
            failures.append(failure)
        if on_event is not None:
            on_event(event)
        return True

    runner = ansible_runner.run(
        private_data_dir=str(private_data_dir),
        project_dir=str(playbook_dir()),
        playbook=playbook,
        inventory=str(Path(inventory).resolve()),
        extravars=extravars,
        envvars={**RUNNER_ENVVARS, "PATH": _path_with_ansible()},
        limit=limit,
        cmdline="--check" if check else None,
        quiet=True,
        event_handler=handle_event,
    )
    _prune_runs(private_data_dir.parent)
    result = PlaybookResult(
        status=runner.status,
        rc=runner.rc,
        recap=_recap(runner.stats or {}),
        failures=failures,
        artifact_dir=Path(runner.config.artifact_dir),
    )
    if not result.ok and not result.failures:
        # ansible-playbook stopped before any task ran: a syntax error, a missing binary.
        result.failures.append(f"ansible-playbook: {_last_output_line(result.artifact_dir)}")
    return result


def _path_with_ansible() -> str:
    # An unactivated virtual environment has ansible-playbook beside its python, not on PATH.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


def _last_output_line(artifact_dir: Path) -> str:
    stdout = artifact_dir / "stdout"
    lines = stdout.read_text(errors="replace").strip().splitlines() if stdout.exists() else []
    return lines[-1] if lines else "failed with no output"


def _new_private_data_dir(playbook: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    directory = state_dir() / "runs" / f"{stamp}-{Path(playbook).stem}"
    directory.mkdir(parents=True, mode=0o700)
    return directory


def _prune_runs(runs_dir: Path) -> None:
    for old in sorted(runs_dir.iterdir())[:-RUNS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def _recap(stats: dict[str, dict[str, int]]) -> dict[str, HostRecap]:
    # Ansible's stats name failures "failures" and unreachable hosts "dark".
    keys = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable", "skipped": "skipped"}
    recap: dict[str, HostRecap] = {}
    for stats_key, field_name in keys.items():
        for host, count in stats.get(stats_key, {}).items():
            setattr(recap.setdefault(host, HostRecap()), field_name, count)
    return recap


def _failure_line(event: dict[str, Any]) -> str | None:
    """Return "HOST: TASK: message" for a failed or unreachable task, else None."""
    kind = event.get("event")
    data = event.get("event_data", {})
    if kind not in ("runner_on_failed", "runner_on_unreachable") or data.get("ignore_errors"):
        return None
    result = data.get("res", {})
    message = result.get("msg") or result.get("stderr") or "failed"
    message = " ".join(str(message).split())
    return f"{data.get('host', '?')}: {data.get('task', '?')}: {message}"


@dataclass
class DatabaseServer:
    host: str
    port: int
    database: str
    role: str
    password_file: Path

    def storage_url(self, *, masked: bool = True) -> str:
        """Return Optuna's storage URL; the password reads "***" unless `masked` is False."""
        password = "***" if masked else quote(read_secret_file(self.password_file), safe="")
        return (
            f"postgresql+psycopg2://{quote(self.role, safe='')}:{password}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )


def password_file_for(inventory: Path) -> Path:
    return secrets_dir() / f"{Path(inventory).stem}-postgresql.password"


def provision_database(
    inventory: Path,
    *,
    extravars: dict[str, Any] | None = None,
    on_event: EventHandler | None = None,
    check: bool = False,
) -> tuple[PlaybookResult, DatabaseServer]:
    """Install PostgreSQL on the inventory's database host and create Optuna's database."""
    extravars = dict(extravars or {})
    _reject_secret_extravars(extravars)

    password_file = password_file_for(inventory)
    ensure_password(password_file)
    extravars["postgresql_password_file"] = str(password_file)

    result = run_playbook("postgresql.yml", inventory, extravars, check=check, on_event=on_event)
    return result, database_server(inventory, extravars, password_file)


def _reject_secret_extravars(extravars: dict[str, Any]) -> None:
    # Extra variables land in ansible-runner's env/extravars file and in argv.
    for name in extravars:
        if "password" in name and name != "postgresql_password_file":
            raise TunefleetError(
                f"extra variable {name} looks like a secret, and extra variables are written to disk",
                "put the password in the file named by postgresql_password_file",
            )


def database_server(inventory: Path, extravars: dict[str, Any], password_file: Path) -> DatabaseServer:
    """Describe the inventory's database server as Optuna workers reach it."""
    host_name, host_vars = _database_host(inventory)
    merged = {**host_vars, **extravars}
    address = str(merged.get("ansible_host", host_name))
    if address == "localhost":
        # The role's default listen address is 127.0.0.1, and "localhost" may resolve to ::1.
        address = "127.0.0.1"
    return DatabaseServer(
        host=address,
        port=int(merged.get("postgresql_port", 5432)),
        database=str(merged.get("postgresql_database", "optuna")),
        role=str(merged.get("postgresql_role", "optuna")),
        password_file=password_file,
    )


def _database_host(inventory: Path) -> tuple[str, dict[str, Any]]:
    # Ansible's own parser, so group_vars and host_vars mean what they mean to Ansible.
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(inventory)])
    hosts = manager.get_hosts(pattern=DATABASE_GROUP)
    if not hosts:
        raise TunefleetError(
            f"inventory {inventory} has no host in group {DATABASE_GROUP!r}",
            f"add the database server under {DATABASE_GROUP}: in {inventory}",
        )
    host = hosts[0]
    return host.name, VariableManager(loader=loader, inventory=manager).get_vars(host=host)
