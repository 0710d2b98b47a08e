"""Training data: samples per second of the digits dataset in memory against lazy PNG reads.

Both modes go through a DataLoader with the default objective's settings (shuffled,
batch size 64, no worker processes), so the figure is what one training epoch waits on.
The memory cost is measured in a fresh process for each mode, as the growth of its
resident set while the training split is built, and as the exact size of the tensors
that the in-memory mode keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.paths import project_root

BATCH_SIZE = 64
# Epochs per timed pass: the in-memory mode runs one epoch in milliseconds, too short
# to time on its own.
EPOCHS_PER_PASS = 5

_MEMORY_PROBE = """
import json, sys
import torch
from sklearn.datasets import load_digits
from trainer.digits import DigitsDataset, split_indices
load_digits(); split_indices()
def rss_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
before = rss_kib()
dataset = DigitsDataset('train', lazy=sys.argv[1] == 'lazy', cache_dir=sys.argv[2])
after = rss_kib()
tensor_bytes = 0 if dataset.images is None else dataset.images.element_size() * dataset.images.nelement()
print(json.dumps({'rss_delta_bytes': (after - before) * 1024, 'tensor_bytes': tensor_bytes, 'samples': len(dataset)}))
"""


def samples_per_second(lazy: bool, cache_dir: str) -> float:
    import torch
    from torch.utils.data import DataLoader

    from trainer.digits import DigitsDataset

    dataset = DigitsDataset("train", lazy=lazy, cache_dir=cache_dir)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    samples = 0
    for _ in range(EPOCHS_PER_PASS):
        for images, _labels in loader:
            samples += len(images)
    return samples / (time.perf_counter() - started)


def memory_cost(lazy: bool, cache_dir: str) -> dict[str, int]:
    output = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, "lazy" if lazy else "memory", cache_dir],
        capture_output=True, text=True, check=True, cwd=project_root(), timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(repetitions: int, log: Any) -> dict[str, Any]:
    """Time both modes alternately `repetitions` times; the PNG cache is written before the first."""
    from trainer.digits import DigitsDataset

    runs: dict[str, list[float]] = {"memory": [], "lazy": []}
    with tempfile.TemporaryDirectory(prefix="tunefleet-bench-data-") as workdir:
        cache_dir = str(Path(workdir) / "digits-png")
        DigitsDataset("train", lazy=True, cache_dir=cache_dir)
        for repetition in range(repetitions):
            for mode in (("memory", "lazy") if repetition % 2 == 0 else ("lazy", "memory")):
                runs[mode].append(samples_per_second(mode == "lazy", cache_dir))
            log(f"data: repetition {repetition + 1}: in memory {runs['memory'][-1]:.0f} samples/s, "
                f"from files {runs['lazy'][-1]:.0f} samples/s")
        memory = {mode: memory_cost(mode == "lazy", cache_dir) for mode in ("memory", "lazy")}
    return {"repetitions": repetitions, "batch_size": BATCH_SIZE, "epochs_per_pass": EPOCHS_PER_PASS,
            "samples_per_second": runs, "memory": memory}
