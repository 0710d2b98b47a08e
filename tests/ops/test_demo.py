"""``tunefleet demo`` end to end on the session's server, with a small study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ops.paths import project_root


@pytest.fixture
def demo_inventory(tmp_path, first_provisioning):
    """Return a copy of inventory/local.yml that points at the session's server."""
    inventory = yaml.safe_load((project_root() / "inventory" / "local.yml").read_text())
    host_vars = inventory["all"]["children"]["db"]["hosts"]["localhost"]
    host_vars.update(first_provisioning.extravars)
    path = tmp_path / "local.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


@pytest.mark.slow
def test_demo_finishes_study_and_writes_best(demo_inventory, tunefleet_home):
    study_name = "demo-under-test"
    env = {**os.environ, "TUNEFLEET_HOME": str(tunefleet_home)}
    env.pop("TUNEFLEET_STORAGE_URL", None)

    demo = subprocess.run(
        [sys.executable, "-m", "ops.cli", "demo", "--inventory", str(demo_inventory),
         "--trials", "4", "--workers", "2", "--study", study_name],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "best validation accuracy" in demo.stdout
    assert f"tunefleet study show {study_name}" in demo.stdout

    run_dir = tunefleet_home / "runs" / study_name
    best = json.loads((run_dir / "best-params.json").read_text())
    assert best["study"] == study_name
    assert set(best["params"]) >= {"lr", "weight_decay", "channels", "dropout", "batch_size", "optimizer"}
    assert yaml.safe_load((run_dir / "best-params.yaml").read_text())["params"] == best["params"]

    listed = subprocess.run(
        [sys.executable, "-m", "ops.cli", "study", "show", study_name, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    summary = json.loads(listed.stdout)
    assert summary["trials"]["COMPLETE"] + summary["trials"]["PRUNED"] == 4
    assert summary["trials"]["RUNNING"] == 0
    assert len({trial["number"] for trial in summary["trial_list"]}) == len(summary["trial_list"])


def test_demo_workers_stop_when_demo_is_killed(storage_url, tmp_path):
    import optuna
    from optuna.trial import TrialState

    name = f"orphan-{os.urandom(4).hex()}"
    study = optuna.create_study(study_name=name, storage=storage_url, direction="maximize")
    study.set_user_attr("tunefleet", {"target_trials": 50, "sampler": "random", "pruner": "none", "seed": 1})
    env_file = tmp_path / "storage.env"
    env_file.write_text(f"TUNEFLEET_STORAGE_URL={storage_url}\n")
    env_file.chmod(0o600)
    # A stand-in for the demo process: it starts the workers, prints their pids, and waits.
    script = ("import sys, time; from pathlib import Path; from ops.demo import start_workers; "
              f"w = start_workers({name!r}, 2, Path({str(env_file)!r}), Path({str(tmp_path / 'run')!r})); "
              "print(' '.join(str(p.process.pid) for p in w.workers), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=project_root(), stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    deadline = time.monotonic() + 120
    while not any(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False)):
        assert time.monotonic() < deadline, "no worker started a trial"
        time.sleep(0.5)

    parent.kill()
    parent.wait()
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline + 60, f"workers {pids} outlived the killed demo"
        time.sleep(0.5)

    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
