"""System-mode provisioning: apt packages on fresh Debian hosts over real sshd and sudo.

Each fresh host is a debootstrap tree without systemd, acl or locales beyond C.UTF-8,
so the role must start the cluster with pg_ctlcluster and become postgres through
pipelining. Two tests install PostgreSQL: one keeps the cluster that Debian's postinst creates, and
the other needs the role's own pg_createcluster. The others stop before the install,
because it dominates the run time.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from support.sshd_hosts import FreshDebianHost, debootstrap_tarball, fresh_debian_host, write_inventory  # noqa: F401

from ops.provision import DatabaseServer, PlaybookResult, provision_database
from ops.secrets import read_secret_file
from tests.conftest import free_port

# The major of Debian 12's postgresql package, which the debootstrap hosts run.
DISTRIBUTION_MAJOR = "15"


def write_db_inventory(path: Path, host: FreshDebianHost, **host_vars: Any) -> Path:
    return write_inventory(path, {"db": [host]}, host_vars={host.name: host_vars})


def provision_system(inventory: Path, *, check: bool = False, **extravars: Any) -> tuple[PlaybookResult, DatabaseServer]:
    return provision_database(inventory, no_sudo=False, check=check, extravars=extravars)


def connect(server: DatabaseServer):
    return psycopg2.connect(
        host=server.host,
        port=server.port,
        user=server.role,
        password=read_secret_file(server.password_file),
        dbname=server.database,
        connect_timeout=10,
    )


def host_has_postgresql(host: FreshDebianHost) -> bool:
    return host.path_on_machine("/usr/lib/postgresql").exists() or host.path_on_machine("/etc/postgresql").exists()


@pytest.mark.slow
def test_system_mode_install_and_repeat(tunefleet_home, fresh_debian_host, tmp_path):
    host = fresh_debian_host("db-system", 4)
    # The host lacks setfacl, so becoming postgres works only through pipelining.
    assert not host.path_on_machine("/usr/bin/setfacl").exists()
    # A locale that the host lacks makes Debian's postinst skip creating the cluster,
    # so the role must create it with C.UTF-8.
    host.path_on_machine("/etc/default/locale").write_text("LANG=de_DE.UTF-8\n")
    port = free_port()
    inventory = write_db_inventory(tmp_path / "inventory.yml", host, postgresql_port=port)

    first, server = provision_system(inventory)

    assert first.ok, first.failures
    assert first.changed > 0
    assert server.host == host.address
    assert server.port == port
    with connect(server) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_user, current_database(), current_setting('server_version_num')")
        user, database, version_num = cursor.fetchone()
        assert (user, database) == ("optuna", "optuna")
        assert version_num.startswith(DISTRIBUTION_MAJOR)
        cursor.execute("SELECT datcollate, pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'optuna'")
        assert cursor.fetchone() == ("C.UTF-8", "UTF8")
        cursor.execute("CREATE TABLE kept (value text)")
        cursor.execute("INSERT INTO kept VALUES ('before the second run')")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=server.host, port=server.port, user=server.role,
                         password="not-the-password", dbname=server.database, connect_timeout=10)
    pg_version = host.path_on_machine(f"/var/lib/postgresql/{DISTRIBUTION_MAJOR}/main/PG_VERSION")
    assert pg_version.read_text().strip() == DISTRIBUTION_MAJOR

    second, _ = provision_system(inventory)

    assert second.ok, second.failures
    assert second.changed == 0, second.recap
    with connect(server) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT value FROM kept")
        assert cursor.fetchall() == [("before the second run",)]

    check, _ = provision_system(inventory, check=True)

    assert check.ok, check.failures
    assert check.changed == 0, check.recap

    # Only check mode runs the pgdg path here. get_url sends a request to the key's
    # server even in check mode, so a machine that cannot reach www.postgresql.org fails at that task.
    pgdg_check, _ = provision_system(inventory, check=True, postgresql_apt_source="pgdg")

    assert pgdg_check.ok or [failure.split(": ")[1] for failure in pgdg_check.failures] == [
        "Download the PostgreSQL apt repository's signing key"
    ], pgdg_check.failures
    assert not host.path_on_machine("/etc/apt/sources.list.d/pgdg.sources").exists()
    assert not host.path_on_machine("/etc/apt/keyrings/postgresql.asc").exists()


@pytest.mark.slow
def test_system_mode_port_in_use_then_restart(tunefleet_home, fresh_debian_host, tmp_path):
    host = fresh_debian_host("db-port", 5)
    port = free_port()
    inventory = write_db_inventory(tmp_path / "inventory.yml", host, postgresql_port=port)

    with socket.socket() as holder:
        holder.bind((host.address, port))
        holder.listen()
        rejected, _ = provision_system(inventory)

    assert not rejected.ok
    expected = f"port {port} on {host.address} is already in use by another process; set postgresql_port to a free port"
    assert [failure.split(": ", 2)[-1] for failure in rejected.failures] == [expected]

    # With the host's usual locale, Debian's postinst created the cluster on its default
    # port. invoke-rc.d does not start it inside a chroot, as it would in a container, so
    # the test starts it, and this run must move it to the requested port with a restart.
    started = host.run(f"sudo pg_ctlcluster {DISTRIBUTION_MAJOR} main start")
    assert started.returncode == 0, started.stderr
    events: list[dict[str, Any]] = []
    second, server = provision_database(inventory, no_sudo=False, on_event=events.append)

    assert second.ok, second.failures
    restarts = [
        event for event in events
        if event.get("event") == "runner_on_ok"
        and event["event_data"].get("task") == "Restart the cluster with pg_ctlcluster"
    ]
    assert len(restarts) == 1
    with connect(server) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('port')")
        assert cursor.fetchone() == (str(port),)


@pytest.mark.slow
def test_system_mode_check_changes_nothing(tunefleet_home, fresh_debian_host, tmp_path):
    host = fresh_debian_host("db-check", 6)
    inventory = write_db_inventory(tmp_path / "inventory.yml", host, postgresql_port=free_port())

    result, _ = provision_system(inventory, check=True)

    assert result.ok, result.failures
    assert not host_has_postgresql(host)
    assert not host.path_on_machine("/usr/lib/python3/dist-packages/psycopg2").exists()


@pytest.mark.slow
def test_system_mode_unavailable_major_fails(tunefleet_home, fresh_debian_host, tmp_path):
    host = fresh_debian_host("db-major", 7)
    inventory = write_db_inventory(tmp_path / "inventory.yml", host, postgresql_port=free_port())

    result, _ = provision_system(inventory, postgresql_version="12")

    assert not result.ok
    expected = (
        "PostgreSQL 12 is not available from the apt sources of Debian bookworm; "
        f"set postgresql_apt_source: pgdg, or set postgresql_version: {DISTRIBUTION_MAJOR} "
        "for the distribution's major"
    )
    assert any(failure.endswith(expected) for failure in result.failures), result.failures
    assert len(result.failures) == 1, result.failures
    assert not host_has_postgresql(host)
