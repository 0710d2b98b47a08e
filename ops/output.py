"""Render command results as a table, JSON or YAML on stdout.

Every read command shares ``--format``: tables are for people, JSON and YAML
for scripts and for keeping parameters in files.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json", "yaml")
PIPE_WIDTH = 400


def _plain(value: Any) -> Any:
    """Convert values that JSON and YAML cannot hold (NaN, tuples, datetimes)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def dump_json(data: Any) -> str:
    return json.dumps(_plain(data), indent=2, sort_keys=False) + "\n"


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True)


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={format_cell(item)}" for key, item in value.items())
    return str(value)


def emit(
    data: Any,
    fmt: str,
    *,
    rows: Sequence[Mapping[str, Any]] | None = None,
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Write ``data`` to stdout in ``fmt``.

    For ``table``, ``rows`` and ``columns`` choose what is shown; JSON and YAML
    always carry the whole of ``data``.
    """
    if fmt == "json":
        sys.stdout.write(dump_json(data))
        return
    if fmt == "yaml":
        sys.stdout.write(dump_yaml(data))
        return

    # Rich assumes 80 columns when stdout is not a terminal, which would cut names and
    # exponents in piped output. A pipe has no width, so the table gets room.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)
    if rows is None:
        rows = [data] if isinstance(data, Mapping) else list(data)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(format_cell(row.get(column)) for column in columns))
    console.print(table)
