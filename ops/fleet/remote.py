"""The layout of tunefleet's base directory on a worker host, and calls to the host agent.

    BASE/payload/HASH/     unpacked payloads, the current one, the one before it and those
                           that running workers import from
    BASE/payload.sha256    hash of the payload whose requirements are installed
    BASE/venv/             virtualenv with access to the system's site-packages
    BASE/storage.env       TUNEFLEET_STORAGE_URL=..., mode 0600
    BASE/workers/          state.json with each worker's process-group id, and its logs
    BASE/results/          checkpoints, one folder per study
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ops.fleet.connection import HostConnection, HostError, quote
from ops.fleet.payload import AGENT_NAME

HASH_FILE = "payload.sha256"


@dataclass(frozen=True)
class RemoteLayout:
    """Absolute paths under one host's base directory."""

    base: str

    @property
    def hash_file(self) -> str:
        return f"{self.base}/{HASH_FILE}"

    @property
    def payload_root(self) -> str:
        return f"{self.base}/payload"

    def payload_dir(self, sha256: str) -> str:
        return f"{self.payload_root}/{sha256}"

    @property
    def venv_python(self) -> str:
        return f"{self.base}/venv/bin/python"

    @property
    def env_file(self) -> str:
        return f"{self.base}/storage.env"

    @property
    def state_dir(self) -> str:
        return f"{self.base}/workers"

    def log_file(self, worker: str) -> str:
        return f"{self.state_dir}/{worker}.log"

    def results_dir(self, study: str) -> str:
        safe = "".join(char if char.isalnum() or char in "._-" else "_" for char in study)
        return f"{self.base}/results/{safe}"


def resolve_layout(connection: HostConnection) -> RemoteLayout:
    """Create the host's base directory if needed and return its absolute path."""
    base = connection.host.base_dir
    result = connection.run(f"mkdir -p {quote(base)} && cd {quote(base)} && pwd -P")
    return RemoteLayout(result.stdout.strip())


def installed_hash(connection: HostConnection, layout: RemoteLayout) -> str | None:
    """Return the hash of the payload installed on the host, or None when there is none."""
    result = connection.run(f"cat {quote(layout.hash_file)} 2>/dev/null", check=False)
    text = result.stdout.strip()
    return text or None


def require_deployed(connection: HostConnection, layout: RemoteLayout) -> str:
    sha256 = installed_hash(connection, layout)
    if sha256 is None:
        raise HostError("no payload installed under "
                        f"{layout.base}; run: tunefleet workers deploy --limit {connection.host.name}")
    return sha256


def call_agent(connection: HostConnection, layout: RemoteLayout, sha256: str, command: str,
               request: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Run the agent's `command` with `request` on stdin and return its JSON reply."""
    payload_dir = layout.payload_dir(sha256)
    line = (f"cd {quote(layout.base)} && PYTHONPATH={quote(payload_dir)} "
            f"{quote(layout.venv_python)} {quote(payload_dir + '/' + AGENT_NAME)} {command}")
    result = connection.run(line, stdin=json.dumps(request), timeout=timeout)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise HostError(f"agent {command} wrote no JSON: {(result.stdout + result.stderr).strip()[-300:]}") from None
