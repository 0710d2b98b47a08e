"""The worker payload: `trainer/`, its requirements, the host agent and the user's extra files.

The payload is a gzipped tarball built once per command. Its content hash names it on
the hosts, so a host that already has the same hash gets no upload and no pip install.
The archive is reproducible: members are sorted and carry fixed times and owners, so
the same files always give the same hash.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ops import paths
from ops.errors import TunefleetError

AGENT_NAME = "tunefleet_agent.py"
EXTRA_DIR = "extra"
REQUIREMENTS = "requirements.txt"


@dataclass(frozen=True)
class Payload:
    """A built payload: the archive bytes and the SHA-256 of its contents."""

    data: bytes
    sha256: str
    files: tuple[str, ...]

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def build_payload(extra_files: Sequence[Path] = ()) -> Payload:
    """Pack trainer/, its requirements file, the agent and `extra_files` (under extra/)."""
    root = paths.project_root()
    members: dict[str, Path] = {}
    for path in sorted((root / "trainer").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            members[path.relative_to(root).as_posix()] = path
    members[REQUIREMENTS] = root / "trainer" / REQUIREMENTS
    members[AGENT_NAME] = Path(__file__).resolve().parent / "agent.py"
    for path in extra_files:
        path = Path(path)
        if not path.is_file():
            raise TunefleetError(f"extra file {path} not found", "pass existing files to --include")
        name = f"{EXTRA_DIR}/{path.name}"
        if name in members:
            raise TunefleetError(f"two extra files are named {path.name}", "rename one of them")
        members[name] = path
    return _pack(members)


def _pack(members: dict[str, Path]) -> Payload:
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    # mtime=0 in the gzip header keeps the archive bytes stable too.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name in sorted(members):
                content = members[name].read_bytes()
                digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
                info = tarfile.TarInfo(name)
                info.size = len(content)
                info.mode = 0o644
                info.mtime = 0
                archive.addfile(info, io.BytesIO(content))
    return Payload(buffer.getvalue(), digest.hexdigest(), tuple(sorted(members)))
