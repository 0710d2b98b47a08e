"""The default objective: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

The digits (1797 images, 10 classes) ship inside scikit-learn, so a worker needs no
download. ``objective`` follows the worker's objective contract (see ``trainer.worker``)
and reads its parameters from ``trainer/spaces/digits.yml``.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import optuna
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset

DEFAULT_EPOCHS = 10
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10

# load_digits() pixels are integers 0..16. Stored in PNG files as value * 15 (0..240),
# they map back to exactly value / 16, so both dataset modes yield identical tensors.
_PIXEL_MAX = 16
_PNG_SCALE = 15


def split_indices() -> dict[str, np.ndarray]:
    """Return the fixed, stratified train/validation split of the digits dataset."""
    labels = load_digits().target
    train, validation = train_test_split(
        np.arange(len(labels)), test_size=VALIDATION_FRACTION,
        random_state=SPLIT_SEED, stratify=labels,
    )
    return {"train": np.sort(train), "validation": np.sort(validation)}


class DigitsDataset(Dataset):
    """One split of the digits as (1x8x8 float tensor in [0, 1], label) pairs.

    By default every image is loaded into memory when the dataset is built, so epochs
    never wait on disk. With ``lazy=True`` the images are written once as PNG files
    under ``cache_dir`` and each ``__getitem__`` reads and decodes one file.
    """

    def __init__(self, split: str, lazy: bool = False, cache_dir: str | Path | None = None) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        digits = load_digits()
        self.indices = split_indices()[split]
        self.labels = torch.as_tensor(digits.target[self.indices], dtype=torch.long)
        self.lazy = lazy
        if lazy:
            self.image_dir = write_png_cache(digits.images, cache_dir)
            self.images = None
        else:
            self.image_dir = None
            pixels = digits.images[self.indices] / _PIXEL_MAX
            self.images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            return self.images[index], self.labels[index]
        path = self.image_dir / _png_name(int(self.indices[index]))
        with Image.open(path) as image:
            pixels = np.asarray(image, dtype=np.float32) / (_PIXEL_MAX * _PNG_SCALE)
        return torch.from_numpy(pixels).unsqueeze(0), self.labels[index]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunefleet" / "digits-png"


def write_png_cache(images: np.ndarray, cache_dir: str | Path | None = None) -> Path:
    """Write every image as a PNG file once; return the directory holding them.

    The files are written into a temporary directory that is renamed into place, so
    concurrent workers never read a half-written cache.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / _png_name(len(images) - 1)).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    for index, image in enumerate(images):
        pixels = (image * _PNG_SCALE).astype(np.uint8)
        Image.fromarray(pixels).save(staging / _png_name(index))
    try:
        staging.rename(target)
    except OSError:
        # Another worker finished its cache first; theirs is complete, so drop ours.
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return target


def _png_name(index: int) -> str:
    return f"{index:04d}.png"


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool and a linear classifier for 8x8 inputs."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 4 * 4, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def make_optimizer(name: str, parameters: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be adam, adamw or sgd, got {name!r}")


@functools.lru_cache(maxsize=4)
def load_splits(lazy: bool, cache_dir: str | None) -> tuple[DigitsDataset, DigitsDataset]:
    """Build both splits once per process; trials of one worker share them."""
    return (DigitsDataset("train", lazy=lazy, cache_dir=cache_dir),
            DigitsDataset("validation", lazy=lazy, cache_dir=cache_dir))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> None:
    model.train()
    loss_function = nn.CrossEntropyLoss()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(images), labels).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = 0
    for images, labels in loader:
        predictions = model(images.to(device)).argmax(dim=1)
        correct += int((predictions == labels.to(device)).sum())
    return correct / len(loader.dataset)


def objective(trial: optuna.Trial, params: Mapping[str, Any], context: Any) -> float:
    """Train the CNN with ``params`` and return the best validation accuracy (maximize).

    ``params``: lr, weight_decay, channels, dropout, batch_size, optimizer.
    ``context.fixed``: epochs (default 10), lazy (default false), cache_dir.
    """
    fixed = context.fixed
    epochs = int(fixed.get("epochs", DEFAULT_EPOCHS))
    train_set, validation_set = load_splits(bool(fixed.get("lazy", False)), fixed.get("cache_dir"))
    generator = torch.Generator().manual_seed(context.seed)
    train_loader = DataLoader(train_set, batch_size=int(params["batch_size"]), shuffle=True, generator=generator)
    validation_loader = DataLoader(validation_set, batch_size=512)

    model = DigitsCNN(int(params["channels"]), float(params["dropout"])).to(context.device)
    optimizer = make_optimizer(params["optimizer"], model.parameters(), params["lr"], params["weight_decay"])

    best_accuracy, best_state, best_epoch = -1.0, None, -1
    for epoch in range(epochs):
        train_one_epoch(model, train_loader, optimizer, context.device)
        epoch_accuracy = accuracy(model, validation_loader, context.device)
        if epoch_accuracy > best_accuracy:
            best_accuracy, best_epoch = epoch_accuracy, epoch
            best_state = copy.deepcopy(model.state_dict())
        trial.report(epoch_accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {epoch_accuracy:.4f} at epoch {epoch}")

    context.save_checkpoint({
        "model_state": best_state, "params": dict(params), "epoch": best_epoch,
        "validation_accuracy": best_accuracy, "seed": context.seed,
    })
    return best_accuracy
