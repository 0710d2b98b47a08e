#!/usr/bin/env python3
"""Take, verify, list, prune and drill PostgreSQL base backups on the database host.

Both the nightly job and the operator's `tunefleet backup` commands run this script on
the db host, as the account that owns the server, so it uses the standard library only.
Each subcommand writes one JSON document to stdout. On failure it writes
{"error": ..., "hint": ...} and exits 1.

Layout of the backup directory:

    <stamp>/           a verified backup: base.tar.*, pg_wal.tar.*, backup_manifest
                       (PostgreSQL 13 and later), data.sha256 (PostgreSQL 12), config.tar
                       (configuration outside the data directory, when there is any),
                       studies.json, record.json and SHA256SUMS over all of them
    .partial-<stamp>/  a backup being taken or verified; never listed as good
    .partial-<stamp>.lock
                       held with flock(2) by the backup that writes .partial-<stamp>/ and
                       by its child processes; `create` removes the .partial directories
                       whose lock no process holds, which a killed backup leaves behind
    records/<stamp>.json
                       one record per attempt, good or failed; `list` and `prune` read
                       these, so a failed night shows up even though it left no directory
    damaged/<stamp>.json
                       written when `verify` finds <stamp>/ damaged and removed when a later
                       `verify` passes; `list` shows such a backup as damaged, `prune`
                       does not count it as good, and `unpack` and the drill reject it.
                       It lies outside <stamp>/, so the backup's files and SHA256SUMS stay
                       as they were taken

The connection comes from the environment (PGHOST, PGPORT), as the server's env.sh sets it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

RECORDS_DIR = "records"
DAMAGED_DIR = "damaged"
PARTIAL_PREFIX = ".partial-"
LOCK_SUFFIX = ".lock"
SCRATCH_PREFIX = ".scratch-"
CHECKSUMS_FILE = "SHA256SUMS"
RECORD_FILE = "record.json"
STUDIES_FILE = "studies.json"
CONFIG_TAR = "config.tar"
DATA_CHECKSUMS_FILE = "data.sha256"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"

# `backup list` warns when the newest good backup is older than this: a nightly job
# that ran a little late is fine, a night that was skipped is not.
STALE_AFTER = datetime.timedelta(hours=26)

# Decompressors for the suffixes that pg_basebackup and this script write.
DECOMPRESSORS = {".zst": ["zstd", "-dcq"], ".lz4": ["lz4", "-dcq"]}
# Commands that compress a file in place, replacing it with FILE.<suffix>.
COMPRESSORS = {"zstd": ["zstd", "-q", "--rm"], "lz4": ["lz4", "-q", "--rm"]}

STUDY_MANIFEST_SQL = """
SELECT coalesce(json_agg(row_to_json(s) ORDER BY s.name), '[]')
FROM (
  SELECT st.study_name AS name,
    (SELECT coalesce(json_object_agg(c.state, c.n), '{}')
       FROM (SELECT t.state::text AS state, count(*) AS n FROM trials t
             WHERE t.study_id = st.study_id GROUP BY t.state) c) AS trials,
    (SELECT CASE WHEN d.direction::text = 'MAXIMIZE' THEN max(v.value) ELSE min(v.value) END
       FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0
       WHERE t.study_id = st.study_id AND t.state::text = 'COMPLETE') AS best_value
  FROM studies st
  LEFT JOIN study_directions d ON d.study_id = st.study_id AND d.objective = 0
) s
"""


# The superuser that initdb created, named after the account that ran it. It has OID 10
# (BOOTSTRAP_SUPERUSERID in PostgreSQL's pg_authid.h).
BOOTSTRAP_ROLE_SQL = "SELECT rolname FROM pg_roles WHERE oid = 10"


class Interrupted(BaseException):
    """A signal that ends the script arrived: SIGINT (Ctrl-C), SIGTERM or SIGHUP.

    A BaseException like KeyboardInterrupt, so that `except Exception` blocks let it
    through to the handlers that clean up.
    """


# Signals that end a backup. Each raises Interrupted in the main thread, so that the
# partial directory is removed and the attempt recorded before the script exits.
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupted(signum: int, frame: object) -> None:
    # Ignored from the first one on, so that a second Ctrl-C cannot cut the cleanup short.
    ignore_interrupts()
    raise Interrupted(signal.Signals(signum).name)


def ignore_interrupts() -> None:
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class BackupError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# --- running PostgreSQL's tools ---


def tool(bin_dir: str | None, name: str) -> str:
    if bin_dir:
        path = Path(bin_dir) / name
        if not path.exists():
            raise BackupError(f"{name} not found in {bin_dir}", "pass the bin directory of the server's installation")
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found on PATH", "source the server's env.sh or pass --bin-dir")
    return found


# Descriptors of the partial backup locks that this process holds. Child processes get
# them too, so that a pg_basebackup that outlives a killed script keeps its partial
# directory locked until it exits.
held_locks: list[int] = []


def run(argv: list[str], *, step: str, env: dict[str, str] | None = None) -> str:
    # The caller's directory may be one the server's account cannot enter.
    completed = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd="/",
                               pass_fds=tuple(held_locks))
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip()[-1500:]
        raise BackupError(f"{step} failed (exit {completed.returncode}): {tail}")
    return completed.stdout


def psql(bin_dir: str | None, database: str, sql: str, *, env: dict[str, str] | None = None) -> str:
    argv = [tool(bin_dir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql]
    return run(argv, step="psql", env=env).strip()


def server_version_num(bin_dir: str | None, database: str) -> int:
    return int(psql(bin_dir, database, "SHOW server_version_num"))


def study_manifest(bin_dir: str | None, database: str, *, env: dict[str, str] | None = None) -> list[dict]:
    """Read each study's name, trial counts by state and best value from Optuna's tables."""
    if not psql(bin_dir, database, "SELECT to_regclass('public.studies') IS NOT NULL", env=env) == "t":
        return []
    return json.loads(psql(bin_dir, database, STUDY_MANIFEST_SQL, env=env))


# --- files ---


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, document: object) -> None:
    """Write `document` to `path` through a temporary file and a rename, mode 0600."""
    partial = path.with_name(f".{path.name}.tmp")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    partial.rename(path)


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def tree_checksums(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): sha256_of(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def extract_tar(archive: Path, destination: Path) -> None:
    """Unpack a possibly compressed tar file, naming the file when it is damaged."""
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    decompressor = DECOMPRESSORS.get(archive.suffix)
    try:
        if decompressor is None:
            with tarfile.open(archive, "r:*") as tar:
                extract_members(tar, destination)
            return
        with subprocess.Popen([*decompressor, str(archive)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                extract_members(tar, destination)
            stderr = proc.stderr.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            raise BackupError(f"{archive.name} is damaged: {decompressor[0]}: {stderr[-500:]}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"{archive.name} is damaged: {exc}") from None


def extract_members(tar: tarfile.TarFile, destination: Path) -> None:
    # Extraction filters exist only from Python 3.11.4 and 3.12, and db hosts run older
    # Pythons (Debian 12 ships 3.11.2), so unsafe members are rejected here instead.
    for member in tar:
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise tarfile.TarError(f"member {member.name} points outside the data directory")
        if member.islnk() or (member.issym() and (Path(member.linkname).is_absolute() or ".." in Path(member.linkname).parts)):
            raise tarfile.TarError(f"member {member.name} is a link to {member.linkname}")
        tar.extract(member, destination, set_attrs=not member.isdir())


def find_archive(directory: Path, stem: str) -> Path | None:
    for path in sorted(directory.glob(f"{stem}.tar*")):
        return path
    return None


# --- records ---


def records_dir(backup_dir: Path) -> Path:
    path = backup_dir / RECORDS_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def read_records(backup_dir: Path) -> list[dict]:
    """Return every record, oldest first by the time the backup started (not by name)."""
    records = []
    directory = backup_dir / RECORDS_DIR
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            record = {"name": path.stem, "status": "unreadable", "error": str(exc), "started_at": None}
        if record.get("status") == "good" and not (backup_dir / record["name"]).is_dir():
            record["status"] = "missing"
        elif record.get("status") == "good":
            mark = read_damaged_mark(backup_dir, record["name"])
            if mark is not None:
                record.update(status="damaged", error=mark.get("error"), damaged_at=mark.get("verified_at"))
        records.append(record)
    return sorted(records, key=lambda record: record.get("started_at") or "")


def damaged_mark_path(backup_dir: Path, name: str) -> Path:
    return backup_dir / DAMAGED_DIR / f"{name}.json"


def read_damaged_mark(backup_dir: Path, name: str) -> dict | None:
    """Return the mark that a failed verify left on backup `name`, or None when there is none."""
    path = damaged_mark_path(backup_dir, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        # A mark that cannot be read still means that a verify failed on this backup.
        return {"error": f"the damaged mark {path} is unreadable: {exc}"}


def write_damaged_mark(backup_dir: Path, name: str, error: str) -> None:
    path = damaged_mark_path(backup_dir, name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_json(path, {"name": name, "error": error,
                      "verified_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})


def reject_damaged(backup_dir: Path, name: str) -> None:
    mark = read_damaged_mark(backup_dir, name)
    if mark is not None:
        raise BackupError(f"backup {name} is marked damaged by an earlier verify: {mark.get('error')}",
                          f"restore from another backup (tunefleet backup list); a passing "
                          f"`tunefleet backup verify {name}` removes the mark")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


# --- create ---


def choose_compression(requested: str, version_num: int) -> str:
    """Pick pg_basebackup's client-side compression: zstd or lz4 on 15 and later, else gzip."""
    if requested != "auto":
        if requested != "gzip" and version_num < 150000:
            raise BackupError(f"compression {requested} needs PostgreSQL 15 or later", "use --compression gzip")
        return requested
    if version_num >= 150000:
        for method in ("zstd", "lz4"):
            if shutil.which(method):
                return method
    return "gzip"


def new_stamp(backup_dir: Path, now: datetime.datetime) -> str:
    stamp = now.strftime(STAMP_FORMAT)
    candidate, counter = stamp, 1
    while any(path.exists() for path in (backup_dir / candidate, backup_dir / RECORDS_DIR / f"{candidate}.json",
                                          partial_lock_path(backup_dir, candidate))):
        counter += 1
        candidate = f"{stamp}-{counter}"
    return candidate


def partial_lock_path(backup_dir: Path, name: str) -> Path:
    return backup_dir / f"{PARTIAL_PREFIX}{name}{LOCK_SUFFIX}"


def lock_partial(backup_dir: Path, name: str) -> int:
    """Create and lock the lock file of .partial-<name>, which must exist before that directory does.

    O_EXCL makes the lock file this process's own, and it is locked before the directory
    exists, so a directory whose lock file is missing or unlocked has no live writer.
    """
    descriptor = os.open(partial_lock_path(backup_dir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    os.set_inheritable(descriptor, True)
    held_locks.append(descriptor)
    return descriptor


def unlock_partial(backup_dir: Path, name: str, descriptor: int) -> None:
    # The lock file goes while still locked, so no other backup can lock it and find the
    # directory (renamed or removed by now) stale.
    partial_lock_path(backup_dir, name).unlink(missing_ok=True)
    held_locks.remove(descriptor)
    os.close(descriptor)


def remove_stale_partials(backup_dir: Path) -> list[str]:
    """Remove the .partial directories that no running backup writes, and record each as failed."""
    removed = []
    for directory in sorted(backup_dir.glob(f"{PARTIAL_PREFIX}*")):
        if directory.is_symlink() or not directory.is_dir():
            continue
        name = directory.name[len(PARTIAL_PREFIX):]
        try:
            descriptor = os.open(partial_lock_path(backup_dir, name), os.O_RDWR)
        except FileNotFoundError:
            descriptor = None
        try:
            if descriptor is not None:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
            # A backup that finished meanwhile renamed its directory and wrote its record.
            if not directory.is_dir():
                continue
            try:
                last_written = directory.stat().st_mtime
                shutil.rmtree(directory)
                partial_lock_path(backup_dir, name).unlink(missing_ok=True)
            except OSError as exc:
                raise BackupError(f"removing {directory}, left by a backup that did not finish, failed: "
                                  f"{describe_failure(exc)}", "remove it by hand, then run the backup again") from None
        finally:
            if descriptor is not None:
                os.close(descriptor)
        record_interrupted(backup_dir, name, last_written)
        removed.append(name)
    return removed


def record_interrupted(backup_dir: Path, name: str, last_written: float) -> None:
    """Write a failed record for a backup whose process ended before it wrote any record.

    Its start time comes from its name, or from `last_written` (a POSIX time) when the
    name is not a stamp, because list and prune order records by that time.
    """
    path = records_dir(backup_dir) / f"{name}.json"
    if path.exists():
        return
    try:
        started = datetime.datetime.strptime(name[:len("YYYYmmddTHHMMSSZ")], STAMP_FORMAT)
        started = started.replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        started = datetime.datetime.fromtimestamp(last_written, datetime.timezone.utc)
    started_at = started.isoformat()
    write_json(path, {"name": name, "started_at": started_at, "status": "failed",
                      "error": "interrupted: the backup process ended before it finished, and the next "
                               "backup removed its partial directory"})


def take_base_backup(args: argparse.Namespace, target: Path, compression: str) -> None:
    argv = [
        tool(args.bin_dir, "pg_basebackup"), "--pgdata", str(target), "--format=tar", "--wal-method=stream",
        "--checkpoint=fast", "--no-password", f"--label=tunefleet {target.name}",
    ]
    argv.append("--gzip" if compression == "gzip" else f"--compress={compression}")
    run(argv, step="pg_basebackup")

    # pg_basebackup 15 and 16 compress pg_wal.tar only with gzip, so compress it here
    # with the same tool. A WAL segment is 16 MB and compresses to a few hundred kB.
    wal = target / "pg_wal.tar"
    if wal.exists() and compression in COMPRESSORS:
        run([*COMPRESSORS[compression], str(wal)], step=f"{compression} of pg_wal.tar")


def archive_config(config_dir: str | None, target: Path) -> None:
    """Store the configuration that lives outside the data directory (Debian's /etc/postgresql/N/main)."""
    if not config_dir:
        return
    source = Path(config_dir)
    if not source.is_dir():
        raise BackupError(f"configuration directory {source} not found", "pass the cluster's --config-dir or none")
    with tarfile.open(target / CONFIG_TAR, "w") as tar:
        tar.add(source, arcname=".")


def write_checksums(target: Path) -> None:
    names = sorted(path.name for path in target.iterdir() if path.is_file() and path.name != CHECKSUMS_FILE)
    lines = [f"{sha256_of(target / name)}  {name}\n" for name in names]
    with open(os.open(target / CHECKSUMS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())


def command_create(args: argparse.Namespace) -> dict:
    backup_dir = Path(args.backup_dir)
    if not backup_dir.is_dir():
        create_backup_dir(backup_dir, args.default_dir)
    removed = remove_stale_partials(backup_dir)
    started = datetime.datetime.now(datetime.timezone.utc)
    name = new_stamp(backup_dir, started)
    partial = backup_dir / f"{PARTIAL_PREFIX}{name}"
    try:
        lock = lock_partial(backup_dir, name)
    except OSError as exc:
        raise BackupError(f"creating the lock file of backup {name} failed: {describe_failure(exc)}",
                          "check the free space and the permissions of the backup directory") from None
    try:
        record = take_and_record(args, backup_dir, name, partial, started)
    finally:
        unlock_partial(backup_dir, name, lock)
    # Reported to the caller, not stored in the record.
    return {**record, "removed_partials": removed}


def create_backup_dir(backup_dir: Path, is_default: bool) -> None:
    """Create the default backup directory on first use; a directory that the user named must exist."""
    if not is_default:
        raise BackupError(f"backup directory {backup_dir} not found",
                          f"create it as {account_name()} with mode 0700 (mkdir -m 700 {backup_dir}), "
                          "or leave out --backup-dir to use the default directory, which backup create makes itself")
    try:
        # Not parents=True: a missing parent means the server itself is missing, which a
        # new directory would hide.
        backup_dir.mkdir(mode=0o700)
        backup_dir.chmod(0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BackupError(f"creating the backup directory {backup_dir} failed: {describe_failure(exc)}",
                          f"check that {backup_dir.parent} exists and that {account_name()} may write to it") from None


def account_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def take_and_record(args: argparse.Namespace, backup_dir: Path, name: str, partial: Path,
                    started: datetime.datetime) -> dict:
    record = {"name": name, "started_at": started.isoformat(), "status": "running", "host": socket.gethostname()}
    clock = time.monotonic()
    try:
        version_num = server_version_num(args.bin_dir, args.database)
        compression = choose_compression(args.compression, version_num)
        record.update(postgresql_version=version_num // 10000, server_version_num=version_num, compression=compression)
        record["bootstrap_role"] = psql(args.bin_dir, args.database, BOOTSTRAP_ROLE_SQL)

        # Taken before the base backup starts, so that every trial it counts is in the backup.
        studies = study_manifest(args.bin_dir, args.database)
        partial.mkdir(mode=0o700)
        take_base_backup(args, partial, compression)
        write_json(partial / STUDIES_FILE, studies)
        archive_config(args.config_dir, partial)
        # The scratch copy lies inside the partial directory, so that the leftovers of a
        # killed backup are one directory, which the next backup removes.
        verify_contents(args, partial, write_data_checksums=version_num < 130000, scratch_parent=partial)

        record.update(
            status="good",
            studies=studies,
            finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            duration_s=round(time.monotonic() - clock, 3),
        )
        record["size_bytes"] = sum(path.stat().st_size for path in partial.iterdir() if path.is_file())
        write_json(partial / RECORD_FILE, record)
        write_checksums(partial)
        for path in partial.iterdir():
            path.chmod(0o600)
        partial.rename(backup_dir / name)
        fsync_dir(backup_dir)
        write_json(records_dir(backup_dir) / f"{name}.json", record)
        return record
    except Interrupted as exc:
        shutil.rmtree(partial, ignore_errors=True)
        message = f"interrupted: {exc} arrived before the backup finished, and its partial directory was removed"
        record.update(status="failed", error=message, duration_s=round(time.monotonic() - clock, 3))
        with contextlib.suppress(OSError):
            write_json(records_dir(backup_dir) / f"{name}.json", record)
        raise BackupError(f"backup {name} {message}",
                          "earlier backups are untouched; run backup create again") from None
    except Exception as exc:
        # Free the space first: a full disk must still leave room for the failed record.
        shutil.rmtree(partial, ignore_errors=True)
        message = describe_failure(exc)
        record.update(status="failed", error=message, duration_s=round(time.monotonic() - clock, 3))
        with contextlib.suppress(OSError):
            write_json(records_dir(backup_dir) / f"{name}.json", record)
        raise BackupError(f"backup {name} failed: {message}", "earlier backups are untouched") from None


def describe_failure(exc: Exception) -> str:
    if isinstance(exc, BackupError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror}: {exc.filename}"
    return f"{type(exc).__name__}: {exc}"


# --- verify ---


def check_checksums(directory: Path) -> list[str]:
    """Compare every file against SHA256SUMS and return one problem per damaged file."""
    sums = directory / CHECKSUMS_FILE
    if not sums.is_file():
        return [f"{CHECKSUMS_FILE}: missing"]
    problems = []
    listed = set()
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        listed.add(name)
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_of(path) != expected:
            problems.append(f"{name}: checksum mismatch (the file was changed or truncated)")
    for path in sorted(directory.iterdir()):
        if path.name not in listed and path.name != CHECKSUMS_FILE:
            problems.append(f"{path.name}: not listed in {CHECKSUMS_FILE}")
    return problems


def unpack_backup(directory: Path, data_dir: Path) -> None:
    """Unpack base.tar.* into `data_dir` and pg_wal.tar.* into its pg_wal."""
    base = find_archive(directory, "base")
    if base is None:
        raise BackupError(f"{directory.name}/base.tar: missing")
    extract_tar(base, data_dir)
    wal = find_archive(directory, "pg_wal")
    if wal is not None:
        extract_tar(wal, data_dir / "pg_wal")
    data_dir.chmod(0o700)


def verify_contents(args: argparse.Namespace, directory: Path, *, write_data_checksums: bool = False,
                    scratch_parent: Path | None = None) -> None:
    """Unpack the backup into a scratch directory and check every file of the data directory.

    pg_verifybackup before PostgreSQL 18 reads only plain-format backups, so the tar
    files are unpacked first. The same unpacking is what a restore does, so a backup
    that passes here has been proven to unpack.
    """
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=scratch_parent or directory.parent) as scratch:
        data_dir = Path(scratch) / "data"
        unpack_backup(directory, data_dir)
        manifest = directory / "backup_manifest"
        data_checksums = directory / DATA_CHECKSUMS_FILE
        if write_data_checksums:
            write_json(data_checksums, tree_checksums(data_dir))
        elif manifest.is_file():
            argv = [tool(args.bin_dir, "pg_verifybackup"), "--quiet", "--manifest-path", str(manifest), str(data_dir)]
            run(argv, step=f"pg_verifybackup of {directory.name}")
        elif data_checksums.is_file():
            compare_data_checksums(json.loads(data_checksums.read_text()), tree_checksums(data_dir))
        else:
            raise BackupError(f"{directory.name}: neither backup_manifest nor {DATA_CHECKSUMS_FILE} found")


def compare_data_checksums(expected: dict[str, str], actual: dict[str, str]) -> None:
    for name in sorted(expected):
        if name not in actual:
            raise BackupError(f"{name}: missing from the unpacked data directory")
        if actual[name] != expected[name]:
            raise BackupError(f"{name}: checksum mismatch in the unpacked data directory")


def resolve_backup(backup_dir: Path, name: str) -> Path:
    directory = backup_dir / name
    if name.startswith(".") or "/" in name or not directory.is_dir():
        known = [record["name"] for record in read_records(backup_dir) if record.get("status") == "good"]
        raise BackupError(f"backup {name} not found in {backup_dir}",
                          f"good backups: {', '.join(known) or 'none'} (tunefleet backup list)")
    return directory


def command_verify(args: argparse.Namespace) -> dict:
    backup_dir = Path(args.backup_dir)
    directory = resolve_backup(backup_dir, args.name)
    if args.restore:
        reject_damaged(backup_dir, args.name)
    problems = check_checksums(directory)
    if problems:
        fail_verify(backup_dir, args.name, "; ".join(problems))
    try:
        verify_contents(args, directory)
    except BackupError as exc:
        fail_verify(backup_dir, args.name, exc.message)
    damaged_mark_path(backup_dir, args.name).unlink(missing_ok=True)
    result = {"name": args.name, "verified": True}
    if args.restore:
        result["drill"] = restore_drill(args, directory)
    return result


def fail_verify(backup_dir: Path, name: str, problem: str) -> None:
    hint = "restore from another backup (tunefleet backup list)"
    try:
        write_damaged_mark(backup_dir, name, problem)
    except OSError as exc:
        hint += f"; marking it damaged failed too ({describe_failure(exc)}), so backup list still shows it as good"
    raise BackupError(f"backup {name} is damaged: {problem}", hint)


# --- restore drill ---


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def compare_study_manifests(expected: list[dict], restored: list[dict]) -> list[str]:
    """Return the differences that mean studies were lost.

    The manifest is read just before the base backup starts, and workers may finish
    trials while it runs, so the restored database may hold more trials, never fewer.
    """
    problems = []
    restored_by_name = {study["name"]: study for study in restored}
    for study in expected:
        name = study["name"]
        if name not in restored_by_name:
            problems.append(f"study {name} is missing")
            continue
        before, after = study["trials"], restored_by_name[name]["trials"]
        finished_before = sum(before.get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL"))
        finished_after = sum(after.get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL"))
        if after.get("COMPLETE", 0) < before.get("COMPLETE", 0) or finished_after < finished_before:
            problems.append(f"study {name} has {after} trials, the manifest has {before}")
        if sum(after.values()) < sum(before.values()):
            problems.append(f"study {name} has {sum(after.values())} trials, the manifest has {sum(before.values())}")
    return problems


def wait_for_recovery_end(bin_dir: str | None, database: str, env: dict[str, str], name: str,
                          timeout_s: float = 300.0) -> None:
    """Wait until the scratch server has replayed the backup's WAL and accepts connections.

    With hot_standby off, pg_ctl start --wait returns once recovery is consistent, while
    the server still rejects connections until the replay ends.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psql(bin_dir, "postgres", "SELECT pg_is_in_recovery()", env=env) == "f":
                return
            reason = "still in recovery"
        except BackupError as error:
            reason = str(error)
        if time.monotonic() > deadline:
            raise BackupError(f"scratch server on backup {name} did not finish recovery in {timeout_s:.0f} s: {reason}")
        time.sleep(0.5)


def restore_drill(args: argparse.Namespace, directory: Path) -> dict:
    """Start a scratch server on the backup, compare its studies with the manifest, remove it."""
    expected = json.loads((directory / STUDIES_FILE).read_text())
    clock = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=directory.parent) as scratch:
        data_dir = Path(scratch) / "data"
        socket_dir = Path(scratch) / "run"
        socket_dir.mkdir(mode=0o700)
        unpack_backup(directory, data_dir)
        port = free_port()
        env = {**os.environ, "PGHOST": str(socket_dir), "PGPORT": str(port)}
        # Command-line settings win over the restored configuration files, so the scratch
        # server neither archives WAL into the real archive nor listens beyond loopback.
        options = (
            f"-c port={port} -c listen_addresses='127.0.0.1' -c unix_socket_directories='{socket_dir}' "
            "-c archive_mode=off -c shared_buffers=32MB -c max_connections=20 "
            "-c max_wal_senders=0 -c wal_level=minimal -c hot_standby=off"
        )
        pg_ctl = tool(args.server_bin_dir or args.bin_dir, "pg_ctl")
        log_file = Path(scratch) / "server.log"
        started = subprocess.run(
            [pg_ctl, "start", "--wait", "--timeout=120", "--pgdata", str(data_dir), "--log", str(log_file),
             "-o", options], capture_output=True, text=True, env=env, check=False,
        )
        try:
            if started.returncode != 0:
                tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else started.stderr
                raise BackupError(f"scratch server on backup {directory.name} did not start: {tail.strip()}")
            wait_for_recovery_end(args.bin_dir, args.database, env, directory.name)
            restored = study_manifest(args.bin_dir, args.database, env=env)
        finally:
            subprocess.run([pg_ctl, "stop", "--wait", "--mode=fast", "--pgdata", str(data_dir)],
                           capture_output=True, env=env, check=False)
    problems = compare_study_manifests(expected, restored)
    if problems:
        raise BackupError(f"restore drill of {directory.name} failed: " + "; ".join(problems))
    return {"port": port, "studies": restored, "duration_s": round(time.monotonic() - clock, 3)}


# --- restore ---


def command_unpack(args: argparse.Namespace) -> dict:
    """Check a backup and unpack it into an empty data directory, for a restore."""
    directory = resolve_backup(Path(args.backup_dir), args.name)
    reject_damaged(Path(args.backup_dir), args.name)
    data_dir = Path(args.data_dir)
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"data directory {data_dir} is not empty; nothing was overwritten",
                          "restore onto a host without a server, or move that directory away first")
    problems = check_checksums(directory)
    if problems:
        raise BackupError(f"backup {args.name} is damaged: " + "; ".join(problems),
                          "restore from another backup (tunefleet backup list)")
    unpack_backup(directory, data_dir)
    restored_config = False
    if args.config_dir and (directory / CONFIG_TAR).is_file():
        extract_tar(directory / CONFIG_TAR, Path(args.config_dir))
        restored_config = True
    record = json.loads((directory / RECORD_FILE).read_text())
    created_role = False
    if args.owner_role:
        bootstrap_role = record.get("bootstrap_role") or args.bootstrap_role
        if not bootstrap_role:
            raise BackupError(f"backup {args.name} does not record its bootstrap superuser",
                              "pass --bootstrap-role, the account that ran the backed-up server")
        created_role = create_owner_role(args, data_dir, args.owner_role, bootstrap_role)
    return {"name": args.name, "data_dir": str(data_dir), "config_restored": restored_config,
            "owner_role_created": created_role, "postgresql_version": record.get("postgresql_version")}


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_owner_role(args: argparse.Namespace, data_dir: Path, role: str, bootstrap_role: str) -> bool:
    """Give the restoring account a superuser role of its own name in the restored cluster.

    The server's tools log in over the socket with peer authentication, which needs a
    role named after the account that runs the server. A cluster restored under another
    account has only the old account's roles. So this starts it once, with no TCP
    listener and trust only on a socket in a 0700 directory, and creates the role as the
    bootstrap superuser. Returns False when no role was needed.
    """
    if role == bootstrap_role:
        return False
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=data_dir.parent) as scratch:
        socket_dir = Path(scratch)
        hba_file = socket_dir / "pg_hba.conf"
        hba_file.write_text("local all all trust\n")
        port = free_port()
        env = {**os.environ, "PGHOST": str(socket_dir), "PGPORT": str(port), "PGUSER": bootstrap_role}
        options = (
            f"-c port={port} -c listen_addresses='' -c unix_socket_directories='{socket_dir}' "
            f"-c hba_file='{hba_file}' -c archive_mode=off"
        )
        pg_ctl = tool(args.server_bin_dir or args.bin_dir, "pg_ctl")
        log_file = socket_dir / "server.log"
        started = subprocess.run(
            [pg_ctl, "start", "--wait", "--timeout=120", "--pgdata", str(data_dir), "--log", str(log_file),
             "-o", options], capture_output=True, text=True, env=env, check=False, cwd="/",
        )
        try:
            if started.returncode != 0:
                tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else started.stderr
                raise BackupError(f"the restored server in {data_dir} did not start: {tail.strip()}")
            wait_for_recovery_end(args.bin_dir, "postgres", env, data_dir.name)
            exists = psql(args.bin_dir, "postgres", f"SELECT count(*) FROM pg_roles WHERE rolname = {quote_literal(role)}",
                          env=env)
            if exists == "0":
                psql(args.bin_dir, "postgres", f"CREATE ROLE {quote_identifier(role)} SUPERUSER LOGIN", env=env)
        finally:
            subprocess.run([pg_ctl, "stop", "--wait", "--mode=fast", "--pgdata", str(data_dir)],
                           capture_output=True, env=env, check=False, cwd="/")
    return exists == "0"


# --- list and prune ---


def command_list(args: argparse.Namespace) -> dict:
    backup_dir = Path(args.backup_dir)
    if not backup_dir.is_dir():
        if args.default_dir:
            raise BackupError(f"backup directory {backup_dir} not found, so no backup was taken yet",
                              "take the first one: tunefleet backup create")
        raise BackupError(f"backup directory {backup_dir} not found",
                          "pass the --backup-dir that backup create or backup schedule wrote to")
    now = parse_time(args.now) if args.now else datetime.datetime.now(datetime.timezone.utc)
    records = read_records(backup_dir)
    good = [record for record in records if record.get("status") == "good"]
    warnings = []
    if not good:
        warnings.append("no good backup exists")
    elif now - parse_time(good[-1]["started_at"]) > STALE_AFTER:
        age_h = (now - parse_time(good[-1]["started_at"])).total_seconds() / 3600
        warnings.append(f"the newest good backup, {good[-1]['name']}, is {age_h:.0f} hours old "
                        f"(more than {STALE_AFTER.total_seconds() / 3600:.0f}); check the nightly job")
    return {"backup_dir": str(backup_dir), "backups": records, "warnings": warnings}


def plan_prune(records: list[dict], keep_daily: int, keep_weekly: int) -> tuple[list[dict], list[dict]]:
    """Split records into (kept, deleted) by backup time.

    The newest good backup of each of the last `keep_daily` days and of each of the
    last `keep_weekly` ISO weeks is kept, and the newest good backup always is. Failed
    records older than the newest good backup are deleted, and newer ones stay so that a
    failing night remains visible. A backup marked damaged counts as failed. Unreadable
    records and records whose directory is missing are kept for the operator to look at.
    """
    good = sorted((r for r in records if r.get("status") == "good"), key=lambda r: r["started_at"], reverse=True)
    keep = set()
    if good:
        keep.add(good[0]["name"])
    for count, period in ((keep_daily, lambda t: t.date()), (keep_weekly, lambda t: t.isocalendar()[:2])):
        seen = []
        for record in good:
            key = period(parse_time(record["started_at"]))
            if key not in seen:
                seen.append(key)
                if len(seen) > count:
                    break
                keep.add(record["name"])
    newest_good_time = good[0]["started_at"] if good else None
    kept, deleted = [], []
    for record in records:
        if record.get("status") == "good":
            (kept if record["name"] in keep else deleted).append(record)
        elif (record.get("status") in ("failed", "damaged") and newest_good_time is not None
              and record["started_at"] < newest_good_time):
            deleted.append(record)
        else:
            kept.append(record)
    return kept, deleted


def command_prune(args: argparse.Namespace) -> dict:
    backup_dir = Path(args.backup_dir)
    if not backup_dir.is_dir():
        raise BackupError(f"backup directory {backup_dir} not found")
    kept, deleted = plan_prune(read_records(backup_dir), args.keep_daily, args.keep_weekly)
    if not args.dry_run:
        for record in deleted:
            # The record goes last, so an interrupted prune leaves a record for what remains.
            shutil.rmtree(backup_dir / record["name"], ignore_errors=True)
            damaged_mark_path(backup_dir, record["name"]).unlink(missing_ok=True)
            (backup_dir / RECORDS_DIR / f"{record['name']}.json").unlink(missing_ok=True)
    return {"dry_run": args.dry_run, "kept": [r["name"] for r in kept], "deleted": [r["name"] for r in deleted]}


def command_studies(args: argparse.Namespace) -> dict:
    return {"studies": study_manifest(args.bin_dir, args.database)}


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunefleet_backup.py", description=__doc__.splitlines()[0])
    parser.add_argument("--backup-dir", required=True, help="Directory that contains the backups and their records.")
    parser.add_argument("--bin-dir", default=None, help="bin directory of the server's installation. Default: PATH.")
    parser.add_argument("--database", default="optuna", help="Database that contains Optuna's tables.")
    parser.add_argument("--default-dir", action="store_true",
                        help="--backup-dir is the site's default, so create makes it on first use "
                             "and a missing one means no backup yet.")
    # NOTE: relocatable server builds, such as the PostgreSQL 12 archive of the test suite,
    # carry only initdb, pg_ctl and postgres. Their client tools then come from a newer
    # installation, because pg_basebackup and psql read servers of older majors, and the
    # restore drill takes the server's own pg_ctl from this directory.
    parser.add_argument("--server-bin-dir", default=None,
                        help="bin directory of pg_ctl and postgres for the restore drill. Default: --bin-dir.")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="Take a base backup, verify it, and record it.")
    create.add_argument("--compression", choices=("auto", "zstd", "lz4", "gzip"), default="auto",
                        help="Compression of the tar files. auto: zstd, else lz4 on PostgreSQL 15+, else gzip.")
    create.add_argument("--config-dir", default=None,
                        help="Configuration directory outside the data directory, such as /etc/postgresql/15/main.")
    create.set_defaults(handler=command_create)

    verify = commands.add_parser("verify", help="Check a backup's checksums and unpack and verify its files.")
    verify.add_argument("name")
    verify.add_argument("--restore", action="store_true", help="Also start a scratch server on it and compare studies.")
    verify.set_defaults(handler=command_verify)

    listing = commands.add_parser("list", help="List the records of every backup, oldest first.")
    listing.add_argument("--now", default=None, help="Current time as ISO 8601, for the age warning. Default: now.")
    listing.set_defaults(handler=command_list)

    prune = commands.add_parser("prune", help="Delete backups beyond the retention.")
    prune.add_argument("--keep-daily", type=int, required=True, help="Days whose newest good backup is kept.")
    prune.add_argument("--keep-weekly", type=int, required=True, help="ISO weeks whose newest good backup is kept.")
    prune.add_argument("--dry-run", action="store_true", help="Report what would be deleted and delete nothing.")
    prune.set_defaults(handler=command_prune)

    unpack = commands.add_parser("unpack", help="Check a backup and unpack it into an empty data directory.")
    unpack.add_argument("name")
    unpack.add_argument("--data-dir", required=True, help="Data directory to create; it must be absent or empty.")
    unpack.add_argument("--config-dir", default=None, help="Where the backup's config.tar goes, if it has one.")
    unpack.add_argument("--owner-role", default=None,
                        help="Superuser role to create for the account that will run the restored server, "
                             "when it is not the backup's bootstrap superuser. Default: create none.")
    unpack.add_argument("--bootstrap-role", default=None,
                        help="Bootstrap superuser of the backed-up cluster, for backups whose record lacks it.")
    unpack.set_defaults(handler=command_unpack)

    studies = commands.add_parser("studies", help="Print the study manifest of the running server.")
    studies.set_defaults(handler=command_studies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, raise_interrupted)
    try:
        result = args.handler(args)
    except BackupError as exc:
        json.dump({"error": exc.message, "hint": exc.hint}, sys.stdout)
        sys.stdout.write("\n")
        return 1
    except Interrupted as exc:
        json.dump({"error": f"{args.command} interrupted by {exc}", "hint": None}, sys.stdout)
        sys.stdout.write("\n")
        return 1
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
