"""Click options that several command groups share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

DEFAULT_INVENTORY = Path("inventory/hosts.yml")


def inventory_option(purpose: str) -> Callable:
    """Return the -i/--inventory option; `purpose` names the groups the command reads."""
    return click.option(
        "-i", "--inventory",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TUNEFLEET_INVENTORY",
        default=DEFAULT_INVENTORY,
        show_default=True,
        help=f"Ansible inventory {purpose}. Also read from $TUNEFLEET_INVENTORY.",
    )
