"""SSH connections to worker hosts through Fabric, with bounded timeouts and checked host keys.

Fabric's defaults suit interactive use: it accepts any unknown host key, and a
connection to a host that drops packets can wait for minutes. Here every connect and
every command has a timeout, and a host key must already be in one of the host's
known_hosts files unless the operator asked to accept new keys.
"""

from __future__ import annotations

import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fabric
import invoke
import paramiko

from ops.inventory import FleetHost

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 120.0

# First contact is accepted one host at a time, so that two threads never append to
# one known_hosts file at once.
_known_hosts_lock = threading.Lock()


class HostError(Exception):
    """A host could not do what was requested; the message is one line with what to do."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection and for one remote command."""

    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    command: float = DEFAULT_COMMAND_TIMEOUT_S


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key and append it to the host's first known_hosts file."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with _known_hosts_lock:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.known_hosts.open("a") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class HostConnection:
    """One Fabric connection to a FleetHost, closed by `close()` or the with-block."""

    def __init__(self, host: FleetHost, timeouts: Timeouts, *, accept_new_host_keys: bool = False) -> None:
        self.host = host
        self.timeouts = timeouts
        connect_kwargs: dict[str, Any] = {
            "banner_timeout": timeouts.connect,
            "auth_timeout": timeouts.connect,
            "channel_timeout": timeouts.connect,
        }
        if host.private_key_file is not None:
            connect_kwargs.update(key_filename=str(host.private_key_file), look_for_keys=False)
        config = fabric.Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
        self.connection = fabric.Connection(
            host=host.address, port=host.port, user=host.user, config=config,
            connect_timeout=timeouts.connect, connect_kwargs=connect_kwargs,
        )
        client = self.connection.client
        for known_hosts in host.known_hosts_files:
            if known_hosts.is_file():
                client.load_host_keys(str(known_hosts))
        if accept_new_host_keys:
            client.set_missing_host_key_policy(_RecordNewHostKey(host.known_hosts_files[0]))
        else:
            # Fabric installs AutoAddPolicy, which would trust any key the server offers.
            client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def __enter__(self) -> HostConnection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def open(self) -> None:
        """Connect, turning every way a connect can fail into a one-line HostError."""
        try:
            self.connection.open()
        except paramiko.BadHostKeyException as error:
            raise HostError(
                f"host key of {self.host.address}:{self.host.port} does not match known_hosts "
                f"({_files(self.host)}): the host was reinstalled, or someone is in between; "
                "check the key, then remove the old line with ssh-keygen -R"
            ) from None
        except paramiko.SSHException as error:
            if "not found in known_hosts" in str(error):
                raise HostError(
                    f"host key of {self.host.address}:{self.host.port} is not in {_files(self.host)}; "
                    "verify it and rerun with --accept-new-host-keys"
                ) from None
            if isinstance(error, paramiko.AuthenticationException):
                raise HostError(f"SSH login as {self.host.user} failed: {error}; check ansible_user "
                                "and ansible_ssh_private_key_file") from None
            raise HostError(f"SSH to {self.host.address}:{self.host.port} failed: {error}") from None
        except (socket.timeout, TimeoutError):
            raise HostError(f"connect to {self.host.address}:{self.host.port} timed out after "
                            f"{self.timeouts.connect:.0f} s; check that the host is up") from None
        except OSError as error:
            raise HostError(f"connect to {self.host.address}:{self.host.port} failed: "
                            f"{error.strerror or error}; check that the host is up and sshd listens") from None

    def run(self, command: str, *, timeout: float | None = None, stdin: str | None = None,
            check: bool = True) -> invoke.Result:
        """Run `command`; on a non-zero exit raise HostError with its code and output tail."""
        self.open()
        timeout = timeout or self.timeouts.command
        try:
            if stdin is not None:
                result = self._run_with_input(command, stdin, timeout)
            else:
                result = self.connection.run(command, hide=True, warn=True, timeout=timeout)
        except invoke.CommandTimedOut:
            raise HostError(f"command timed out after {timeout:.0f} s: {_short(command)}") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise HostError(f"SSH connection lost while running {_short(command)}: {error}") from None
        if check and result.exited != 0:
            tail = (result.stdout + result.stderr).strip()[-600:]
            raise HostError(f"command failed with exit code {result.exited}: {_short(command)}: {tail}")
        return result

    def _run_with_input(self, command: str, stdin: str, timeout: float) -> invoke.Result:
        """Run `command` on a channel of our own and send `stdin` in one write.

        Invoke forwards a stdin that is not a terminal one byte per read with a 10 ms
        pause in between, so a 1 KB request took over ten seconds through Fabric.
        """
        deadline = time.monotonic() + timeout
        channel = self.connection.client.get_transport().open_session(timeout=self.timeouts.connect)
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            channel.sendall(stdin.encode())
            channel.shutdown_write()
            stdout, stderr = bytearray(), bytearray()
            while True:
                if channel.recv_ready():
                    stdout += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(65536)
                elif channel.exit_status_ready():
                    break
                elif time.monotonic() > deadline:
                    raise invoke.CommandTimedOut(invoke.Result(command=command), timeout)
                else:
                    select.select([channel], [], [], 0.1)
            return invoke.Result(stdout=stdout.decode(errors="replace"), stderr=stderr.decode(errors="replace"),
                                 command=command, exited=channel.recv_exit_status())
        except socket.timeout:
            raise invoke.CommandTimedOut(invoke.Result(command=command), timeout) from None
        finally:
            channel.close()

    def sftp(self) -> paramiko.SFTPClient:
        self.open()
        return self.connection.sftp()


def _files(host: FleetHost) -> str:
    return ", ".join(str(path) for path in host.known_hosts_files)


def _short(command: str) -> str:
    return command if len(command) <= 160 else command[:157] + "..."


def quote(value: str | Path) -> str:
    """Quote a path for the remote shell, keeping a leading ~/ so the shell expands it."""
    text = str(value)
    if text.startswith("~/"):
        return "~/" + shlex.quote(text[2:])
    return shlex.quote(text)
