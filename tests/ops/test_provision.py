"""Provisioning tests against real Ansible, a real PostgreSQL server and real files."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from rich.console import Console

from ops import provision
from ops.errors import TunefleetError
from ops.progress import PlaybookProgress
from ops.paths import state_dir
from ops.provision import DatabaseServer, database_server, password_file_for, provision_database
from ops.secrets import ensure_password, read_secret_file, write_secret_file
from tests.conftest import LOCAL_INVENTORY, free_port, provision_test_server


def connect(server: DatabaseServer):
    return psycopg2.connect(
        host=server.host,
        port=server.port,
        user=server.role,
        password=read_secret_file(server.password_file),
        dbname=server.database,
        connect_timeout=10,
    )


@pytest.mark.slow
def test_first_run_serves_password_login(first_provisioning):
    assert first_provisioning.result.ok
    assert first_provisioning.result.changed > 0
    with connect(first_provisioning.server) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_user, current_database(), pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()")
        assert cursor.fetchone() == ("optuna", "optuna", "UTF8")


@pytest.mark.slow
def test_wrong_password_rejected(provisioned_server):
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=provisioned_server.host,
            port=provisioned_server.port,
            user=provisioned_server.role,
            password="not-the-password",
            dbname=provisioned_server.database,
            connect_timeout=10,
        )


@pytest.mark.slow
def test_second_run_changes_nothing_and_keeps_data(first_provisioning):
    with connect(first_provisioning.server) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        cursor.execute("INSERT INTO kept VALUES ('before the second run')")

    second = provision_test_server(first_provisioning.prefix, first_provisioning.server.port)

    assert second.result.ok, second.result.failures
    assert second.result.changed == 0, second.result.recap
    with connect(second.server) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT value FROM kept")
        assert ("before the second run",) in cursor.fetchall()


@pytest.mark.slow
def test_password_absent_from_artifacts_and_events(first_provisioning):
    password = read_secret_file(first_provisioning.server.password_file)
    runs = state_dir() / "runs"
    leaks = [
        path for path in runs.rglob("*")
        if path.is_file() and password.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert password not in json.dumps(first_provisioning.events, default=str)
    assert password not in json.dumps(first_provisioning.extravars)


@pytest.mark.slow
def test_password_file_mode_0600(provisioned_server):
    mode = stat.S_IMODE(provisioned_server.password_file.stat().st_mode)
    assert mode == 0o600


@pytest.mark.slow
def test_storage_url_masks_password(provisioned_server):
    password = read_secret_file(provisioned_server.password_file)
    masked = provisioned_server.storage_url()
    assert password not in masked
    assert masked == f"postgresql+psycopg2://optuna:***@127.0.0.1:{provisioned_server.port}/optuna"
    assert password in provisioned_server.storage_url(masked=False)


@pytest.mark.slow
def test_taken_port_fails_before_initdb(tunefleet_home, server_base_dir):
    prefix = server_base_dir / "taken-port"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        provisioning = provision_test_server(prefix, port)

    assert not provisioning.result.ok
    assert provisioning.result.rc != 0
    expected = (
        f"port {port} on 127.0.0.1 is already in use by another process; "
        "set postgresql_port to a free port"
    )
    assert any(failure.endswith(expected) for failure in provisioning.result.failures), provisioning.result.failures
    assert all("\n" not in failure for failure in provisioning.result.failures)
    assert not (prefix / "data").exists()


def test_move_to_taken_port_keeps_server(first_provisioning):
    """A running server asked to move to a taken port fails before anything stops it."""
    server = first_provisioning.server
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        moved = provision_test_server(
            first_provisioning.prefix, taken,
            **{key: value for key, value in first_provisioning.extravars.items()
               if key not in ("postgresql_prefix", "postgresql_port")},
        )

    assert not moved.result.ok
    assert any(f"port {taken} on 127.0.0.1 is already in use" in line for line in moved.result.failures)
    with psycopg2.connect(host=server.host, port=server.port, dbname=server.database, user=server.role,
                          password=read_secret_file(server.password_file), connect_timeout=10) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)


def test_extravars_with_password_rejected(tunefleet_home):
    with pytest.raises(TunefleetError, match="postgresql_password looks like a secret"):
        provision_database(LOCAL_INVENTORY, no_sudo=True, extravars={"postgresql_password": "x"})


def test_ensure_password_reuses_file(tmp_path):
    path = tmp_path / "secrets" / "db.password"
    first = ensure_password(path)
    assert ensure_password(path) == first
    assert len(first) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_readable_secret_rejected_with_chmod_hint(tmp_path):
    path = tmp_path / "db.password"
    path.write_text("secret")
    path.chmod(0o644)
    with pytest.raises(TunefleetError) as raised:
        ensure_password(path)
    message = str(raised.value)
    assert "\n" not in message
    assert f"chmod 600 {path}" in message


def test_write_secret_file_replaces_atomically(tmp_path):
    path = tmp_path / "value"
    write_secret_file(path, "one")
    write_secret_file(path, "two")
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["value"]


def test_malformed_inventory_names_line(tmp_path, tunefleet_home):
    inventory = tmp_path / "broken.yml"
    inventory.write_text("all:\n  children:\n    db: [\n")
    with pytest.raises(TunefleetError, match=r"not valid YAML at line 4"):
        provision_database(inventory, no_sudo=True)


def test_password_file_named_after_server(tmp_path, first_provisioning):
    """Two inventories naming the same server share its password instead of rotating it."""
    copy = tmp_path / "another-name.yml"
    copy.write_text(LOCAL_INVENTORY.read_text())
    described = database_server(copy, first_provisioning.extravars, Path())
    assert password_file_for(described.host, described.role) == first_provisioning.server.password_file


def _inventory_with(tmp_path, db_vars=None, gpu_hosts=None) -> Path:
    inventory = {"all": {"children": {
        "db": {"hosts": {"localhost": {"ansible_connection": "local", **(db_vars or {})}}},
        "gpu": {"hosts": gpu_hosts or {}},
    }}}
    path = tmp_path / "fleet.yml"
    path.write_text(json.dumps(inventory))
    return path


def test_limit_without_db_host_rejected(tmp_path, tunefleet_home):
    inventory = _inventory_with(tmp_path, gpu_hosts={"gpu1": {"ansible_host": "127.0.0.5"}})
    with pytest.raises(TunefleetError, match="--limit gpu1 does not select the db host localhost"):
        provision_database(inventory, no_sudo=True, limit="gpu1")


def test_invalid_gpu_address_rejected(tmp_path, tunefleet_home):
    inventory = _inventory_with(tmp_path, gpu_hosts={"gpu1": {"ansible_host": "127.0.0.300"}})
    with pytest.raises(TunefleetError, match=r"gpu host gpu1 .* invalid ansible_host: '127.0.0.300'"):
        provision_database(inventory, no_sudo=True)


def test_invalid_port_rejected(tmp_path, tunefleet_home):
    inventory = _inventory_with(tmp_path, db_vars={"postgresql_port": "abc"})
    with pytest.raises(TunefleetError, match="invalid postgresql_port 'abc'"):
        provision_database(inventory, no_sudo=True)


def test_empty_secret_file_rejected(tmp_path):
    path = tmp_path / "db.password"
    write_secret_file(path, "")
    with pytest.raises(TunefleetError, match="is empty"):
        read_secret_file(path)


PORT_CHECK = Path(__file__).resolve().parents[2] / "playbooks" / "roles" / "postgresql" / "files" / "port_in_use.py"


def _port_check(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PORT_CHECK), *arguments], capture_output=True, text=True, timeout=30)


def test_port_check_names_each_problem():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = _port_check(str(port), "127.0.0.1")
        held_by_server = _port_check(str(port), "127.0.0.1", "ignore-in-use")

    assert taken.returncode == 1
    assert taken.stdout.strip() == (f"port {port} on 127.0.0.1 is already in use by another process; "
                                    "set postgresql_port to a free port")
    assert held_by_server.returncode == 0

    # 192.0.2.1 is reserved for documentation, so no host has it; binding sends nothing.
    foreign = _port_check(str(free_port()), "127.0.0.1,192.0.2.1")
    assert foreign.returncode == 1
    assert foreign.stdout.strip().startswith("listen address 192.0.2.1 is not an address of this host")


def test_check_mode_explains_fresh_host(tunefleet_home, server_base_dir):
    """Check mode on a host without data shows the role's explanation, not only a count."""
    console = Console(record=True, width=200)
    result, _ = provision_database(
        LOCAL_INVENTORY, no_sudo=True, check=True,
        extravars={"postgresql_prefix": str(server_base_dir / "never-created"), "postgresql_port": free_port(),
                   "postgresql_start_on_boot": False},
        on_event=PlaybookProgress(console),
    )
    assert result.ok, result.failures
    assert "check mode:" in console.export_text()
    assert not (server_base_dir / "never-created" / "data").exists()


def test_check_mode_without_account_creates_none(tunefleet_home, server_base_dir):
    console = Console(record=True, width=200)
    result, _ = provision_database(
        LOCAL_INVENTORY, no_sudo=True, check=True,
        extravars={"postgresql_user_space_account": "tf-never-made", "postgresql_port": free_port(),
                   "postgresql_prefix": str(server_base_dir / "no-account"), "postgresql_start_on_boot": False},
        on_event=PlaybookProgress(console),
    )
    assert result.ok, result.failures
    assert "account tf-never-made does not exist" in console.export_text()
    with pytest.raises(KeyError):
        pwd.getpwnam("tf-never-made")


def test_playbook_run_restores_signal_handlers():
    def handler(number, frame):
        raise AssertionError("the run's own handler should be active")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with provision._signals_cancel_run() as cancel_requested:
            assert cancel_requested() is False
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_playbook_cancels_then_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with provision._signals_cancel_run() as cancel_requested:
            os.kill(os.getpid(), signal.SIGINT)
            assert cancel_requested() is True
    assert signal.getsignal(signal.SIGINT) is before
