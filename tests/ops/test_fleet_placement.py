"""Placement of workers on GPUs and CPUs, and the reproducible payload."""

from __future__ import annotations

import io
import tarfile

import pytest

from ops.fleet.payload import AGENT_NAME, build_payload
from ops.fleet.placement import place_workers
from ops.inventory import FleetHost


def test_one_worker_per_discovered_gpu():
    slots = place_workers(FleetHost("h", "127.0.0.2"), [0, 1, 2])
    assert [slot.environment["CUDA_VISIBLE_DEVICES"] for slot in slots] == ["0", "1", "2"]
    assert [slot.name for slot in slots] == ["gpu0", "gpu1", "gpu2"]


def test_gpus_variable_overrides_discovery():
    slots = place_workers(FleetHost("h", "127.0.0.2", gpus=(1, 3)), [0, 1, 2, 3])
    assert [slot.gpu for slot in slots] == [1, 3]


def test_per_gpu_packs_workers_onto_each_device():
    slots = place_workers(FleetHost("h", "127.0.0.2"), [0, 1], per_gpu=2)
    assert [slot.gpu for slot in slots] == [0, 0, 1, 1]
    assert len({slot.name for slot in slots}) == 4


def test_workers_per_gpu_variable_is_the_default_packing():
    slots = place_workers(FleetHost("h", "127.0.0.2", workers_per_gpu=3), [0])
    assert [slot.name for slot in slots] == ["gpu0-0", "gpu0-1", "gpu0-2"]


def test_gpu_less_host_runs_cpu_workers():
    slots = place_workers(FleetHost("h", "127.0.0.2", cpu_workers=2), [])
    assert [slot.name for slot in slots] == ["cpu0", "cpu1"]
    assert all(slot.gpu is None for slot in slots)
    assert all(slot.environment["CUDA_VISIBLE_DEVICES"] == "" for slot in slots)


def test_zero_workers_per_gpu_is_rejected():
    with pytest.raises(ValueError, match="at least 1"):
        place_workers(FleetHost("h", "127.0.0.2"), [0], per_gpu=0)


def test_payload_hash_is_stable_and_tracks_content(tmp_path):
    extra = tmp_path / "objective.py"
    extra.write_text("def objective(trial, params, context):\n    return 1.0\n")
    first = build_payload([extra])
    assert build_payload([extra]).sha256 == first.sha256
    assert build_payload([extra]).data == first.data
    extra.write_text("def objective(trial, params, context):\n    return 2.0\n")
    assert build_payload([extra]).sha256 != first.sha256


def test_payload_holds_trainer_agent_and_extra_files(tmp_path):
    extra = tmp_path / "objective.py"
    extra.write_text("x = 1\n")
    payload = build_payload([extra])
    with tarfile.open(fileobj=io.BytesIO(payload.data)) as archive:
        names = set(archive.getnames())
    assert {"trainer/worker.py", "requirements.txt", AGENT_NAME, "extra/objective.py"} <= names
    assert not any("__pycache__" in name for name in names)
