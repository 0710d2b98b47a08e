"""Restore a backup onto a host: install the same major, unpack, start, prove the studies came back.

A physical backup restores only onto the same PostgreSQL major version, so a different
major is rejected before anything changes. `tunefleet study export` moves studies across
majors instead.

When the target is another machine than the db host, the backup's files travel over SFTP
through the operator's machine into a staging directory on the target, and the backup
script checks their checksums there before it unpacks anything.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import backups, provision
from ops import inventory as inventory_module
from ops.backup_copy import copy_backup
from ops.backups import BackupHost
from ops.errors import TunefleetError
from ops.secrets import ensure_password

RESTORE_PLAYBOOK = "restore.yml"

# Directory that receives a copied backup until it is unpacked: under the prefix in user
# mode, in the postgres account's home (SYSTEM_HOME) in system mode.
STAGING_DIR = "restore-staging"
SYSTEM_HOME = "/var/lib/postgresql"

# Label of the host that a backup is restored onto, in error messages.
TARGET_ROLE = "restore target"


@dataclass
class RestoreReport:
    backup: str
    target: str
    postgresql_version: int
    data_dir: str
    server: provision.DatabaseServer
    studies: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"backup": self.backup, "target": self.target, "postgresql_version": self.postgresql_version,
                "data_dir": self.data_dir, "storage_url": self.server.storage_url(masked=True), "studies": self.studies, "problems": self.problems, "ok": self.ok}


def restore_backup(inventory: Path, name: str, target: str, *, no_sudo: bool, backup_dir: str | None = None,
                   on_event: provision.EventHandler | None = None) -> RestoreReport:
    """Restore backup `name` of the inventory's db host onto inventory host `target`.

    The steps: read the backup's record, and reject a target that has a data directory
    or is set to another major. Install PostgreSQL there with the provisioning role and
    postgresql_initdb false, so no cluster is made. Copy the backup to the target when
    it is another machine, and unpack it into the empty data directory (and, in system
    mode, its configuration into /etc/postgresql/N/main). Run the role again so that it
    writes the target's own settings and starts the server. Last, compare the restored
    studies with the backup's study manifest.
    """
    source = backups.open_backup_host(inventory, no_sudo=no_sudo, backup_dir=backup_dir)
    target_host = None
    try:
        record = _good_record(source, name)
        major = int(record["postgresql_version"])
        target_host = _target_backup_host(inventory, target, no_sudo=no_sudo, major=major)
        layout = _Layout.of(target_host.site, major)
        _check_target(target_host, inventory, target, major, layout)

        _install(inventory, target, major, on_event, no_sudo=no_sudo, initdb=False)
        _restore_files(source, target_host, record, layout)
        _install(inventory, target, major, on_event, no_sudo=no_sudo)

        restored = backups.live_study_manifest(target_host)
    finally:
        for host in (source, target_host):
            if host is not None and host.connection is not None:
                host.connection.close()
    report = RestoreReport(backup=name, target=target, postgresql_version=major, data_dir=layout.data_dir,
                           server=target_server(inventory, target), studies=restored)
    report.problems = backups.compare_study_manifests(record.get("studies") or [], restored)
    return report


@dataclass(frozen=True)
class _Layout:
    """Paths of the restored server's files on the target."""

    data_dir: str
    # The cluster's configuration directory outside the data directory (system mode only).
    config_dir: str | None
    staging_dir: str

    @classmethod
    def of(cls, site: backups.BackupSite, major: int) -> _Layout:
        if site.env_script:
            prefix = str(Path(site.env_script).parent)
            return cls(f"{prefix}/data", None, f"{prefix}/{STAGING_DIR}")
        # Debian's cluster N/main, as the postgresql role's system mode creates it.
        return cls(f"{SYSTEM_HOME}/{major}/main", site.config_dir, f"{SYSTEM_HOME}/{STAGING_DIR}")


def _good_record(source: BackupHost, name: str) -> dict[str, Any]:
    records = {record["name"]: record for record in backups.list_backups(source)["backups"]}
    record = records.get(name)
    if record is None or record.get("status") != "good":
        good = [entry for entry, value in records.items() if value.get("status") == "good"]
        if record is None:
            state = "not found"
        elif record.get("status") == "damaged":
            state = f"marked damaged by a failed verify ({record.get('error')})"
        else:
            state = f"not good (status {record.get('status')})"
        raise TunefleetError(f"backup {name} is {state} in {source.site.backup_dir}",
                             f"pick a good backup: {', '.join(good) or 'none yet'} (tunefleet backup list)")
    return record


def _target_backup_host(inventory: Path, target: str, *, no_sudo: bool, major: int) -> BackupHost:
    from ops.fleet.connection import Timeouts
    from ops.inventory import host_from_variables

    data = inventory_module.load_inventory(inventory)
    host = data.manager.get_host(target)
    if host is None:
        raise TunefleetError(f"host {target} not found in inventory {inventory}",
                             "add the new database machine to the inventory under any group, then pass its name")
    variables = {**data.variables.get_vars(host=host), "postgresql_version": str(major)}
    if variables.get("ansible_connection") == "local":
        login = backups.current_account()
        return BackupHost(_target_site(target, variables, no_sudo, login, backups.run_locally),
                          backups.run_locally, login, role=TARGET_ROLE)

    connection = backups.open_connection(host_from_variables(target, variables), Timeouts(), TARGET_ROLE)
    runner = backups.run_over_ssh(connection, TARGET_ROLE)
    login = str(variables.get("ansible_user") or backups.current_account())
    try:
        site = _target_site(target, variables, no_sudo, login, runner)
    except BaseException:
        connection.close()
        raise
    return BackupHost(site, runner, login, connection, role=TARGET_ROLE)


def _target_site(target: str, variables: dict[str, Any], no_sudo: bool, login: str,
                 runner: backups.CommandRunner) -> backups.BackupSite:
    try:
        return backups._site_for(variables, no_sudo=no_sudo, login=login, runner=runner, backup_dir=None,
                                 role=TARGET_ROLE)
    except backups.AccountNotFound as error:
        # In user mode as root, the prefix lies in the home of an account that the role
        # creates, so a fresh target has no prefix to check yet.
        raise TunefleetError(f"{TARGET_ROLE} {target}: {error.message}",
                             f"set postgresql_prefix for {target} in the inventory, or create the account "
                             "that will run the server first") from None


def _check_target(target_host: BackupHost, inventory: Path, target: str, major: int, layout: _Layout) -> None:
    variables = inventory_module.load_inventory(inventory)
    configured_major = str(
        variables.variables.get_vars(host=variables.manager.get_host(target)).get("postgresql_version") or "")
    if configured_major and configured_major != str(major):
        raise TunefleetError(
            f"backup is PostgreSQL {major}, but {target} is set to install PostgreSQL {configured_major}; "
            "a physical backup restores only onto the same major version",
            f"move the studies with: tunefleet study export NAME --to-env-file FILE (a {configured_major} server)")

    # Prints each directory that has entries. An unreadable one fails, rather than reading as empty.
    directories = " ".join(shlex.quote(path) for path in (layout.data_dir, layout.config_dir) if path)
    script = (f'for d in {directories}; do if [ -d "$d" ]; then n=$(ls -A "$d") || exit 3; '
              f'[ -z "$n" ] || echo "$d"; fi; done')
    code, stdout, stderr = target_host.runner(_as_root(target_host, script), "")
    if code != 0:
        raise TunefleetError(f"reading {directories} on {target} failed: {(stderr or stdout).strip()[-500:]}",
                             "check that the login account may use sudo -n on the target, or log in as root")
    if stdout.strip():
        raise TunefleetError(f"{', '.join(stdout.split())} on {target} is not empty; nothing was changed",
                             "restore onto a machine without a server, or move that directory away first")


def _as_root(host: BackupHost, script: str) -> str:
    """Wrap `script` to run as root in system mode, where the postgres account may not exist yet.

    In user mode the login account is root or the server's account, and either one can
    read the data directory.
    """
    if host.login_account == "root" or host.site.env_script:
        return script
    return f"sudo -n sh -c {shlex.quote(script)}"


def target_server(inventory: Path, target: str) -> provision.DatabaseServer:
    """Describe the restored server on `target` as Optuna workers reach it."""
    data = inventory_module.load_inventory(inventory)
    variables = data.variables.get_vars(host=data.manager.get_host(target))
    described = provision._describe_server(target, variables, Path())
    password_file = provision.password_file_for(described.host, described.role)
    return dataclasses.replace(described, password_file=password_file)


def _install(inventory: Path, target: str, major: int, on_event: provision.EventHandler | None, *,
             no_sudo: bool, initdb: bool = True) -> None:
    password_file = target_server(inventory, target).password_file
    ensure_password(password_file)
    extravars = {
        "tunefleet_restore_target": target,
        "postgresql_install_mode": "user" if no_sudo else "system",
        "postgresql_version": str(major),
        "postgresql_password_file": str(password_file),
        "postgresql_initdb": initdb,
    }
    result = provision.run_playbook(RESTORE_PLAYBOOK, inventory, extravars, limit=target, on_event=on_event)
    if not result.ok:
        raise TunefleetError(f"installing PostgreSQL {major} on {target} failed: " + "; ".join(result.failures),
                             "fix the cause and run the same restore again")


def _restore_files(source: BackupHost, target_host: BackupHost, record: dict[str, Any], layout: _Layout) -> None:
    """Unpack a backup on the target, copying it there first unless both hosts are this machine."""
    name = record["name"]
    # The restored cluster's roles are the source's, so the target's account may need its own.
    unpack = ["unpack", name, "--data-dir", layout.data_dir, "--owner-role", target_host.site.account,
              "--bootstrap-role", source.site.account]
    if layout.config_dir:
        unpack += ["--config-dir", layout.config_dir]
    if source.connection is None and target_host.connection is None:
        # The target reads the source's backup directory in place.
        in_place = BackupHost(dataclasses.replace(target_host.site, backup_dir=source.site.backup_dir),
                              target_host.runner, target_host.login_account, role=TARGET_ROLE)
        in_place.call(*unpack)
        return

    staging = shlex.quote(layout.staging_dir)
    _run_as_account(target_host, f"rm -rf {staging} && mkdir -m 700 {staging}")
    try:
        copy_backup(source, target_host, name, f"{layout.staging_dir}/{name}")
        staged = BackupHost(dataclasses.replace(target_host.site, backup_dir=layout.staging_dir),
                            target_host.runner, target_host.login_account, role=TARGET_ROLE)
        # unpack compares every copied file with SHA256SUMS before it writes anything.
        staged.call(*unpack)
    finally:
        _run_as_account(target_host, f"rm -rf {staging}")


def _run_as_account(target_host: BackupHost, script: str) -> None:
    code, stdout, stderr = target_host.runner(target_host.as_account(script), "")
    if code != 0:
        raise TunefleetError(f"on the restore target, {script} failed (exit {code}): {(stderr or stdout).strip()[-500:]}")
