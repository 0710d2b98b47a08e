"""The live board of `tunefleet run`, drawn into a recording console."""

from __future__ import annotations

from rich.console import Console

from ops import board
from ops.board import StudySnapshot, format_duration
from ops.fleet.board import FleetWorkerRow, HostOutage, Progress, render, summary_line


def snapshot(complete: int, running_by_worker: dict[str, int] | None = None) -> StudySnapshot:
    counts = {"COMPLETE": complete, "PRUNED": 0, "FAIL": 1, "RUNNING": 2, "WAITING": 1}
    return StudySnapshot(counts, 0.93, 4, running_by_worker or {})


def rows() -> list[FleetWorkerRow]:
    return [
        FleetWorkerRow("gpu-a", "gpu0", 0, "alive", 7, 3, 0, "trial 6 COMPLETE value=0.9", "box:11"),
        FleetWorkerRow("gpu-b", "gpu1", 1, "dead", None, 1, 2, "Killed", "box:12"),
        FleetWorkerRow("gpu-c", "cpu0", None, "unknown", last_known_state="alive"),
    ]


def test_rate_counts_trials_since_start():
    progress = Progress(target=20, finished_at_start=2)
    assert progress.rate_per_minute(12, elapsed=300) == 2.0
    assert progress.estimate_left(12, elapsed=300) == format_duration(8 / 2.0 * 60)


def test_time_left_unknown_before_first_trial():
    progress = Progress(target=20, finished_at_start=5)
    assert progress.rate_per_minute(5, elapsed=60) is None
    assert progress.estimate_left(5, elapsed=60) == "-"


def test_board_shows_hosts_trials_and_events():
    progress = Progress(target=20, finished_at_start=0, events=["worker gpu-b:gpu1 restarted (2/3)"])
    console = Console(record=True, width=200, force_terminal=False)
    console.print(render("study-x", snapshot(10), rows(), progress, elapsed=600))
    text = console.export_text()
    assert "study-x" in text
    assert "10/20" in text
    assert "#7" in text
    assert "unknown, was alive" in text
    assert "worker gpu-b:gpu1 restarted (2/3)" in text
    assert "0.9300 (trial 4)" in text


def test_summary_line_counts_alive_workers():
    line = summary_line("study-x", snapshot(10), rows(), Progress(20, 0), elapsed=600)
    assert "workers alive 1/3" in line
    assert "10/20 finished" in line


def test_board_shows_host_outage_with_reason():
    outage = HostOutage("gpu-c", "connect to 127.0.0.43:2222 failed: Connection refused", since=0.0)
    console = Console(record=True, width=200, force_terminal=False)
    console.print(render("study-x", snapshot(10), rows(), Progress(20, 0), elapsed=600, outages=[outage]))
    text = console.export_text()
    assert "gpu-c unreachable since " in text
    assert "Connection refused" in text


def test_summary_line_names_unreachable_hosts():
    outage = HostOutage("gpu-c", "timed out", since=0.0)
    line = summary_line("study-x", snapshot(10), rows(), Progress(20, 0), elapsed=600, outages=[outage])
    assert "hosts unreachable 1 (gpu-c)" in line


def test_changed_line_printer_repeats_a_long_unchanged_line():
    console = Console(record=True, width=200)
    now = [0.0]
    printer = board.ChangedLinePrinter(console, repeat_seconds=60, clock=lambda: now[0])

    printer.print("study s: 11/12 finished, elapsed 0:00:47")
    now[0] = 30
    printer.print("study s: 11/12 finished, elapsed 0:01:17")
    now[0] = 61
    printer.print("study s: 11/12 finished, elapsed 0:01:48")
    printer.print("study s: 12/12 finished, elapsed 0:01:48")

    lines = console.export_text().splitlines()
    assert lines == ["study s: 11/12 finished, elapsed 0:00:47", "study s: 11/12 finished, elapsed 0:01:48",
                     "study s: 12/12 finished, elapsed 0:01:48"]
