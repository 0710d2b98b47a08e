"""`tunefleet workers deploy`: ship the payload, build the virtualenv, check each host.

Each step reads the host's state first: the payload is uploaded and its requirements
installed only when the host's recorded hash differs, the virtualenv is created only
when missing, and the env file is rewritten only when its content changed. A new
payload replaces older ones, but the one before it and those that running workers
import from stay.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from ops.fleet import remote
from ops.fleet.connection import HostConnection, HostError, Timeouts, quote
from ops.fleet.fanout import HostResult
from ops.fleet.payload import REQUIREMENTS, Payload
from ops.inventory import FleetHost

logger = logging.getLogger("tunefleet.fleet")

MIN_PYTHON = (3, 9)
# Enough for the payload, the virtualenv's own packages and some checkpoints; a host
# below it is rejected before workers fill its disk.
MIN_FREE_DISK_BYTES = 1 << 30
DEFAULT_INSTALL_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DeployOptions:
    """Settings every host's deploy shares."""

    payload: Payload
    env_text: str
    study: str | None = None
    timeouts: Timeouts = Timeouts()
    install_timeout: float = DEFAULT_INSTALL_TIMEOUT_S
    accept_new_host_keys: bool = False


def deploy_host(host: FleetHost, options: DeployOptions) -> HostResult:
    """Bring one host up to the payload, then run its preflight."""
    with HostConnection(host, options.timeouts, accept_new_host_keys=options.accept_new_host_keys) as connection:
        layout = remote.resolve_layout(connection)
        check_python(connection)
        previous = remote.installed_hash(connection, layout)
        changed = previous != options.payload.sha256

        if changed:
            upload_payload(connection, layout, options.payload)
        venv_created = ensure_venv(connection, layout)
        if changed or venv_created:
            install_requirements(connection, layout, options.payload.sha256, options.install_timeout)
            connection.run(f"printf '%s\\n' {options.payload.sha256} > {quote(layout.hash_file)}")
        removed = remove_old_payloads(connection, layout, options.payload.sha256, previous) if changed else []
        env_written = upload_env_file(connection, layout, options.env_text)

        report = remote.call_agent(connection, layout, options.payload.sha256, "preflight",
                                   {"base_dir": layout.base, "env_file": layout.env_file, "study": options.study})

    data: dict[str, Any] = {
        "uploaded": changed, "venv_created": venv_created, "env_file_written": env_written,
        "payload": options.payload.short_hash, "payloads_removed": [sha256[:12] for sha256 in removed],
        **_summary(report),
    }
    problems = preflight_problems(report, layout)
    if problems:
        return HostResult(host.name, False, "; ".join(problems), data)
    return HostResult(host.name, True, _describe(data, report), data)


def check_python(connection: HostConnection) -> str:
    """Return the host interpreter's version, or raise HostError saying how to get one."""
    python = connection.host.python
    result = connection.run(
        f"{quote(python)} -c 'import sys; print(\"%d.%d.%d\" % sys.version_info[:3])'", check=False)
    if result.exited == 127 or "not found" in result.stderr:
        raise HostError(f"{python} not found on the host; install python3 (with venv) or set "
                        "tunefleet_python in the inventory to its path")
    if result.exited != 0:
        raise HostError(f"{python} failed to run: {result.stderr.strip()[-300:]}")
    version = result.stdout.strip()
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_PYTHON:
        raise HostError(f"{python} is Python {version}, but workers need "
                        f"{'.'.join(map(str, MIN_PYTHON))} or later; set tunefleet_python to a newer one")
    return version


def upload_payload(connection: HostConnection, layout: remote.RemoteLayout, payload: Payload) -> None:
    """Upload and unpack the payload into its own folder named by its hash."""
    target = layout.payload_dir(payload.sha256)
    archive = f"{target}.tar.gz"
    connection.run(f"mkdir -p {quote(posixpath.dirname(target))}")
    sftp = connection.sftp()
    sftp.putfo(io.BytesIO(payload.data), archive)
    connection.run(f"rm -rf {quote(target)} && mkdir -p {quote(target)} && "
                   f"tar -xzf {quote(archive)} -C {quote(target)} && rm -f {quote(archive)}")


def remove_old_payloads(connection: HostConnection, layout: remote.RemoteLayout, current: str,
                        previous: str | None) -> list[str]:
    """Remove the payload folders other than `current` and `previous`; return the removed hashes.

    The host agent keeps every folder that a live worker in the state file imports from,
    because deleting it would break that worker's next import.
    """
    keep = [current] + ([previous] if previous else [])
    answer = remote.call_agent(connection, layout, current, "prune",
                               {"state_dir": layout.state_dir, "payload_root": layout.payload_root, "keep": keep})
    if answer["in_use"]:
        logger.info("%s: kept payload(s) %s because workers still run from them", connection.host.name,
                    ", ".join(sha256[:12] for sha256 in answer["in_use"]))
    return answer["removed"]


def ensure_venv(connection: HostConnection, layout: remote.RemoteLayout) -> bool:
    """Create the virtualenv unless it exists; return whether it was created.

    The virtualenv gets no packages of its own while the host's interpreter has pip,
    because a bundled pip or setuptools would shadow newer ones in the system's
    site-packages. For example, torch 2.13 requires setuptools 77 or later, and
    Python 3.11's ensurepip bundles setuptools 65. Only an interpreter without pip
    gets ensurepip's copy.
    """
    python = quote(layout.venv_python)
    if connection.run(f"test -x {python}", check=False).exited == 0:
        return False
    venv_dir = posixpath.dirname(posixpath.dirname(layout.venv_python))
    commands = [
        f"{quote(connection.host.python)} -m venv --system-site-packages --without-pip {quote(venv_dir)}",
        f"{python} -m pip --version >/dev/null 2>&1 || {python} -m ensurepip --default-pip",
    ]
    for command in commands:
        result = connection.run(command, check=False)
        if result.exited != 0:
            connection.run(f"rm -rf {quote(venv_dir)}", check=False)
            output = (result.stdout + result.stderr).strip()
            hint = ("install python3-venv (Debian, Ubuntu) and deploy again" if "ensurepip" in output
                    else "fix the cause and deploy again")
            raise HostError(f"creating the virtualenv {venv_dir} failed: {output[-300:]}; {hint}")
    return True


def install_requirements(connection: HostConnection, layout: remote.RemoteLayout, sha256: str,
                         timeout: float) -> None:
    requirements = f"{layout.payload_dir(sha256)}/{REQUIREMENTS}"
    extra = " ".join(quote(argument) for argument in connection.host.pip_args)
    result = connection.run(
        f"{quote(layout.venv_python)} -m pip install --disable-pip-version-check --no-input -q "
        f"{extra} -r {quote(requirements)}", timeout=timeout, check=False)
    if result.exited != 0:
        tail = (result.stdout + result.stderr).strip()[-500:]
        raise HostError(f"pip install -r {REQUIREMENTS} failed with exit code {result.exited}: {tail}; "
                        "fix the cause (set tunefleet_pip_args for hosts without a package index) "
                        "and deploy again")


def upload_env_file(connection: HostConnection, layout: remote.RemoteLayout, text: str) -> bool:
    """Write the env file with mode 0600 unless the host has the same content already.

    The temporary file is made 0600 before any byte of the secret is written, then
    renamed over the old one, so no reader ever sees it readable or half written.
    """
    digest = hashlib.sha256(text.encode()).hexdigest()
    current = connection.run(f"sha256sum {quote(layout.env_file)} 2>/dev/null", check=False).stdout.split()
    mode = connection.run(f"stat -c %a {quote(layout.env_file)} 2>/dev/null", check=False).stdout.strip()
    if current and current[0] == digest and mode == "600":
        return False
    sftp = connection.sftp()
    temporary = f"{layout.env_file}.{os.getpid()}.tmp"
    with sftp.open(temporary, "w") as handle:
        handle.chmod(0o600)
        handle.write(text.encode())
    sftp.posix_rename(temporary, layout.env_file)
    return True


def preflight_problems(report: dict[str, Any], layout: remote.RemoteLayout) -> list[str]:
    """Return why the host cannot run workers; an empty list means it can."""
    problems = []
    if report.get("torch") is None:
        problems.append(f"torch failed to import: {report.get('torch_error')}; install torch for "
                        "the host's CUDA, or let pip install it by deploying again")
    if report.get("trainer_error"):
        problems.append(f"trainer failed to import: {report['trainer_error']}; check the packages "
                        f"in {layout.base}/venv against trainer/requirements.txt")
    if report.get("storage_error"):
        problems.append(f"database check from this host failed: {report['storage_error']}")
    if report.get("disk_free_bytes", 0) < MIN_FREE_DISK_BYTES:
        problems.append(f"only {report.get('disk_free_bytes', 0) >> 20} MiB free under {layout.base}; "
                        f"free at least {MIN_FREE_DISK_BYTES >> 20} MiB")
    return problems


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "python": report.get("python"),
        "torch": report.get("torch"),
        "cuda": report.get("cuda"),
        "gpus": [gpu["index"] for gpu in report.get("gpus", [])],
        "gpu_names": sorted({gpu["name"] for gpu in report.get("gpus", [])}),
        "disk_free_gib": round(report.get("disk_free_bytes", 0) / (1 << 30), 1),
        "storage": report.get("storage"),
        "database_ok": report.get("storage_error") is None and "storage" in report,
    }


def _describe(data: dict[str, Any], report: dict[str, Any]) -> str:
    gpus = f"{len(data['gpus'])} GPU(s)" if data["gpus"] else f"no GPU (nvidia-smi {report.get('nvidia_smi')})"
    shipped = f"payload {data['payload']} uploaded" if data["uploaded"] else f"payload {data['payload']} unchanged"
    if data["payloads_removed"]:
        shipped += f", {len(data['payloads_removed'])} old payload(s) removed"
    text = (f"{shipped}; python {data['python']}, torch {data['torch']}, cuda {data['cuda']}, {gpus}, "
            f"{data['disk_free_gib']} GiB free, database ok")
    if data["gpus"] and not data["cuda"]:
        text += "; warning: nvidia-smi lists GPUs but torch cannot use CUDA, so workers run on the CPU"
    return text
