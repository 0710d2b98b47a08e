"""Helpers shared by the worker tests; importable from the worker processes too."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna

import trainer

REPO_ROOT = Path(trainer.__file__).resolve().parents[1]
TEST_DIR = Path(__file__).resolve().parent


def worker_environment(**extra: str) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("TUNEFLEET_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TEST_DIR)])
    environ.update(extra)
    return environ


def read_log(process: subprocess.Popen) -> str:
    process.log.flush()
    return Path(process.log.name).read_text()


def wait_for(condition, timeout: float, interval: float = 0.2, message: str = "condition"):
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def running_trial_of(study: optuna.Study, pid: int):
    """Return the RUNNING trial of the worker with process id ``pid`` once its params are sampled."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if str(trial.user_attrs.get("worker", "")).endswith(f":{pid}") and trial.params:
            return trial
    return None
