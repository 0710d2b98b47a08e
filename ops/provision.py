"""Provisioning: run tunefleet's playbooks through ansible-runner and read their results."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ansible_runner

from ops.errors import TunefleetError
from ops.inventory import InventoryData, load_inventory
from ops.paths import playbook_dir, secrets_dir, state_dir
from ops.secrets import ensure_password, read_secret_file

EventHandler = Callable[[dict[str, Any]], None]

# Seconds that SSH waits for a host to accept the connection. Ansible's ssh plugin turns
# ANSIBLE_TIMEOUT into `-o ConnectTimeout`, so a host that drops packets fails after
# this long instead of after the kernel's TCP timeout of about two minutes.
SSH_CONNECT_TIMEOUT_S = 10

# Settings for every run. Pipelining saves a file transfer per task, and the role's
# become tasks use su as root, which needs no tty.
RUNNER_ENVVARS = {
    "ANSIBLE_PIPELINING": "True",
    "ANSIBLE_NOCOLOR": "True",
    "ANSIBLE_RETRY_FILES_ENABLED": "False",
    "ANSIBLE_DEPRECATION_WARNINGS": "False",
    "ANSIBLE_TIMEOUT": str(SSH_CONNECT_TIMEOUT_S),
    # ansible-runner turns host key checking off unless this is set, and Ansible then
    # passes StrictHostKeyChecking=no before any option from the inventory.
    "ANSIBLE_HOST_KEY_CHECKING": "True",
    # Ansible's default SSH arguments, plus keepalives, because without them a host that stops
    # responding hangs a reused ControlPersist connection until the kernel gives up.
    "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=60s -o ServerAliveInterval=15 -o ServerAliveCountMax=4",
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
    connections = _connection_variables(load_inventory(inventory))

    def handle_event(event: dict[str, Any]) -> bool:
        failure = _failure_line(event, connections)
        if failure:
            failures.append(failure)
        if on_event is not None:
            on_event(event)
        return True

    # A ControlPersist connection left by an earlier run would skip the host key and
    # login checks of this one, so each run gets its own control sockets. /tmp keeps
    # the socket path under the 108-byte limit of Unix sockets.
    control_dir = tempfile.mkdtemp(prefix="tf-ssh-")
    try:
        with _signals_cancel_run() as cancel_requested:
            runner = ansible_runner.run(
                private_data_dir=str(private_data_dir),
                project_dir=str(playbook_dir()),
                playbook=playbook,
                inventory=str(Path(inventory).resolve()),
                extravars=extravars,
                envvars={**RUNNER_ENVVARS, "PATH": _path_with_ansible(),
                         "ANSIBLE_SSH_CONTROL_PATH_DIR": control_dir},
                limit=limit,
                cmdline="--check" if check else None,
                quiet=True,
                event_handler=handle_event,
                cancel_callback=cancel_requested,
            )
    finally:
        _close_control_sockets(control_dir)
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


@contextmanager
def _signals_cancel_run() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT and SIGTERM into a cancel of the playbook run, then deliver them as usual.

    Without a cancel callback, ansible-runner installs SIGINT and SIGTERM handlers of its
    own and never restores the previous ones, so Ctrl-C after a playbook did nothing for
    the rest of the command.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def record(number: int, frame: Any) -> None:
        received.append(number)

    for number in previous:
        signal.signal(number, record)
    try:
        yield lambda: bool(received)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        # The run was cancelled; now the command's own handling applies, Ctrl-C included.
        signal.raise_signal(received[0])


def _close_control_sockets(control_dir: str) -> None:
    """Stop the SSH master processes of a run and remove their sockets."""
    for socket_path in Path(control_dir).iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "unused"],
                       capture_output=True, timeout=10, check=False)
    shutil.rmtree(control_dir, ignore_errors=True)


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


def _failure_line(event: dict[str, Any], connections: dict[str, dict[str, Any]]) -> str | None:
    """Return "HOST: TASK: message" for a failed task, "HOST: reason" for an unreachable one, else None."""
    kind = event.get("event")
    data = event.get("event_data", {})
    if kind not in ("runner_on_failed", "runner_on_unreachable") or data.get("ignore_errors"):
        return None
    result = data.get("res", {})
    message = result.get("msg") or result.get("stderr") or "failed"
    message = " ".join(str(message).split())
    host = data.get("host", "?")
    if kind == "runner_on_unreachable":
        return f"{host}: {_unreachable_reason(message, data, connections)}"
    return f"{host}: {data.get('task', '?')}: {message}"


# ssh's own messages, as Ansible passes them on in an unreachable result.
_REFUSED_OR_TIMED_OUT = re.compile(
    r"Connection refused|Connection timed out|timed out|No route to host|Network is unreachable"
    r"|Could not resolve hostname",
    re.IGNORECASE,
)


def _unreachable_reason(message: str, data: dict[str, Any], connections: dict[str, dict[str, Any]]) -> str:
    """Turn ssh's unreachable message into what failed and what to check."""
    address, port, user = _connection_of(data, connections)
    if "Host key verification failed" in message or "REMOTE HOST IDENTIFICATION HAS CHANGED" in message:
        return f"host key of {address}:{port} changed or is unknown; check it and update known_hosts"
    if "Permission denied (publickey" in message:
        return f"SSH login as {user} refused; check ansible_user and the key"
    if _REFUSED_OR_TIMED_OUT.search(message):
        return (
            f"{address}:{port} unreachable ({_last_ssh_error(message)}); "
            "check that the host is up, that sshd listens there, and ansible_host/ansible_port"
        )
    return f"unreachable: {message}"


def _connection_of(data: dict[str, Any], connections: dict[str, dict[str, Any]]) -> tuple[str, Any, str]:
    # The event carries no connection variables, so they come from the run's inventory.
    host = data.get("host", "?")
    variables = connections.get(host, {})
    address = variables.get("ansible_host") or host
    user = variables.get("ansible_user") or os.environ.get("USER", "the current user")
    return str(address), variables.get("ansible_port") or 22, str(user)


def _last_ssh_error(message: str) -> str:
    # "Failed to connect to the host via ssh: ssh: connect to host 127.0.0.5 port 22: Connection refused"
    return message.rsplit(": ", 1)[-1].strip() or message


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


def password_file_for(address: str, role: str) -> Path:
    """Return where the operator keeps the password of ``role`` on the server at ``address``.

    The file is named after the server, not the inventory, so that two inventories
    naming the same host agree on its password instead of rotating it.
    """
    safe_address = re.sub(r"[^A-Za-z0-9._-]", "_", address)
    safe_role = re.sub(r"[^A-Za-z0-9._-]", "_", role)
    return secrets_dir() / f"postgresql-{safe_address}-{safe_role}.password"


def provision_database(
    inventory: Path,
    *,
    no_sudo: bool,
    limit: str | None = None,
    check: bool = False,
    extravars: dict[str, Any] | None = None,
    on_event: EventHandler | None = None,
) -> tuple[PlaybookResult, DatabaseServer]:
    """Install PostgreSQL on the inventory's database host and create Optuna's database.

    `no_sudo` selects the role's user-space mode, which needs no root on the host.
    `check` runs Ansible's check mode, which reports what would change and changes nothing.
    """
    extravars = dict(extravars or {})
    _reject_secret_extravars(extravars)
    inventory_data = load_inventory(inventory)
    host_name, host_vars = _database_host(inventory, inventory_data)
    _check_limit(inventory, inventory_data, limit, host_name)
    _check_client_addresses(inventory, inventory_data, {**host_vars, **extravars})

    described = _describe_server(host_name, {**host_vars, **extravars}, Path())
    password_file = password_file_for(described.host, described.role)
    ensure_password(password_file)
    extravars["postgresql_password_file"] = str(password_file)
    extravars["postgresql_install_mode"] = "user" if no_sudo else "system"

    result = run_playbook("postgresql.yml", inventory, extravars, limit=limit, check=check, on_event=on_event)
    return result, _describe_server(host_name, {**host_vars, **extravars}, password_file)


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
    host_name, host_vars = _database_host(inventory, load_inventory(inventory))
    return _describe_server(host_name, {**host_vars, **extravars}, password_file)


def _describe_server(host_name: str, variables: dict[str, Any], password_file: Path) -> DatabaseServer:
    if _is_local(host_name, variables):
        # The role always listens on 127.0.0.1, and "localhost" may resolve to ::1.
        address = "127.0.0.1"
    else:
        address = str(variables.get("ansible_host", host_name))
    return DatabaseServer(
        host=address,
        port=_port(variables.get("postgresql_port", 5432)),
        database=str(variables.get("postgresql_database", "optuna")),
        role=str(variables.get("postgresql_role", "optuna")),
        password_file=password_file,
    )


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise TunefleetError(f"invalid postgresql_port {value!r}", "use a TCP port number from 1024 to 65535")
    return port


def _is_local(host_name: str, variables: dict[str, Any]) -> bool:
    address = str(variables.get("ansible_host", host_name))
    return variables.get("ansible_connection") == "local" or address in ("localhost", "127.0.0.1", "::1")


def _database_host(inventory: Path, data: InventoryData) -> tuple[str, dict[str, Any]]:
    """Return the name and variables of the one host in the db group, or raise a one-line error."""
    groups = data.manager.groups
    if DATABASE_GROUP not in groups:
        raise TunefleetError(
            f"inventory {inventory} has no group {DATABASE_GROUP!r}",
            f"add a {DATABASE_GROUP} group with the database server as its only host",
        )
    hosts = groups[DATABASE_GROUP].get_hosts()
    if len(hosts) != 1:
        names = ", ".join(sorted(host.name for host in hosts)) or "none"
        raise TunefleetError(
            f"group {DATABASE_GROUP!r} in inventory {inventory} must hold exactly one host, "
            f"but holds {len(hosts)} ({names})",
            f"keep only the database server under {DATABASE_GROUP}",
        )
    host = hosts[0]
    return host.name, data.variables.get_vars(host=host)


def _check_limit(inventory: Path, data: InventoryData, limit: str | None, db_host: str) -> None:
    if not limit:
        return
    known = {host.name for host in data.manager.get_hosts()}
    # A limit is a comma- or colon-separated host pattern. Only plain names are checked,
    # because a pattern with wildcards or group operators can rightly match nothing here.
    for name in re.split(r"[,:]", limit):
        name = name.strip()
        if name and not re.search(r"[*?\[\]!&~]", name) and name not in known and name not in data.manager.groups:
            raise TunefleetError(
                f"host {name} in --limit not found in inventory {inventory}",
                f"use the name of the {DATABASE_GROUP} host as the inventory spells it",
            )
    data.manager.subset(limit)
    selected = {host.name for host in data.manager.get_hosts(pattern=DATABASE_GROUP)}
    data.manager.subset(None)
    if db_host not in selected:
        raise TunefleetError(
            f"--limit {limit} does not select the {DATABASE_GROUP} host {db_host}, so nothing would run",
            f"use --limit {db_host}, or leave --limit out",
        )


_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _is_client_address(value: str) -> bool:
    """Accept what pg_hba.conf accepts: an IP address, a CIDR block, or a host name."""
    try:
        ipaddress.ip_network(value, strict=False)
        return True
    except ValueError:
        pass
    # A dotted run of digits that is no IP address (127.0.0.300) is a typo, not a name.
    return bool(_HOSTNAME.fullmatch(value)) and not re.fullmatch(r"[0-9.]+", value)


def _check_client_addresses(inventory: Path, data: InventoryData, db_variables: dict[str, Any]) -> None:
    """Reject addresses that would make PostgreSQL drop the whole pg_hba.conf."""
    candidates = []
    if "gpu" in data.manager.groups:
        for host in data.manager.groups["gpu"].get_hosts():
            address = str(data.variables.get_vars(host=host).get("ansible_host", host.name))
            candidates.append((f"gpu host {host.name}", "ansible_host", address))
    operator = str(db_variables.get("postgresql_operator_address") or "")
    if operator:
        candidates.append(("the db host", "postgresql_operator_address", operator))
    for owner, variable, address in candidates:
        if not _is_client_address(address):
            raise TunefleetError(
                f"{owner} in inventory {inventory} has an invalid {variable}: {address!r}",
                "use an IP address, a CIDR block or a host name",
            )


def _connection_variables(data: InventoryData) -> dict[str, dict[str, Any]]:
    names = ("ansible_host", "ansible_port", "ansible_user")
    connections = {}
    for host in data.manager.get_hosts():
        variables = data.variables.get_vars(host=host)
        connections[host.name] = {name: variables[name] for name in names if name in variables}
    return connections
