"""The worker's link to the study: storage URL, RDB storage, study settings, trial counts.

The storage URL comes from the environment (``TUNEFLEET_STORAGE_URL``) or from an
environment file of ``KEY=VALUE`` lines, never from the command line, because argv is
visible to every user of the host through ``ps``.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

URL_VARIABLE = "TUNEFLEET_STORAGE_URL"
ENV_FILE_VARIABLE = "TUNEFLEET_ENV_FILE"
SETTINGS_ATTR = "tunefleet"

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")

# First key of the two-key advisory lock that serializes "count, then ask for a trial"
# across workers; the second key is the study id. The value spells "tf".
_LOCK_NAMESPACE = 0x7466


class StorageError(Exception):
    """A storage URL, environment file, connection or study problem, in one line."""


@dataclass(frozen=True)
class StudySettings:
    """The operator's settings stored in the study user attribute ``tunefleet``."""

    target_trials: int
    sampler: str
    pruner: str
    seed: int | None

    @classmethod
    def from_attr(cls, study_name: str, attr: Any) -> "StudySettings":
        """Validate the ``tunefleet`` attribute written by ``tunefleet study create``."""
        fix = f"recreate it with: tunefleet study create {study_name}"
        if not isinstance(attr, dict):
            raise StorageError(f"study '{study_name}' has an invalid '{SETTINGS_ATTR}' attribute; {fix}")
        target = attr.get("target_trials")
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise StorageError(f"study '{study_name}': target_trials must be a positive integer, got {target!r}; {fix}")
        if attr.get("sampler") not in SAMPLERS:
            raise StorageError(f"study '{study_name}': sampler must be one of {', '.join(SAMPLERS)}, got {attr.get('sampler')!r}; {fix}")
        if attr.get("pruner") not in PRUNERS:
            raise StorageError(f"study '{study_name}': pruner must be one of {', '.join(PRUNERS)}, got {attr.get('pruner')!r}; {fix}")
        seed = attr.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise StorageError(f"study '{study_name}': seed must be an integer or null, got {seed!r}; {fix}")
        return cls(target_trials=target, sampler=attr["sampler"], pruner=attr["pruner"], seed=seed)


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return "<unparsable storage URL>"


def read_env_file(path: str | Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines; reject a file that group or others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise StorageError(f"cannot read env file {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StorageError(
            f"env file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}) "
            f"and holds the storage password; run: chmod 600 {path}"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise StorageError(f"cannot read env file {path}: {error.strerror}") from None

    values = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.removeprefix("export ").partition("=")
        if not separator or not key.strip():
            raise StorageError(f"env file {path}, line {number}: expected KEY=VALUE")
        values[key.strip()] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def normalize_url(url: str) -> str:
    """Pin a bare PostgreSQL URL to psycopg2, the driver tunefleet installs.

    SQLAlchemy 2 maps ``postgresql://`` to psycopg 3, which is usually absent.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def resolve_storage_url(env_file: str | None, environ: Mapping[str, str]) -> str:
    """Find the storage URL: ``--env-file``, then the environment, then ``TUNEFLEET_ENV_FILE``."""
    if env_file is None and environ.get(URL_VARIABLE):
        return normalize_url(environ[URL_VARIABLE])
    env_file = env_file or environ.get(ENV_FILE_VARIABLE)
    if not env_file:
        raise StorageError(
            f"no storage URL: set {URL_VARIABLE}, or pass --env-file PATH "
            f"(or set {ENV_FILE_VARIABLE}) naming a 0600 file with a {URL_VARIABLE}=... line"
        )
    url = read_env_file(env_file).get(URL_VARIABLE)
    if not url:
        raise StorageError(f"env file {env_file} has no {URL_VARIABLE}=... line")
    return normalize_url(url)


def open_storage(url: str, heartbeat_interval: int, grace_period: int | None,
                 stale_trial_callback: Any) -> optuna.storages.RDBStorage:
    """Connect to the RDB storage with heartbeats; raise StorageError with a masked URL."""
    engine_kwargs = {
        # A worker runs for days; pre-ping re-opens connections the server or a
        # firewall dropped in between trials instead of failing the next query.
        "pool_pre_ping": True,
        # The main thread and the heartbeat thread each hold at most one connection,
        # plus one for the trial-count lock.
        "pool_size": 2,
        "max_overflow": 2,
    }
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale_trial_callback,
            # The operator creates the schema with the study; concurrent creation by
            # several starting workers could race.
            skip_table_creation=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
            ImportError, ValueError) as error:
        raise StorageError(
            f"cannot connect to the storage at {mask_url(url)}: {_reason(error, url)}; "
            f"check host, port, database, user and password in {URL_VARIABLE}, "
            "and that the server accepts connections from this host"
        ) from None
    except RuntimeError as error:
        # Optuna raises RuntimeError when the schema version does not match this release.
        raise StorageError(f"storage at {mask_url(url)}: {_reason(error, url)}") from None


def _reason(error: BaseException, url: str) -> str:
    # Optuna wraps SQLAlchemy errors, which wrap the driver's error, the most specific one.
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return text


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None


def find_study(storage: optuna.storages.RDBStorage, name: str) -> tuple[int, StudySettings]:
    """Return the study id and settings; the worker never creates a study."""
    create = f"create it with: tunefleet study create {name}"
    try:
        study_id = storage.get_study_id_from_name(name)
        attrs = storage.get_study_user_attrs(study_id)
    except KeyError:
        raise StorageError(f"study '{name}' not found at the storage; {create}") from None
    except sqlalchemy.exc.ProgrammingError:
        # No Optuna tables yet, so no study has been created in this database.
        raise StorageError(f"study '{name}' not found at the storage; {create}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise StorageError(f"cannot read study '{name}': {_reason(error, storage.url)}") from None
    if SETTINGS_ATTR not in attrs:
        raise StorageError(
            f"study '{name}' has no '{SETTINGS_ATTR}' settings attribute, so it was not created "
            f"by tunefleet; {create}"
        )
    return study_id, StudySettings.from_attr(name, attrs[SETTINGS_ATTR])


def build_sampler(settings: StudySettings, worker_id: str) -> optuna.samplers.BaseSampler:
    """Build the study's sampler with a seed that differs per worker.

    Workers sharing one seed would draw the same random start-up points, so the study
    seed is mixed with the worker id. Runs are reproducible per worker id, not overall.
    """
    seed = None
    if settings.seed is not None:
        seed = (settings.seed * 1_000_003 + zlib.crc32(worker_id.encode())) % 2**32
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(settings: StudySettings) -> optuna.pruners.BasePruner:
    """Build the study's pruner; every worker builds the same one."""
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def count_trials(storage: optuna.storages.RDBStorage, study_id: int) -> Counter[str]:
    """Count the study's trials by state name in one query, however long the study is."""
    # NOTE: reads Optuna's own table; the schema is Optuna's and could change in a
    # major release, which the storage's version check would report first.
    query = sqlalchemy.text("SELECT state, count(*) FROM trials WHERE study_id = :id GROUP BY state")
    with storage.engine.connect() as connection:
        rows = connection.execute(query, {"id": study_id}).all()
    return Counter({str(state): int(count) for state, count in rows})


class HeartbeatlessTrialWatch:
    """Fails RUNNING trials whose heartbeat never started, then queues them again.

    Optuna's stale-trial check looks only at trials that have a heartbeat row. A worker
    killed between creating its trial and its heartbeat thread's first write leaves a
    trial without one. That trial stays RUNNING and takes a slot of the target. The watch
    times such a trial from when it first saw it, on this process's clock: the trial's
    datetime_start is the creating host's local time, and hosts differ in clock and
    time zone.
    """

    _QUERY = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :id AND t.state = 'RUNNING' AND h.trial_id IS NULL"
    )

    def __init__(self, storage: optuna.storages.RDBStorage, study_id: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.study_id = study_id
        self._clock = clock
        self._first_seen: dict[int, float] = {}

    @property
    def grace_seconds(self) -> float:
        # The same grace period as Optuna's own check of trials with heartbeats.
        if self.storage.grace_period is not None:
            return float(self.storage.grace_period)
        return 2.0 * float(self.storage.heartbeat_interval or 60)

    def fail_overdue(self, study: optuna.Study) -> list[int]:
        """Fail the heartbeatless trials seen for longer than the grace period; return their numbers."""
        now = self._clock()
        current = self._heartbeatless_trials()
        self._first_seen = {trial_id: self._first_seen.get(trial_id, now) for trial_id in current}
        overdue = [trial_id for trial_id, seen in self._first_seen.items()
                   if now - seen >= self.grace_seconds]
        if not overdue:
            return []
        # Read again right before failing, because a slow but live worker may have
        # written its first heartbeat in the meantime.
        overdue = [trial_id for trial_id in overdue if trial_id in self._heartbeatless_trials()]
        failed = []
        for trial_id in overdue:
            try:
                if self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # It finished or another worker failed it first.
            self._first_seen.pop(trial_id, None)
        callback = self.storage.get_heartbeat_stale_trial_callback()
        numbers = []
        for trial_id in failed:
            trial = self.storage.get_trial(trial_id)
            numbers.append(trial.number)
            if callback is not None:
                callback(study, trial)
        return numbers

    def _heartbeatless_trials(self) -> set[int]:
        # NOTE: reads Optuna's own tables, like count_trials.
        with self.storage.engine.connect() as connection:
            rows = connection.execute(self._QUERY, {"id": self.study_id}).all()
        return {int(trial_id) for (trial_id,) in rows}


@contextmanager
def trial_count_lock(storage: optuna.storages.RDBStorage, study_id: int) -> Iterator[Callable]:
    """Hold a PostgreSQL advisory lock while a worker counts trials and requests one.

    Yields a function that releases the lock early; the worker calls it as soon as its
    new trial exists, so other workers wait only for the count and the insert, never for
    training. Without the lock two workers could both see one slot left and overshoot.
    """
    keys = {"namespace": _LOCK_NAMESPACE, "study": study_id}
    connection = storage.engine.connect()
    held = False

    def release() -> None:
        nonlocal held
        if held:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:namespace, :study)"), keys)
            connection.commit()
            held = False

    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:namespace, :study)"), keys)
        connection.commit()
        held = True
        yield release
    finally:
        try:
            release()
        finally:
            connection.close()
