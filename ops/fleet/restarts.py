"""Restarts of dead workers during `tunefleet run`, in the background so the board keeps refreshing.

A restart waits until the new worker logs its start line, which takes tens of seconds
on a loaded host. Each worker has at most one restart in flight, and at most `limit`
restarts in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ops.fleet import workers as workers_module
from ops.fleet.connection import Timeouts
from ops.fleet.fanout import HostResult
from ops.inventory import FleetHost

logger = logging.getLogger("tunefleet.fleet")

# (host name, worker name)
WorkerKey = tuple[str, str]

MAX_PARALLEL_RESTARTS = 8


class WorkerRestarts:
    """Submit, count and collect restarts of dead workers."""

    def __init__(self, hosts: Mapping[str, FleetHost], options: workers_module.WorkerOptions, timeouts: Timeouts,
                 limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.hosts = hosts
        self.options = options
        self.timeouts = timeouts
        self.limit = limit
        self.clock = clock
        self.counts: dict[WorkerKey, int] = {}
        self.finished_at: dict[WorkerKey, float] = {}
        self._in_flight: dict[WorkerKey, Future[HostResult]] = {}
        self._pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL_RESTARTS, thread_name_prefix="tunefleet-restart")

    def in_flight(self, key: WorkerKey) -> bool:
        return key in self._in_flight

    @property
    def any_in_flight(self) -> bool:
        return bool(self._in_flight)

    def finished_since(self, key: WorkerKey, moment: float) -> bool:
        """Return whether a restart of `key` ended after `moment`, so a status read then is stale."""
        return self.finished_at.get(key, float("-inf")) >= moment

    def submit(self, key: WorkerKey) -> bool:
        """Start a restart of `key` in the background; return False when it is used up or already in flight."""
        if key in self._in_flight or self.counts.get(key, 0) >= self.limit:
            return False
        self.counts[key] = self.counts.get(key, 0) + 1
        host, name = key
        self._in_flight[key] = self._pool.submit(workers_module.start_host, self.hosts[host], self.options,
                                                 self.timeouts, only={name})
        return True

    def collect(self) -> list[str]:
        """Return one event line for each restart that ended since the last call."""
        events = []
        for key, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            self.finished_at[key] = self.clock()
            events.append(self._describe(key, future))
        return events

    def _describe(self, key: WorkerKey, future: Future[HostResult]) -> str:
        error = future.exception()
        if error is not None:
            outcome = f"restart failed: {error}"
        else:
            result = future.result()
            outcome = "restarted" if result.ok else f"restart failed: {result.message}"
        host, name = key
        logger.info("worker %s:%s %s", host, name, outcome)
        return f"worker {host}:{name} {outcome} ({self.counts[key]}/{self.limit})"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the restarts in flight; return whether all of them ended within `timeout`."""
        _, not_done = wait(list(self._in_flight.values()), timeout=timeout)
        return not not_done

    def close(self) -> None:
        """Wait for the restarts in flight, so that a stop after this finds every worker they started."""
        self._pool.shutdown(wait=True, cancel_futures=True)
