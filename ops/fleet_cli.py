"""`tunefleet workers deploy|start|status|logs|stop` and `tunefleet run`: parse, call ops.fleet, print.

Every command acts on the selected hosts of the inventory's gpu group in parallel,
writes one result per host to stdout and exits 1 when any host failed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ops import fleet, output, storage_config, studies
from ops.cli_options import inventory_option
from ops.errors import TunefleetError
from ops.fleet import trials as fleet_trials
from ops.fleet.connection import DEFAULT_COMMAND_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S, HostError, Timeouts
from ops.fleet.deploy import DEFAULT_INSTALL_TIMEOUT_S
from ops.fleet.run import DEFAULT_MAX_RESTARTS, DEFAULT_POLL_INTERVAL_S, RunOptions, run_study, worker_state
from ops.fleet.workers import DEFAULT_STOP_TIMEOUT_S, log_command
from ops.inventory import FleetHost, load_gpu_hosts


def _host_options(function: Callable) -> Callable:
    """Add the options every fleet command shares: inventory, host selection, timeouts."""
    options = [
        inventory_option("whose gpu group lists the worker hosts"),
        click.option("--limit", default=None, help="Comma-separated names of gpu hosts to act on (default: all)."),
        click.option("--connect-timeout", type=click.FloatRange(min=1), default=DEFAULT_CONNECT_TIMEOUT_S,
                     show_default=True, help="Seconds to wait for an SSH connection to a host."),
        click.option("--command-timeout", type=click.FloatRange(min=1), default=DEFAULT_COMMAND_TIMEOUT_S,
                     show_default=True, help="Seconds to wait for one remote command (pip install has its own)."),
        click.option("--accept-new-host-keys", is_flag=True,
                     help="Record the key of a host that no known_hosts file lists yet, one host at a time. "
                          "A changed key is still rejected."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _worker_options(function: Callable) -> Callable:
    """Add the options that set how workers run."""
    options = [
        click.option("--objective", default=None, metavar="MODULE:FUNCTION",
                     help="Objective to optimize (default: trainer.digits:objective). Ship its module "
                          "with --include."),
        click.option("--search-space", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Search-space YAML file; it is shipped with the payload. Required with --objective."),
        click.option("--per-gpu", type=click.IntRange(min=1), default=None,
                     help="Workers per GPU (default: the host's workers_per_gpu, else 1). Above 1 they share "
                          "a device."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads per worker."),
        click.option("--heartbeat-interval", type=click.IntRange(min=1), default=None,
                     help="Seconds between trial heartbeats (worker default: 60)."),
        click.option("--grace-period", type=click.IntRange(min=1), default=None,
                     help="Seconds without heartbeat after which a trial counts as dead and is queued again "
                          "(worker default: twice the heartbeat interval)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_include_option = click.option(
    "--include", "include", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Extra file to ship into the payload's extra/ folder, which is on the workers' PYTHONPATH "
         "(an objective module). Repeatable.")
_env_file_option = click.option(
    "--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Env file (mode 0600) with TUNEFLEET_STORAGE_URL; default: as for 'tunefleet study'.")
_format_option = click.option("--format", "fmt", type=click.Choice(output.FORMATS), default="table",
                              show_default=True, help="Output format of the per-host results on stdout.")


def _select_hosts(inventory: Path, limit: str | None) -> list[FleetHost]:
    return load_gpu_hosts(inventory, limit=limit)


def _timeouts(connect_timeout: float, command_timeout: float) -> Timeouts:
    return Timeouts(connect=connect_timeout, command=command_timeout)


def _emit_results(results: Sequence[fleet.HostResult], fmt: str, title: str) -> None:
    records = [{"host": result.host, "ok": result.ok, "seconds": round(result.seconds, 1),
                "message": result.message, "data": result.data} for result in results]
    rows = [{**record, "result": "ok" if record["ok"] else "FAILED"} for record in records]
    output.emit(records, fmt, rows=rows, columns=["host", "result", "seconds", "message"], title=title)


def _fail_if_any_failed(results: Sequence[fleet.HostResult], action: str) -> None:
    failed = [result.host for result in results if not result.ok]
    if failed:
        raise TunefleetError(f"{action} failed on {len(failed)} of {len(results)} host(s): {', '.join(failed)}",
                             "each host's line above says what to do; the other hosts are done")


def _env_text(env_file: Path | None) -> str:
    return f"{storage_config.URL_VARIABLE}={storage_config.resolve_storage_url(env_file)}\n"


def _worker_settings(study: str, objective: str | None, search_space: Path | None, per_gpu: int | None,
                     threads: int | None, heartbeat_interval: int | None, grace_period: int | None
                     ) -> fleet.WorkerOptions:
    if objective and search_space is None:
        raise click.UsageError("--objective needs --search-space FILE")
    return fleet.WorkerOptions(study=study, objective=objective,
                               search_space=search_space.name if search_space else None,
                               per_gpu=per_gpu, threads=threads, heartbeat_interval=heartbeat_interval,
                               grace_period=grace_period)


@click.group("workers")
def workers_group() -> None:
    """Ship the trainer to the gpu hosts and start, watch and stop their workers."""


@workers_group.command("deploy")
@_host_options
@_include_option
@_env_file_option
@click.option("--study", default=None, help="Also check from each host that this study exists.")
@click.option("--install-timeout", type=click.FloatRange(min=1), default=DEFAULT_INSTALL_TIMEOUT_S,
              show_default=True, help="Seconds to wait for pip install on a host.")
@_format_option
def deploy_command(inventory: Path, limit: str | None, connect_timeout: float, command_timeout: float,
                   accept_new_host_keys: bool, include: tuple[Path, ...], env_file: Path | None,
                   study: str | None, install_timeout: float, fmt: str) -> None:
    """Upload the payload where it changed, build each host's virtualenv and run its preflight."""
    hosts = _select_hosts(inventory, limit)
    options = fleet.DeployOptions(payload=fleet.build_payload(include), env_text=_env_text(env_file), study=study,
                                  timeouts=_timeouts(connect_timeout, command_timeout),
                                  install_timeout=install_timeout, accept_new_host_keys=accept_new_host_keys)
    results = fleet.deploy(hosts, options)
    _emit_results(results, fmt, "deploy")
    _fail_if_any_failed(results, "deploy")


@workers_group.command("start")
@click.argument("study")
@_host_options
@_worker_options
@_format_option
def start_command(study: str, inventory: Path, limit: str | None, connect_timeout: float, command_timeout: float,
                  accept_new_host_keys: bool, objective: str | None, search_space: Path | None,
                  per_gpu: int | None, threads: int | None, heartbeat_interval: int | None,
                  grace_period: int | None, fmt: str) -> None:
    """Start the workers of STUDY, one per GPU, on hosts that 'workers deploy' prepared.

    A --search-space file must have been shipped with 'workers deploy --include FILE'.
    """
    hosts = _select_hosts(inventory, limit)
    _check_study_exists(study)
    options = _worker_settings(study, objective, search_space, per_gpu, threads, heartbeat_interval, grace_period)
    results = fleet.start(hosts, options, _timeouts(connect_timeout, command_timeout),
                          accept_new=accept_new_host_keys)
    _emit_results(results, fmt, f"start {study}")
    _fail_if_any_failed(results, "start")


def _check_study_exists(study: str) -> None:
    """Reject an unknown study before any host is contacted, when the operator's storage URL is known.

    Without a storage URL here, the workers' own start-up check on each host reports it.
    """
    try:
        url = storage_config.resolve_storage_url(None)
    except TunefleetError:
        return
    studies.load_study(studies.open_storage(url), study)


@workers_group.command("status")
@_host_options
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Env file with TUNEFLEET_STORAGE_URL, to show each worker's current trial.")
@_format_option
def status_command(inventory: Path, limit: str | None, connect_timeout: float, command_timeout: float,
                   accept_new_host_keys: bool, env_file: Path | None, fmt: str) -> None:
    """Show every worker: host, GPU, alive or dead, current trial, trials finished, last log line."""
    hosts = _select_hosts(inventory, limit)
    results = fleet.status(hosts, _timeouts(connect_timeout, command_timeout), accept_new=accept_new_host_keys)
    rows = _status_rows(results, _current_trials(results, env_file))
    records = [{"host": result.host, "ok": result.ok, "message": result.message, "data": result.data}
               for result in results]
    columns = ["host", "worker", "gpu", "state", "study", "trial", "finished", "restarts", "last log line"]
    output.emit(records if fmt != "table" else rows, fmt, rows=rows, columns=columns)
    _fail_if_any_failed(results, "status")


def _current_trials(results: Sequence[fleet.HostResult], env_file: Path | None) -> dict[str, int]:
    study_names = {worker.get("study") for result in results if result.ok
                   for worker in result.data["workers"].values()} - {None}
    if not study_names:
        return {}
    try:
        storage = studies.open_storage(storage_config.resolve_storage_url(env_file))
    except TunefleetError as error:
        click.echo(f"warning: current trials not shown: {error}", err=True)
        return {}
    running: dict[str, int] = {}
    for name in sorted(study_names):
        try:
            running.update(fleet_trials.running_trials(studies.load_study(storage, name)))
        except TunefleetError as error:
            click.echo(f"warning: {error}", err=True)
    return running


def _status_rows(results: Sequence[fleet.HostResult], running: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        if not result.ok:
            rows.append({"host": result.host, "worker": "-", "state": "unreachable",
                         "last log line": result.message})
            continue
        for name, worker in sorted(result.data["workers"].items()):
            worker_id = fleet_trials.worker_id(result.data["hostname"], worker["pid"])
            rows.append({"host": result.host, "worker": name, "gpu": worker["gpu"], "state": worker_state(worker),
                         "study": worker["study"], "trial": running.get(worker_id),
                         "finished": worker["trials_finished"], "restarts": worker["restarts"],
                         "last log line": worker["last_log_line"][-100:]})
    return rows


@workers_group.command("logs")
@click.argument("target", metavar="HOST[:WORKER]")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True,
              help="Number of last lines to show per log.")
@_host_options
def logs_command(target: str, follow: bool, lines: int, inventory: Path, limit: str | None,
                 connect_timeout: float, command_timeout: float, accept_new_host_keys: bool) -> None:
    """Show the log of the workers on HOST, or of one: HOST:GPU (HOST:0) or HOST:NAME (HOST:cpu0)."""
    if limit:
        raise click.UsageError("logs takes the host as HOST[:WORKER], not --limit")
    host_name, _, worker = target.partition(":")
    host = _select_hosts(inventory, host_name)[0]
    timeouts = _timeouts(connect_timeout, command_timeout)
    if accept_new_host_keys:
        fleet.accept_new_host_keys([host], timeouts)
    try:
        connection, command = log_command(host, timeouts, worker or None, lines=lines, follow=follow)
    except HostError as error:
        raise TunefleetError(f"{host.name}: {error}") from None
    with connection:
        try:
            # A followed log has no end, so no command timeout applies to it.
            connection.connection.run(command, hide=False, warn=True, timeout=None if follow else timeouts.command)
        except KeyboardInterrupt:
            pass


@workers_group.command("stop")
@_host_options
@click.option("--timeout", "stop_timeout", type=click.FloatRange(min=0), default=DEFAULT_STOP_TIMEOUT_S,
              show_default=True, help="Seconds between SIGTERM and SIGKILL.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Env file with TUNEFLEET_STORAGE_URL, to fail and queue again the trials of killed workers.")
@_format_option
def stop_command(inventory: Path, limit: str | None, connect_timeout: float, command_timeout: float,
                 accept_new_host_keys: bool, stop_timeout: float, env_file: Path | None, fmt: str) -> None:
    """Stop every worker: SIGTERM, SIGKILL after --timeout, then check that none is left."""
    hosts = _select_hosts(inventory, limit)
    results = fleet.stop(hosts, _timeouts(connect_timeout, command_timeout), stop_timeout=stop_timeout,
                         accept_new=accept_new_host_keys)
    _fail_trials_of_stopped_workers(results, env_file)
    _emit_results(results, fmt, "stop")
    _fail_if_any_failed(results, "stop")


def _fail_trials_of_stopped_workers(results: Sequence[fleet.HostResult], env_file: Path | None) -> None:
    """Fail and queue again the RUNNING trials of workers that SIGKILL ended."""
    by_study: dict[str, set[str]] = {}
    for result in results:
        for worker in result.data.get("workers", {}).values():
            if worker["result"] in ("stopped", "killed") and worker.get("study"):
                worker_id = fleet_trials.worker_id(result.data["hostname"], worker["pid"])
                by_study.setdefault(worker["study"], set()).add(worker_id)
    if not by_study:
        return
    try:
        storage = studies.open_storage(storage_config.resolve_storage_url(env_file))
    except TunefleetError as error:
        click.echo(f"warning: trials of stopped workers not checked: {error}", err=True)
        return
    for name, worker_ids in sorted(by_study.items()):
        failed = fleet_trials.fail_trials_of(studies.load_study(storage, name), worker_ids)
        if failed:
            click.echo(f"study {name}: trials {failed} of killed workers marked FAIL and queued again", err=True)


@click.command("run")
@click.argument("study")
@_host_options
@_worker_options
@_include_option
@_env_file_option
@click.option("--max-restarts", type=click.IntRange(min=0), default=DEFAULT_MAX_RESTARTS, show_default=True,
              help="Times a worker that died is restarted before it is left dead.")
@click.option("--poll-interval", type=click.FloatRange(min=0.5), default=DEFAULT_POLL_INTERVAL_S,
              show_default=True, help="Seconds between reads of the hosts' worker state.")
@click.option("--install-timeout", type=click.FloatRange(min=1), default=DEFAULT_INSTALL_TIMEOUT_S,
              show_default=True, help="Seconds to wait for pip install on a host.")
def run_command(study: str, inventory: Path, limit: str | None, connect_timeout: float, command_timeout: float,
                accept_new_host_keys: bool, objective: str | None, search_space: Path | None,
                per_gpu: int | None, threads: int | None, heartbeat_interval: int | None,
                grace_period: int | None, include: tuple[Path, ...], env_file: Path | None,
                max_restarts: int, poll_interval: float, install_timeout: float) -> None:
    """Deploy, start one worker per GPU and show a live board until STUDY reaches its target.

    Create the study first with 'tunefleet study create'.
    """
    hosts = _select_hosts(inventory, limit)
    url = storage_config.resolve_storage_url(env_file)
    loaded = studies.load_study(studies.open_storage(url), study)
    target = loaded.user_attrs.get(studies.SETTINGS_ATTR, {}).get("target_trials")
    if not isinstance(target, int):
        raise TunefleetError(f"study '{study}' has no target_trials setting, so it was not created by tunefleet",
                             f"create a study with: tunefleet study create NAME --trials N")
    timeouts = _timeouts(connect_timeout, command_timeout)
    extra_files = list(include) + ([search_space] if search_space else [])
    options = RunOptions(
        deploy=fleet.DeployOptions(payload=fleet.build_payload(extra_files), env_text=f"{storage_config.URL_VARIABLE}={url}\n",
                                   study=study, timeouts=timeouts, install_timeout=install_timeout,
                                   accept_new_host_keys=accept_new_host_keys),
        workers=_worker_settings(study, objective, search_space, per_gpu, threads, heartbeat_interval,
                                 grace_period),
        timeouts=timeouts, max_restarts=max_restarts, poll_interval=poll_interval,
    )
    console = Console(stderr=True, soft_wrap=True)
    try:
        outcome = run_study(hosts, loaded, target, options, console,
                            on_phase=functools.partial(_print_phase, console))
    except KeyboardInterrupt:
        raise TunefleetError(f"run of {study} interrupted; its workers were stopped and their running "
                             "trials ended as FAIL", f"see the study with: tunefleet study show {study}") from None
    counts = ", ".join(f"{state.lower()} {count}" for state, count in outcome.counts.items())
    click.echo(f"study {study}: {'target reached' if outcome.target_reached else 'target NOT reached'} "
               f"({counts}); {outcome.restarts} worker restart(s)")
    if outcome.failed_hosts or not outcome.target_reached:
        failed = ", ".join(outcome.failed_hosts) or "none"
        raise TunefleetError(f"run of {study} ended with failed hosts: {failed}" if outcome.target_reached
                             else f"run of {study} ended before its target; failed hosts: {failed}",
                             f"see the lines above; check the workers with: tunefleet workers status")


def _print_phase(console: Console, phase: str, results: list[fleet.HostResult]) -> None:
    for result in results:
        mark = "ok" if result.ok else "FAILED"
        console.print(f"{phase} {result.host}: {mark}: {result.message}", highlight=False, markup=False)


def register(cli_group: click.Group) -> None:
    """Add the `workers` group and the `run` command to the top-level CLI."""
    cli_group.add_command(workers_group)
    cli_group.add_command(run_command)
