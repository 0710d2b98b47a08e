"""``tunefleet demo`` end to end on the session's server, with a small study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
