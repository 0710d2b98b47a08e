"""Backups of a db host reached over SSH: a loopback sshd host with a user-space server."""

from __future__ import annotations

import shlex

import pytest
import yaml

from conftest import free_port
from ops.backups import create_backup, list_backups, open_backup_host, schedule_backups, verify_backup
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
        backup_dir = backup_host.site.backup_dir
        assert backup_dir.endswith("/.tunefleet/postgresql/backups")
        # The default directory does not exist until the first backup makes it.
        backup_host.runner(f"rm -rf {shlex.quote(backup_dir)}", "")

        record = create_backup(backup_host)
        code, stat, stderr = backup_host.runner(f"stat -c '%U %a' {shlex.quote(backup_dir)}", "")
        listed = list_backups(backup_host)
        drill = verify_backup(backup_host, record["name"], restore=True)
    finally:
        backup_host.connection.close()

    assert record["status"] == "good"
    assert code == 0, stderr
    assert stat.split() == [backup_host.login_account, "700"]
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
    assert "mkdir -m 700 /nonexistent/backups" in caught.value.hint


def test_list_missing_explicit_dir_names_option(ssh_db):
    inventory, _ = ssh_db
    backup_host = open_backup_host(inventory, no_sudo=True, backup_dir="/nonexistent/backups")
    try:
        with pytest.raises(TunefleetError) as caught:
            list_backups(backup_host)
    finally:
        backup_host.connection.close()

    assert "/nonexistent/backups not found" in str(caught.value)
    assert "--backup-dir" in caught.value.hint
    assert "backup create first" not in caught.value.hint


def test_schedule_without_root_installs_cron_job(ssh_db):
    inventory, _ = ssh_db
    backup_host = open_backup_host(inventory, no_sudo=True)
    host_account = backup_host.login_account
    backup_dir = backup_host.site.backup_dir
    try:
        first = schedule_backups(inventory, backup_host, hour=2, minute=30, keep_daily=7, keep_weekly=4)
        second = schedule_backups(inventory, backup_host, hour=2, minute=30, keep_daily=7, keep_weekly=4)
        code, crontab, stderr = backup_host.runner("crontab -l", "")
        code_stat, stat, stat_error = backup_host.runner(f"stat -c '%U %a' {shlex.quote(backup_dir)}", "")
    finally:
        # The spool entry would outlive the account that the host fixture removes.
        backup_host.runner("crontab -r", "")
        backup_host.connection.close()

    assert host_account != "root"
    assert first.ok, first.failures
    assert second.ok, second.failures
    assert second.changed == 0
    assert code == 0, stderr
    assert f"30 2 * * * {backup_dir}/.tunefleet/nightly.sh" in crontab
    assert code_stat == 0, stat_error
    assert stat.split() == [host_account, "700"]


def test_forgotten_no_sudo_hints_at_flag(ssh_db):
    inventory, _ = ssh_db
    # Without --no-sudo the site is system mode, which the host's account may not sudo into.
    backup_host = open_backup_host(inventory, no_sudo=False)
    try:
        with pytest.raises(TunefleetError) as caught:
            list_backups(backup_host)
    finally:
        backup_host.connection.close()

    assert "sudo: a password is required" in str(caught.value)
    assert "pass --no-sudo" in caught.value.hint
    assert "sudo -n" in caught.value.hint
