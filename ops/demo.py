"""``tunefleet demo``: the main job on this machine.

Steps: install PostgreSQL without sudo through the playbook (a later run
reuses the server), write the workers' env file, create the study once, start
the workers, watch them on a live board, then write the best parameters.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ops import board, output, paths, progress, provision, secrets, storage_config, studies
from ops.errors import TunefleetError

STOP_TIMEOUT_S = 60
# prctl(2) option that requests a signal when the parent process exits (linux/prctl.h).
PR_SET_PDEATHSIG = 1
DEMO_HEARTBEAT_S = 10


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def view(self) -> board.WorkerView:
        code = self.process.poll()
        state = "running" if code is None else f"exited {code}"
        return board.WorkerView(self.name, self.process.pid, state, _last_line(self.log_path))


class LocalWorkers:
    """Worker processes on this machine, for the board and for shutdown."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
        self.workers = workers

    def worker_views(self) -> list[board.WorkerView]:
        return [worker.view() for worker in self.workers]

    def all_exited(self) -> bool:
        return all(worker.process.poll() is not None for worker in self.workers)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every worker (each fails or finishes its trial), SIGKILL after ``timeout``."""
        for worker in self.workers:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                worker.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def default_study_name() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    # The random suffix keeps two demos started in the same second apart.
    return f"digits-demo-{stamp}-{os.urandom(2).hex()}"


def write_env_file(server: provision.DatabaseServer) -> Path:
    env_file = storage_config.default_env_file()
    secrets.write_secret_file(
        env_file, f"{storage_config.URL_VARIABLE}={server.storage_url(masked=False)}\n"
    )
    return env_file


def _stop_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """Return a pre-exec hook that has the kernel send SIGTERM to the worker when the demo dies.

    Workers run in sessions of their own so that Ctrl-C reaches only the demo, which
    stops them in order. A demo killed with SIGKILL cannot stop them, so they would run
    on unseen. The parent-death signal stops them instead, and each worker fails and
    queues again its running trial, as on any SIGTERM.
    """
    if not sys.platform.startswith("linux"):
        return None

    def prepare() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            # The demo died between fork and prctl, before the kernel could tell.
            os.kill(os.getpid(), signal.SIGTERM)

    return prepare


def start_workers(study_name: str, count: int, env_file: Path, run_dir: Path) -> LocalWorkers:
    """Start ``count`` worker processes, each in its own session, logging to ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    environment = {key: value for key, value in os.environ.items() if key != storage_config.URL_VARIABLE}
    workers = []
    for index in range(1, count + 1):
        log_path = run_dir / f"worker-{index}.log"
        command = [
            sys.executable, "-m", "trainer.worker",
            "--study", study_name,
            "--env-file", str(env_file),
            "--results-dir", str(run_dir / "checkpoints"),
            # Two workers share two cores: one torch thread each avoids oversubscription.
            "--threads", "1",
            # A short heartbeat lets a killed worker's trial be retried within half a
            # minute instead of the two minutes of the default, which suits a demo.
            "--heartbeat-interval", str(DEMO_HEARTBEAT_S),
        ]
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=environment, start_new_session=True, cwd=paths.project_root(),
                preexec_fn=_stop_with_parent(os.getpid()),
            )
        workers.append(WorkerProcess(f"worker-{index}", process, log_path))
    return LocalWorkers(workers)


def write_best_params(study, run_dir: Path) -> tuple[Path, Path]:
    document = studies.best_params_document(study)
    json_path = run_dir / "best-params.json"
    yaml_path = run_dir / "best-params.yaml"
    json_path.write_text(output.dump_json(document))
    yaml_path.write_text(output.dump_yaml(document))
    return json_path, yaml_path


def run_demo(*, target_trials: int, worker_count: int, inventory: Path | None, study_name: str | None,
             port: int | None = None) -> None:
    console = Console(stderr=True, soft_wrap=True)
    inventory = inventory or paths.project_root() / "inventory" / "local.yml"
    study_name = study_name or default_study_name()
    extravars = {} if port is None else {"postgresql_port": port}

    console.print(f"[bold]1/4[/] PostgreSQL without sudo, from {inventory} (changed tasks shown)")
    result, server = provision.provision_database(
        inventory, no_sudo=True, extravars=extravars, on_event=progress.PlaybookProgress(console, show_ok=False)
    )
    progress.print_recap(console, result.recap)
    if result.rc != 0:
        raise TunefleetError(
            "provisioning failed: " + ("; ".join(result.failures) or f"ansible-runner status {result.status}"),
            "fix the cause above and run 'tunefleet demo' again; finished work is kept",
        )
    env_file = write_env_file(server)
    console.print(f"     storage {server.storage_url(masked=True)} (password in {server.password_file})")

    console.print(f"[bold]2/4[/] study {study_name}: {target_trials} trials")
    storage = studies.open_storage(server.storage_url(masked=False))
    settings = studies.StudySettings(target_trials=target_trials, sampler="tpe", pruner="median", seed=0)
    study = studies.create_study(storage, study_name, settings, direction="maximize")

    run_dir = paths.state_dir() / "runs" / study_name
    console.print(f"[bold]3/4[/] {worker_count} workers, logs in {run_dir}")
    workers = start_workers(study_name, worker_count, env_file, run_dir)
    try:
        board.watch(study, target_trials, workers, until_done=workers.all_exited, console=console,
                    hostname=socket.gethostname())
    except KeyboardInterrupt:
        console.print("interrupted: stopping the workers (their running trials end as FAIL)")
        workers.stop()
        raise TunefleetError("demo interrupted", f"the study is kept; see it with: tunefleet study show {study_name}")

    _check_workers(workers, study, target_trials, console)
    console.print("[bold]4/4[/] best parameters")
    json_path, yaml_path = write_best_params(study, run_dir)
    best = studies.best_trial(study)
    print(f"best validation accuracy {best.value:.4f} (trial {best.number})")
    print(f"best parameters: {json_path}")
    print(f"                 {yaml_path}")
    print(f"show the study again: tunefleet study show {study_name}")


def _exit_description(state: str) -> str:
    """Spell out a worker state such as ``exited -9`` as the signal that ended it."""
    code = state.removeprefix("exited ")
    if code.startswith("-") and code[1:].isdigit():
        try:
            return f"was killed by {signal.Signals(int(code[1:])).name}"
        except ValueError:
            return f"was killed by signal {code[1:]}"
    return state


def _check_workers(workers: LocalWorkers, study, target_trials: int, console: Console) -> None:
    """Fail when the study fell short of its target; warn about workers that died anyway.

    A worker killed mid-run is what the heartbeat and retry exist for: when the
    others finished the study, the run succeeded.
    """
    failed = [view for view in workers.worker_views() if view.state != "exited 0"]
    finished = studies.finished_count(studies.count_states(study.get_trials(deepcopy=False)))
    details = "; ".join(f"{view.name} (pid {view.pid}) {_exit_description(view.state)}, last log line: "
                        f"{view.last_log_line or '(none)'}" for view in failed)
    if finished < target_trials:
        raise TunefleetError(
            f"the workers stopped at {finished} of {target_trials} finished trials: {details or 'no error logged'}",
            "read the worker logs named above, then run the workers again on the same study",
        )
    if failed:
        console.print(f"warning: the study finished, but some workers exited abnormally: {details}")
