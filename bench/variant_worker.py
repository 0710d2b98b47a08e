"""``python -m bench.variant_worker ARGS``: trainer.worker with ``pool_pre_ping`` turned off.

It measures what SQLAlchemy's pre-ping costs the worker: one extra round trip
(``SELECT 1``) on every pool checkout, and Optuna's RDB storage checks out a connection
for each storage call. Only the engine setting differs from ``python -m trainer.worker``.
"""

from __future__ import annotations

import sys

import optuna

from trainer import worker


class _RDBStorageWithoutPrePing(optuna.storages.RDBStorage):
    def __init__(self, url: str, engine_kwargs: dict | None = None, **kwargs) -> None:
        super().__init__(url, engine_kwargs={**(engine_kwargs or {}), "pool_pre_ping": False}, **kwargs)


if __name__ == "__main__":
    # trainer.storage.open_storage looks the class up on optuna.storages at call time.
    optuna.storages.RDBStorage = _RDBStorageWithoutPrePing
    sys.exit(worker.main())
