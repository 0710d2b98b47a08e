"""Lookup of the storage URL for the operator's commands.

Order: ``--env-file``, then the TUNEFLEET_STORAGE_URL variable, then
TUNEFLEET_ENV_FILE, then the env file that ``tunefleet demo`` and
``tunefleet provision`` write. The URL carries the password, so it is never
taken from argv. Workers follow the same rules (``trainer.storage``) except
for the last default.
"""

from __future__ import annotations

import os
from pathlib import Path

from ops import paths
from ops.errors import TunefleetError
from trainer import storage as worker_storage

URL_VARIABLE = worker_storage.URL_VARIABLE
ENV_FILE_VARIABLE = worker_storage.ENV_FILE_VARIABLE


def default_env_file() -> Path:
    return paths.state_dir() / "storage.env"


def resolve_storage_url(env_file: Path | None = None) -> str:
    environ = dict(os.environ)
    if env_file is None and not environ.get(URL_VARIABLE) and not environ.get(ENV_FILE_VARIABLE):
        env_file = default_env_file()
        if not env_file.exists():
            raise TunefleetError(
                f"no storage URL: {URL_VARIABLE} is not set and {env_file} does not exist",
                "run 'tunefleet demo' or 'tunefleet provision' first, or pass --env-file",
            )
    try:
        return worker_storage.resolve_storage_url(str(env_file) if env_file else None, environ)
    except worker_storage.StorageError as exc:
        raise TunefleetError(str(exc)) from None
