"""Host-side helper that tunefleet ships with the trainer and runs over SSH.

It uses the standard library only and never imports `ops`, because it runs on the
worker host with the host's interpreter. The operator sends one JSON request on stdin
and reads one JSON document from stdout:

    python tunefleet_agent.py preflight|gpus|start|stop|status|prune < request.json

Workers are started here, not through a shell line over SSH, so that starting them is
an ordinary fork in a process that waits for the result. Each worker gets its own
session (setsid), stdin from /dev/null and a log file. The agent checks that each one
is alive before it replies. The state file records each worker's process-group id, so later
sessions can signal the group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
# Torch's facts and the trainer's import check from the last preflight, with their key.
PREFLIGHT_CACHE = "preflight-cache.json"
# The worker logs this once it has connected to the storage and loaded the study.
STARTED_MARKER = " starting: study="
FINISHED_MARKER = " finished: "
TRIAL_FINISHED = re.compile(r" trial \d+ (COMPLETE|PRUNED) ")
# A payload folder, or the archive of an upload that was cut short, named by its SHA-256.
PAYLOAD_ENTRY = re.compile(r"^([0-9a-f]{64})(\.tar\.gz)?$")


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    handlers = {"preflight": preflight, "gpus": gpus, "start": start, "stop": stop, "status": status,
                "prune": prune}
    if command not in handlers:
        print(json.dumps({"error": f"unknown agent command {command!r}"}))
        return 2
    request = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(handlers[command](request)))
    return 0


# Preflight.


def preflight(request: dict[str, Any]) -> dict[str, Any]:
    """Report what the host can run: python, torch, CUDA, GPUs, disk, trainer, storage."""
    base_dir = Path(request["base_dir"])
    report: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "disk_free_bytes": shutil.disk_usage(base_dir).free,
    }
    report["gpus"], report["nvidia_smi"] = _nvidia_smi()
    report.update(_cached_python_facts(base_dir, [report["gpus"], report["nvidia_smi"]]))
    if report["trainer_error"] is None and request.get("env_file"):
        report.update(_storage_facts(request["env_file"], request.get("study")))
    return report


def _cached_python_facts(base_dir: Path, gpus_seen: list[Any]) -> dict[str, Any]:
    """Return torch's facts and the trainer's import error, from the cache when nothing changed.

    Importing torch takes a second or more of CPU, most of a redeploy that uploads
    nothing. The cache key is the interpreter, the payload on sys.path and what
    nvidia-smi reported. It also contains the modification time of every sys.path
    directory, which changes whenever a package is installed, upgraded or removed there.
    """
    key = {
        "python": sys.executable,
        "version": sys.version,
        "path": {entry: _mtime_ns(entry) for entry in sys.path if entry},
        "gpus": gpus_seen,
    }
    cache_file = base_dir / PREFLIGHT_CACHE
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key and isinstance(cached.get("facts"), dict):
        return {**cached["facts"], "cached": True}
    facts = {**_torch_facts(), "trainer_error": _import_error("trainer.worker")}
    temporary = cache_file.with_name(cache_file.name + ".tmp")
    temporary.write_text(json.dumps({"key": key, "facts": facts}))
    temporary.replace(cache_file)
    return {**facts, "cached": False}


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def gpus(request: dict[str, Any]) -> dict[str, Any]:
    """Report the GPUs that nvidia-smi lists, without importing torch."""
    listed, outcome = _nvidia_smi()
    return {"hostname": socket.gethostname(), "gpus": listed, "nvidia_smi": outcome}


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except Exception as error:  # a broken CUDA install raises more than ImportError
        return {"torch": None, "torch_error": f"{type(error).__name__}: {error}", "cuda": False}
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:
        cuda = False
    return {"torch": torch.__version__, "torch_error": None, "cuda": cuda}


def _nvidia_smi() -> tuple[list[dict[str, Any]], str]:
    """Return the GPUs that nvidia-smi lists, and a word on how the lookup went."""
    if shutil.which("nvidia-smi") is None:
        return [], "not found"
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return [], "timed out after 30 s"
    if result.returncode != 0:
        return [], f"failed with exit code {result.returncode}: {result.stderr.strip()[-200:]}"
    gpus = []
    for line in result.stdout.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) >= 3 and fields[0].isdigit():
            gpus.append({"index": int(fields[0]), "name": fields[1], "memory": fields[2]})
    return gpus, "ok"


def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _storage_facts(env_file: str, study: str | None) -> dict[str, Any]:
    """Connect from this host: first a TCP connect, then a real login, then the study."""
    from trainer import storage

    facts: dict[str, Any] = {"storage_error": None}
    try:
        url = storage.resolve_storage_url(env_file, {})
        facts["storage"] = storage.mask_url(url)
        _tcp_connect(url)
        _log_in(url)
        if study:
            rdb = storage.open_storage(url)
            storage.find_study(rdb, study)
    except storage.StorageError as error:
        facts["storage_error"] = str(error)
    except OSError as error:
        facts["storage_error"] = f"cannot open a TCP connection to the database: {error.strerror or error}"
    return facts


def _log_in(url: str) -> None:
    """Log in and run one query, which needs no Optuna tables, unlike opening the storage."""
    import sqlalchemy
    from trainer import storage

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if url.startswith("postgresql") else {})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        password = sqlalchemy.engine.make_url(url).password
        if password:
            reason = reason.replace(password, "***")
        raise storage.StorageError(f"login to {storage.mask_url(url)} failed: {reason}") from None
    finally:
        engine.dispose()


def _tcp_connect(url: str) -> None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.host:
        return  # a Unix socket: the login below tests it
    with socket.create_connection((parsed.host, parsed.port or 5432), timeout=10):
        pass


# Process groups.


def _group_members(pgid: int) -> list[int]:
    """Return the live, non-zombie processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses, so split after its end.
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _read_state(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return {"workers": {}}


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    temporary = state_dir / f".{STATE_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(temporary, state_dir / STATE_FILE)


def _tail(path: Path, lines: int = 1) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return text.strip().splitlines()[-lines:]


# Start.


def start(request: dict[str, Any]) -> dict[str, Any]:
    """Start the requested workers that are not running yet, and check each one is alive."""
    state_dir = Path(request["state_dir"])
    state = _read_state(state_dir)
    launched: dict[str, subprocess.Popen] = {}
    results: dict[str, dict[str, Any]] = {}
    for spec in request["workers"]:
        previous = state["workers"].get(spec["name"])
        if previous and _group_members(previous["pgid"]):
            results[spec["name"]] = {"result": "already running", "pid": previous["pid"]}
            continue
        process = _launch(spec, state_dir)
        launched[spec["name"]] = process
        restarts = previous.get("restarts", 0) + 1 if previous else 0
        state["workers"][spec["name"]] = {
            **spec, "pid": process.pid, "pgid": process.pid, "started_at": time.time(), "restarts": restarts,
        }
        # The state is written before the alive check, so that a stop can find a worker
        # even when this request is cut short.
        _write_state(state_dir, state)
    results.update(_wait_until_started(launched, state["workers"], float(request.get("alive_timeout", 60))))
    return {"hostname": socket.gethostname(), "workers": results}


def _launch(spec: dict[str, Any], state_dir: Path) -> subprocess.Popen:
    log_path = Path(spec["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    environment.update(spec["environment"])
    with log_path.open("ab") as log:
        log.write(f"--- starting {spec['name']} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        return subprocess.Popen(
            spec["argv"], cwd=spec["cwd"], env=environment, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )


def _wait_until_started(launched: dict[str, subprocess.Popen], records: dict[str, Any],
                        timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until each new worker logs that it loaded the study, or exits.

    The agent is the workers' parent here, so an exit is seen through waitpid and not
    guessed from timing. A worker that is still loading after `timeout` counts as alive.
    """
    results = {}
    pending = dict(launched)
    deadline = time.monotonic() + timeout
    while pending:
        for name, process in list(pending.items()):
            log = Path(records[name]["log"])
            code = process.poll()
            if code is not None:
                results[name] = {"result": "exited", "pid": process.pid, "exit_code": code,
                                 "last_log_lines": _tail(log, 5)}
            elif _log_contains(log, STARTED_MARKER):
                results[name] = {"result": "started", "pid": process.pid}
            elif time.monotonic() > deadline:
                results[name] = {"result": "started", "pid": process.pid,
                                 "note": f"still loading after {timeout:.0f} s"}
            else:
                continue
            del pending[name]
        time.sleep(0.2)
    return results


def _log_contains(path: Path, marker: str) -> bool:
    # Only the part after the latest "--- starting" line belongs to this start.
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return marker in text.rsplit("--- starting ", 1)[-1]


# Stop.


def stop(request: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM each worker's process group, SIGKILL what is left after the timeout."""
    state_dir = Path(request["state_dir"])
    state = _read_state(state_dir)
    names = request.get("names") or list(state["workers"])
    timeout = float(request.get("timeout", 60))
    signalled = {}
    for name in names:
        record = state["workers"].get(name)
        if record is None:
            continue
        signalled[name] = bool(_group_members(record["pgid"]))
        if signalled[name]:
            _signal_group(record["pgid"], signal.SIGTERM)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_members(state["workers"][n]["pgid"]) for n in signalled):
        time.sleep(0.2)

    results = {}
    for name, was_running in signalled.items():
        pgid = state["workers"][name]["pgid"]
        killed = False
        if _group_members(pgid):
            killed = True
            for _ in range(50):
                _signal_group(pgid, signal.SIGKILL)
                time.sleep(0.1)
                if not _group_members(pgid):
                    break
        left = _group_members(pgid)
        if left:
            outcome = "left running"
        elif killed:
            outcome = "killed"
        else:
            outcome = "stopped" if was_running else "not running"
        record = state["workers"][name]
        results[name] = {"result": outcome, "left": left, "pid": record["pid"], "study": record.get("study"),
                         "last_log_line": (_tail(Path(record["log"])) or [""])[-1]}
        if not left:
            del state["workers"][name]
    _write_state(state_dir, state)
    return {"hostname": socket.gethostname(), "workers": results}


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


# Status.


def status(request: dict[str, Any]) -> dict[str, Any]:
    """Describe every worker in the state file: alive or dead, trials finished, last log line."""
    state = _read_state(Path(request["state_dir"]))
    workers = {}
    for name, record in state["workers"].items():
        log = Path(record["log"])
        alive = bool(_group_members(record["pgid"]))
        workers[name] = {
            "pid": record["pid"],
            "gpu": record.get("gpu"),
            "study": record.get("study"),
            "alive": alive,
            "finished_normally": (not alive) and _log_contains(log, FINISHED_MARKER),
            "trials_finished": _count_finished_trials(log),
            "restarts": record.get("restarts", 0),
            "last_log_line": (_tail(log) or [""])[-1],
            "log": record["log"],
        }
    return {"hostname": socket.gethostname(), "workers": workers}


def _count_finished_trials(log: Path) -> int:
    """Count the trials finished since the worker's latest start.

    A worker's log file is kept across starts, so earlier runs and studies are in it too.
    """
    count = 0
    try:
        with log.open(errors="replace") as handle:
            for line in handle:
                if STARTED_MARKER in line:
                    count = 0
                elif TRIAL_FINISHED.search(line):
                    count += 1
    except OSError:
        return 0
    return count



# Prune.


def prune(request: dict[str, Any]) -> dict[str, Any]:
    """Remove payload folders except those in `keep` and those that live workers import from."""
    root = Path(request["payload_root"])
    in_use = _payloads_in_use(_read_state(Path(request["state_dir"])))
    keep = set(request["keep"]) | in_use
    removed = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        match = PAYLOAD_ENTRY.match(entry.name)
        if match is None or match.group(1) in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(match.group(1))
    return {"hostname": socket.gethostname(), "removed": sorted(set(removed)),
            "in_use": sorted(in_use - set(request["keep"]))}


def _payloads_in_use(state: dict[str, Any]) -> set[str]:
    used = set()
    for record in state["workers"].values():
        if not _group_members(record["pgid"]):
            continue
        # Records written before "payload" was recorded name the folder first in PYTHONPATH.
        payload = record.get("payload") or Path(record["environment"]["PYTHONPATH"].split(":")[0]).name
        used.add(payload)
    return used


if __name__ == "__main__":
    sys.exit(main())
