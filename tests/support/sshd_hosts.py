"""Loopback test hosts: real sshd servers that the test suite starts and removes itself.

Each `SshHost` is a root-run `/usr/sbin/sshd` bound to one address in 127.0.0.0/8 and a
free port, with its own host key, its own unprivileged account and an ed25519 client key
for the operator. Host-key checking stays on: every host comes with a `known_hosts` file
that pins its key. `FreshDebianHost` runs the same kind of sshd inside a chroot of a
minimal Debian tree made with debootstrap, which plays a fresh machine or a container
without systemd. `network_namespace` gives a client its own non-loopback
address for tests of address-based rules such as pg_hba.conf.

Everything here needs root. The pytest fixtures at the end skip their tests when the
suite does not run as root, and fail with the install command when a tool is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
INSTALL_COMMAND = "bash .ci/install-test-deps"
REQUIRED_TOOLS = (SSHD, "ssh", "ssh-keygen", "useradd", "userdel", "visudo", "nft", "ip")

# Debian's sshd sets this PATH for sessions; `extra_path` is put in front of it.
DEFAULT_SESSION_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
# NOTE: a test run killed with SIGKILL leaves its tfhost-* accounts, sudoers.d files,
# nftables tables and chroot mounts behind, and nothing removes them on the next run yet.
ACCOUNT_PREFIX = "tfhost-"
START_TIMEOUT_S = 15.0

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("openssh-server", "python3", "sudo")
DEFAULT_CACHE_DIR = "/var/cache/tunefleet-tests"
CACHE_DIR_VARIABLE = "TUNEFLEET_TEST_CACHE"


class HostSetupError(RuntimeError):
    """A test host could not be set up, started or removed."""


def run_checked(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raising HostSetupError with its exit code and output tail on failure."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise HostSetupError(
            f"command failed with exit code {result.returncode}: {shlex.join(argv)}\n{output}"
        )
    return result


def loopback_address(index: int) -> str:
    """Return 127.0.0.<index>, rejecting 127.0.0.1 so test hosts never share it."""
    if not 2 <= index <= 254:
        raise ValueError(f"address index must be between 2 and 254, got {index}")
    return f"127.0.0.{index}"


def find_free_port(address: str) -> int:
    """Return a TCP port that is free on `address` now.

    Another process may take the port before the caller binds it, so callers retry or
    fail with a clear message rather than assume it stays free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def generate_ed25519_key(path: Path, comment: str) -> str:
    """Create an ed25519 key pair at `path` with no passphrase and return the public key line."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)
    return path.with_suffix(".pub").read_text().strip()


def known_hosts_line(address: str, port: int, public_key_line: str) -> str:
    """Return a known_hosts entry; OpenSSH writes `[address]:port` for ports other than 22."""
    key_type, key_data = public_key_line.split()[:2]
    host_field = address if port == 22 else f"[{address}]:{port}"
    return f"{host_field} {key_type} {key_data}\n"


# Process lookups through /proc, so teardown can end exactly the processes a host owns.


def _proc_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _parent_pid(pid: int) -> int:
    stat_text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in field 2 may contain spaces and parentheses, so split after its end.
    return int(stat_text.rsplit(")", 1)[1].split()[1])


def _real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ProcessLookupError(pid)


def _pids_where(predicate: Callable[[int], bool]) -> list[int]:
    matches = []
    for pid in _proc_pids():
        if pid == os.getpid():
            continue
        try:
            if predicate(pid):
                matches.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process exited while it was being read
    return matches


def descendant_pids(root_pid: int) -> list[int]:
    """Return the pids of all live descendants of `root_pid`."""
    children: dict[int, list[int]] = {}
    for pid in _proc_pids():
        try:
            children.setdefault(_parent_pid(pid), []).append(pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    found, pending = [], [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def kill_until_gone(find_pids: Callable[[], list[int]], what: str, rounds: int = 50) -> None:
    """SIGKILL the pids that `find_pids` returns until it returns none.

    Repeats because a process can fork between one lookup and the kill.
    """
    for _ in range(rounds):
        pids = find_pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise HostSetupError(f"processes of {what} still running after SIGKILL: {find_pids()}")


def mounts_under(path: Path) -> list[str]:
    """Return the mount points at or below `path`, from /proc/self/mountinfo."""
    prefix = str(path).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces written as \040.
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


class SshHost:
    """A real sshd on one loopback address with its own account, keys and base directory.

    The account is named `tfhost-<hex>`, gets a bash login shell and no password, and is
    removed with its home at `close()`. `base_dir` is a directory in the account's home
    that the account owns. `sudo=True` grants passwordless sudo through a file in
    /etc/sudoers.d. `extra_path` is put in front of the session PATH for every session,
    including the non-interactive `ssh host command` sessions that Fabric and Ansible
    open. A relative `extra_path` is resolved against the account's home and created.
    `accept_env` lists the environment variables, as sshd_config patterns such as
    "LC_*", that sshd takes from a client's SendEnv or SetEnv.
    """

    def __init__(
        self,
        name: str,
        address_index: int,
        workdir: Path,
        *,
        sudo: bool = False,
        extra_path: str | os.PathLike[str] | None = None,
        inventory_vars: Mapping[str, Any] | None = None,
        accept_env: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.address = loopback_address(address_index)
        self.port = 0
        self.sudo = sudo
        self.host_id = secrets.token_hex(3)
        self.user = ACCOUNT_PREFIX + self.host_id
        self.home = Path("/home") / self.user
        self.base_dir = self.home / "tunefleet"
        self.extra_path = self._resolve_extra_path(extra_path)
        self.extra_inventory_vars = dict(inventory_vars or {})
        self.accept_env = list(accept_env)

        # Operator-side files: keys, known_hosts, sshd config and log. Only root reads them.
        self.config_dir = workdir / f"{name}-{self.host_id}"
        self.client_key = self.config_dir / "id_ed25519"
        self.known_hosts = self.config_dir / "known_hosts"
        self.sshd_config = self.config_dir / "sshd_config"
        self.sshd_log = self.config_dir / "sshd.log"
        self.host_key = self.config_dir / "ssh_host_ed25519_key"
        self.host_public_key = ""

        self._process: subprocess.Popen[bytes] | None = None
        self._blackhole_table: str | None = None
        self._account_created = False
        self._sudoers_file: Path | None = None
        self.closed = False

    def _resolve_extra_path(self, extra_path: str | os.PathLike[str] | None) -> Path | None:
        if extra_path is None:
            return None
        path = Path(extra_path)
        return path if path.is_absolute() else self.home / path

    # Paths inside the host versus paths on this machine. They are the same here, but
    # FreshDebianHost maps them into its chroot.

    def path_on_machine(self, path_in_host: str | os.PathLike[str]) -> Path:
        """Return where a path inside the host lives on the machine that runs the tests."""
        return Path(path_in_host)

    @property
    def sshd_argv(self) -> list[str]:
        return [SSHD, "-D", "-e", "-f", str(self.sshd_config)]

    def setup(self) -> SshHost:
        """Create the account, keys and sshd configuration, then start sshd."""
        self.config_dir.mkdir(mode=0o700, parents=True)
        self._create_account()
        self._write_keys()
        if self.sudo:
            self._grant_sudo()
        self.port = find_free_port(self.address)
        self._write_sshd_config()
        self.start()
        return self

    def _create_account(self) -> None:
        run_checked(self._account_command("useradd") + [
            "--create-home", "--home-dir", str(self.home), "--shell", "/bin/bash",
            "--user-group",
            # "*" is no valid password hash but, unlike useradd's default "!", does not
            # mark the account as locked, and sshd without PAM rejects locked accounts.
            "--password", "*",
            self.user,
        ])
        self._account_created = True
        uid, gid = self.account_ids()
        for directory in (self.base_dir, self.extra_path):
            if directory is None:
                continue
            on_machine = self.path_on_machine(directory)
            if not on_machine.exists():
                on_machine.mkdir(mode=0o755, parents=True)
                os.chown(on_machine, uid, gid)

    def _account_command(self, tool: str) -> list[str]:
        return [tool]

    def account_ids(self) -> tuple[int, int]:
        """Return the account's uid and gid."""
        entry = pwd.getpwnam(self.user)
        return entry.pw_uid, entry.pw_gid

    def _write_keys(self) -> None:
        uid, gid = self.account_ids()
        self.host_public_key = generate_ed25519_key(self._host_key_on_machine(), f"{self.name} host key")
        client_public_key = generate_ed25519_key(self.client_key, f"operator@{self.name}")

        ssh_dir = self.path_on_machine(self.home / ".ssh")
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized_keys = ssh_dir / "authorized_keys"
        authorized_keys.write_text(client_public_key + "\n")
        authorized_keys.chmod(0o600)
        for path in (ssh_dir, authorized_keys):
            os.chown(path, uid, gid)

    def _host_key_on_machine(self) -> Path:
        return self.host_key

    def _host_key_in_host(self) -> Path:
        return self.host_key

    def _grant_sudo(self) -> None:
        sudoers_dir = self.path_on_machine("/etc/sudoers.d")
        # sudo skips files in sudoers.d whose names contain a dot, so the temporary file
        # is never read before visudo has checked it.
        final = sudoers_dir / self.user
        temporary = sudoers_dir / f"{self.user}.new"
        temporary.write_text(f"{self.user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        temporary.chmod(0o440)
        run_checked(["visudo", "-c", "-q", "-f", str(temporary)])
        temporary.rename(final)
        self._sudoers_file = final

    def _write_sshd_config(self) -> None:
        self.known_hosts.write_text(known_hosts_line(self.address, self.port, self.host_public_key))
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.address}",
            f"HostKey {self._host_key_in_host()}",
            "PidFile none",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # PAM's session modules expect systemd-logind and a login uid, neither of
            # which a test host has.
            "UsePAM no",
            "PermitRootLogin no",
            "StrictModes yes",
            "LogLevel VERBOSE",
            # Fabric's group runs and Ansible's forks open many sessions at once.
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "Subsystem sftp internal-sftp",
        ]
        if self.accept_env:
            lines.append(f"AcceptEnv {' '.join(self.accept_env)}")
        if self.extra_path is not None:
            # SetEnv is applied after sshd sets its default PATH, so it replaces it in
            # every session, interactive or not (OpenSSH 8.7 and later).
            lines.append(f"SetEnv PATH={self.extra_path}:{DEFAULT_SESSION_PATH}")
        config = self.path_on_machine(self._sshd_config_in_host())
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)

    def _sshd_config_in_host(self) -> Path:
        return self.sshd_config

    # Lifecycle.

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start sshd and wait until it accepts connections on its address and port."""
        if self.is_running:
            return
        privsep_dir = self.path_on_machine("/run/sshd")
        privsep_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        log = open(self.sshd_log, "ab")
        try:
            self._process = subprocess.Popen(
                self.sshd_argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_until_listening()
        logger.debug("started sshd for %s on %s:%d as pid %d", self.name, self.address, self.port, self._process.pid)

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise HostSetupError(
                    f"sshd for {self.name} exited with code {self._process.returncode} at start; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise HostSetupError(
            f"sshd for {self.name} did not accept connections on {self.address}:{self.port} "
            f"within {START_TIMEOUT_S:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self, characters: int = 3000) -> str:
        """Return the end of this host's sshd log."""
        try:
            return self.sshd_log.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return "(no sshd log)"

    def stop(self, *, kill_account_processes: bool = False) -> None:
        """Stop sshd and every connection it serves, so connects fail with ECONNREFUSED.

        Ending the connections matters because a client that multiplexes sessions, as
        Ansible's ControlPersist does, would otherwise keep reaching a stopped host.
        Processes that detached from their session, such as workers, keep running unless
        `kill_account_processes` is set, which ends everything the account runs, as if
        the machine had gone down.
        """
        if self._process is not None:
            listener = self._process.pid
            if self._process.poll() is None:
                tree = descendant_pids(listener)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(listener, signal.SIGKILL)
                self._process.wait(timeout=10)
                kill_until_gone(lambda: [pid for pid in tree if Path(f"/proc/{pid}").exists()],
                                f"the sshd connections of {self.name}")
            self._process = None
        if kill_account_processes:
            kill_until_gone(self._account_pids, f"account {self.user}")

    def _account_pids(self) -> list[int]:
        uid, _ = self.account_ids()
        return _pids_where(lambda pid: _real_uid(pid) == uid)

    def blackhole(self) -> None:
        """Drop every packet to this host's address and port, so connects hang until timeout.

        Uses an nftables table of its own on the input hook, which loopback traffic
        passes through; sshd keeps running behind it.
        """
        if self._blackhole_table is not None:
            return
        table = f"tf_blackhole_{self.host_id}"
        ruleset = (
            f"table ip {table} {{\n"
            f"  chain input {{\n"
            f"    type filter hook input priority -10; policy accept;\n"
            f"    ip daddr {self.address} tcp dport {self.port} drop\n"
            f"  }}\n"
            f"}}\n"
        )
        run_checked(["nft", "-f", "-"], input=ruleset)
        self._blackhole_table = table

    def unblackhole(self) -> None:
        """Remove the drop rule that `blackhole` added."""
        if self._blackhole_table is None:
            return
        run_checked(["nft", "delete", "table", "ip", self._blackhole_table])
        self._blackhole_table = None

    @contextlib.contextmanager
    def blackholed(self) -> Iterator[None]:
        """Drop packets to this host for the duration of the block."""
        self.blackhole()
        try:
            yield
        finally:
            self.unblackhole()

    def close(self) -> None:
        """Stop sshd, end the account's processes and remove the account, its home and sudo rule."""
        if self.closed:
            return
        self.closed = True
        self.unblackhole()
        if self._account_created:
            self.stop(kill_account_processes=True)
            run_checked(self._account_command("userdel") + ["--remove", self.user])
        else:
            self.stop()
        if self._sudoers_file is not None:
            self._sudoers_file.unlink(missing_ok=True)
        shutil.rmtree(self.config_dir, ignore_errors=True)

    # Clients.

    @property
    def ssh_options(self) -> list[str]:
        """Return `-o` options that pin this host's key and use only the operator's key."""
        return [
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
        ]

    def ssh_argv(self, command: str, *, connect_timeout_s: int = 10) -> list[str]:
        """Return the `ssh` command line that runs `command` on this host as its account."""
        return [
            "ssh", "-F", "/dev/null", *self.ssh_options,
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect_timeout_s}",
            "-i", str(self.client_key),
            "-p", str(self.port),
            f"{self.user}@{self.address}",
            "--", command,
        ]

    def run(
        self, command: str, *, timeout_s: float = 60, connect_timeout_s: int = 10
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` over ssh as the account and return the completed process unchecked."""
        return subprocess.run(
            self.ssh_argv(command, connect_timeout_s=connect_timeout_s),
            capture_output=True, text=True, timeout=timeout_s,
            stdin=subprocess.DEVNULL, check=False,
        )

    def fabric_connection(self) -> Any:
        """Return a Fabric Connection that rejects any host key but this host's pinned one."""
        import fabric
        import paramiko

        # in_stream=False keeps Invoke from reading the test process's stdin, which pytest
        # replaces with a stream that raises on read.
        config = fabric.Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
        connection = fabric.Connection(
            host=self.address, port=self.port, user=self.user, config=config,
            connect_kwargs={
                "key_filename": str(self.client_key),
                "look_for_keys": False,
                "allow_agent": False,
            },
        )
        # Fabric installs AutoAddPolicy, which would accept any key the server offers.
        connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        connection.client.load_host_keys(str(self.known_hosts))
        return connection

    def install_stand_in(self, command_name: str, script: str) -> Path:
        """Write an executable script named `command_name` into `extra_path` and return its path."""
        if self.extra_path is None:
            raise HostSetupError(f"host {self.name} has no extra_path; create it with extra_path=...")
        path = self.path_on_machine(self.extra_path / command_name)
        path.write_text(script)
        path.chmod(0o755)
        return path

    def inventory_vars(self) -> dict[str, Any]:
        """Return the Ansible connection variables for this host, then its extra variables."""
        variables: dict[str, Any] = {
            "ansible_host": self.address,
            "ansible_port": self.port,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": shlex.join(self.ssh_options),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        variables.update(self.extra_inventory_vars)
        return variables

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.user}@{self.address}:{self.port}>"


def write_inventory(
    path: Path,
    groups: Mapping[str, Sequence[SshHost]],
    *,
    host_vars: Mapping[str, Mapping[str, Any]] | None = None,
    group_vars: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write an Ansible YAML inventory of `groups` (for example `db` and `gpu`) to `path`.

    Each host appears under its `name` with its connection variables, its own extra
    variables, then `host_vars[name]`, so the later ones win.
    """
    hosts_by_name: dict[str, SshHost] = {}
    for members in groups.values():
        for host in members:
            if hosts_by_name.setdefault(host.name, host) is not host:
                raise ValueError(f"two different hosts are named {host.name!r}; host names must be unique")
    unknown = set(host_vars or {}) - set(hosts_by_name)
    if unknown:
        raise ValueError(f"host_vars names hosts that are in no group: {sorted(unknown)}")

    children: dict[str, Any] = {}
    for group, members in groups.items():
        entry: dict[str, Any] = {"hosts": {}}
        for host in members:
            variables = host.inventory_vars()
            variables.update((host_vars or {}).get(host.name, {}))
            entry["hosts"][host.name] = variables
        if group_vars and group in group_vars:
            entry["vars"] = dict(group_vars[group])
        children[group] = entry

    path.write_text(yaml.safe_dump({"all": {"children": children}}, sort_keys=False))
    return path


# Fresh Debian hosts: a debootstrap tree, built once and cached as a tarball.


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """Return the mirror URI that this machine's apt uses for Debian's main suite."""
    candidates = [sources_dir / "sources.list"]
    candidates += sorted((sources_dir / "sources.list.d").glob("*.list"))
    candidates += sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for source in candidates:
        if not source.is_file():
            continue
        text = source.read_text()
        if source.suffix == ".sources":
            uri = _mirror_from_deb822(text)
        else:
            uri = _mirror_from_one_line_format(text)
        if uri:
            return uri
    raise HostSetupError(
        f"found no apt source for Debian {DEBIAN_SUITE} under {sources_dir}; "
        "a fresh Debian host needs the mirror this machine's apt uses"
    )


def _mirror_from_deb822(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        types = fields.get("types", "").split()
        suites = fields.get("suites", "").split()
        if "deb" in types and DEBIAN_SUITE in suites and fields.get("enabled", "yes") != "no":
            return fields["uris"].split()[0]
    return None


def _mirror_from_one_line_format(text: str) -> str | None:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == DEBIAN_SUITE:
            return words[1]
    return None


def cache_dir_for_tests() -> Path:
    """Return the cache directory: $TUNEFLEET_TEST_CACHE, else /var/cache/tunefleet-tests."""
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR)


def make_debootstrap_tree(cache_dir: Path) -> Path:
    """Return a tarball of a minimal Debian tree with sshd, python3 and sudo, building it once.

    The tarball's name carries the suite and the package list, so changing either builds
    a new one. A lock file lets parallel test runs share one build. The tree contains no
    host keys, because each host generates its own.
    """
    cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    tarball = cache_dir / f"debian-{DEBIAN_SUITE}-minbase-{'-'.join(DEBIAN_PACKAGES)}.tar"
    with open(cache_dir / "debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        started = time.monotonic()
        build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
        tree = build_dir / "tree"
        try:
            _debootstrap(tree)
            _write_tarball(tree, tarball)
        finally:
            _remove_tree(build_dir)
        seconds = time.monotonic() - started
        tarball.with_suffix(".json").write_text(json.dumps({"build_seconds": round(seconds, 1)}) + "\n")
        logger.info("built %s in %.1f s", tarball, seconds)
    return tarball


def _debootstrap(tree: Path) -> None:
    mirror = debian_mirror()
    run_checked(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(tree), mirror], timeout=1200)
    policy = tree / "usr/sbin/policy-rc.d"
    # A policy-rc.d that exits with 101 stops package scripts from starting services
    # inside the tree.
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy2("/etc/resolv.conf", tree / "etc/resolv.conf")
    run_checked(["mount", "-t", "proc", "proc", str(tree / "proc")])
    try:
        install = (
            "apt-get update -qq && "
            f"apt-get install -y -qq --no-install-recommends {' '.join(DEBIAN_PACKAGES)} && "
            "apt-get clean"
        )
        run_checked(["chroot", str(tree), "/usr/bin/env", "DEBIAN_FRONTEND=noninteractive",
                     "/bin/sh", "-c", install], timeout=1200)
    finally:
        run_checked(["umount", str(tree / "proc")])
    policy.unlink()
    for path in (tree / "etc/ssh").glob("ssh_host_*"):
        path.unlink()
    for path in (tree / "var/lib/apt/lists").glob("*_*"):
        path.unlink()


def _write_tarball(tree: Path, tarball: Path) -> None:
    partial = tarball.with_name(tarball.name + ".partial")
    run_checked(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(partial), "."], timeout=600)
    partial.rename(tarball)


def _remove_tree(path: Path) -> None:
    """Delete `path`, but only when nothing is mounted inside it."""
    if not path.exists():
        return
    leftover = mounts_under(path)
    if leftover:
        raise HostSetupError(f"refusing to delete {path}: still mounted inside it: {leftover}")
    run_checked(["rm", "-rf", "--one-file-system", str(path)])


class FreshDebianHost(SshHost):
    """An SshHost whose sshd runs chrooted in a fresh copy of the cached Debian tree.

    Inside there is no systemd and nothing but minbase, openssh-server, python3 and sudo,
    like a fresh server or a container. The account exists only in the tree and always
    has passwordless sudo. The tree gets its own /proc, a read-only /sys and a /dev made
    of a few device nodes on tmpfs, so deleting the tree can never reach the machine's
    /dev. `start_seconds` is the time from unpacking to sshd accepting connections.
    """

    def __init__(
        self,
        name: str,
        address_index: int,
        workdir: Path,
        tarball: Path,
        roots_dir: Path,
        *,
        extra_path: str | os.PathLike[str] | None = None,
        inventory_vars: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, address_index, workdir, sudo=True, extra_path=extra_path,
                         inventory_vars=inventory_vars)
        self.tarball = tarball
        self.root = roots_dir / f"{name}-{self.host_id}"
        self.start_seconds = 0.0

    def path_on_machine(self, path_in_host: str | os.PathLike[str]) -> Path:
        return self.root / Path(path_in_host).relative_to("/")

    @property
    def sshd_argv(self) -> list[str]:
        return ["chroot", str(self.root), SSHD, "-D", "-e", "-f", str(self._sshd_config_in_host())]

    def _sshd_config_in_host(self) -> Path:
        return Path("/etc/ssh/tunefleet_sshd_config")

    def _host_key_on_machine(self) -> Path:
        return self.path_on_machine(self._host_key_in_host())

    def _host_key_in_host(self) -> Path:
        return Path("/etc/ssh/ssh_host_ed25519_key")

    def _account_command(self, tool: str) -> list[str]:
        return [tool, "--root", str(self.root)]

    def account_ids(self) -> tuple[int, int]:
        for line in self.path_on_machine("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == self.user:
                return int(fields[2]), int(fields[3])
        raise HostSetupError(f"account {self.user} not found in {self.root}/etc/passwd")

    def _account_pids(self) -> list[int]:
        # Uids inside the tree may belong to other users on the machine, so processes
        # are matched by their root directory instead.
        root = str(self.root)
        return _pids_where(lambda pid: os.readlink(f"/proc/{pid}/root") == root)

    def setup(self) -> FreshDebianHost:
        started = time.monotonic()
        self.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o755)
        run_checked(["tar", "--numeric-owner", "-C", str(self.root), "-xf", str(self.tarball)], timeout=600)
        self._mount_kernel_filesystems()
        super().setup()
        self.start_seconds = time.monotonic() - started
        return self

    def _mount_kernel_filesystems(self) -> None:
        run_checked(["mount", "-t", "proc", "proc", str(self.root / "proc")])
        run_checked(["mount", "-t", "sysfs", "-o", "ro", "sysfs", str(self.root / "sys")])
        dev = self.root / "dev"
        run_checked(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,size=16m", "tunefleet-dev", str(dev)])
        for node, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7),
                                   ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)):
            os.mknod(dev / node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            (dev / node).chmod(0o666)
        for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                             ("ptmx", "pts/ptmx")):
            (dev / link).symlink_to(target)
        (dev / "pts").mkdir()
        (dev / "shm").mkdir()
        # newinstance keeps the tree's pseudo-terminals apart from the machine's.
        run_checked(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620",
                     "devpts", str(dev / "pts")])
        run_checked(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tunefleet-shm", str(dev / "shm")])

    def _unmount_kernel_filesystems(self) -> None:
        for point in sorted(mounts_under(self.root), key=len, reverse=True):
            run_checked(["umount", point])

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            self.closed = True
            kill_until_gone(self._account_pids, f"chroot {self.root}")
            self._unmount_kernel_filesystems()
            _remove_tree(self.root)


# Network namespaces for tests that need a client address outside loopback.


# Ids of the namespaces this process created and has not deleted yet.
_LIVE_NAMESPACE_IDS: set[str] = set()


class NetworkNamespace:
    """A network namespace joined to the root namespace by a veth pair on a private /30.

    The root side gets 10.213.<index>.1 and the namespace side 10.213.<index>.2. The
    subnet exists only on the veth pair the test created, so traffic on it never leaves
    this machine.
    """

    SUBNET_PREFIX = "10.213"

    def __init__(self, index: int) -> None:
        if not 0 <= index <= 255:
            raise ValueError(f"network namespace index must be between 0 and 255, got {index}")
        self.namespace_id = secrets.token_hex(3)
        self.name = f"tf-{self.namespace_id}"
        # Interface names are limited to 15 characters.
        self.root_interface = f"tfv{self.namespace_id}a"
        self.namespace_interface = f"tfv{self.namespace_id}b"
        self.subnet = ipaddress.ip_network(f"{self.SUBNET_PREFIX}.{index}.0/30")
        self.root_address = str(self.subnet.network_address + 1)
        self.namespace_address = str(self.subnet.network_address + 2)
        self._created = False

    def create(self) -> NetworkNamespace:
        """Create the namespace and the veth pair, and bring both sides up."""
        self._remove_stale_namespaces()
        self._reject_overlapping_routes()
        run_checked(["ip", "netns", "add", self.name])
        self._created = True
        _LIVE_NAMESPACE_IDS.add(self.namespace_id)
        prefix = self.subnet.prefixlen
        commands = [
            ["ip", "link", "add", self.root_interface, "type", "veth", "peer", "name", self.namespace_interface],
            ["ip", "link", "set", self.namespace_interface, "netns", self.name],
            ["ip", "addr", "add", f"{self.root_address}/{prefix}", "dev", self.root_interface],
            ["ip", "link", "set", self.root_interface, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.namespace_address}/{prefix}", "dev", self.namespace_interface],
            ["ip", "-n", self.name, "link", "set", self.namespace_interface, "up"],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
        ]
        for command in commands:
            run_checked(command)
        return self

    def _remove_stale_namespaces(self) -> None:
        """Delete a namespace of this subnet that a killed test run left behind.

        Only interfaces named by this class (tfv<id>a) and not created by this process
        are touched, so a subnet that this run or something else uses still fails in
        _reject_overlapping_routes.
        """
        addresses = run_checked(["ip", "-4", "-o", "addr", "show"]).stdout
        for line in addresses.splitlines():
            fields = line.split()
            if len(fields) < 4 or not re.fullmatch(r"tfv[0-9a-f]{6}a", fields[1]):
                continue
            if ipaddress.ip_interface(fields[3]).ip not in self.subnet:
                continue
            stale_id = fields[1][3:-1]
            if stale_id in _LIVE_NAMESPACE_IDS:
                continue
            subprocess.run(["ip", "netns", "delete", f"tf-{stale_id}"], capture_output=True, check=False)
            subprocess.run(["ip", "link", "delete", fields[1]], capture_output=True, check=False)

    def _reject_overlapping_routes(self) -> None:
        routes = run_checked(["ip", "-4", "route", "show", "table", "all"]).stdout
        for line in routes.splitlines():
            destination = line.split()[0] if line.split() else ""
            if destination in ("default", "local", "broadcast", "unreachable"):
                destination = line.split()[1]
            try:
                network = ipaddress.ip_network(destination, strict=False)
            except ValueError:
                continue
            if network.prefixlen > 0 and network.overlaps(self.subnet):
                raise HostSetupError(
                    f"{self.subnet} overlaps the existing route {line.strip()!r}; "
                    "pick another network namespace index"
                )

    def command(self, argv: Sequence[str]) -> list[str]:
        """Return `argv` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run_in_netns(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace; keyword arguments go to subprocess.run."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        return subprocess.run(self.command(argv), **kwargs)

    def _pids(self) -> list[int]:
        return [int(pid) for pid in run_checked(["ip", "netns", "pids", self.name]).stdout.split()]

    def delete(self) -> None:
        """Delete the namespace; the veth pair goes with it."""
        if not self._created:
            return
        kill_until_gone(self._pids, f"network namespace {self.name}")
        run_checked(["ip", "netns", "delete", self.name])
        # The kernel removes the root side of a veth pair when the namespace side goes,
        # but only once the namespace is freed, so an explicit delete avoids a race.
        subprocess.run(["ip", "link", "delete", self.root_interface], capture_output=True, check=False)
        self._created = False
        _LIVE_NAMESPACE_IDS.discard(self.namespace_id)


@contextlib.contextmanager
def network_namespace(index: int) -> Iterator[NetworkNamespace]:
    """Create a NetworkNamespace for the block and delete it afterwards."""
    namespace = NetworkNamespace(index)
    try:
        yield namespace.create()
    finally:
        namespace.delete()


# pytest fixtures. tests/conftest.py makes them available to every test module by
# importing them: `from support.sshd_hosts import ssh_host_factory, ...`, because pytest
# puts tests/ on sys.path for a conftest.py in a folder without __init__.py.


def require_root_and_tools(tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    """Skip the test when not root, and fail it when a needed tool is not installed."""
    if os.geteuid() != 0:
        pytest.skip("test hosts need root: they create accounts and start sshd (the CI runs as root)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing test tools {missing}; install them with `{INSTALL_COMMAND}`", pytrace=False)


class SshHostFactory:
    """Create started SshHosts and close every one of them at `close_all()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hosts: list[SshHost] = []

    def __call__(
        self,
        name: str,
        address_index: int = 2,
        *,
        sudo: bool = False,
        extra_path: str | os.PathLike[str] | None = None,
        inventory_vars: Mapping[str, Any] | None = None,
        accept_env: Sequence[str] = (),
    ) -> SshHost:
        host = SshHost(name, address_index, self.workdir, sudo=sudo, extra_path=extra_path,
                       inventory_vars=inventory_vars, accept_env=accept_env)
        return self._set_up(host)

    def _set_up(self, host: SshHost) -> SshHost:
        self.hosts.append(host)
        try:
            return host.setup()
        except BaseException:
            host.close()
            raise

    def close_all(self) -> None:
        errors = []
        for host in reversed(self.hosts):
            try:
                host.close()
            except HostSetupError as error:
                errors.append(f"{host!r}: {error}")
        self.hosts.clear()
        if errors:
            raise HostSetupError("could not remove every test host:\n" + "\n".join(errors))


class FreshDebianHostFactory(SshHostFactory):
    """Create started FreshDebianHosts from one cached tarball."""

    def __init__(self, workdir: Path, tarball: Path, roots_dir: Path) -> None:
        super().__init__(workdir)
        self.tarball = tarball
        self.roots_dir = roots_dir

    def __call__(  # type: ignore[override]
        self,
        name: str,
        address_index: int = 2,
        *,
        extra_path: str | os.PathLike[str] | None = None,
        inventory_vars: Mapping[str, Any] | None = None,
    ) -> FreshDebianHost:
        host = FreshDebianHost(name, address_index, self.workdir, self.tarball, self.roots_dir,
                               extra_path=extra_path, inventory_vars=inventory_vars)
        self._set_up(host)
        return host


@pytest.fixture(scope="session")
def ssh_host_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHostFactory]:
    """Create loopback sshd hosts: `ssh_host_factory("gpu1", 3, extra_path="bin")`."""
    require_root_and_tools()
    factory = SshHostFactory(tmp_path_factory.mktemp("sshd-hosts"))
    yield factory
    factory.close_all()


@pytest.fixture(scope="session")
def debootstrap_tarball() -> Path:
    """Return the cached Debian tree tarball, building it on first use.

    The build took 35 s on a 2-core machine with a nearby mirror, and unpacking plus
    starting sshd about 5 s per host.
    """
    require_root_and_tools(REQUIRED_TOOLS + ("debootstrap", "chroot", "tar"))
    return make_debootstrap_tree(cache_dir_for_tests())


@pytest.fixture
def fresh_debian_host(
    debootstrap_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshDebianHostFactory]:
    """Create fresh Debian hosts for one test: `fresh_debian_host("db1", 4)`."""
    # The trees live outside pytest's temporary directories, because pytest deletes old
    # ones without checking for mounts inside them.
    roots_dir = cache_dir_for_tests() / "roots"
    factory = FreshDebianHostFactory(tmp_path_factory.mktemp("debian-hosts"), debootstrap_tarball, roots_dir)
    yield factory
    factory.close_all()
