"""Placement: the workers of a host and the GPU that CUDA_VISIBLE_DEVICES exposes to each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ops.inventory import FleetHost


@dataclass(frozen=True)
class WorkerSlot:
    """One worker on one host; `gpu` is None for a CPU worker."""

    host: str
    name: str
    gpu: int | None

    @property
    def environment(self) -> dict[str, str]:
        # An empty CUDA_VISIBLE_DEVICES hides every GPU, so a CPU worker never grabs one.
        return {"CUDA_VISIBLE_DEVICES": "" if self.gpu is None else str(self.gpu)}

    @property
    def address(self) -> str:
        """HOST:GPU for a GPU worker, HOST:cpuN for a CPU worker, as `logs` accepts it."""
        return f"{self.host}:{self.name.removeprefix('gpu')}" if self.gpu is not None else f"{self.host}:{self.name}"


def place_workers(host: FleetHost, discovered_gpus: Sequence[int], per_gpu: int | None = None) -> list[WorkerSlot]:
    """Return the workers for `host`: `per_gpu` per GPU, or `cpu_workers` when it has no GPU.

    The inventory's `gpus` overrides what nvidia-smi found. `per_gpu` defaults to the
    host's `workers_per_gpu`. Two workers share a device only when that is above 1.
    """
    gpus = list(host.gpus if host.gpus is not None else discovered_gpus)
    count = per_gpu if per_gpu is not None else host.workers_per_gpu
    if count < 1:
        raise ValueError(f"workers per GPU must be at least 1, got {count}")
    if not gpus:
        return [WorkerSlot(host.name, f"cpu{index}", None) for index in range(host.cpu_workers)]
    slots = []
    for gpu in gpus:
        for index in range(count):
            name = f"gpu{gpu}" if count == 1 else f"gpu{gpu}-{index}"
            slots.append(WorkerSlot(host.name, name, gpu))
    return slots
