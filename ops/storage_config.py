"""Where the operator's commands find the storage URL.

Order: the TUNEFLEET_STORAGE_URL variable, then ``--env-file``, then
TUNEFLEET_ENV_FILE, then the env file that ``tunefleet demo`` writes. The URL
carries the password, so it is never taken from argv.
"""

from __future__ import annotations

import os
from pathlib import Path

from ops import paths
from ops.errors import TunefleetError
from trainer import storage as worker_storage

URL_VARIABLE = "TUNEFLEET_STORAGE_URL"
ENV_FILE_VARIABLE = "TUNEFLEET_ENV_FILE"


def default_env_file() -> Path:
    return paths.state_dir() / "storage.env"


def resolve_storage_url(env_file: Path | None = None) -> str:
    if os.environ.get(URL_VARIABLE):
        return os.environ[URL_VARIABLE]
    candidates = [env_file, os.environ.get(ENV_FILE_VARIABLE), default_env_file()]
    chosen = next((Path(candidate) for candidate in candidates if candidate), None)
    if chosen is None or not chosen.exists():
        raise TunefleetError(
            f"no storage URL: {URL_VARIABLE} is not set and the env file {chosen} does not exist",
            "run 'tunefleet demo' or 'tunefleet provision' first, or pass --env-file",
        )
    try:
        return worker_storage.load_storage_url(chosen)
    except worker_storage.StorageConfigError as exc:
        raise TunefleetError(str(exc)) from None
