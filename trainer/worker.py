"""The Optuna worker process: ``python -m trainer.worker --study NAME``.

A worker loads a study that ``tunefleet study create`` made, builds the sampler and
pruner named in the study's ``tunefleet`` attribute, and runs trials until the study
has ``target_trials`` finished (COMPLETE or PRUNED) trials, counted across all workers.
Near the end, a worker whose remaining slots are all taken by running trials waits
rather than overshooting, and takes over the trial of a dead worker once the heartbeat
marks it stale.

Objective contract (the default ``trainer.digits:objective`` follows it as well)::

    def objective(trial: optuna.Trial, params: dict, context: TrialContext) -> float

``params`` contains the values sampled from the search-space file, already registered on
``trial``. ``context`` is a :class:`TrialContext`: the torch device, a per-trial seed
(Python, NumPy and torch are already seeded with it), the results directory, the
checkpoint path, the file's ``fixed`` settings, and ``save_checkpoint(obj)``, which
writes the checkpoint atomically and records its path in the trial user attribute
``checkpoint``. Report intermediate values with ``trial.report`` and raise
``optuna.TrialPruned`` when ``trial.should_prune()``. An exception fails the trial
(logged at WARNING) and the worker goes on, except ``ImportError``, which stops it,
and ``--max-consecutive-failures`` failures in a row, which stop it too.

Exit status: 0 when the study reached its target, or when SIGTERM or SIGINT stopped
the worker. A trial interrupted by the signal is marked FAIL and queued again with the
same parameters, so no trial is left RUNNING. 1 on errors (storage, study, search
space, objective import, too many failures in a row), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
import sqlalchemy.exc
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from trainer import storage as storage_module
from trainer.search_space import SearchSpace, SearchSpaceError, load_search_space

DEFAULT_OBJECTIVE = "trainer.digits:objective"
DEFAULT_SEARCH_SPACE = Path(__file__).resolve().parent / "spaces" / "digits.yml"

# A trial whose worker died is retried at most this many times, so a trial that kills
# its worker every time (out of memory, a driver crash) cannot stall the study forever.
MAX_STALE_RETRIES = 3

# Seconds between trial counts of a worker with no free slot. Each count is one cheap
# query, and this delay bounds how long idle workers linger after the last trial.
WAIT_POLL_SECONDS = 2.0

# A worker whose trials all fail (a broken objective, a full disk) would otherwise
# create failed trials in a tight loop for days.
DEFAULT_MAX_CONSECUTIVE_FAILURES = 10

logger = logging.getLogger("trainer.worker")


class WorkerError(Exception):
    """An error that stops the worker with exit status 1 and a one-line message."""


class StopRequested(KeyboardInterrupt):
    """Raised inside the objective on SIGTERM/SIGINT so Optuna marks the trial FAIL."""


@dataclass(frozen=True)
class TrialContext:
    """Per-trial settings and helpers that the worker passes to an objective."""

    device: Any
    seed: int
    results_dir: Path
    checkpoint_path: Path
    fixed: Mapping[str, Any]
    worker_id: str
    trial: Any = field(repr=False)

    def save_checkpoint(self, obj: Any) -> Path:
        """Write ``obj`` with ``torch.save`` atomically and store its path on the trial."""
        import torch

        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.checkpoint_path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(obj, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.checkpoint_path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.trial.set_user_attr("checkpoint", str(self.checkpoint_path))
        return self.checkpoint_path


def trial_seed(study_seed: int | None, trial_number: int) -> int:
    """Derive a trial's seed; a retried trial passes its original number and reruns alike."""
    return ((study_seed or 0) * 1_000_003 + trial_number) % 2**31


def seed_everything(seed: int) -> None:
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def load_objective(spec: str) -> Callable[..., float]:
    """Import ``package.module:function``; raise WorkerError naming what failed."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WorkerError(f"cannot import objective module '{module_name}' (from --objective {spec}): {error}") from None
    except Exception as error:
        raise WorkerError(f"importing objective module '{module_name}' raised {type(error).__name__}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise WorkerError(f"module '{module_name}' has no function '{function_name}' (from --objective {spec})")
    return function


def select_device(threads: int | None) -> Any:
    """Pick cuda:0 when CUDA is usable, else the CPU, and log which."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    # The process that started the worker sets CUDA_VISIBLE_DEVICES and the worker never
    # changes it, so cuda:0 is the first GPU that the variable exposes.
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        logger.info("device: cuda:0 (CUDA_VISIBLE_DEVICES=%s, %s)", visible, torch.cuda.get_device_name(0))
        return torch.device("cuda:0")
    logger.info("device: cpu (%d threads)", torch.get_num_threads())
    return torch.device("cpu")


@dataclass(frozen=True)
class TrialOutcome:
    """The end state, value and params of a trial of this worker, as Optuna records them."""

    number: int
    state: TrialState
    value: float | None
    params: dict[str, Any]


def _as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _no_lock() -> None:
    """Release nothing: the trial was created without the trial-count lock."""


class Worker:
    """Runs trials of one study until its target is reached or a signal stops it."""

    def __init__(self, study: optuna.Study, rdb: optuna.storages.RDBStorage, study_id: int,
                 settings: storage_module.StudySettings,
                 objective: Callable[..., float], space: SearchSpace, device: Any,
                 results_dir: Path, worker_id: str, wait_seconds: float,
                 heartbeat_interval: float, grace_period: float | None = None,
                 max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES) -> None:
        self.study = study
        self.rdb = rdb
        self.study_id = study_id
        self.settings = settings
        self.objective = objective
        self.space = space
        self.device = device
        self.results_dir = results_dir
        self.worker_id = worker_id
        self.wait_seconds = wait_seconds
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.trials_run = 0
        self.stop_signal: int | None = None
        self._stop_event = threading.Event()
        self._in_objective = False
        self._release_lock: Callable[[], None] = _no_lock
        self._fatal: BaseException | None = None
        self._started: dict[int, float] = {}
        self._outcome: TrialOutcome | None = None
        self.heartbeat = storage_module.TrialHeartbeat(rdb, heartbeat_interval)
        self.stale_watch = storage_module.StaleTrialWatch(
            rdb, study_id, grace_seconds=grace_period or 2 * heartbeat_interval,
            retry=RetryHeartbeatStaleTrialCallback(max_retry=MAX_STALE_RETRIES))
        self._next_stale_check = 0.0

    def handle_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            logger.warning("received %s; stopping after marking the running trial, if any",
                           signal.Signals(signum).name)
        self._stop_event.set()
        if self._in_objective:
            self._in_objective = False
            raise StopRequested()

    def run(self) -> str:
        """Run trials; return why the worker stopped."""
        self.heartbeat.start()
        try:
            return self._run_trials()
        finally:
            self.heartbeat.stop()

    def _run_trials(self) -> str:
        target = self.settings.target_trials
        while not self._stop_event.is_set():
            self._fail_stale_trials(due_only=True)
            counts = storage_module.count_trials(self.rdb, self.study_id)
            if counts.finished >= target:
                return f"target reached ({counts.finished}/{target} trials finished)"
            if counts.open_slots(target) > storage_module.lock_headroom(counts.workers):
                self._run_one_trial()
            else:
                with storage_module.trial_count_lock(self.rdb, self.study_id) as (release, connection):
                    counts = storage_module.count_trials(self.rdb, self.study_id, connection)
                    if counts.finished >= target:
                        return f"target reached ({counts.finished}/{target} trials finished)"
                    if counts.states["WAITING"] == 0 and counts.open_slots(target) <= 0:
                        release()
                        self._wait_for_running_trials(counts)
                        continue
                    self._release_lock = release
                    self._run_one_trial()
            if self._fatal is not None:
                raise WorkerError(f"objective failed with {type(self._fatal).__name__}: {self._fatal}")
            if self.consecutive_failures >= self.max_consecutive_failures:
                raise WorkerError(
                    f"the last {self.consecutive_failures} trials of this worker failed; "
                    "see the WARNING lines above for the objective's errors"
                )
        return f"stopped by {signal.Signals(self.stop_signal).name}"

    def _wait_for_running_trials(self, counts: storage_module.TrialCounts) -> None:
        logger.debug("all %d slots are taken by finished or running trials (%s); waiting %.0fs",
                     self.settings.target_trials, dict(counts.states), self.wait_seconds)
        self._fail_stale_trials(due_only=False)
        self._stop_event.wait(self.wait_seconds)

    def _fail_stale_trials(self, due_only: bool) -> None:
        """Fail and queue again the trials of dead workers; with `due_only`, at most once per heartbeat interval."""
        now = time.monotonic()
        if due_only and now < self._next_stale_check:
            return
        self._next_stale_check = now + self.heartbeat.interval
        for number in self.stale_watch.fail_stale(self.study):
            logger.warning("trial %d had no heartbeat for %.0fs; marked FAIL and queued again",
                           number, self.stale_watch.grace_seconds)

    def _run_one_trial(self) -> None:
        self._outcome = None
        try:
            # No callbacks: with one, Optuna reads the finished trial back from the
            # storage (six queries per trial), while _objective has already recorded the outcome.
            self.study.optimize(self._objective, n_trials=1, catch=(Exception,))
        except StopRequested:
            self._requeue_interrupted_trial()
        else:
            if self._outcome is not None:
                self._on_trial_end(self._outcome)
        finally:
            self.heartbeat.beat_for(None)
            self._release_lock()
            self._release_lock = _no_lock

    def _objective(self, trial: optuna.Trial) -> float:
        self._release_lock()
        self._started[trial.number] = time.monotonic()
        trial_id, original_number = storage_module.trial_identity(self.rdb, self.study_id, trial.number)
        self.heartbeat.beat_for(trial_id)
        trial.set_user_attr("worker", self.worker_id)
        seed = trial_seed(self.settings.seed, original_number)
        seed_everything(seed)
        params = self.space.sample(trial)
        context = TrialContext(
            device=self.device, seed=seed, results_dir=self.results_dir,
            checkpoint_path=self.results_dir / f"trial-{trial.number}.pt",
            fixed=dict(self.space.fixed), worker_id=self.worker_id, trial=trial,
        )

        # Set the flag before checking the event so a signal arriving in between is
        # either seen here or raised by the handler.
        self._in_objective = True
        try:
            if self._stop_event.is_set():
                raise StopRequested()
            value = self.objective(trial, params, context)
        except optuna.TrialPruned:
            self._outcome = TrialOutcome(trial.number, TrialState.PRUNED, None, trial.params)
            raise
        except ImportError as error:
            self._fatal = error
            self._outcome = TrialOutcome(trial.number, TrialState.FAIL, None, trial.params)
            raise
        except Exception:
            self._outcome = TrialOutcome(trial.number, TrialState.FAIL, None, trial.params)
            raise
        finally:
            self._in_objective = False
        # Optuna fails a trial whose value is not a number, or NaN, the same way.
        number_value = _as_number(value)
        state = TrialState.FAIL if number_value is None else TrialState.COMPLETE
        self._outcome = TrialOutcome(trial.number, state, number_value, trial.params)
        return value

    def _on_trial_end(self, outcome: TrialOutcome) -> None:
        self.trials_run += 1
        self._log_trial_end(outcome)
        if outcome.state == TrialState.FAIL:
            self.consecutive_failures += 1
        else:
            self.consecutive_failures = 0

    def _log_trial_end(self, trial: TrialOutcome | FrozenTrial) -> None:
        started = self._started.pop(trial.number, None)
        duration = time.monotonic() - started if started is not None else float("nan")
        value = "-" if trial.value is None else f"{trial.value:.6g}"
        logger.info("trial %d %s value=%s in %.1fs params=%s", trial.number, trial.state.name,
                    value, duration, trial.params)

    def _requeue_interrupted_trial(self) -> None:
        storage = self.rdb
        number = max(self._started, default=None)
        if number is None:
            return
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        trial = storage.get_trial(trial_id)
        self._log_trial_end(trial)
        if trial.state == TrialState.FAIL:
            RetryHeartbeatStaleTrialCallback()(self.study, trial)
            logger.warning("trial %d was interrupted and marked FAIL; queued again with the same params",
                           number)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.worker",
        description="Run Optuna trials of a tunefleet study until its target number of "
                    "finished trials is reached. The storage URL is read from "
                    "TUNEFLEET_STORAGE_URL or an env file, never from the command line.",
    )
    parser.add_argument("--study", required=True, help="name of a study made by 'tunefleet study create'")
    parser.add_argument("--env-file", metavar="PATH",
                        help="0600 file with a TUNEFLEET_STORAGE_URL=... line (default: $TUNEFLEET_ENV_FILE)")
    parser.add_argument("--objective", default=DEFAULT_OBJECTIVE, type=_objective_spec,
                        metavar="MODULE:FUNCTION", help=f"objective to optimize (default: {DEFAULT_OBJECTIVE})")
    parser.add_argument("--search-space", metavar="FILE", type=Path,
                        help="search-space YAML file (default: trainer/spaces/digits.yml with the "
                             "default objective; required with --objective)")
    parser.add_argument("--results-dir", metavar="DIR", type=Path,
                        help="directory for checkpoints (default: ./results/STUDY)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch CPU threads (default: torch's own default)")
    parser.add_argument("--heartbeat-interval", type=_positive_int, default=60, metavar="SECONDS",
                        help="seconds between trial heartbeats (default: 60)")
    parser.add_argument("--grace-period", type=_positive_int, metavar="SECONDS",
                        help="seconds without heartbeat before a running trial counts as dead "
                             "and is retried (default: twice the heartbeat interval)")
    parser.add_argument("--synchronous-commit", choices=["on", "off"], default="on",
                        help="off lets the server acknowledge this worker's commits before they reach "
                             "the disk: faster for short trials, and a server crash can lose the last "
                             "fraction of a second of trial updates, whose trials are then retried "
                             "(default: on)")
    parser.add_argument("--max-consecutive-failures", type=_positive_int, metavar="N",
                        default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
                        help="exit with status 1 after N failed trials in a row "
                             f"(default: {DEFAULT_MAX_CONSECUTIVE_FAILURES})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default: INFO)")
    return parser


def _objective_spec(value: str) -> str:
    module_name, separator, function_name = value.partition(":")
    if not separator or not module_name or not function_name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected package.module:function, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Optuna's own INFO lines repeat the per-trial line logged here; its WARNING lines
    # (failed trials, with tracebacks) go through the same handler.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run(args: argparse.Namespace) -> int:
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    space = _load_space(args)
    objective = load_objective(args.objective)
    url = storage_module.resolve_storage_url(args.env_file, os.environ)

    application = storage_module.WORKER_APPLICATION_PREFIX + f"{zlib.crc32(worker_id.encode()):08x}"
    rdb = storage_module.open_storage(url, application_name=application,
                                      synchronous_commit=args.synchronous_commit == "on")
    study_id, settings = storage_module.find_study(rdb, args.study)
    study = optuna.load_study(
        study_name=args.study, storage=rdb,
        sampler=storage_module.build_sampler(settings, worker_id),
        pruner=storage_module.build_pruner(settings),
    )
    results_dir = (args.results_dir or Path("results") / _safe_name(args.study)).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)

    logger.info("worker %s starting: study=%s storage=%s target=%d sampler=%s pruner=%s "
                "objective=%s search_space=%s heartbeat=%ds results=%s",
                worker_id, args.study, storage_module.mask_url(url), settings.target_trials,
                settings.sampler, settings.pruner, args.objective, space.source,
                args.heartbeat_interval, results_dir)
    device = select_device(args.threads)
    worker = Worker(study, rdb, study_id, settings, objective, space, device, results_dir, worker_id,
                    wait_seconds=min(float(args.heartbeat_interval), WAIT_POLL_SECONDS),
                    heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                    max_consecutive_failures=args.max_consecutive_failures)
    signal.signal(signal.SIGTERM, worker.handle_signal)
    signal.signal(signal.SIGINT, worker.handle_signal)

    started = time.monotonic()
    reason = worker.run()
    logger.info("worker %s finished: %s; ran %d trials in %.1fs", worker_id, reason,
                worker.trials_run, time.monotonic() - started)
    return 0


def _load_space(args: argparse.Namespace) -> SearchSpace:
    if args.search_space is not None:
        return load_search_space(args.search_space)
    if args.objective != DEFAULT_OBJECTIVE:
        raise WorkerError(f"--objective {args.objective} needs --search-space FILE")
    return load_search_space(DEFAULT_SEARCH_SPACE)


def _safe_name(name: str) -> str:
    return "".join(char if char.isalnum() or char in "._-" else "_" for char in name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grace_period is not None and args.grace_period <= args.heartbeat_interval:
        # A live trial writes its first heartbeat up to one interval after it starts.
        parser.error(f"--grace-period ({args.grace_period}) must be longer than "
                     f"--heartbeat-interval ({args.heartbeat_interval})")
    configure_logging(args.log_level)
    try:
        return run(args)
    except (WorkerError, SearchSpaceError, storage_module.StorageError) as error:
        logger.error("%s", error)
        return 1
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        # The storage was reachable at start, so a lost connection mid-run ends up here
        # when no new connection could be opened. Trials left RUNNING turn stale and retry.
        while error.__cause__ is not None:
            error = error.__cause__
        logger.error("lost the storage: %s; the trial of this worker, if any, is retried by "
                     "another worker after the grace period", " ".join(str(error).split()))
        return 1


if __name__ == "__main__":
    sys.exit(main())
