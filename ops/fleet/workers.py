"""`tunefleet workers start|stop|status|logs` on one host each, so the caller does the fan-out.

The host agent does the process work (setsid, the state file, signals). This module
places workers, builds their command lines and turns the agent's replies into results.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ops.fleet import remote
from ops.fleet.connection import HostConnection, HostError, Timeouts, quote
from ops.fleet.fanout import HostResult
from ops.fleet.payload import EXTRA_DIR
from ops.fleet.placement import WorkerSlot, place_workers
from ops.inventory import FleetHost

DEFAULT_STOP_TIMEOUT_S = 60.0
DEFAULT_ALIVE_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class WorkerOptions:
    """Run settings of one study's workers: objective, heartbeat and placement."""

    study: str
    objective: str | None = None
    # A file name inside the payload's extra/ folder, as --include shipped it.
    search_space: str | None = None
    per_gpu: int | None = None
    threads: int | None = None
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    alive_timeout: float = DEFAULT_ALIVE_TIMEOUT_S


def start_host(host: FleetHost, options: WorkerOptions, timeouts: Timeouts,
               only: set[str] | None = None) -> HostResult:
    """Start the host's workers for `options.study`; `only` restricts it to some worker names."""
    with HostConnection(host, timeouts) as connection:
        layout = remote.resolve_layout(connection)
        sha256 = remote.require_deployed(connection, layout)
        discovered = _discover_gpus(connection, layout, sha256) if host.gpus is None else []
        slots = place_workers(host, discovered, options.per_gpu)
        if only is not None:
            slots = [slot for slot in slots if slot.name in only]
        if not slots:
            raise HostError("no workers to place: no GPU found and cpu_workers is 0; "
                            "set gpus or cpu_workers in the inventory")
        _reject_other_study(connection, layout, sha256, options.study, slots)
        specs = [_worker_spec(slot, layout, sha256, options) for slot in slots]
        answer = remote.call_agent(connection, layout, sha256, "start",
                                   {"state_dir": layout.state_dir, "workers": specs,
                                    "alive_timeout": options.alive_timeout},
                                   timeout=options.alive_timeout + timeouts.command)
    return _start_result(host, slots, answer)


def _discover_gpus(connection: HostConnection, layout: remote.RemoteLayout, sha256: str) -> list[int]:
    answer = remote.call_agent(connection, layout, sha256, "gpus", {})
    if answer["nvidia_smi"] not in ("ok", "not found"):
        raise HostError(f"nvidia-smi {answer['nvidia_smi']}; fix the driver, or set gpus in the inventory")
    return [gpu["index"] for gpu in answer["gpus"]]


def _reject_other_study(connection: HostConnection, layout: remote.RemoteLayout, sha256: str,
                        study: str, slots: list[WorkerSlot]) -> None:
    answer = remote.call_agent(connection, layout, sha256, "status", {"state_dir": layout.state_dir})
    names = {slot.name for slot in slots}
    busy = [f"{name} ({worker['study']})" for name, worker in answer["workers"].items()
            if name in names and worker["alive"] and worker["study"] != study]
    if busy:
        raise HostError(f"workers of another study still run: {', '.join(busy)}; stop them first with: "
                        f"tunefleet workers stop --limit {connection.host.name}")


def _worker_spec(slot: WorkerSlot, layout: remote.RemoteLayout, sha256: str,
                 options: WorkerOptions) -> dict[str, Any]:
    payload_dir = layout.payload_dir(sha256)
    argv = [layout.venv_python, "-m", "trainer.worker", "--study", options.study,
            "--env-file", layout.env_file, "--results-dir", layout.results_dir(options.study)]
    if options.objective:
        argv += ["--objective", options.objective]
    if options.search_space:
        argv += ["--search-space", f"{payload_dir}/{EXTRA_DIR}/{options.search_space}"]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if options.heartbeat_interval:
        argv += ["--heartbeat-interval", str(options.heartbeat_interval)]
    if options.grace_period:
        argv += ["--grace-period", str(options.grace_period)]
    environment = {
        **slot.environment,
        # extra/ contains the user's objective modules shipped with --include.
        "PYTHONPATH": f"{payload_dir}:{payload_dir}/{EXTRA_DIR}",
        "PYTHONUNBUFFERED": "1",
    }
    return {"name": slot.name, "gpu": slot.gpu, "study": options.study, "payload": sha256, "argv": argv,
            "environment": environment, "cwd": layout.base, "log": layout.log_file(slot.name)}


def _start_result(host: FleetHost, slots: list[WorkerSlot], answer: dict[str, Any]) -> HostResult:
    workers = answer["workers"]
    # A worker that exits 0 right away found the study's target already reached.
    failed = {name: worker for name, worker in workers.items()
              if worker["result"] == "exited" and worker["exit_code"] != 0}
    data = {"hostname": answer["hostname"], "workers": workers,
            "gpus": {slot.name: slot.gpu for slot in slots}}
    if failed:
        details = "; ".join(
            f"{name} exited with code {worker['exit_code']}: {(worker['last_log_lines'] or ['(no output)'])[-1]}"
            for name, worker in sorted(failed.items()))
        return HostResult(host.name, False, f"{len(failed)} of {len(workers)} worker(s) failed to start: {details}",
                          data)
    started = sum(1 for worker in workers.values() if worker["result"] == "started")
    running = sum(1 for worker in workers.values() if worker["result"] == "already running")
    finished = len(workers) - started - running
    message = f"{started} worker(s) started, {running} already running"
    if finished:
        message += f", {finished} exited at once because the study reached its target"
    return HostResult(host.name, True, message, data)


def stop_host(host: FleetHost, timeouts: Timeouts, *, stop_timeout: float = DEFAULT_STOP_TIMEOUT_S,
              names: list[str] | None = None) -> HostResult:
    """SIGTERM the host's workers, SIGKILL them after `stop_timeout`, check none is left."""
    with HostConnection(host, timeouts) as connection:
        layout = remote.resolve_layout(connection)
        sha256 = remote.installed_hash(connection, layout)
        if sha256 is None:
            return HostResult(host.name, True, "nothing deployed, so no worker runs", {"workers": {}})
        answer = remote.call_agent(connection, layout, sha256, "stop",
                                   {"state_dir": layout.state_dir, "timeout": stop_timeout, "names": names},
                                   timeout=stop_timeout + timeouts.command)
    workers = answer["workers"]
    data = {"hostname": answer["hostname"], "workers": workers}
    left = {name: worker["left"] for name, worker in workers.items() if worker["left"]}
    if left:
        return HostResult(host.name, False, f"processes still running after SIGKILL: {left}", data)
    counts: dict[str, int] = {}
    for worker in workers.values():
        counts[worker["result"]] = counts.get(worker["result"], 0) + 1
    summary = ", ".join(f"{count} {result}" for result, count in sorted(counts.items())) or "no workers"
    return HostResult(host.name, True, summary, data)


def status_host(host: FleetHost, timeouts: Timeouts) -> HostResult:
    """Read every worker's state on the host: alive or dead, trials, last log line."""
    with HostConnection(host, timeouts) as connection:
        layout = remote.resolve_layout(connection)
        sha256 = remote.installed_hash(connection, layout)
        if sha256 is None:
            return HostResult(host.name, True, "nothing deployed", {"hostname": None, "workers": {}})
        answer = remote.call_agent(connection, layout, sha256, "status", {"state_dir": layout.state_dir})
    workers = answer["workers"]
    alive = sum(1 for worker in workers.values() if worker["alive"])
    return HostResult(host.name, True, f"{alive} of {len(workers)} worker(s) alive",
                      {"hostname": answer["hostname"], "workers": workers})


def log_command(host: FleetHost, timeouts: Timeouts, worker: str | None, *, lines: int, follow: bool) -> tuple[
        HostConnection, str]:
    """Return an open connection and the tail command that shows the selected workers' logs."""
    connection = HostConnection(host, timeouts)
    try:
        layout = remote.resolve_layout(connection)
        sha256 = remote.require_deployed(connection, layout)
        answer = remote.call_agent(connection, layout, sha256, "status", {"state_dir": layout.state_dir})
        logs = _select_logs(host, answer["workers"], worker)
    except BaseException:
        connection.close()
        raise
    tail = ["tail", "-n", str(lines)]
    if follow:
        tail.append("-F")
    return connection, shlex.join(tail) + " " + " ".join(quote(path) for path in logs)


def _select_logs(host: FleetHost, workers: dict[str, Any], selector: str | None) -> list[str]:
    if not workers:
        raise HostError(f"no workers recorded on {host.name}; start them with: tunefleet workers start STUDY")
    if selector is None:
        return [workers[name]["log"] for name in sorted(workers)]
    matches = [name for name, worker in workers.items()
               if selector in (name, str(worker.get("gpu"))) or name.startswith(f"gpu{selector}-")]
    if not matches:
        raise HostError(f"no worker {selector!r} on {host.name}; workers there: {', '.join(sorted(workers))}")
    return [workers[name]["log"] for name in sorted(matches)]
