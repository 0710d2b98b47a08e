import os

import pytest
import torch

from trainer.digits import DigitsDataset, split_indices
from worker_testing import read_log


def test_split_is_fixed_and_disjoint():
    first, second = split_indices(), split_indices()
    assert (first["train"] == second["train"]).all()
    assert not set(first["train"]) & set(first["validation"])
    assert len(first["train"]) + len(first["validation"]) == 1797


def test_lazy_dataset_matches_in_memory(tmp_path):
    in_memory = DigitsDataset("validation")
    lazy = DigitsDataset("validation", lazy=True, cache_dir=tmp_path / "png")
    assert len(lazy) == len(in_memory)
    assert len(list((tmp_path / "png").glob("*.png"))) == 1797
    for index in (0, 7, len(lazy) - 1):
        lazy_image, lazy_label = lazy[index]
        image, label = in_memory[index]
        assert lazy_image.shape == (1, 8, 8)
        assert torch.equal(lazy_image, image)
        assert lazy_label == label


@pytest.mark.slow
def test_digits_worker_reaches_accuracy(make_study, env_file, start_worker, tmp_path):
    study = make_study(target_trials=2, pruner="median")
    # A known good configuration first, then one sampled by TPE.
    study.enqueue_trial({"lr": 0.005, "weight_decay": 1e-5, "channels": 16, "dropout": 0.1,
                         "batch_size": 32, "optimizer": "adam"})
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file), "--threads", "1")
    assert worker.wait(timeout=300) == 0, read_log(worker)

    log = read_log(worker)
    assert "device: cpu (1 threads)" in log or "device: cuda:0" in log
    best = study.trials[0]
    assert best.value >= 0.95
    assert len(best.intermediate_values) == 10
    checkpoint = torch.load(best.user_attrs["checkpoint"], weights_only=False)
    assert checkpoint["validation_accuracy"] == best.value
    assert os.path.dirname(best.user_attrs["checkpoint"]) == str(tmp_path / "results" / study.study_name)
