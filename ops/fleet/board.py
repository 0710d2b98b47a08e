"""The live board of `tunefleet run`: the study from the database, the workers from the hosts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ops import board, studies
from ops.board import format_duration

STATE_STYLES = {"alive": "green", "finished": "dim", "dead": "red", "restarting": "yellow", "unknown": "yellow"}


@dataclass
class FleetWorkerRow:
    """One worker as the board shows it."""

    host: str
    name: str
    gpu: int | None
    # "alive", "dead", "finished", "restarting" (dead, with a restart in flight), or
    # "unknown" while its host cannot be reached.
    state: str
    trial: int | None = None
    trials_finished: int = 0
    restarts: int = 0
    last_log_line: str = ""
    # HOSTNAME:PID, as the worker stores it in its trials' `worker` user attribute.
    worker_id: str = ""
    # The state its host reported last, kept while the state is "unknown".
    last_known_state: str | None = None

    @property
    def state_text(self) -> str:
        if self.state == "unknown" and self.last_known_state:
            return f"unknown, was {self.last_known_state}"
        return self.state


@dataclass
class HostOutage:
    """A host that became unreachable during the run: since when (wall-clock time) and why."""

    host: str
    reason: str
    since: float

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.host} unreachable since {since}: {self.reason}"


@dataclass
class Progress:
    """Finished trials over time, for the rate and the estimate of the time left."""

    target: int
    finished_at_start: int
    events: list[str] = field(default_factory=list)

    def rate_per_minute(self, finished: int, elapsed: float) -> float | None:
        done = finished - self.finished_at_start
        if elapsed <= 0 or done <= 0:
            return None
        return done / (elapsed / 60)

    def estimate_left(self, finished: int, elapsed: float) -> str:
        rate = self.rate_per_minute(finished, elapsed)
        if rate is None:
            return "-"
        # An estimate from the average rate so far; restarts and slow trials move it.
        return format_duration(max(0, self.target - finished) / rate * 60)


def render(study_name: str, snapshot: board.StudySnapshot, rows: list[FleetWorkerRow], progress: Progress,
           elapsed: float, outages: Sequence[HostOutage] = ()) -> Group:
    finished = studies.finished_count(snapshot.counts)
    rate = progress.rate_per_minute(finished, elapsed)
    header = board.study_header(study_name, progress.target, snapshot, elapsed,
                                ("trials/min", "-" if rate is None else f"{rate:.1f}"),
                                ("estimated time left", progress.estimate_left(finished, elapsed)))

    worker_table = Table(show_edge=False, header_style="bold")
    for column in ("host", "worker", "gpu", "state", "trial", "done", "restarts", "last log line"):
        worker_table.add_column(column, overflow="ellipsis", no_wrap=True)
    for row in rows:
        worker_table.add_row(
            row.host, row.name, "-" if row.gpu is None else str(row.gpu),
            Text(row.state_text, style=STATE_STYLES.get(row.state, "")),
            "-" if row.trial is None else f"#{row.trial}",
            str(row.trials_finished), str(row.restarts), row.last_log_line[-80:],
        )
    parts = [header, board.trial_table(snapshot), worker_table]
    parts += [Text(outage.describe(), style="bold yellow") for outage in outages]
    parts += [Text(event, style="yellow") for event in progress.events[-5:]]
    return Group(*parts)


def summary_line(study_name: str, snapshot: board.StudySnapshot, rows: list[FleetWorkerRow],
                 progress: Progress, elapsed: float, outages: Sequence[HostOutage] = ()) -> str:
    """Format one line for non-terminals: counts, best value, workers alive, hosts unreachable."""
    alive = sum(1 for row in rows if row.state == "alive")
    line = (f"{board.summary_line(study_name, progress.target, snapshot, elapsed)}, "
            f"workers alive {alive}/{len(rows)}")
    if outages:
        line += f", hosts unreachable {len(outages)} ({', '.join(outage.host for outage in outages)})"
    return f"{line}, estimated time left {progress.estimate_left(studies.finished_count(snapshot.counts), elapsed)}"
