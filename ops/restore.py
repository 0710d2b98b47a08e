"""Restore a backup onto a host: install the same major, unpack, start, prove the studies came back.

A physical backup restores only onto the same PostgreSQL major version, so a different
major is rejected before anything changes. `tunefleet study export` moves studies across
majors instead.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import backups, provision
from ops.backups import BackupHost
from ops.errors import TunefleetError
from ops.secrets import ensure_password

RESTORE_PLAYBOOK = "restore.yml"


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
    or is set to another major. Install PostgreSQL there with the provisioning role, then
    replace the fresh, empty cluster that the role made with the backup. Run the role
    again so that it writes the target's own settings and starts the server. Last,
    compare the restored studies with the backup's study manifest.
    """
    if not no_sudo:
        # TODO: system mode restores once the postgresql role can install a cluster without
        # initdb; pg_createcluster writes /etc/postgresql/N/main, which config.tar replaces.
        raise TunefleetError("restore supports servers provisioned with --no-sudo only",
                             "restore into user space with --no-sudo, or move studies with tunefleet study export")
    source = backups.open_backup_host(inventory, no_sudo=no_sudo, backup_dir=backup_dir)
    try:
        record = _good_record(source, name)
        target_host = _target_backup_host(inventory, target, source)
        major = int(record["postgresql_version"])
        data_dir = str(Path(target_host.site.env_script).parent / "data")
        _check_target(target_host, inventory, target, major, data_dir)

        _install(inventory, target, major, on_event)
        _drop_fresh_cluster(target_host, data_dir)
        _unpack(target_host, source, name, data_dir)
        _install(inventory, target, major, on_event)

        restored = backups.live_study_manifest(target_host)
    finally:
        if source.connection is not None:
            source.connection.close()
    report = RestoreReport(backup=name, target=target, postgresql_version=major, data_dir=data_dir,
                           server=target_server(inventory, target), studies=restored)
    report.problems = backups.compare_study_manifests(record.get("studies") or [], restored)
    return report


def _good_record(source: BackupHost, name: str) -> dict[str, Any]:
    records = {record["name"]: record for record in backups.list_backups(source)["backups"]}
    record = records.get(name)
    if record is None or record.get("status") != "good":
        good = [entry for entry, value in records.items() if value.get("status") == "good"]
        state = "not found" if record is None else f"not good (status {record.get('status')})"
        raise TunefleetError(f"backup {name} is {state} in {source.site.backup_dir}",
                             f"pick a good backup: {', '.join(good) or 'none yet'} (tunefleet backup list)")
    return record


def _target_backup_host(inventory: Path, target: str, source: BackupHost) -> BackupHost:
    data = provision.load_inventory(inventory)
    host = data.manager.get_host(target)
    if host is None:
        raise TunefleetError(f"host {target} not found in inventory {inventory}",
                             "add the new database machine to the inventory under any group, then pass its name")
    variables = data.variables.get_vars(host=host)
    if variables.get("ansible_connection") != "local":
        # TODO: copy the backup between hosts over SFTP; until then the backup must be on
        # the machine that is restored, which holds when both are reached locally.
        raise TunefleetError(f"restoring onto the remote host {target} is not supported yet",
                             "copy the backup directory to the new machine and restore there with "
                             "ansible_connection=local, or move studies with tunefleet study export")
    site = backups._site_for(variables, no_sudo=True, login=source.login_account, runner=backups.run_locally,
                             backup_dir=None)
    return BackupHost(site, backups.run_locally, source.login_account)


def _check_target(target_host: BackupHost, inventory: Path, target: str, major: int, data_dir: str) -> None:
    variables = provision.load_inventory(inventory)
    configured_major = str(
        variables.variables.get_vars(host=variables.manager.get_host(target)).get("postgresql_version") or "")
    if configured_major and configured_major != str(major):
        raise TunefleetError(
            f"backup is PostgreSQL {major}, but {target} is set to install PostgreSQL {configured_major}; "
            "a physical backup restores only onto the same major version",
            f"move the studies with: tunefleet study export NAME --to-env-file FILE (a {configured_major} server)")
    code, stdout, _ = target_host.runner(
        f"test -d {shlex.quote(data_dir)} && ls -A {shlex.quote(data_dir)} | head -1", "")
    if stdout.strip():
        raise TunefleetError(f"data directory {data_dir} on {target} is not empty; nothing was changed",
                             "restore onto a machine without a server, or move that directory away first")


def target_server(inventory: Path, target: str) -> provision.DatabaseServer:
    """Describe the restored server on `target` as Optuna workers reach it."""
    data = provision.load_inventory(inventory)
    variables = data.variables.get_vars(host=data.manager.get_host(target))
    described = provision._describe_server(target, variables, Path())
    password_file = provision.password_file_for(described.host, described.role)
    return dataclasses.replace(described, password_file=password_file)


def _install(inventory: Path, target: str, major: int, on_event: provision.EventHandler | None) -> None:
    password_file = target_server(inventory, target).password_file
    ensure_password(password_file)
    extravars = {
        "tunefleet_restore_target": target,
        "postgresql_install_mode": "user",
        "postgresql_version": str(major),
        "postgresql_password_file": str(password_file),
    }
    result = provision.run_playbook(RESTORE_PLAYBOOK, inventory, extravars, limit=target, on_event=on_event)
    if not result.ok:
        raise TunefleetError(f"installing PostgreSQL {major} on {target} failed: " + "; ".join(result.failures),
                             "fix the cause and run the same restore again")


def _drop_fresh_cluster(target_host: BackupHost, data_dir: str) -> None:
    """Stop the cluster that the role just initialised and remove it, after checking that it contains no study."""
    if backups.live_study_manifest(target_host):
        raise TunefleetError(f"the server at {data_dir} already contains studies; nothing was changed",
                             "restore onto a machine without a server")
    site = target_host.site
    script = (f". {shlex.quote(site.env_script)} && pg_ctl stop --wait --mode=fast --pgdata {shlex.quote(data_dir)}"
              f" && rm -rf {shlex.quote(data_dir)}")
    command = target_host.as_account(script)
    code, stdout, stderr = target_host.runner(command, "")
    if code != 0:
        raise TunefleetError(f"stopping the fresh server at {data_dir} failed: {(stderr or stdout).strip()[-500:]}")


def _unpack(target_host: BackupHost, source: BackupHost, name: str, data_dir: str) -> None:
    # Both hosts are this machine (see _target_backup_host), so the target reads the
    # source's backup directory in place.
    staged = BackupHost(dataclasses.replace(target_host.site, backup_dir=source.site.backup_dir),
                        target_host.runner, target_host.login_account)
    staged.call("unpack", name, "--data-dir", data_dir)
