"""The role's user_space_packages module, run for real through Ansible against Debian's archive."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ops.paths import playbook_dir

MODULE_DIR = playbook_dir() / "roles" / "postgresql" / "library"
# tds_fdw links libsybdb.so.5 from libsybdb5, a library that few hosts have installed.
LIBRARY_PACKAGE = "libsybdb5"


def default_major() -> str:
    output = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", "postgresql"], capture_output=True, text=True, check=True
    ).stdout
    return re.search(r"^Depends:.*?postgresql-(\d+)", output, re.MULTILINE).group(1)


def host_has(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", package], capture_output=True, text=True
    )
    return result.stdout.startswith("ii")


def run_module(prefix: Path, packages: list[str]) -> dict:
    arguments = json.dumps({"prefix": str(prefix), "packages": packages})
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-c", "local",
         "-M", str(MODULE_DIR), "-m", "user_space_packages", "-a", arguments, "--one-line"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_NOCOLOR": "True"},
    )
    # --one-line prints "localhost | STATUS => {json}".
    return json.loads(result.stdout.split("=>", 1)[1])


@pytest.mark.slow
def test_missing_library_unpacked_once(tmp_path):
    if host_has(LIBRARY_PACKAGE):
        pytest.skip(f"{LIBRARY_PACKAGE} is installed on this host, so nothing would be missing")
    extension = f"postgresql-{default_major()}-tds-fdw"

    first = run_module(tmp_path, [extension])
    second = run_module(tmp_path, [extension])

    assert first.get("changed") is True, first
    assert first["unpacked"] == [extension, LIBRARY_PACKAGE]
    assert second.get("changed") is False, second
    assert second["unpacked"] == []
    assert list(tmp_path.glob("usr/lib/*/libsybdb.so.5"))
