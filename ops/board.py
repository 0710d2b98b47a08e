"""A live terminal board of one study and the worker processes running it.

The board reads the study from the storage (trial counts by state, best
value, which trial each worker runs) and the workers' state from the code that
started them, and redraws once a second. On a non-terminal it prints one line
whenever the counts change instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ops import studies


@dataclass
class WorkerView:
    """One worker as the board shows it."""

    name: str
    pid: int
    state: str  # "running", "exited 0", "exited 1", ...
    last_log_line: str = ""


class WorkerSource(Protocol):
    def worker_views(self) -> list[WorkerView]: ...


@dataclass
class StudySnapshot:
    counts: dict[str, int]
    best_value: float | None
    best_number: int | None
    running_by_worker: dict[str, int] = field(default_factory=dict)


def take_snapshot(study: optuna.Study) -> StudySnapshot:
    trials = study.get_trials(deepcopy=False)
    best = studies.best_trial(study)
    running = {
        trial.user_attrs["worker"]: trial.number
        for trial in trials
        if trial.state.name == "RUNNING" and "worker" in trial.user_attrs
    }
    return StudySnapshot(
        counts=studies.count_states(trials),
        best_value=best.value if best else None,
        best_number=best.number if best else None,
        running_by_worker=running,
    )


def format_duration(seconds: float) -> str:
    """Format seconds as H:MM:SS."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def short_log_line(line: str) -> str:
    """Drop the timestamp, level and logger name, and the parameters that follow a trial result."""
    _, separator, message = line.partition(": ")
    message = message if separator else line
    return message.split(" params=")[0]


def study_header(study_name: str, target: int, snapshot: StudySnapshot, elapsed: float,
                 *extra: tuple[str, str]) -> Text:
    """Build the board's first line; `extra` adds (label, value) pairs after the finished count."""
    parts: list[str | tuple[str, str]] = [
        ("study ", "dim"), (study_name, "bold"),
        ("  elapsed ", "dim"), format_duration(elapsed),
        ("  finished ", "dim"), f"{studies.finished_count(snapshot.counts)}/{target}",
    ]
    for label, value in extra:
        parts += [(f"  {label} ", "dim"), value]
    return Text.assemble(*parts)


def trial_table(snapshot: StudySnapshot) -> Table:
    """Build the table of trial counts by state and the best value."""
    table = Table(show_edge=False, header_style="bold")
    for state in studies.STATE_ORDER:
        table.add_column(state.lower(), justify="right")
    table.add_column("best value", justify="right")
    best = "-" if snapshot.best_value is None else f"{snapshot.best_value:.4f} (trial {snapshot.best_number})"
    table.add_row(*(str(snapshot.counts[state]) for state in studies.STATE_ORDER), best)
    return table


class ChangedLinePrinter:
    """Print a summary line on a non-terminal when more than its elapsed time changed.

    An unchanged line is printed again after `repeat_seconds`, so that a log of a long
    wait, such as a dead worker's grace period, still shows that the run is alive.
    """

    def __init__(self, console: Console, repeat_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.repeat_seconds = repeat_seconds
        self.clock = clock
        self.last_line = ""
        self.last_printed = float("-inf")

    def print(self, line: str) -> None:
        changed = line.split(", elapsed")[0] != self.last_line.split(", elapsed")[0]
        if changed or self.clock() - self.last_printed >= self.repeat_seconds:
            self.console.print(line, highlight=False)
            self.last_line = line
            self.last_printed = self.clock()


def render(study_name: str, target: int, snapshot: StudySnapshot, workers: list[WorkerView],
           elapsed: float, hostname: str) -> Group:
    worker_table = Table(show_edge=False, header_style="bold")
    worker_table.add_column("worker", no_wrap=True, min_width=8)
    worker_table.add_column("pid", no_wrap=True, min_width=6)
    worker_table.add_column("state", no_wrap=True, min_width=9)
    worker_table.add_column("trial", no_wrap=True, min_width=5)
    worker_table.add_column("last log line", no_wrap=True, overflow="ellipsis", ratio=1)
    for worker in workers:
        trial_number = snapshot.running_by_worker.get(f"{hostname}:{worker.pid}")
        style = "red"
        if worker.state == "running":
            style = "green"
        elif worker.state == "exited 0":
            style = "dim"
        worker_table.add_row(
            worker.name,
            str(worker.pid),
            Text(worker.state, style=style),
            "-" if trial_number is None else f"#{trial_number}",
            short_log_line(worker.last_log_line),
        )
    return Group(study_header(study_name, target, snapshot, elapsed), trial_table(snapshot), worker_table)


def summary_line(study_name: str, target: int, snapshot: StudySnapshot, elapsed: float) -> str:
    counts = snapshot.counts
    best = "-" if snapshot.best_value is None else f"{snapshot.best_value:.4f}"
    return (
        f"{study_name}: {studies.finished_count(counts)}/{target} finished "
        f"(complete {counts['COMPLETE']}, pruned {counts['PRUNED']}, failed {counts['FAIL']}, "
        f"running {counts['RUNNING']}), best {best}, elapsed {format_duration(elapsed)}"
    )


def watch(study: optuna.Study, target: int, source: WorkerSource, *, until_done, console: Console,
          hostname: str, interval: float = 1.0, clock=time.monotonic) -> StudySnapshot:
    """Redraw until ``until_done()`` returns True; return the last snapshot."""
    started = clock()
    snapshot = take_snapshot(study)
    if console.is_terminal:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                snapshot = take_snapshot(study)
                live.update(render(study.study_name, target, snapshot, source.worker_views(),
                                   clock() - started, hostname))
                if until_done():
                    break
                time.sleep(interval)
        return take_snapshot(study)

    printer = ChangedLinePrinter(console)
    while not until_done():
        snapshot = take_snapshot(study)
        printer.print(summary_line(study.study_name, target, snapshot, clock() - started))
        time.sleep(interval)
    snapshot = take_snapshot(study)
    console.print(summary_line(study.study_name, target, snapshot, clock() - started), highlight=False)
    return snapshot
