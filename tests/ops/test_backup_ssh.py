"""Backups of a db host reached over SSH: a loopback sshd host with a user-space server."""

from __future__ import annotations

import shlex

import pytest
import yaml

from conftest import free_port
from ops.backups import create_backup, list_backups, open_backup_host, verify_backup
from ops.errors import TunefleetError
from ops.provision import provision_database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ssh_db(tunefleet_home, ssh_host_factory, tmp_path_factory):
    """A db host over SSH with a server provisioned without sudo."""
    host = ssh_host_factory("backupdb", 47)
    inventory = tmp_path_factory.mktemp("backup-ssh") / "fleet.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "db": {"hosts": {host.name: host.inventory_vars()}},
        "gpu": {"hosts": {}},
    }}}))
    result, server = provision_database(inventory, no_sudo=True, extravars={
        "postgresql_port": free_port(), "postgresql_start_on_boot": False,
    })
    assert result.ok, result.failures
    return inventory, server


def test_backup_over_ssh_creates_and_drills(ssh_db):
    inventory, server = ssh_db
    backup_host = open_backup_host(inventory, no_sudo=True)
    try:
        assert backup_host.site.backup_dir.endswith("/.tunefleet/postgresql/backups")
        code, _, stderr = backup_host.runner(f"mkdir -m 700 -p {shlex.quote(backup_host.site.backup_dir)}", "")
        assert code == 0, stderr

        record = create_backup(backup_host)
        listed = list_backups(backup_host)
        drill = verify_backup(backup_host, record["name"], restore=True)
    finally:
        backup_host.connection.close()

    assert record["status"] == "good"
    assert [entry["name"] for entry in listed["backups"]] == [record["name"]]
    assert drill["verified"] is True
    assert drill["drill"]["studies"] == []


def test_backup_over_ssh_missing_dir_fails(ssh_db):
    inventory, _ = ssh_db
    backup_host = open_backup_host(inventory, no_sudo=True, backup_dir="/nonexistent/backups")
    try:
        with pytest.raises(TunefleetError) as caught:
            create_backup(backup_host)
    finally:
        backup_host.connection.close()

    assert "/nonexistent/backups not found" in str(caught.value)
