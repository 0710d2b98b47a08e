"""Show an Ansible run as it happens, from ansible-runner's events.

One line per task result on stderr: status, host, task name. No module output
is shown, so nothing a task returns (and nothing ``no_log`` hides) reaches the
terminal.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

_STATUS_STYLE = {
    "ok": "green",
    "changed": "yellow",
    "skipped": "dim",
    "failed": "bold red",
    "unreachable": "bold red",
}

_EVENT_STATUS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
}


class PlaybookProgress:
    """Callable for ``run_playbook(on_event=...)`` that prints task results."""

    def __init__(self, console: Console | None = None, *, show_ok: bool = True, show_skipped: bool = False) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.show_ok = show_ok
        self.show_skipped = show_skipped

    def __call__(self, event: dict[str, Any]) -> None:
        status = _EVENT_STATUS.get(event.get("event", ""))
        if status is None:
            return
        data = event.get("event_data", {})
        if status == "ok" and data.get("res", {}).get("changed"):
            status = "changed"
        if status == "failed" and data.get("ignore_errors"):
            return
        if status == "skipped" and not self.show_skipped:
            return
        if status == "ok" and not self.show_ok and not _debug_message(data):
            return
        line = Text.assemble(
            (f"{status:<12}", _STATUS_STYLE[status]),
            (f"{data.get('host', '?'):<14} ", "bold"),
            data.get("task", ""),
        )
        self.console.print(line, highlight=False)
        message = _debug_message(data)
        if message:
            # The role speaks to the operator through debug tasks: warnings, and what
            # check mode could not show.
            self.console.print(Text(f"{'':<12}{message}", style="cyan"), highlight=False)


def _debug_message(data: dict[str, Any]) -> str:
    if data.get("task_action") not in ("debug", "ansible.builtin.debug"):
        return ""
    message = data.get("res", {}).get("msg", "")
    if not isinstance(message, str) or "censored" in message:
        return ""
    return message


def print_recap(console: Console, recap: dict[str, Any]) -> None:
    """Print the per-host recap of a finished playbook run."""
    table = Table(title="recap", show_edge=False, header_style="bold")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column, justify="right" if column != "host" else "left")
    for host, counts in sorted(recap.items()):
        table.add_row(host, *(str(getattr(counts, name)) for name in
                              ("ok", "changed", "failed", "unreachable", "skipped")))
    console.print(table)
