"""Secret files on the operator's machine: created 0600, written atomically."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ops.errors import TunefleetError

# 32 random bytes, about 43 URL-safe characters: no quoting trouble in URLs or configs.
PASSWORD_BYTES = 32


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` so that no reader ever sees a partial or readable-by-others file.

    The temporary file is created 0600 by os.open in the same directory, synced, then
    renamed over `path`, which is atomic on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_secret_file(path: Path) -> str:
    """Return the secret in `path`, rejecting a file that group or others can read."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TunefleetError(
            f"secret file {path} has mode {mode:04o}, readable by group or others",
            f"run: chmod 600 {path}",
        )
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise TunefleetError(
            f"secret file {path} is empty",
            "restore it from your records, or delete it to generate a new password on the next provision",
        )
    return secret


def ensure_password(path: Path) -> str:
    """Return the password stored in `path`, generating and storing one on first use."""
    path = Path(path)
    if path.exists():
        return read_secret_file(path)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    write_secret_file(path, password)
    return password
