"""Backups of the database server: run the backup script on the db host and read its results.

The work itself happens in playbooks/roles/backup/files/tunefleet_backup.py, a
standard-library script that the nightly job runs on the db host too. This module
passes that script to the host as a command-line argument, runs it as the account that
owns the server (locally or over SSH), and turns its JSON output into Python values or
a TunefleetError."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pwd
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ops import inventory as inventory_module
from ops.errors import TunefleetError
from ops.paths import playbook_dir

BACKUP_SCRIPT = playbook_dir() / "roles" / "backup" / "files" / "tunefleet_backup.py"

# Seconds one call of the backup script may take. A base backup of an Optuna database
# of a few GB takes minutes; a restore drill adds an unpack and a server start.
SCRIPT_TIMEOUT_S = 3600

# Seconds an interrupted backup script may take to remove its partial directory.
INTERRUPT_GRACE_S = 60

# Messages of `sudo -n` when the login account cannot switch to the server's account
# without a password or a terminal.
SUDO_DENIALS = ("sudo: a password is required", "sudo: a terminal is required")


@dataclass(frozen=True)
class BackupSite:
    """Where the server's backups live and how the backup script reaches the server.

    `env_script` is the role's env.sh in user mode, which puts the server's binaries on
    PATH and sets PGHOST and PGPORT. In system mode there is none, and `bin_dir` and
    `environment` (PGHOST, PGPORT) give the same. `server_bin_dir` is the directory of
    pg_ctl for the restore drill when the client tools come from another installation.
    `default_dir` is true when `backup_dir` is the site's default rather than one the
    user passed, so `create` makes it on first use.
    """

    backup_dir: str
    account: str
    env_script: str | None = None
    bin_dir: str | None = None
    server_bin_dir: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    config_dir: str | None = None
    database: str = "optuna"
    python: str = "python3"
    default_dir: bool = False

    @classmethod
    def user_mode(cls, prefix: Path | str, account: str, *, backup_dir: str | None = None,
                  database: str = "optuna") -> BackupSite:
        """Describe a server that the postgresql role installed under `prefix` without sudo."""
        prefix = str(prefix)
        return cls(backup_dir=backup_dir or f"{prefix}/backups", account=account,
                   env_script=f"{prefix}/env.sh", database=database, default_dir=backup_dir is None)


class CommandRunner(Protocol):
    def __call__(self, command: str, stdin: str) -> tuple[int, str, str]: ...


def current_account() -> str:
    """Return the name of the account that runs this process."""
    return pwd.getpwuid(os.geteuid()).pw_name


def run_locally(command: str, stdin: str) -> tuple[int, str, str]:
    # A session of its own, so that the signals below reach su and the script, and a
    # Ctrl-C in the terminal reaches them only through this process.
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(stdin, timeout=SCRIPT_TIMEOUT_S)
        except KeyboardInterrupt:
            _let_script_clean_up(process)
            raise
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            raise
    return process.returncode, stdout, stderr


def _let_script_clean_up(process: subprocess.Popen) -> None:
    """Send the backup script SIGTERM and wait while it removes its partial directory and records the attempt.

    subprocess.run would kill it 0.25 s after Ctrl-C, too soon to remove a large partial
    directory.
    """
    # NOTE: when the script runs under su, su passes SIGTERM on but sends SIGKILL 2 s
    # later (util-linux su), so a cleanup that takes longer leaves the partial directory
    # for the next backup create to remove.
    _signal_group(process, signal.SIGTERM)
    try:
        process.communicate(timeout=INTERRUPT_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def run_over_ssh(connection: Any, role: str = "db host") -> CommandRunner:
    """Return a runner for an ops.fleet.connection.HostConnection; `role` names the host in errors."""

    from ops.fleet.connection import HostError

    def runner(command: str, stdin: str) -> tuple[int, str, str]:
        try:
            result = connection.run(command, stdin=stdin or None, timeout=SCRIPT_TIMEOUT_S, check=False)
        except HostError as error:
            raise TunefleetError(f"{role} {connection.host.label}: {error}") from None
        return result.exited, result.stdout, result.stderr

    return runner


def open_connection(host: Any, timeouts: Any, role: str) -> Any:
    """Connect to inventory host `host` over SSH; `role` ("db host", "restore target") names it in errors.

    The key file is checked first, because paramiko reports a missing one as a failed
    connect, which reads like a host that is down.
    """
    from ops.fleet.connection import HostConnection, HostError

    key_file = host.private_key_file
    if key_file is not None and not key_file.is_file():
        raise TunefleetError(f"{role} {host.label}: SSH key file {key_file} not found",
                             f"fix ansible_ssh_private_key_file of {host.name} in the inventory")
    connection = HostConnection(host, timeouts)
    try:
        connection.open()
    except HostError as error:
        connection.close()
        raise TunefleetError(f"{role} {host.label}: {error}",
                             f"check ansible_host, ansible_port and ansible_user of {host.name} "
                             "in the inventory") from None
    return connection


@dataclass
class BackupHost:
    """A db host's backup site and the way to run commands there."""

    site: BackupSite
    runner: CommandRunner = run_locally
    # The account that runner's commands run as; "su" switches to site.account when they differ.
    login_account: str = field(default_factory=lambda: pwd.getpwuid(os.geteuid()).pw_name)
    # The SSH connection behind runner, if any, for the caller to close.
    connection: Any = None
    # What errors call the host: "db host", or "restore target" for the host of a restore.
    role: str = "db host"

    def call(self, *arguments: str) -> dict[str, Any]:
        """Run the backup script with `arguments` and return its JSON result."""
        command = self._command(arguments)
        code, stdout, stderr = self.runner(command, "")
        try:
            result = json.loads(stdout)
        except json.JSONDecodeError:
            tail = (stderr or stdout).strip()[-800:]
            raise TunefleetError(f"the backup script failed on the {self.role} (exit {code}): {tail}",
                                 self._failure_hint(stdout + stderr)) from None
        if "error" in result:
            raise TunefleetError(result["error"], result.get("hint"))
        return result

    def _failure_hint(self, output: str) -> str:
        if any(message in output for message in SUDO_DENIALS):
            return (f"pass --no-sudo if the server was provisioned with --no-sudo, or allow {self.login_account} "
                    f"to run commands as {self.site.account} with `sudo -n` (no password)")
        return f"check that {self.site.python} exists there and that {self.site.account} can reach the server"

    def _command(self, arguments: tuple[str, ...]) -> str:
        site = self.site
        options = ["--backup-dir", site.backup_dir, "--database", site.database]
        if site.default_dir:
            options.append("--default-dir")
        if site.bin_dir:
            options += ["--bin-dir", site.bin_dir]
        if site.server_bin_dir:
            options += ["--server-bin-dir", site.server_bin_dir]
        # The script travels as the argument of -c, not on stdin, because Fabric (invoke 2)
        # forwards stdin one byte per 10 ms, which takes minutes for a 30 kB script.
        source = BACKUP_SCRIPT.read_text()
        script = f"{shlex.quote(site.python)} -c {shlex.quote(source)} {shlex.join([*options, *arguments])}"
        if site.environment:
            script = f"env {shlex.join(f'{name}={value}' for name, value in site.environment.items())} {script}"
        if site.env_script:
            script = f". {shlex.quote(site.env_script)} && exec {script}"
        return self.as_account(script)

    def as_account(self, script: str) -> str:
        """Wrap shell `script` so that it runs as the server's account."""
        if self.site.account == self.login_account:
            return script
        # The script must run as the server's account, because peer authentication over
        # the socket is what lets it connect without a password.
        account = shlex.quote(self.site.account)
        if self.login_account == "root":
            return f"su {account} -s /bin/sh -c {shlex.quote(script)}"
        return f"sudo -n -u {account} sh -c {shlex.quote(script)}"


def create_backup(host: BackupHost, *, compression: str = "auto") -> dict[str, Any]:
    """Take a verified base backup; return its record."""
    arguments = ["create", "--compression", compression]
    if host.site.config_dir:
        arguments += ["--config-dir", host.site.config_dir]
    return host.call(*arguments)


def verify_backup(host: BackupHost, name: str, *, restore: bool = False) -> dict[str, Any]:
    """Check a backup's files; with `restore`, also run the restore drill on it."""
    return host.call("verify", name, *(["--restore"] if restore else []))


def list_backups(host: BackupHost, *, now: str | None = None) -> dict[str, Any]:
    """Return every backup record, oldest first, and warnings such as a stale newest backup."""
    return host.call("list", *(["--now", now] if now else []))


def prune_backups(host: BackupHost, *, keep_daily: int, keep_weekly: int, dry_run: bool) -> dict[str, Any]:
    """Delete backups beyond the retention; return the names kept and deleted."""
    if keep_daily < 1 and keep_weekly < 1:
        raise TunefleetError("--keep-daily and --keep-weekly are both 0",
                             "keep at least one daily or weekly backup; the newest good backup is kept anyway")
    arguments = ["prune", "--keep-daily", str(keep_daily), "--keep-weekly", str(keep_weekly)]
    return host.call(*arguments, *(["--dry-run"] if dry_run else []))


@functools.cache
def _backup_script_module() -> Any:
    spec = importlib.util.spec_from_file_location("tunefleet_backup", BACKUP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_study_manifests(expected: list[dict[str, Any]], restored: list[dict[str, Any]]) -> list[str]:
    """Return the ways `restored` lost studies or trials of `expected`, with the backup script's rules."""
    return _backup_script_module().compare_study_manifests(expected, restored)


def live_study_manifest(host: BackupHost) -> list[dict[str, Any]]:
    """Read the study manifest from the running server, as a backup would record it."""
    return host.call("studies")["studies"]


# Backup directory of system mode (Debian's cluster N/main) when --backup-dir sets none. It
# lies beside the cluster and belongs to the postgres account that runs it.
SYSTEM_BACKUP_DIR = "/var/lib/postgresql/tunefleet-backups"
SYSTEM_ACCOUNT = "postgres"
SYSTEM_SOCKET_DIR = "/var/run/postgresql"
# The postgresql role's default prefix in user mode, relative to the server account's home.
USER_PREFIX = ".tunefleet/postgresql"


def open_backup_host(inventory: Path, *, no_sudo: bool, backup_dir: str | None = None,
                     timeouts: Any = None) -> BackupHost:
    """Describe the backup site of the inventory's db host and how to reach it.

    A db host with ansible_connection=local runs the script here; any other is reached
    over SSH with the inventory's connection settings. The caller closes
    `host.connection` when there is one.
    """
    from ops import provision
    from ops.fleet.connection import Timeouts
    from ops.inventory import host_from_variables

    name, variables = provision._database_host(inventory, inventory_module.load_inventory(inventory))
    if variables.get("ansible_connection") == "local":
        runner: CommandRunner = run_locally
        login = pwd.getpwuid(os.geteuid()).pw_name
        connection = None
    else:
        connection = open_connection(host_from_variables(name, variables), timeouts or Timeouts(), "db host")
        runner = run_over_ssh(connection)
        login = str(variables.get("ansible_user") or pwd.getpwuid(os.geteuid()).pw_name)
    try:
        site = _site_for(variables, no_sudo=no_sudo, login=login, runner=runner, backup_dir=backup_dir)
    except BaseException:
        if connection is not None:
            connection.close()
        raise
    return BackupHost(site, runner, login, connection)


def _site_for(variables: dict[str, Any], *, no_sudo: bool, login: str, runner: CommandRunner,
              backup_dir: str | None, role: str = "db host") -> BackupSite:
    database = str(variables.get("postgresql_database", "optuna"))
    port = str(variables.get("postgresql_port", 5432))
    if no_sudo:
        # The same rule as the postgresql role: root hands the server to a dedicated account.
        account = str(variables.get("postgresql_user_space_account", "tunefleet")) if login == "root" else login
        prefix = (str(variables.get("postgresql_prefix") or "")
                  or f"{_home_of(account, runner, role)}/{USER_PREFIX}")
        return BackupSite.user_mode(prefix, account, backup_dir=backup_dir, database=database)
    major = str(variables.get("postgresql_version") or "") or _installed_major(runner, role)
    return BackupSite(
        backup_dir=backup_dir or SYSTEM_BACKUP_DIR, account=SYSTEM_ACCOUNT, default_dir=backup_dir is None,
        bin_dir=f"/usr/lib/postgresql/{major}/bin",
        environment={"PGHOST": SYSTEM_SOCKET_DIR, "PGPORT": port},
        config_dir=f"/etc/postgresql/{major}/main", database=database,
    )


class AccountNotFound(TunefleetError):
    """The server's account does not exist on the host, so its home and default prefix are unknown."""


def _home_of(account: str, runner: CommandRunner, role: str) -> str:
    code, stdout, stderr = runner(f"getent passwd {shlex.quote(account)}", "")
    fields = stdout.strip().split(":")
    if code != 0 or len(fields) < 6:
        raise AccountNotFound(f"account {account} not found on the {role}",
                             "provision the server first: tunefleet provision --no-sudo")
    return fields[5]


def _installed_major(runner: CommandRunner, role: str) -> str:
    code, stdout, _ = runner("ls /usr/lib/postgresql", "")
    majors = sorted((entry for entry in stdout.split() if entry.isdigit()), key=int)
    if code != 0 or not majors:
        raise TunefleetError(f"no PostgreSQL installation found under /usr/lib/postgresql on the {role}",
                             "provision the server first (tunefleet provision), or pass --no-sudo for user mode")
    return majors[-1]


def schedule_backups(inventory: Path, host: BackupHost, *, hour: int, minute: int, keep_daily: int,
                     keep_weekly: int, scheduler: str = "", on_event: Any = None) -> Any:
    """Install the nightly backup job on the db host with the backup role; return the playbook result."""
    from ops.provision import run_playbook

    site = host.site
    extravars = {
        "backup_account": site.account,
        "backup_dir": site.backup_dir,
        "backup_env_script": site.env_script or "",
        "backup_bin_dir": site.bin_dir or "",
        "backup_environment": dict(site.environment),
        "backup_config_dir": site.config_dir or "",
        "backup_database": site.database,
        "backup_scheduler": scheduler,
        "backup_hour": hour,
        "backup_minute": minute,
        "backup_keep_daily": keep_daily,
        "backup_keep_weekly": keep_weekly,
    }
    return run_playbook("backup.yml", inventory, extravars, on_event=on_event)
