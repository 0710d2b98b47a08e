"""Fan-out: `tunefleet workers deploy` and `workers start` on 1, 4 and 8 loopback hosts.

Each host is a real sshd on its own address in 127.0.0.0/8 with its own account, made by
the test suite's tests/support/sshd_hosts.py, with an nvidia-smi stand-in that lists one
GPU. As in tests/ops/test_fleet.py, the hosts' /usr/bin/python3 reaches the project's
virtualenv through a .pth file in the account's user site-packages, so the deployed
virtualenv (made with --system-site-packages) finds torch and Optuna there, and
`pip install --no-index` installs nothing.

The commands run in this process through the real command line (`ops.cli`), so Python's
start-up is not timed but everything the command does is. Per repetition and host count:
a first deploy onto hosts whose base directory was emptied, a second deploy with the same
payload, then `workers start` with an objective that only sleeps, then `workers stop`.
The order of the host counts alternates between repetitions.

Every host runs on this machine, so the hosts' own work (creating the virtualenv, pip
checking the requirements, importing torch for the preflight, starting the worker) shares
its cores. The CPU time that the whole machine spent during each command is recorded from
/proc/stat, beside the time that this process (the operator's side) spent and the time
that the host accounts' processes spent, sampled from /proc.

The host agent's calls are timed too, with the size of the JSON request that each one
sends on stdin, so that the report can show where a command's time goes.

This part needs root, because the hosts create accounts and start sshd.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import stat
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import provision_bench_server
from ops import fleet, studies
from ops.cli import cli
from ops.fleet import remote
from ops.paths import project_root

sys.path.insert(0, str(project_root() / "tests"))
from support.sshd_hosts import SshHost, write_inventory  # noqa: E402

HOST_COUNTS = (1, 4, 8)
# Loopback addresses 127.0.0.50 to .57, away from those that the test suite and the
# provisioning part use.
FIRST_ADDRESS_INDEX = 50
BENCH_DIR = Path(__file__).resolve().parent
OBJECTIVE_FILE = BENCH_DIR / "idle_objective.py"
SEARCH_SPACE_FILE = BENCH_DIR / "trivial_space.yml"
HOST_PYTHON = "/usr/bin/python3"
# A host count is measured again, up to this many times in all, when the payload's files
# (trainer/, the host agent) changed between its first deploy and its redeploy, so that
# the redeploy had to upload.
MEASURE_ATTEMPTS = 3
# Seconds between two samples of the host accounts' processes.
SAMPLE_INTERVAL_S = 0.05
NVIDIA_SMI_ONE_GPU = "#!/bin/sh\necho '0, Stand-in GPU 0, 16384 MiB'\n"

# Seconds, CPU seconds, and the slowest host's request size and seconds per agent call.
Measurement = tuple[float, dict[str, float], dict[str, dict[str, float]]]


def run(repetitions: int, log: Any) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError("the fan-out benchmark needs root, because it starts sshd hosts with their own "
                           "accounts; run it with sudo")
    seconds: dict[str, list[float]] = {f"{step}-{count}": [] for step in ("deploy", "redeploy", "start", "stop")
                                       for count in HOST_COUNTS}
    cpu: dict[str, list[dict[str, float]]] = {key: [] for key in seconds}
    agent_calls: dict[str, list[dict[str, dict[str, float]]]] = {key: [] for key in seconds}
    with contextlib.ExitStack() as cleanup:
        workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tunefleet-bench-fanout-")))
        server = provision_bench_server()
        cleanup.callback(server.stop)
        cleanup.enter_context(project_packages_traversable())
        hosts = start_hosts(workdir, max(HOST_COUNTS), cleanup)
        env_file = write_env_file(workdir, server.storage_url())
        cleanup.enter_context(environment_variable("TUNEFLEET_ENV_FILE", str(env_file)))
        study = create_idle_study(server.storage_url())
        inventories = {count: write_inventory(workdir / f"hosts-{count}.yml", {"gpu": hosts[:count]})
                       for count in HOST_COUNTS}

        for repetition in range(repetitions):
            order = HOST_COUNTS if repetition % 2 == 0 else tuple(reversed(HOST_COUNTS))
            for count in order:
                measured = measure_unchanged_payload(hosts[:count], inventories[count], env_file, study, log)
                for step, (step_seconds, step_cpu, step_calls) in measured.items():
                    seconds[f"{step}-{count}"].append(step_seconds)
                    cpu[f"{step}-{count}"].append(step_cpu)
                    agent_calls[f"{step}-{count}"].append(step_calls)
                log(f"fanout: repetition {repetition + 1}, {count} host(s): "
                    + ", ".join(f"{step} {value[0]:.1f} s" for step, value in measured.items()))
    return {"repetitions": repetitions, "host_counts": list(HOST_COUNTS), "seconds": seconds, "cpu": cpu,
            "agent_calls": agent_calls, "cores": os.cpu_count()}


class UnexpectedResult(RuntimeError):
    """A command succeeded, but a host's result was not the one the measurement requires."""


def measure_unchanged_payload(hosts: list[SshHost], inventory: Path, env_file: Path, study: str,
                              log: Any) -> dict[str, Measurement]:
    """Measure `hosts`, again when the payload changed during the measurement.

    Each command builds the payload from the working tree's trainer/ and host agent, so an
    edit in between makes the redeploy upload. That cannot happen on a checkout that no one edits.
    """
    for _ in range(MEASURE_ATTEMPTS):
        payload_hash = fleet.build_payload([OBJECTIVE_FILE, SEARCH_SPACE_FILE]).sha256
        try:
            return measure_host_count(hosts, inventory, env_file, study)
        except UnexpectedResult:
            if fleet.build_payload([OBJECTIVE_FILE, SEARCH_SPACE_FILE]).sha256 == payload_hash:
                raise
            log(f"fanout: the payload's files changed while {len(hosts)} host(s) were measured, so measuring again")
    raise RuntimeError(f"the payload's files (trainer/, ops/fleet/agent.py) changed during each of {MEASURE_ATTEMPTS} "
                       f"measurements of {len(hosts)} host(s); run the benchmark on a checkout that no one edits")


def measure_host_count(hosts: list[SshHost], inventory: Path, env_file: Path, study: str) -> dict[str, Measurement]:
    """Time a first deploy, a second one, a start and a stop of the workers on `hosts`."""
    for host in hosts:
        empty_base_dir(host)
    common = ["-i", str(inventory), "--format", "json"]
    deploy = ["workers", "deploy", *common, "--env-file", str(env_file),
              "--include", str(OBJECTIVE_FILE), "--include", str(SEARCH_SPACE_FILE)]
    start = ["workers", "start", study, *common, "--objective", f"{OBJECTIVE_FILE.stem}:objective",
             "--search-space", str(SEARCH_SPACE_FILE), "--threads", "1"]
    stop = ["workers", "stop", *common, "--env-file", str(env_file), "--timeout", "30"]

    uids = {host.account_ids()[0] for host in hosts}
    measured = {"deploy": run_command(deploy, uids, expect=lambda record: record["data"]["uploaded"])}
    measured["redeploy"] = run_command(deploy, uids, expect=lambda record: not record["data"]["uploaded"])
    try:
        measured["start"] = run_command(start, uids, expect=started_one_worker)
    finally:
        measured["stop"] = run_command(stop, uids, expect=lambda record: True)
    return measured


def started_one_worker(record: dict[str, Any]) -> bool:
    workers = record["data"]["workers"].values()
    return len(workers) == 1 and all(worker["result"] == "started" for worker in workers)


def run_command(argv: list[str], uids: set[int], expect: Any) -> Measurement:
    """Run `tunefleet ARGV` in this process and return its seconds, the CPU seconds spent
    meanwhile and the slowest host's time in each agent call.

    Raises RuntimeError when the command fails, or when a host's result does not pass `expect`,
    for example a first deploy that uploaded nothing.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    machine_before, own_before = machine_busy_seconds(), own_cpu_seconds()
    started = time.monotonic()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), timed_agent_calls() as calls, \
            AccountCpuSampler(uids) as hosts_cpu:
        exit_code = cli.main(args=argv, prog_name="tunefleet", standalone_mode=False)
    elapsed = time.monotonic() - started
    usage = {"machine_busy_s": machine_busy_seconds() - machine_before,
             "operator_s": own_cpu_seconds() - own_before, "hosts_s": hosts_cpu.seconds()}
    if exit_code:
        raise RuntimeError(f"tunefleet {' '.join(argv[:2])} failed with exit code {exit_code}: "
                           f"{stderr.getvalue().strip()[-1500:]}")
    unexpected = [record for record in json.loads(stdout.getvalue()) if not expect(record)]
    if unexpected:
        raise UnexpectedResult(f"tunefleet {' '.join(argv[:2])} gave unexpected results: "
                           + "; ".join(f"{record['host']}: {record['message']}" for record in unexpected))
    return elapsed, usage, slowest_agent_calls(calls)


@contextlib.contextmanager
def timed_agent_calls() -> Iterator[list[dict[str, Any]]]:
    """Record each host agent call's command, request size and seconds while the block runs.

    ops.fleet's modules call `remote.call_agent` through the module, so replacing the
    attribute reaches every call, and the real function still does the work.
    """
    calls: list[dict[str, Any]] = []
    original = remote.call_agent

    def timed(connection: Any, layout: Any, sha256: str, command: str, request: dict[str, Any],
              **kwargs: Any) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return original(connection, layout, sha256, command, request, **kwargs)
        finally:
            calls.append({"command": command, "request_bytes": len(json.dumps(request)),
                          "seconds": time.monotonic() - started})

    remote.call_agent = timed
    try:
        yield calls
    finally:
        remote.call_agent = original


def slowest_agent_calls(calls: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Keep, per agent command, the largest request and the longest call over all hosts."""
    slowest: dict[str, dict[str, float]] = {}
    for call in calls:
        entry = slowest.setdefault(call["command"], {"request_bytes": 0, "seconds": 0.0})
        entry["request_bytes"] = max(entry["request_bytes"], call["request_bytes"])
        entry["seconds"] = max(entry["seconds"], call["seconds"])
    return slowest


def machine_busy_seconds() -> float:
    """Return the CPU seconds that all cores spent outside idle and I/O wait since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class AccountCpuSampler:
    """Sum the CPU time of the processes that some accounts run, by sampling /proc in a thread.

    Each process counts with its last sample, so it loses up to one interval, and one that
    lives shorter than an interval can be missed: the sum is a lower bound.
    """

    def __init__(self, uids: set[int], interval: float = SAMPLE_INTERVAL_S) -> None:
        self.uids = uids
        self.interval = interval
        self.baseline = self._sample()
        self.latest = dict(self.baseline)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AccountCpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._done.set()
        self._thread.join()
        self.latest.update(self._sample())

    def seconds(self) -> float:
        ticks = sum(value - self.baseline.get(pid, 0) for pid, value in self.latest.items())
        return ticks / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.latest.update(self._sample())

    def _sample(self) -> dict[int, int]:
        ticks = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid not in self.uids:
                    continue
                # utime and stime are fields 14 and 15 of proc(5); the split starts at field 3.
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process exited while the loop ran
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
        return ticks


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_hosts(workdir: Path, count: int, cleanup: contextlib.ExitStack) -> list[SshHost]:
    """Start `count` sshd hosts with one stand-in GPU each, and register their removal with `cleanup`."""
    hosts = []
    for index in range(count):
        host = SshHost(f"bench-gpu{index}", FIRST_ADDRESS_INDEX + index, workdir, extra_path="bin",
                       inventory_vars={"tunefleet_python": HOST_PYTHON, "tunefleet_pip_args": "--no-index"})
        cleanup.callback(host.close)
        host.setup()
        host.install_stand_in("nvidia-smi", NVIDIA_SMI_ONE_GPU)
        give_host_the_project_packages(host)
        hosts.append(host)
    return hosts


def give_host_the_project_packages(host: SshHost) -> None:
    """Point the account's user site-packages at the project's, through a .pth file."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    local = host.home / ".local"
    user_site = local / "lib" / version / "site-packages"
    user_site.mkdir(parents=True, exist_ok=True)
    (user_site / "tunefleet-bench-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uid, gid = host.account_ids()
    for path in [local, *local.rglob("*")]:
        os.chown(path, uid, gid)


def empty_base_dir(host: SshHost) -> None:
    """Remove everything an earlier deploy left in the host's base directory, as on a new host."""
    for entry in host.base_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def project_packages_traversable() -> Iterator[None]:
    """Let the host accounts traverse into the project's site-packages, then restore the modes.

    A clone may sit under a directory that only its owner can enter (mktemp -d makes 0700
    ones), so each ancestor gets the search bit for others while the part runs.
    """
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    changed = []
    try:
        for directory in [site_packages, *site_packages.parents]:
            mode = stat.S_IMODE(directory.stat().st_mode)
            if not mode & stat.S_IXOTH:
                directory.chmod(mode | stat.S_IXOTH)
                changed.append((directory, mode))
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


@contextlib.contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def write_env_file(workdir: Path, storage_url: str) -> Path:
    """Write the storage URL to a 0600 env file, created with that mode before the secret is written."""
    path = workdir / "storage.env"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"TUNEFLEET_STORAGE_URL={storage_url}\n")
    return path


def create_idle_study(storage_url: str) -> str:
    # The target is out of reach, so that no worker exits at start because the study is done.
    name = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    settings = studies.StudySettings(target_trials=1_000_000, sampler="random", pruner="none", seed=1)
    studies.create_study(studies.open_storage(storage_url), name, settings, direction="minimize")
    return name
