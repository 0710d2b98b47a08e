"""Run one action on many hosts at once and keep a result for every host.

A failing or unreachable host never stops the others: its error becomes its result, and
the caller decides what a failure means for the whole command.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ops.fleet.connection import HostError
from ops.inventory import FleetHost

logger = logging.getLogger("tunefleet.fleet")

MAX_PARALLEL_HOSTS = 32


@dataclass
class HostResult:
    """The outcome of one action on one host: ok or not, a one-line message and data for output."""

    host: str
    ok: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def for_each_host(hosts: Sequence[FleetHost], action: Callable[[FleetHost], HostResult]) -> list[HostResult]:
    """Run `action` on every host in threads; return the results in the order of `hosts`."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_HOSTS, len(hosts))) as pool:
        return list(pool.map(lambda host: _guarded(action, host), hosts))


def _guarded(action: Callable[[FleetHost], HostResult], host: FleetHost) -> HostResult:
    started = time.monotonic()
    try:
        result = action(host)
    except HostError as error:
        result = HostResult(host.name, False, str(error))
    except Exception as error:  # one host's bug must not hide the other hosts' results
        logger.debug("unexpected error on %s", host.name, exc_info=True)
        result = HostResult(host.name, False, f"{type(error).__name__}: {error}")
    result.seconds = time.monotonic() - started
    return result
