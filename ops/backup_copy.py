"""Copy one backup directory from the db host to a restore target, through the operator's machine.

Each side is this machine's file system or an SFTP session. The files are read and
written as each host's server account, because backups are 0600 files of that account
and the staging directory on the target must belong to it. Over SSH the SFTP server
runs as that account, through su or sudo when the login account differs. On this
machine the copy is handed to that account with chown afterwards.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from dataclasses import dataclass
from typing import IO, Any

import paramiko

from ops.backups import BackupHost
from ops.errors import TunefleetError

COPY_BLOCK_BYTES = 1 << 20

# Install paths of OpenSSH's SFTP server: Debian and Ubuntu, Fedora and RHEL, then Arch
# and Alpine.
SFTP_SERVER_PATHS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
)

logger = logging.getLogger("tunefleet.restore")


def copy_backup(source: BackupHost, target: BackupHost, name: str, destination: str) -> int:
    """Copy the files of backup `name` to the new directory `destination` on the target; return the bytes copied.

    The directory gets mode 0700 and the files 0600 before any byte is written.
    """
    from ops.fleet.connection import HostError

    source_dir = f"{source.site.backup_dir}/{name}"
    current = destination
    copied = 0
    try:
        with _open_files(source) as source_files, _open_files(target) as target_files:
            target_files.mkdir(destination, 0o700)
            for entry in source_files.listdir_attr(source_dir):
                if not stat.S_ISREG(entry.st_mode or 0):
                    raise TunefleetError(f"backup {name} contains {entry.filename}, which is not a regular file",
                                         "verify the backup with tunefleet backup verify, and restore another one")
                current = entry.filename
                with source_files.open(f"{source_dir}/{entry.filename}", "rb") as reader, \
                        _open_for_writing(target_files, f"{destination}/{entry.filename}") as writer:
                    copied += _copy_stream(reader, writer)
    except (HostError, OSError, paramiko.SSHException) as error:
        raise TunefleetError(f"copying backup {name} ({current}) to the restore target failed: {error}",
                             "check the free space on the target and the SSH access to both hosts, "
                             "then run the same restore again") from None

    if target.connection is None and target.login_account != target.site.account:
        _hand_over(target, destination)
    logger.info("copied backup %s (%d bytes) to %s on the restore target", name, copied, destination)
    return copied


def _hand_over(target: BackupHost, destination: str) -> None:
    """Give a copy that this process wrote as root to the server's account."""
    account = shlex.quote(target.site.account)
    code, stdout, stderr = target.runner(f"chown -R {account}: {shlex.quote(destination)}", "")
    if code != 0:
        raise TunefleetError(f"handing {destination} to {target.site.account} failed: "
                             f"{(stderr or stdout).strip()[-500:]}", "run the restore as root or as that account")


def _copy_stream(reader: IO[bytes], writer: IO[bytes]) -> int:
    if hasattr(reader, "prefetch"):
        # paramiko then requests the whole file at once instead of one block per round trip.
        reader.prefetch()
    copied = 0
    while block := reader.read(COPY_BLOCK_BYTES):
        writer.write(block)
        copied += len(block)
    return copied


def _open_for_writing(files: Any, path: str) -> IO[bytes]:
    handle = files.open(path, "wb")
    files.chmod(path, 0o600)
    if hasattr(handle, "set_pipelined"):
        # Without pipelining, paramiko waits for the server's reply to every write.
        handle.set_pipelined(True)
    return handle


def _open_files(host: BackupHost) -> Any:
    """Return an SFTP client that acts as the host's server account, or the same calls on this machine."""
    if host.connection is None:
        return _LocalFiles()
    if host.login_account == host.site.account:
        return host.connection.sftp()
    return _sftp_as_account(host)


def _sftp_as_account(host: BackupHost) -> paramiko.SFTPClient:
    """Start OpenSSH's SFTP server as the server's account on an exec channel and speak SFTP over it."""
    candidates = " ".join(shlex.quote(path) for path in SFTP_SERVER_PATHS)
    code, stdout, _ = host.runner(
        f'for path in {candidates}; do if [ -x "$path" ]; then echo "$path"; exit 0; fi; done; exit 1', "")
    if code != 0:
        raise TunefleetError(f"no sftp-server found on {host.connection.host.label} in {', '.join(SFTP_SERVER_PATHS)}",
                             "install OpenSSH's SFTP server there (Debian: openssh-sftp-server)")
    host.connection.open()
    channel = host.connection.connection.client.get_transport().open_session()
    channel.exec_command(host.as_account(shlex.quote(stdout.strip())))
    try:
        return paramiko.SFTPClient(channel)
    except (paramiko.SSHException, EOFError):
        message = channel.recv_stderr(4000).decode(errors="replace").strip()
        channel.close()
        raise TunefleetError(f"starting sftp-server as {host.site.account} on {host.connection.host.label} "
                             f"failed: {message or 'no SFTP answer'}",
                             f"check that {host.login_account} may run commands as {host.site.account} "
                             "without a password (sudo -n)") from None


class _LocalFiles:
    """The paramiko.SFTPClient calls that copy_backup makes, on this machine's files."""

    def __enter__(self) -> _LocalFiles:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass

    @staticmethod
    def listdir_attr(path: str) -> list[Any]:
        return [_LocalEntry(entry.name, entry.stat(follow_symlinks=False).st_mode) for entry in os.scandir(path)]

    @staticmethod
    def open(path: str, mode: str) -> IO[bytes]:
        if "w" in mode:
            return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        return open(path, "rb")

    @staticmethod
    def mkdir(path: str, mode: int) -> None:
        os.mkdir(path, mode)

    @staticmethod
    def chmod(path: str, mode: int) -> None:
        os.chmod(path, mode)


@dataclass
class _LocalEntry:
    filename: str
    st_mode: int
