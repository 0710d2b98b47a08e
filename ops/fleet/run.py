"""`tunefleet run STUDY`: deploy, start one worker per GPU, watch until the study's target.

While it watches, `run` restarts a worker that died before the target, up to a limit
per worker, in the background so that the board keeps refreshing. The trial the dead
worker held is failed and queued again by the stale-trial check of the workers still
running, so `run` never edits trials. The workers of a host that
cannot be reached are shown as unknown, not dead, and are not restarted, because they
may still be running.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
import sqlalchemy.exc
from rich.console import Console, Group
from rich.live import Live

from ops import board, studies
from ops.fleet import deploy as deploy_module
from ops.fleet import trials as fleet_trials
from ops.fleet import workers as workers_module
from ops.board import format_duration
from ops.fleet.board import FleetWorkerRow, HostOutage, Progress, render, summary_line
from ops.fleet.connection import Timeouts
from ops.fleet.fanout import HostResult, for_each_host
from ops.fleet.restarts import WorkerRestarts
from ops.inventory import FleetHost

logger = logging.getLogger("tunefleet.fleet")

DEFAULT_MAX_RESTARTS = 3
DEFAULT_POLL_INTERVAL_S = 3.0
# Workers stop on their own at the target, and this bounds the wait for the last ones.
FINISH_GRACE_S = 60.0


@dataclass
class RunOptions:
    """Settings of one `run`: deploy and worker options, restarts and polling."""

    deploy: deploy_module.DeployOptions
    workers: workers_module.WorkerOptions
    timeouts: Timeouts
    max_restarts: int = DEFAULT_MAX_RESTARTS
    poll_interval: float = DEFAULT_POLL_INTERVAL_S
    stop_timeout: float = workers_module.DEFAULT_STOP_TIMEOUT_S


@dataclass
class RunOutcome:
    """The end of a run: per-host results of each phase and the final study counts."""

    deploy: list[HostResult]
    start: list[HostResult]
    counts: dict[str, int] = field(default_factory=dict)
    target_reached: bool = False
    restarts: int = 0
    unreachable: set[str] = field(default_factory=set)

    @property
    def failed_hosts(self) -> list[str]:
        failed = {result.host for result in self.deploy + self.start if not result.ok}
        return sorted(failed | self.unreachable)


def worker_state(worker: dict) -> str:
    """Name a worker's state from the agent's status: alive, finished (at the target) or dead."""
    if worker["alive"]:
        return "alive"
    if worker["finished_normally"]:
        return "finished"
    return "dead"


class FleetWatcher:
    """Polls the hosts, restarts dead workers and draws the board until the target."""

    def __init__(self, hosts: Sequence[FleetHost], study: optuna.Study, target: int, options: RunOptions,
                 console: Console, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.hosts = {host.name: host for host in hosts}
        self.study = study
        self.target = target
        self.options = options
        self.console = console
        self.clock = clock
        self.wall_clock = wall_clock
        self.rows: list[FleetWorkerRow] = []
        self.outages: dict[str, HostOutage] = {}
        self.restarts = WorkerRestarts(self.hosts, options.workers, options.timeouts, options.max_restarts, clock)
        self.reported_dead: set[tuple[str, str, int]] = set()
        self.storage_errors = 0
        snapshot = board.take_snapshot(study)
        self.progress = Progress(target, studies.finished_count(snapshot.counts))

    @property
    def unreachable(self) -> set[str]:
        return set(self.outages)

    def watch(self) -> board.StudySnapshot:
        """Poll and redraw until the study reaches its target; return the last snapshot."""
        started = self.clock()
        printer = board.ChangedLinePrinter(self.console)
        live = Live(console=self.console, refresh_per_second=4) if self.console.is_terminal else None
        if live is not None:
            live.start()
        try:
            while True:
                self.poll()
                snapshot = self._read_snapshot()
                if snapshot is None:
                    time.sleep(self.options.poll_interval)
                    continue
                self._attach_trials(snapshot)
                elapsed = self.clock() - started
                if live is not None:
                    live.update(self.render(snapshot, elapsed))
                else:
                    printer.print(summary_line(self.study.study_name, snapshot, self.rows, self.progress, elapsed,
                                               list(self.outages.values())))
                if studies.finished_count(snapshot.counts) >= self.target or self._nothing_left_to_run():
                    return snapshot
                time.sleep(self.options.poll_interval)
        finally:
            if live is not None:
                live.stop()

    def render(self, snapshot: board.StudySnapshot, elapsed: float) -> Group:
        """Draw the board from `snapshot` and the hosts' state of the last poll."""
        return render(self.study.study_name, snapshot, self.rows, self.progress, elapsed,
                      list(self.outages.values()))

    def _nothing_left_to_run(self) -> bool:
        # Workers of an unreachable host may still run, and a restart may still bring one back.
        # NOTE: a host that stays unreachable therefore keeps `run` watching until Ctrl-C,
        # even when every other worker is dead and out of restarts.
        waiting = ("alive", "unknown", "restarting")
        return bool(self.rows) and not self.restarts.any_in_flight and not any(
            row.state in waiting for row in self.rows)

    def _read_snapshot(self) -> board.StudySnapshot | None:
        """Read the study, or return None after logging a storage error the next poll may not hit."""
        try:
            return board.take_snapshot(self.study)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
            self.storage_errors += 1
            logger.warning("reading study %s failed (%d time(s) so far), retrying at the next poll: %s",
                           self.study.study_name, self.storage_errors, error)
            return None

    def poll(self) -> None:
        """Read every host's workers once, then restart the dead ones in the background."""
        polled_at = self.clock()
        results = for_each_host(list(self.hosts.values()),
                                lambda host: workers_module.status_host(host, self.options.timeouts))
        rows = []
        for result in results:
            if result.ok:
                self._host_reachable(result.host)
                rows += self._rows_of(result)
            else:
                self._host_unreachable(result.host, result.message)
                rows += [_unknown(row) for row in self.rows if row.host == result.host]
        self.rows = rows
        for event in self.restarts.collect():
            self.progress.events.append(event)
        self._restart_dead_workers(polled_at)

    def _host_unreachable(self, host: str, reason: str) -> None:
        if host in self.outages:
            self.outages[host].reason = reason
            return
        self.outages[host] = HostOutage(host, reason, self.wall_clock())
        message = self.outages[host].describe()
        self.progress.events.append(message)
        logger.warning("%s", message)

    def _host_reachable(self, host: str) -> None:
        outage = self.outages.pop(host, None)
        if outage is not None:
            message = f"{host} is reachable again after {format_duration(self.wall_clock() - outage.since)}"
            self.progress.events.append(message)
            logger.info("%s", message)

    def _rows_of(self, result: HostResult) -> list[FleetWorkerRow]:
        rows = []
        hostname = result.data["hostname"]
        for name, worker in sorted(result.data["workers"].items()):
            if worker.get("study") != self.study.study_name:
                continue
            rows.append(FleetWorkerRow(result.host, name, worker["gpu"], worker_state(worker), None, worker["trials_finished"],
                                       worker["restarts"], worker["last_log_line"],
                                       fleet_trials.worker_id(hostname, worker["pid"])))
        return rows

    def _attach_trials(self, snapshot: board.StudySnapshot) -> None:
        for row in self.rows:
            row.trial = snapshot.running_by_worker.get(row.worker_id)

    def _restart_dead_workers(self, polled_at: float) -> None:
        snapshot = self._read_snapshot()
        if snapshot is None or studies.finished_count(snapshot.counts) >= self.target:
            return
        for row in self.rows:
            if row.state != "dead":
                continue
            key = (row.host, row.name)
            # A status read before a restart ended still shows the worker that restart replaced.
            if self.restarts.in_flight(key) or self.restarts.finished_since(key, polled_at):
                row.state = "restarting"
                continue
            self._event_once((row.host, row.name, row.restarts),
                             f"worker {row.host}:{row.name} died (last log line: {row.last_log_line[-100:] or 'none'}); "
                             "its trial, if any, is failed and queued again once its heartbeat is stale")
            if self.restarts.submit(key):
                row.state = "restarting"

    def _event_once(self, key: tuple[str, str, int], message: str) -> None:
        if key not in self.reported_dead:
            self.reported_dead.add(key)
            self.progress.events.append(message)
            logger.warning("%s", message)

    def close(self) -> None:
        """Wait for the restarts in flight and end their threads."""
        self.restarts.close()


def _unknown(row: FleetWorkerRow) -> FleetWorkerRow:
    """Return `row` as unknown, keeping what its host reported last."""
    last_known = row.last_known_state if row.state == "unknown" else row.state
    return dataclasses.replace(row, state="unknown", last_known_state=last_known)


def run_study(hosts: Sequence[FleetHost], study: optuna.Study, target: int, options: RunOptions,
              console: Console, on_phase: Callable[[str, list[HostResult]], None]) -> RunOutcome:
    """Deploy to `hosts`, start workers on those that passed, and watch until the target."""
    from ops import fleet

    deployed = fleet.deploy(hosts, options.deploy)
    on_phase("deploy", deployed)
    ready = [host for host, result in zip(hosts, deployed) if result.ok]
    started = fleet.start(ready, options.workers, options.timeouts) if ready else []
    on_phase("start", started)
    running = [host for host, result in zip(ready, started) if result.data.get("workers")]
    outcome = RunOutcome(deployed, started)
    if not running:
        return outcome

    watcher = FleetWatcher(running, study, target, options, console)
    try:
        snapshot = watcher.watch()
        outcome.target_reached = studies.finished_count(snapshot.counts) >= target
        if outcome.target_reached:
            _wait_for_workers_to_finish(watcher)
    finally:
        watcher.close()
        # Workers stop on their own at the target; this ends any that still run, such as
        # after Ctrl-C, so that no trial is left RUNNING.
        fleet.stop(running, options.timeouts, stop_timeout=options.stop_timeout)
    outcome.counts = studies.count_states(study.get_trials(deepcopy=False))
    outcome.restarts = sum(watcher.restarts.counts.values())
    outcome.unreachable = set(watcher.unreachable)
    return outcome


def _wait_for_workers_to_finish(watcher: FleetWatcher) -> None:
    deadline = time.monotonic() + FINISH_GRACE_S
    while time.monotonic() < deadline:
        watcher.poll()
        if not any(row.state == "alive" for row in watcher.rows):
            return
        time.sleep(1.0)
