"""The worker's link to the study: storage URL, RDB storage, study settings, trial counts.

The storage URL comes from the environment (``TUNEFLEET_STORAGE_URL``) or from an
environment file of ``KEY=VALUE`` lines, never from the command line, because argv is
visible to every user of the host through ``ps``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
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
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

URL_VARIABLE = "TUNEFLEET_STORAGE_URL"
ENV_FILE_VARIABLE = "TUNEFLEET_ENV_FILE"
SETTINGS_ATTR = "tunefleet"

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")

# Connections of workers carry this application name, followed by the worker's id, so
# pg_stat_activity shows them and workers can count each other.
WORKER_APPLICATION_PREFIX = "tunefleet-worker "
APPLICATION_NAME = "tunefleet"
# A pooled connection idle for longer than this is tested before use; see
# _ping_idle_connections.
IDLE_PING_SECONDS = 30.0
_WORKERS_ROW = "workers"

logger = logging.getLogger("trainer.storage")

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


def open_storage(url: str, *, application_name: str = APPLICATION_NAME,
                 synchronous_commit: bool = True) -> optuna.storages.RDBStorage:
    """Connect to the RDB storage; raise StorageError with a masked URL.

    The storage has no Optuna heartbeat: workers run :class:`TrialHeartbeat` and
    :class:`StaleTrialWatch`, which cost no query per trial.
    """
    engine_kwargs: dict[str, Any] = {
        # Statements run one at a time per thread, so one pooled connection serves the
        # worker. A second thread (the heartbeat) or the trial-count lock briefly opens
        # an overflow connection, which closes again when it is returned.
        "pool_size": 1,
        "max_overflow": 2,
    }
    if url.startswith("postgresql"):
        connect_args: dict[str, Any] = {
            "connect_timeout": 10,
            "application_name": application_name,
            # Keepalives let the kernel notice a peer that vanished without closing the
            # connection, such as a rebooted server or a dropped NAT entry.
            "keepalives": 1,
            "keepalives_idle": 60,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        if not synchronous_commit:
            connect_args["options"] = "-c synchronous_commit=off"
        engine_kwargs["connect_args"] = connect_args
    try:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
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
    _ping_idle_connections(storage.engine, IDLE_PING_SECONDS)
    return storage


def _ping_idle_connections(engine: sqlalchemy.Engine, idle_seconds: float) -> None:
    """Test a pooled connection at checkout only when it sat idle for `idle_seconds`.

    SQLAlchemy's pool_pre_ping costs a round trip at every checkout, about a fifth of
    a worker's statements. A connection used a moment ago is very likely alive, while
    one idle through a long trial may have been dropped by a server restart. Raising
    DisconnectionError makes the pool replace the connection and check out again.
    """

    @sqlalchemy.event.listens_for(engine, "checkin")
    def _remember_checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @sqlalchemy.event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        checked_in = record.info.get("checked_in")
        if checked_in is None or time.monotonic() - checked_in < idle_seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise sqlalchemy.exc.DisconnectionError(str(error)) from error


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


@dataclass(frozen=True)
class TrialCounts:
    """A study's trials by state name, and the tunefleet workers connected to its database."""

    states: Counter[str]
    workers: int

    @property
    def finished(self) -> int:
        return self.states["COMPLETE"] + self.states["PRUNED"]

    def open_slots(self, target: int) -> int:
        """Return how many new trials the target still allows beyond those finished or running."""
        return target - self.finished - self.states["RUNNING"]


def count_trials(storage: optuna.storages.RDBStorage, study_id: int,
                 connection: sqlalchemy.Connection | None = None) -> TrialCounts:
    """Count the study's trials by state and the connected workers in one round trip."""
    # NOTE: reads Optuna's own table; the schema is Optuna's and could change in a
    # major release, which the storage's version check would report first.
    query = sqlalchemy.text(
        "SELECT state::text, count(*) FROM trials WHERE study_id = :id GROUP BY state "
        "UNION ALL SELECT :workers, count(DISTINCT application_name) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE :pattern"
    )
    parameters = {"id": study_id, "workers": _WORKERS_ROW, "pattern": WORKER_APPLICATION_PREFIX + "%"}
    if connection is not None:
        rows = connection.execute(query, parameters).all()
    else:
        with storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
            rows = autocommit.execute(query, parameters).all()
    counts = {str(state): int(count) for state, count in rows}
    workers = counts.pop(_WORKERS_ROW, 0)
    return TrialCounts(states=Counter(counts), workers=workers)


def lock_headroom(workers: int) -> int:
    """Return the open slots at or below which workers take the trial-count lock.

    Far from the target, a worker creates its trial without the lock, which saves a
    second connection and three round trips per trial. That is safe while the other
    workers cannot fill every open slot between its count and its insert, a window of a
    few milliseconds: the headroom allows each connected worker one trial in it, plus
    four for workers still connecting. This is an estimate, not a proof.
    """
    return max(workers, 1) + 4


def trial_identity(storage: optuna.storages.RDBStorage, study_id: int, number: int) -> tuple[int, int]:
    """Return the trial's id and the number of its first attempt, in one round trip.

    RetryHeartbeatStaleTrialCallback stores the first attempt's number as the system
    attribute ``failed_trial`` on each retry.
    """
    query = sqlalchemy.text(
        "SELECT t.trial_id, a.value_json FROM trials t LEFT JOIN trial_system_attributes a "
        "ON a.trial_id = t.trial_id AND a.key = 'failed_trial' WHERE t.study_id = :id AND t.number = :number"
    )
    with storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        row = connection.execute(query, {"id": study_id, "number": number}).one()
    first_number = json.loads(row[1]) if row[1] is not None else number
    return int(row[0]), int(first_number)


class TrialHeartbeat:
    """Background thread that records a heartbeat for the worker's current trial.

    One thread lives as long as the worker and writes once per interval, only while a
    trial runs. Optuna's own heartbeat starts a thread and writes at the start of every
    trial, and checks for stale trials before each one, which for short trials costs
    more round trips than the trial itself.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, interval: float) -> None:
        self.storage = storage
        self.interval = interval
        self._trial_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trial-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 10)

    def beat_for(self, trial_id: int | None) -> None:
        """Record heartbeats for `trial_id` from now on, or for no trial."""
        self._trial_id = trial_id

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            trial_id = self._trial_id
            if trial_id is None:
                continue
            try:
                self.storage.record_heartbeat(trial_id)
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
                # The next interval tries again. A trial whose heartbeats keep failing
                # for the grace period is failed by another worker and retried.
                logger.warning("heartbeat of trial id %d failed: %s", trial_id, _reason(error, self.storage.url))


class StaleTrialWatch:
    """Fails RUNNING trials whose worker stopped beating, then queues them again.

    A trial is stale when its last heartbeat is older than the grace period, or when it
    has had no heartbeat at all for the grace period. A worker killed between creating
    its trial and its first heartbeat leaves such a trial, which Optuna's own check
    skips. The watch times it from when the watch first saw it, on this process's
    clock, because the trial's datetime_start is the creating host's local time, and
    hosts differ in clock and time zone.
    """

    # Heartbeats are written by Optuna as the session's local time, so they are
    # compared with LOCALTIMESTAMP, as Optuna's own check compares them with now().
    _QUERY = sqlalchemy.text(
        "SELECT t.trial_id, h.trial_id IS NULL AS never_beat, "
        "coalesce(h.heartbeat < LOCALTIMESTAMP - make_interval(secs => :grace), false) AS late "
        "FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :id AND t.state = 'RUNNING'"
    )

    def __init__(self, storage: optuna.storages.RDBStorage, study_id: int, grace_seconds: float,
                 retry: Callable[[optuna.Study, FrozenTrial], None] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.study_id = study_id
        self.grace_seconds = grace_seconds
        self.retry = retry
        self._clock = clock
        self._first_seen: dict[int, float] = {}

    def fail_stale(self, study: optuna.Study) -> list[int]:
        """Fail the stale trials and queue each again; return their numbers."""
        now = self._clock()
        late, never_beat = self._running_trials()
        self._first_seen = {trial_id: self._first_seen.get(trial_id, now) for trial_id in never_beat}
        overdue = [trial_id for trial_id, seen in self._first_seen.items() if now - seen >= self.grace_seconds]
        if overdue:
            # Read again right before failing, because a slow but live worker may have
            # written its first heartbeat in the meantime.
            overdue = [trial_id for trial_id in overdue if trial_id in self._running_trials()[1]]
        numbers = []
        for trial_id in sorted({*late, *overdue}):
            self._first_seen.pop(trial_id, None)
            try:
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # It finished or another worker failed it first.
            trial = self.storage.get_trial(trial_id)
            numbers.append(trial.number)
            if self.retry is not None:
                self.retry(study, trial)
        return numbers

    def _running_trials(self) -> tuple[set[int], set[int]]:
        """Return the ids of RUNNING trials with a late heartbeat, and of those with none."""
        # NOTE: reads Optuna's own tables, like count_trials.
        with self.storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            rows = connection.execute(self._QUERY, {"id": self.study_id, "grace": self.grace_seconds}).all()
        late = {int(trial_id) for trial_id, _, is_late in rows if is_late}
        never_beat = {int(trial_id) for trial_id, no_heartbeat, _ in rows if no_heartbeat}
        return late, never_beat


@contextmanager
def trial_count_lock(storage: optuna.storages.RDBStorage,
                     study_id: int) -> Iterator[tuple[Callable[[], None], sqlalchemy.Connection]]:
    """Hold a PostgreSQL advisory lock while a worker counts trials and requests one.

    Yields a function that releases the lock early and the lock's connection, on which
    the worker counts. The worker releases the lock as soon as its new trial exists, so
    other workers wait only for the count and the insert, never for training. Without
    the lock two workers could both see one slot left and overshoot.
    """
    keys = {"namespace": _LOCK_NAMESPACE, "study": study_id}
    connection = storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    held = False

    def release() -> None:
        nonlocal held
        if held:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:namespace, :study)"), keys)
            held = False

    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:namespace, :study)"), keys)
        held = True
        yield release, connection
    finally:
        try:
            release()
        finally:
            connection.close()
