"""Locations of tunefleet's state directory, project root and playbooks."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """Return the operator's state directory: ``$TUNEFLEET_HOME``, else ``~/.tunefleet``."""
    configured = os.environ.get("TUNEFLEET_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".tunefleet"


def project_root() -> Path:
    return PROJECT_ROOT


def playbook_dir() -> Path:
    return PROJECT_ROOT / "playbooks"


def secrets_dir() -> Path:
    return state_dir() / "secrets"
