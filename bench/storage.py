"""Study storage: trials per second, connections held and per-trial overhead.

Three ways to run the same trivial objective with Optuna's default sampler (TPE):

- ``memory``: Optuna's in-memory storage in one process, the upper bound;
- ``plain``: ``optuna.load_study(storage=URL)`` and ``study.optimize`` in N processes,
  the storage with Optuna's defaults (bench.plain_worker);
- ``tunefleet``: N ``python -m trainer.worker`` processes with their own settings.

Both storage modes use the same PostgreSQL server, which the project's playbook
installs for this benchmark. Every process of a run starts its trials at the same
moment: plain processes wait for a line on stdin, and tunefleet workers wait for the
lock on the trials table that the benchmark holds until every worker waits for it. Worker
start-up (imports, connecting) is therefore outside the measured window.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from bench.common import BenchServer, median, provision_bench_server, ratio
from bench.trivial_objective import HIGH, LOW, plain_objective
from ops.paths import project_root
from trainer.storage import SETTINGS_ATTR

WORKER_COUNTS = (1, 4, 8)
# Trials per throughput run, shared by the run's processes. Fewer make the timed window
# short against start and end effects, and more push `make bench` past 30 minutes on two cores.
THROUGHPUT_TRIALS = 160
# "tunefleet-async" is the worker with --synchronous-commit off.
THROUGHPUT_MODES = ("plain", "tunefleet", "tunefleet-async")
WORKER_ARGS = {"tunefleet": (), "tunefleet-async": ("--synchronous-commit", "off")}
# Trials already in the study before an overhead run, and trials run on top of them.
OVERHEAD_SIZES = (1_000, 10_000)
OVERHEAD_TRIALS = 20
# Trials of the two statement-counting runs per mode; see measure_statements.
STATEMENT_TRIALS = (10, 40)

SPACE_FILE = Path(__file__).resolve().parent / "trivial_space.yml"
SAMPLE_INTERVAL_S = 0.2
BARRIER_TIMEOUT_S = 180.0
# application_name of the benchmark's own connections, which the connection count leaves out.
APPLICATION_NAME = "tunefleet-bench"
RUN_TIMEOUT_S = 600.0


@dataclass
class RunResult:
    """One run of one mode at one worker count."""

    trials_per_second: float
    max_connections: int = 0
    transactions_per_trial: float = float("nan")


@dataclass
class ConnectionSampler:
    """Polls pg_stat_activity for the database's client connections while a run lasts."""

    engine: sqlalchemy.Engine
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "ConnectionSampler":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        query = sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND application_name <> :bench"
        )
        with self.engine.connect() as connection:
            while not self._stop.wait(SAMPLE_INTERVAL_S):
                self.samples.append(int(connection.execute(query, {"bench": APPLICATION_NAME}).scalar_one()))
                connection.commit()


def transaction_count(engine: sqlalchemy.Engine) -> int:
    """Return committed plus rolled-back transactions of the current database so far."""
    # A backend may hold its statistics back while it runs, but flushes them when it exits,
    # so callers count only after the run's processes are gone and their backends closed.
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_stat_clear_snapshot()"))
        return int(connection.execute(sqlalchemy.text(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )).scalar_one())


def window_throughput(groups: list[list[FrozenTrial]], started: float) -> float:
    """Trials per second from `started` until the first process ran its last trial.

    Cutting at the first process to finish keeps the tail, where fewer processes are
    busy, out of the figure.
    """
    groups = [group for group in groups if group]
    end = min(max(trial.datetime_complete.timestamp() for trial in group) for group in groups)
    done = sum(1 for group in groups for trial in group if trial.datetime_complete.timestamp() <= end)
    return ratio(done, end - started)


def run_memory(trials: int, sampler_name: str = "tpe") -> RunResult:
    study = optuna.create_study(sampler=_sampler(sampler_name))
    started = time.time()
    study.optimize(plain_objective, n_trials=trials)
    return RunResult(window_throughput([study.trials], started))


def _sampler(name: str) -> optuna.samplers.BaseSampler | None:
    return optuna.samplers.RandomSampler() if name == "random" else None


class StorageBench:
    """Runs the storage modes against one provisioned server."""

    def __init__(self, server: BenchServer, workdir: Path) -> None:
        self.url = server.storage_url()
        connect_args = {"application_name": APPLICATION_NAME}
        self.engine = sqlalchemy.create_engine(self.url, connect_args=connect_args)
        self.storage = optuna.storages.RDBStorage(self.url, engine_kwargs={"connect_args": connect_args})
        self.workdir = workdir
        self.environment = {**os.environ, "TUNEFLEET_STORAGE_URL": self.url,
                            "PYTHONPATH": str(project_root())}
        self._counter = 0

    def new_study_name(self, mode: str) -> str:
        self._counter += 1
        return f"{mode}-{self._counter}-{os.getpid()}"

    def create_study(self, name: str, target_trials: int, sampler: str = "tpe") -> optuna.Study:
        study = optuna.create_study(storage=self.storage, study_name=name)
        self.set_settings(study, target_trials, sampler)
        return study

    @staticmethod
    def set_settings(study: optuna.Study, target_trials: int, sampler: str) -> None:
        study.set_user_attr(SETTINGS_ATTR, {"target_trials": target_trials, "sampler": sampler,
                                            "pruner": "none", "seed": None})

    def run_plain(self, study_name: str, workers: int, trials: int, sampler: str = "tpe",
                  counts_file: Path | None = None) -> RunResult:
        argv = [*_module_argv("bench.plain_worker", counts_file), "--study", study_name,
                "--trials", str(trials // workers), "--sampler", sampler]
        processes = [subprocess.Popen(argv, env=self.environment, cwd=project_root(), text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(workers)]
        try:
            for process in processes:
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"bench.plain_worker exited with {process.wait()} before it was ready")
            transactions_before = transaction_count(self.engine)
            with ConnectionSampler(self.engine) as sampler_thread:
                started = time.time()
                for process in processes:
                    process.stdin.write("go\n")
                    process.stdin.flush()
                outputs = [process.communicate(timeout=RUN_TIMEOUT_S)[0] for process in processes]
        finally:
            _kill_all(processes)
        for process in processes:
            if process.returncode != 0:
                raise RuntimeError(f"bench.plain_worker exited with {process.returncode}")

        study = optuna.load_study(study_name=study_name, storage=self.storage)
        trials = {trial.number: trial for trial in study.get_trials(states=(TrialState.COMPLETE,))}
        groups = [[trials[number] for number in json.loads(output.strip().splitlines()[-1])["numbers"]]
                  for output in outputs]
        return self._result(groups, started, sampler_thread, transactions_before, len(trials))

    def run_tunefleet(self, study: optuna.Study, workers: int, counts_file: Path | None = None,
                      worker_args: tuple[str, ...] = ()) -> RunResult:
        module = "trainer.worker"
        argv = [*_module_argv(module, counts_file), *worker_args, "--study", study.study_name,
                "--objective", "bench.trivial_objective:objective", "--search-space", str(SPACE_FILE),
                "--results-dir", str(self.workdir / "results"), "--threads", "1"]
        log_path = self.workdir / f"{study.study_name}.log"
        with self.engine.connect() as barrier, open(log_path, "w") as log:
            # Workers read the trials table before their first trial, so an exclusive lock
            # on it holds every worker at that point until all of them are started.
            barrier.execute(sqlalchemy.text("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE"))
            processes = [subprocess.Popen(argv, env=self.environment, cwd=project_root(),
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                         for _ in range(workers)]
            try:
                self._wait_until_queued(processes, log_path)
                transactions_before = transaction_count(self.engine)
                with ConnectionSampler(self.engine) as sampler_thread:
                    started = time.time()
                    barrier.commit()
                    for process in processes:
                        process.wait(timeout=RUN_TIMEOUT_S)
            finally:
                _kill_all(processes)
        for process in processes:
            if process.returncode != 0:
                raise RuntimeError(f"{module} exited with {process.returncode}; see {log_path}")

        finished = study.get_trials(states=(TrialState.COMPLETE,))
        by_worker: dict[str, list[FrozenTrial]] = {}
        for trial in finished:
            by_worker.setdefault(trial.user_attrs.get("worker", "?"), []).append(trial)
        return self._result(list(by_worker.values()), started, sampler_thread, transactions_before, len(finished))

    def _wait_until_queued(self, processes: list[subprocess.Popen], log_path: Path) -> None:
        query = sqlalchemy.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted "
            "AND relation = 'trials'::regclass"
        )
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        with self.engine.connect() as connection:
            while time.monotonic() < deadline:
                if any(process.poll() is not None for process in processes):
                    raise RuntimeError(f"a worker process exited before its first trial; see {log_path}")
                waiting = connection.execute(query).scalar_one()
                connection.commit()
                if waiting == len(processes):
                    return
                time.sleep(0.1)
        raise RuntimeError(f"workers did not reach the locked trials table within {BARRIER_TIMEOUT_S:.0f} s; "
                           f"see {log_path}")

    def _result(self, groups: list[list[FrozenTrial]], started: float, sampler_thread: ConnectionSampler,
                transactions_before: int, trial_count: int) -> RunResult:
        time.sleep(1.5)
        # Each sample of the connection sampler is one transaction of its own.
        transactions = transaction_count(self.engine) - transactions_before - len(sampler_thread.samples) - 1
        return RunResult(
            trials_per_second=window_throughput(groups, started),
            max_connections=max(sampler_thread.samples, default=0),
            transactions_per_trial=ratio(transactions, trial_count),
        )

    def prefill(self, name: str, size: int) -> optuna.Study:
        """Create a study that already contains `size` COMPLETE trials, added with study.add_trials."""
        study = self.create_study(name, size)
        study.add_trials(finished_trials(size))
        return study


def finished_trials(count: int) -> list[FrozenTrial]:
    distributions = {"x": FloatDistribution(LOW, HIGH), "y": FloatDistribution(LOW, HIGH)}
    generator = random.Random(count)
    trials = []
    for _ in range(count):
        x, y = generator.uniform(LOW, HIGH), generator.uniform(LOW, HIGH)
        trials.append(create_trial(params={"x": x, "y": y}, distributions=distributions,
                                   value=(x - 2.0) ** 2 + y))
    return trials


def _module_argv(module: str, counts_file: Path | None) -> list[str]:
    if counts_file is None:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "bench.statement_counter", str(counts_file), module]


def _kill_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def seconds_per_trial(trials: list[FrozenTrial]) -> float:
    """Median time between consecutive completions, which leaves out the worker's start-up."""
    ends = sorted(trial.datetime_complete.timestamp() for trial in trials)
    return median([later - earlier for earlier, later in zip(ends, ends[1:])])


def measure_throughput(bench: StorageBench, repetitions: int, log: Any) -> dict[str, Any]:
    runs: dict[str, list[RunResult]] = {}
    for repetition in range(repetitions):
        runs.setdefault("memory-1", []).append(run_memory(THROUGHPUT_TRIALS))
        for workers in WORKER_COUNTS:
            # Alternate the order so that neither mode always runs on a warmer server.
            modes = THROUGHPUT_MODES if repetition % 2 == 0 else THROUGHPUT_MODES[::-1]
            for mode in modes:
                name = bench.new_study_name(mode)
                study = bench.create_study(name, THROUGHPUT_TRIALS)
                if mode == "plain":
                    result = bench.run_plain(name, workers, THROUGHPUT_TRIALS)
                else:
                    result = bench.run_tunefleet(study, workers, worker_args=WORKER_ARGS[mode])
                runs.setdefault(f"{mode}-{workers}", []).append(result)
                log(f"storage: repetition {repetition + 1}, {mode}, workers={workers}: "
                    f"{result.trials_per_second:.1f} trials/s, {result.max_connections} connections")
    return {key: [vars(result) for result in results] for key, results in runs.items()}


def measure_overhead(bench: StorageBench, repetitions: int, log: Any) -> dict[str, Any]:
    """Seconds per trial of one worker in studies that already hold 1,000 and 10,000 trials.

    The studies are filled with finished trials by study.add_trials, and each repetition
    adds OVERHEAD_TRIALS per mode, so the window stays within a few percent of its size.
    Both the default sampler and RandomSampler run, because TPE reads every trial to
    sample, which grows with the study whatever the storage does.
    """
    results: dict[str, list[float]] = {}
    for size in OVERHEAD_SIZES:
        log(f"storage: filling a study with {size} finished trials")
        shared = bench.prefill(bench.new_study_name(f"filled-{size}"), size)
        memory = optuna.create_study()
        memory.add_trials(finished_trials(size))
        for repetition in range(repetitions):
            for sampler in ("tpe", "random"):
                memory.sampler = _sampler(sampler) or optuna.samplers.TPESampler()
                before = len(memory.trials)
                memory.optimize(plain_objective, n_trials=OVERHEAD_TRIALS)
                results.setdefault(f"memory-{sampler}-{size}", []).append(seconds_per_trial(memory.trials[before:]))

                before = len(shared.trials)
                bench.run_plain(shared.study_name, 1, OVERHEAD_TRIALS, sampler)
                results.setdefault(f"plain-{sampler}-{size}", []).append(seconds_per_trial(shared.trials[before:]))

                before = len(shared.trials)
                bench.set_settings(shared, before + OVERHEAD_TRIALS, sampler)
                bench.run_tunefleet(shared, 1)
                results.setdefault(f"tunefleet-{sampler}-{size}", []).append(seconds_per_trial(shared.trials[before:]))
                log(f"storage: overhead at {size} trials, {sampler}, repetition {repetition + 1}: " + ", ".join(
                    f"{mode} {results[f'{mode}-{sampler}-{size}'][-1] * 1000:.1f} ms"
                    for mode in ("memory", "plain", "tunefleet")))
    return results


def measure_statements(bench: StorageBench, log: Any) -> dict[str, Any]:
    """Count the SQL statements and pool checkouts per trial of one plain process and one worker.

    Each mode runs twice, with STATEMENT_TRIALS[0] and STATEMENT_TRIALS[1] trials in a
    fresh study, and the difference divided by the difference in trials leaves out the
    statements of start-up and shutdown.
    """
    few, many = STATEMENT_TRIALS
    per_trial: dict[str, Any] = {}
    for mode in ("plain", "tunefleet"):
        counts = []
        for trials in (few, many):
            counts_file = bench.workdir / f"statements-{mode}-{trials}.json"
            name = bench.new_study_name(f"statements-{mode}")
            study = bench.create_study(name, trials)
            if mode == "plain":
                bench.run_plain(name, 1, trials, counts_file=counts_file)
            else:
                bench.run_tunefleet(study, 1, counts_file=counts_file)
            counts.append(json.loads(counts_file.read_text()))
        kinds = set(counts[0]["counts"]) | set(counts[1]["counts"])
        per_trial[mode] = {
            "pre_ping": counts[1]["pre_ping"],
            "per_trial": {kind: (counts[1]["counts"].get(kind, 0) - counts[0]["counts"].get(kind, 0)) / (many - few)
                          for kind in sorted(kinds)},
        }
        log(f"storage: {mode} makes {sum(per_trial[mode]['per_trial'].values()):.1f} statements, "
            "commits and checkouts per trial")
    return per_trial


def server_version(bench: StorageBench) -> str:
    with bench.engine.connect() as connection:
        return str(connection.execute(sqlalchemy.text("SHOW server_version")).scalar_one())


def run(repetitions: int, log: Any) -> dict[str, Any]:
    """Provision a server, run both measurements, and return their raw figures."""
    log("storage: provisioning a PostgreSQL server with the project's playbook")
    server = provision_bench_server()
    try:
        with tempfile.TemporaryDirectory(prefix="tunefleet-bench-storage-") as workdir:
            bench = StorageBench(server, Path(workdir))
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            return {
                "server_version": server_version(bench),
                "repetitions": repetitions,
                "throughput_trials": THROUGHPUT_TRIALS,
                "overhead_trials": OVERHEAD_TRIALS,
                "throughput": measure_throughput(bench, repetitions, log),
                "overhead": measure_overhead(bench, repetitions, log),
                "statement_trials": STATEMENT_TRIALS,
                "statements": measure_statements(bench, log),
            }
    finally:
        server.stop()
