"""Fixtures for worker tests: studies on the real PostgreSQL, env files, worker processes."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from worker_testing import worker_environment


@pytest.fixture
def make_study(storage_url):
    """Create a study the way the operator does: maximize, with the 'tunefleet' attribute."""

    def make(target_trials: int, sampler: str = "tpe", pruner: str = "none", seed: int | None = 1,
             settings: dict | None = None) -> optuna.Study:
        name = f"test-{uuid.uuid4().hex[:10]}"
        study = optuna.create_study(study_name=name, storage=storage_url, direction="maximize")
        attr = {"target_trials": target_trials, "sampler": sampler, "pruner": pruner, "seed": seed}
        study.set_user_attr("tunefleet", settings if settings is not None else attr)
        return study

    return make


@pytest.fixture
def env_file(tmp_path, storage_url) -> Path:
    path = tmp_path / "storage.env"
    path.write_text(f"# written by the test suite\nTUNEFLEET_STORAGE_URL={storage_url}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def sleepy_space(tmp_path):
    """Write a search space for sleepy_objective and return its path."""

    def write(steps: int = 3, step_seconds: float = 0.1) -> Path:
        path = tmp_path / f"sleepy-{steps}-{step_seconds}.yml"
        document = {
            "params": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
            "fixed": {"steps": steps, "step_seconds": step_seconds},
        }
        path.write_text(yaml.safe_dump(document))
        return path

    return write


@pytest.fixture
def start_worker(tmp_path):
    """Start ``python -m trainer.worker`` with the given arguments; stop leftovers at teardown."""
    processes: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"worker-{len(processes)}.log", "w+")
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer.worker", *args],
            cwd=tmp_path, env=env or worker_environment(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        process.log = log
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.log.close()

