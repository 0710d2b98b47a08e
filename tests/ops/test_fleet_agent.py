"""The host agent's process control, run in this process without SSH."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ops.fleet import agent

# Prints the worker's start marker, then ignores SIGTERM, as a worker stuck in a
# C extension would.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('worker x starting: study=s', flush=True); time.sleep(600)")
# Prints the start marker and exits at SIGTERM, as a worker does.
POLITE = "import time; print('worker x starting: study=s', flush=True); time.sleep(600)"


def spec(tmp_path: Path, name: str, code: str, **environment: str) -> dict:
    return {"name": name, "gpu": 0, "study": "s", "argv": [sys.executable, "-c", code],
            "environment": environment, "cwd": str(tmp_path), "log": str(tmp_path / f"{name}.log")}


@pytest.fixture
def state_dir(tmp_path):
    directory = tmp_path / "workers"
    yield directory
    # Leave no process behind, whatever the test did.
    agent.stop({"state_dir": str(directory), "timeout": 0})


def test_start_records_group_and_environment(tmp_path, state_dir):
    answer = agent.start({"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", POLITE, MARK="1")],
                          "alive_timeout": 30})
    assert answer["workers"]["gpu0"]["result"] == "started"
    record = json.loads((state_dir / "state.json").read_text())["workers"]["gpu0"]
    assert record["pgid"] == record["pid"]
    assert os.getpgid(record["pid"]) == record["pid"]
    assert os.getsid(record["pid"]) == record["pid"]
    environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
    assert b"MARK=1" in environ
    assert os.readlink(f"/proc/{record['pid']}/fd/0") == "/dev/null"


def test_start_twice_leaves_running_worker_alone(tmp_path, state_dir):
    request = {"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", POLITE)], "alive_timeout": 30}
    first = agent.start(request)
    second = agent.start(request)
    assert second["workers"]["gpu0"]["result"] == "already running"
    assert second["workers"]["gpu0"]["pid"] == first["workers"]["gpu0"]["pid"]


def test_start_reports_worker_that_exits(tmp_path, state_dir):
    failing = "import sys; print('study not found', flush=True); sys.exit(1)"
    answer = agent.start({"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", failing)],
                          "alive_timeout": 30})
    worker = answer["workers"]["gpu0"]
    assert worker["result"] == "exited"
    assert worker["exit_code"] == 1
    assert worker["last_log_lines"][-1] == "study not found"


def test_stop_kills_group_that_ignores_sigterm(tmp_path, state_dir):
    started = agent.start({"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", STUBBORN)],
                           "alive_timeout": 30})
    pid = started["workers"]["gpu0"]["pid"]
    answer = agent.stop({"state_dir": str(state_dir), "timeout": 1})
    assert answer["workers"]["gpu0"]["result"] == "killed"
    assert answer["workers"]["gpu0"]["left"] == []
    assert agent._group_members(pid) == []
    assert json.loads((state_dir / "state.json").read_text())["workers"] == {}


def test_status_marks_dead_worker(tmp_path, state_dir):
    started = agent.start({"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", POLITE)],
                           "alive_timeout": 30})
    os.killpg(started["workers"]["gpu0"]["pid"], 9)
    os.waitpid(started["workers"]["gpu0"]["pid"], 0)
    worker = agent.status({"state_dir": str(state_dir)})["workers"]["gpu0"]
    assert worker["alive"] is False
    assert worker["finished_normally"] is False


def test_restart_counts_in_state(tmp_path, state_dir):
    request = {"state_dir": str(state_dir), "workers": [spec(tmp_path, "gpu0", POLITE)], "alive_timeout": 30}
    first = agent.start(request)
    os.killpg(first["workers"]["gpu0"]["pid"], 9)
    os.waitpid(first["workers"]["gpu0"]["pid"], 0)
    agent.start(request)
    assert agent.status({"state_dir": str(state_dir)})["workers"]["gpu0"]["restarts"] == 1


def test_finished_count_restarts_at_each_start(tmp_path):
    log = tmp_path / "gpu0.log"
    log.write_text(
        "2026-12-04 01:00:00,000 INFO trainer.worker: starting: study=old on cpu\n"
        "2026-12-04 01:00:01,000 INFO trainer.worker: trial 0 COMPLETE value=0.9 in 1.0s\n"
        "2026-12-04 01:00:02,000 INFO trainer.worker: trial 1 PRUNED value=- in 1.0s\n"
        "2026-12-04 02:00:00,000 INFO trainer.worker: starting: study=new on cpu\n"
        "2026-12-04 02:00:01,000 INFO trainer.worker: trial 0 COMPLETE value=0.8 in 1.0s\n"
        "2026-12-04 02:00:02,000 INFO trainer.worker: trial 1 FAIL value=- in 1.0s\n"
    )
    assert agent._count_finished_trials(log) == 1


def test_prune_keeps_requested_and_in_use_payloads(tmp_path, state_dir):
    root = tmp_path / "payload"
    hashes = [character * 64 for character in "abcde"]
    for sha256 in hashes:
        (root / sha256).mkdir(parents=True)
    (root / f"{hashes[4]}.tar.gz").write_bytes(b"cut short")
    (root / "notes").mkdir()
    live = spec(tmp_path, "gpu0", POLITE)
    live["payload"] = hashes[2]
    # A record from before "payload" was recorded names its folder in PYTHONPATH only.
    legacy = spec(tmp_path, "gpu1", POLITE, PYTHONPATH=f"{root / hashes[3]}:{root / hashes[3]}/extra")
    agent.start({"state_dir": str(state_dir), "workers": [live, legacy], "alive_timeout": 30})

    answer = agent.prune({"state_dir": str(state_dir), "payload_root": str(root), "keep": hashes[:2]})

    assert answer["removed"] == [hashes[4]]
    assert answer["in_use"] == [hashes[2], hashes[3]]
    assert sorted(path.name for path in root.iterdir()) == [*hashes[:4], "notes"]


def test_prune_removes_payload_of_stopped_worker(tmp_path, state_dir):
    root = tmp_path / "payload"
    old, current = "a" * 64, "b" * 64
    (root / old).mkdir(parents=True)
    (root / current).mkdir()
    worker = spec(tmp_path, "gpu0", POLITE)
    worker["payload"] = old
    agent.start({"state_dir": str(state_dir), "workers": [worker], "alive_timeout": 30})
    agent.stop({"state_dir": str(state_dir), "timeout": 10})

    answer = agent.prune({"state_dir": str(state_dir), "payload_root": str(root), "keep": [current]})

    assert answer["removed"] == [old]
    assert [path.name for path in root.iterdir()] == [current]


def test_preflight_reuses_facts_until_packages_change(tmp_path, monkeypatch):
    packages = tmp_path / "site-packages"
    packages.mkdir()
    monkeypatch.syspath_prepend(str(packages))
    request = {"base_dir": str(tmp_path)}

    first = agent.preflight(request)
    second = agent.preflight(request)
    (packages / "new_package-1.0.dist-info").mkdir()
    after_install = agent.preflight(request)

    assert first["cached"] is False
    assert second["cached"] is True
    assert second["torch"] == first["torch"]
    assert second["trainer_error"] == first["trainer_error"]
    assert after_install["cached"] is False
