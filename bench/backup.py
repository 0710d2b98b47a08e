"""Backup and restore: `tunefleet backup create` and the restore's unpack against plain tar.

The server is a user-mode PostgreSQL that the project's playbook installs for this part.
It contains STUDY_COUNT studies with TRIAL_COUNT finished trials in all, each with two float
parameters and one value. Optuna's `study.add_trials` writes one transaction per trial, so
only the first ADD_TRIALS_COUNT trials go through it. One INSERT per study writes the rest
into Optuna's own tables, with random parameters so that the data compresses like real
trials. Both rates are recorded.

Per repetition:

- *backup create*: `ops.backups.create_backup` on the site that `ops.backups.open_backup_host`
  reads from an inventory, which is what `tunefleet backup create --no-sudo` calls. It runs
  pg_basebackup against the running server, compresses, unpacks the result into a scratch
  directory, checks it with pg_verifybackup and writes checksums.
- *tar*, the limit: the server is shut down, `tar -cf` copies its data directory, and
  `sync` fsyncs the tar file, as pg_basebackup fsyncs what it writes.
- *restore*: the backup script's `unpack` command, the step of `tunefleet restore` that
  puts the data directory in place, against `tar -xf` of the tar file.

Throughput is the raw data directory's size divided by the time, so each ratio is the
tar's time over tunefleet's. The order of backup and tar alternates between repetitions.
Two steps of the backup are timed alone to show where its time goes: pg_basebackup with
the same options, and `tunefleet backup verify` (checksums, unpack, pg_verifybackup).

This part runs as root or as any account that may run the playbook in user mode. Under
root, the server and the backup script run as the account that the role creates.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from optuna.distributions import FloatDistribution

from bench.common import BenchServer, provision_bench_server
from bench.trivial_objective import HIGH, LOW
from ops import backups

STUDY_COUNT = 4
TRIAL_COUNT = 100_000
ADD_TRIALS_COUNT = 1_000
ADD_TRIALS_BATCH = 250
INSERT_TRIALS_SQL = """
WITH new_trials AS (
    INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete)
    SELECT :first_number + g, (SELECT study_id FROM studies WHERE study_name = :study_name), 'COMPLETE',
           now() - interval '1 second' * (:count - g) * 30,
           now() - interval '1 second' * ((:count - g) * 30 - 1 - 28 * random())
    FROM generate_series(0, :count - 1) AS g
    RETURNING trial_id
), sampled AS (
    SELECT trial_id, :low + (:high - :low) * random() AS x, :low + (:high - :low) * random() AS y
    FROM new_trials
), params AS (
    INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
    SELECT trial_id, 'x', x, :distribution FROM sampled
    UNION ALL
    SELECT trial_id, 'y', y, :distribution FROM sampled
)
INSERT INTO trial_values (trial_id, objective, value, value_type)
SELECT trial_id, 0, (x - 2.0) ^ 2 + y, 'FINITE' FROM sampled
"""


def run(repetitions: int, log: Any) -> dict[str, Any]:
    server = provision_bench_server()
    try:
        fill = fill_studies(server.storage_url())
        log(f"backup: {TRIAL_COUNT} trials written: add_trials {fill['add_trials_per_second']:.0f} trials/s, "
            f"bulk INSERT {fill['insert_per_second']:.0f} trials/s")
        with tempfile.TemporaryDirectory(prefix="tunefleet-bench-backup-", dir=server.base_dir) as scratch:
            scratch_dir = Path(scratch)
            owned_by_account(scratch_dir, server)
            host = backup_host(server, scratch_dir)
            runs = [measure_repetition(server, host, scratch_dir, repetition, log)
                    for repetition in range(repetitions)]
    finally:
        server.stop()
    return {"repetitions": repetitions, "fill": fill, "runs": runs}


def fill_studies(storage_url: str) -> dict[str, Any]:
    """Create STUDY_COUNT studies with TRIAL_COUNT COMPLETE trials in all, and return the fill rates."""
    per_study = TRIAL_COUNT // STUDY_COUNT
    distribution = FloatDistribution(LOW, HIGH)
    names = [f"bench-backup-{index}-{uuid.uuid4().hex[:6]}" for index in range(STUDY_COUNT)]
    first_study = optuna.create_study(study_name=names[0], storage=storage_url, direction="minimize")
    for name in names[1:]:
        optuna.create_study(study_name=name, storage=storage_url, direction="minimize")

    started = time.monotonic()
    for _ in range(ADD_TRIALS_COUNT // ADD_TRIALS_BATCH):
        first_study.add_trials([finished_trial(distribution) for _ in range(ADD_TRIALS_BATCH)])
    add_trials_seconds = time.monotonic() - started

    engine = sqlalchemy.create_engine(storage_url)
    started = time.monotonic()
    try:
        with engine.begin() as connection:
            for index, name in enumerate(names):
                already = ADD_TRIALS_COUNT if index == 0 else 0
                connection.execute(sqlalchemy.text(INSERT_TRIALS_SQL), {
                    "first_number": already, "study_name": name, "count": per_study - already,
                    "low": LOW, "high": HIGH,
                    "distribution": optuna.distributions.distribution_to_json(distribution),
                })
    finally:
        engine.dispose()
    insert_seconds = time.monotonic() - started
    inserted = TRIAL_COUNT - ADD_TRIALS_COUNT
    return {"studies": STUDY_COUNT, "trials": TRIAL_COUNT, "add_trials_trials": ADD_TRIALS_COUNT,
            "add_trials_per_second": ADD_TRIALS_COUNT / add_trials_seconds,
            "insert_trials": inserted, "insert_per_second": inserted / insert_seconds}


def finished_trial(distribution: FloatDistribution) -> optuna.trial.FrozenTrial:
    x, y = random.uniform(LOW, HIGH), random.uniform(LOW, HIGH)
    return optuna.trial.create_trial(params={"x": x, "y": y}, distributions={"x": distribution, "y": distribution},
                                     value=(x - 2.0) ** 2 + y)


def backup_host(server: BenchServer, scratch_dir: Path) -> backups.BackupHost:
    """Open the backup site the way the `tunefleet backup` commands do: from an inventory."""
    inventory = scratch_dir / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "db": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "postgresql_port": server.server.port,
            "postgresql_prefix": str(server.prefix),
        }}},
    }}}))
    backup_dir = scratch_dir / "backups"
    backup_dir.mkdir(mode=0o700)
    owned_by_account(backup_dir, server)
    return backups.open_backup_host(inventory, no_sudo=True, backup_dir=str(backup_dir))


def measure_repetition(server: BenchServer, host: backups.BackupHost, scratch_dir: Path, repetition: int,
                       log: Any) -> dict[str, Any]:
    """Time backup create against tar, then the restore's unpack against untar, then two backup steps alone."""
    tar_file = scratch_dir / "limit.tar"
    if repetition % 2 == 0:
        record, backup_seconds = timed(lambda: backups.create_backup(host))
        raw = stopped_sizes(server)
        tar_seconds, fsync_seconds = tar_stopped_data_dir(server, tar_file)
    else:
        raw = stopped_sizes(server)
        tar_seconds, fsync_seconds = tar_stopped_data_dir(server, tar_file)
        record, backup_seconds = timed(lambda: backups.create_backup(host))

    unpack_dir, untar_dir = scratch_dir / "unpacked", scratch_dir / "untarred"
    _, unpack_seconds = timed(lambda: host.call("unpack", record["name"], "--data-dir", str(unpack_dir)))
    untar_dir.mkdir(mode=0o700)
    _, untar_seconds = timed(lambda: run_checked(["tar", "-xf", str(tar_file), "-C", str(untar_dir)]))
    for path in (unpack_dir, untar_dir, tar_file):
        remove(path)

    basebackup_seconds = time_basebackup_alone(server, scratch_dir, record["compression"])
    _, verify_seconds = timed(lambda: backups.verify_backup(host, record["name"]))
    remove(Path(host.site.backup_dir) / record["name"])

    result = {
        "raw_bytes": raw["total"], "raw_wal_bytes": raw["pg_wal"], "backup_bytes": record["size_bytes"],
        "compression": record["compression"], "studies": record["studies"],
        "seconds": {"backup": backup_seconds, "tar": tar_seconds + fsync_seconds, "tar_without_fsync": tar_seconds,
                    "unpack": unpack_seconds, "untar": untar_seconds,
                    "basebackup_alone": basebackup_seconds, "verify_alone": verify_seconds},
    }
    log(f"backup: repetition {repetition + 1}: backup create {backup_seconds:.1f} s, "
        f"tar {tar_seconds:.1f} s and fsync {fsync_seconds:.1f} s, "
        f"unpack {unpack_seconds:.1f} s, untar {untar_seconds:.1f} s, "
        f"backup {record['size_bytes'] / 2**20:.0f} MiB of {raw['total'] / 2**20:.0f} MiB")
    return result


def stopped_sizes(server: BenchServer) -> dict[str, int]:
    """Shut the server down and return the bytes of its data directory and of pg_wal in it.

    The server stays down for the tar that follows, and tar_stopped_data_dir starts it again.
    """
    server.shut_down()
    return {"total": tree_bytes(server.data_dir), "pg_wal": tree_bytes(server.data_dir / "pg_wal")}


def tar_stopped_data_dir(server: BenchServer, tar_file: Path) -> tuple[float, float]:
    """Time `tar -cf` of the stopped data directory and the fsync of the tar file, then start the server again.

    pg_basebackup fsyncs the files that it writes, so the limit's tar file is synced too.
    """
    _, tar_seconds = timed(lambda: run_checked(["tar", "-cf", str(tar_file), "-C", str(server.data_dir), "."]))
    _, fsync_seconds = timed(lambda: run_checked(["sync", str(tar_file)]))
    server.start()
    return tar_seconds, fsync_seconds


def time_basebackup_alone(server: BenchServer, scratch_dir: Path, compression: str) -> float:
    """Time pg_basebackup with the backup script's options, without its compression of pg_wal.tar or verify."""
    target = scratch_dir / "basebackup-alone"
    option = "--gzip" if compression == "gzip" else f"--compress={compression}"
    script = (f"pg_basebackup --pgdata '{target}' --format=tar --wal-method=stream --checkpoint=fast "
              f"--no-password {option}")
    completed, seconds = timed(lambda: server.run_as_account(script, timeout=600))
    remove(target)
    if completed.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed: {(completed.stdout + completed.stderr).strip()[-500:]}")
    return seconds


def tree_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def timed(action: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def run_checked(argv: list[str]) -> None:
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed with exit code {completed.returncode}: "
                           f"{completed.stderr.strip()[-500:]}")


def owned_by_account(path: Path, server: BenchServer) -> None:
    """Give `path` to the server's account, which runs the backup script, when that is another account."""
    account = pwd.getpwnam(server.account)
    if os.geteuid() == 0:
        os.chown(path, account.pw_uid, account.pw_gid)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
