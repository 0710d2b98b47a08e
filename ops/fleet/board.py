"""The live board of `tunefleet run`: the study from the database, the workers from the hosts."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ops import board, studies


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


@dataclass
class FleetWorkerRow:
    """One worker as the board shows it."""

    host: str
    name: str
    gpu: int | None
    state: str  # "alive", "dead", "finished", "unreachable"
    trial: int | None = None
    trials_finished: int = 0
    restarts: int = 0
    last_log_line: str = ""
    # HOSTNAME:PID, as the worker stores it in its trials' `worker` user attribute.
    worker_id: str = ""


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
        return format_seconds(max(0, self.target - finished) / rate * 60)


def render(study_name: str, snapshot: board.StudySnapshot, rows: list[FleetWorkerRow], progress: Progress,
           elapsed: float) -> Group:
    counts = snapshot.counts
    finished = studies.finished_count(counts)
    rate = progress.rate_per_minute(finished, elapsed)
    header = Text.assemble(
        ("study ", "dim"), (study_name, "bold"),
        ("  elapsed ", "dim"), format_seconds(elapsed),
        ("  finished ", "dim"), f"{finished}/{progress.target}",
        ("  trials/min ", "dim"), "-" if rate is None else f"{rate:.1f}",
        ("  estimated time left ", "dim"), progress.estimate_left(finished, elapsed),
    )
    trial_table = Table(show_edge=False, header_style="bold")
    for state in studies.STATE_ORDER:
        trial_table.add_column(state.lower(), justify="right")
    trial_table.add_column("best value", justify="right")
    best = "-" if snapshot.best_value is None else f"{snapshot.best_value:.4f} (trial {snapshot.best_number})"
    trial_table.add_row(*(str(counts[state]) for state in studies.STATE_ORDER), best)

    worker_table = Table(show_edge=False, header_style="bold")
    for column in ("host", "worker", "gpu", "state", "trial", "done", "restarts", "last log line"):
        worker_table.add_column(column, overflow="ellipsis", no_wrap=True)
    styles = {"alive": "green", "finished": "dim", "dead": "red", "unreachable": "yellow"}
    for row in rows:
        worker_table.add_row(
            row.host, row.name, "-" if row.gpu is None else str(row.gpu),
            Text(row.state, style=styles.get(row.state, "")),
            "-" if row.trial is None else f"#{row.trial}",
            str(row.trials_finished), str(row.restarts), row.last_log_line[-80:],
        )
    parts = [header, trial_table, worker_table]
    parts += [Text(event, style="yellow") for event in progress.events[-5:]]
    return Group(*parts)


def summary_line(study_name: str, snapshot: board.StudySnapshot, rows: list[FleetWorkerRow],
                 progress: Progress, elapsed: float) -> str:
    """Format one line for non-terminals: counts, best value, workers alive."""
    alive = sum(1 for row in rows if row.state == "alive")
    return (f"{board.summary_line(study_name, progress.target, snapshot, elapsed)}, "
            f"workers alive {alive}/{len(rows)}, "
            f"estimated time left {progress.estimate_left(studies.finished_count(snapshot.counts), elapsed)}")
