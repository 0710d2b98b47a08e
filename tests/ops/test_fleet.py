"""Fan-out over real sshd hosts on loopback, with real Fabric and the real PostgreSQL.

Three hosts carry an nvidia-smi stand-in reporting 2, 2 and 3 GPUs. Their python3 is
the machine's /usr/bin/python3, which has neither torch nor Optuna. So each host
account gets a .pth file in its user site-packages that points at the project's
virtualenv site-packages. The deployed virtualenv, made with --system-site-packages,
then finds the packages the way it finds a host's own CUDA PyTorch, and pip installs
nothing. pip runs with --no-index, so it cannot reach the network either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import sysconfig
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from rich.console import Console

from ops import fleet, studies
from ops.fleet import trials as fleet_trials
from ops.fleet.connection import HostConnection, Timeouts
from ops.board import take_snapshot
from ops.fleet.run import FleetWatcher, RunOptions, run_study
from ops.inventory import load_gpu_hosts
from support.sshd_hosts import SshHost, write_inventory

SLEEPY_OBJECTIVE = Path(__file__).resolve().parents[1] / "trainer" / "sleepy_objective.py"
HOST_GPUS = {"gpu-a": 2, "gpu-b": 2, "gpu-c": 3}
FAST = Timeouts(connect=5, command=120)


def nvidia_smi_stand_in(count: int) -> str:
    lines = "\n".join(f"{index}, Stand-in GPU {index}, 16384 MiB" for index in range(count))
    return f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n"


@pytest.fixture(scope="module", autouse=True)
def project_packages_traversable():
    """Let other accounts reach the project's site-packages for the test hosts' python3.

    A clone may live under a directory only its owner can enter (mktemp -d makes
    0700 ones), so each ancestor gets the search bit for others, and its old mode
    back afterwards. Only traversal is granted, not listing.
    """
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    changed = []
    for directory in [site_packages, *site_packages.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((directory, stat.S_IMODE(mode)))
    yield
    for directory, mode in changed:
        directory.chmod(mode)


def give_host_the_project_packages(host: SshHost) -> None:
    """Make the project's site-packages visible to the host account's python3 through its user site."""
    site_packages = sysconfig.get_paths()["purelib"]
    user_site = host.home / ".local" / "lib" / "python3.11" / "site-packages"
    user_site.mkdir(parents=True, exist_ok=True)
    (user_site / "tunefleet-test-packages.pth").write_text(site_packages + "\n")
    uid, gid = host.account_ids()
    for path in [host.home / ".local", *user_site.parents, user_site, *user_site.iterdir()]:
        if str(path).startswith(str(host.home / ".local")):
            os.chown(path, uid, gid)


@pytest.fixture(scope="module")
def gpu_hosts(ssh_host_factory) -> dict[str, SshHost]:
    hosts = {}
    for offset, (name, count) in enumerate(HOST_GPUS.items()):
        host = ssh_host_factory(name, 41 + offset, extra_path="bin", inventory_vars={
            "tunefleet_python": "/usr/bin/python3",
            "tunefleet_pip_args": "--no-index",
        })
        host.install_stand_in("nvidia-smi", nvidia_smi_stand_in(count))
        give_host_the_project_packages(host)
        hosts[name] = host
    return hosts


@pytest.fixture(scope="module")
def inventory(gpu_hosts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fleet-inventory") / "hosts.yml"
    return write_inventory(path, {"gpu": list(gpu_hosts.values())})


@pytest.fixture(scope="module")
def env_text(storage_url) -> str:
    return f"TUNEFLEET_STORAGE_URL={storage_url}\n"


@pytest.fixture(scope="module")
def sleepy_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sleepy") / "sleepy.yml"
    path.write_text(yaml.safe_dump({
        "params": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
        "fixed": {"steps": 4, "step_seconds": 0.5},
    }))
    return path


@pytest.fixture(scope="module")
def payload(sleepy_space) -> fleet.Payload:
    return fleet.build_payload([SLEEPY_OBJECTIVE, sleepy_space])


@pytest.fixture(scope="module")
def first_deploy(inventory, payload, env_text) -> list[fleet.HostResult]:
    hosts = load_gpu_hosts(inventory)
    started = time.monotonic()
    results = fleet.deploy(hosts, fleet.DeployOptions(payload=payload, env_text=env_text, timeouts=FAST))
    print(f"first deploy of {len(hosts)} hosts took {time.monotonic() - started:.1f} s")
    return results


@pytest.fixture
def make_study(storage_url):
    def make(target_trials: int) -> optuna.Study:
        storage = studies.open_storage(storage_url)
        name = f"fleet-{uuid.uuid4().hex[:8]}"
        settings = studies.StudySettings(target_trials=target_trials, sampler="random", pruner="none", seed=3)
        return studies.create_study(storage, name, settings, direction="maximize")

    return make


def sleepy_options(study: optuna.Study, **overrides) -> fleet.WorkerOptions:
    settings = {"study": study.study_name, "objective": "sleepy_objective:objective",
                "search_space": "sleepy.yml", "threads": 1, "heartbeat_interval": 1, "grace_period": 3}
    settings.update(overrides)
    return fleet.WorkerOptions(**settings)


def worker_environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def account_processes(host: SshHost) -> list[int]:
    uid, _ = host.account_ids()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}").stat().st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids


# Deploy.


def test_connection_sends_large_stdin_whole(inventory):
    # Invoke forwards a non-terminal stdin one byte per 10 ms, so this input would take
    # about 40 minutes and time out. The connection sends it in one write instead.
    data = "".join(f"{number:07d}\n" for number in range(32_768))
    host = load_gpu_hosts(inventory)[0]
    with HostConnection(host, FAST) as connection:
        result = connection.run("sha256sum", stdin=data, timeout=30)
        failed = connection.run("cat >/dev/null; echo problem >&2; exit 3", stdin="x", check=False)
    assert result.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    assert failed.exited == 3
    assert failed.stderr.strip() == "problem"


def test_deploy_ships_payload_and_passes_preflight(first_deploy):
    for result in first_deploy:
        assert result.ok, f"{result.host}: {result.message}"
        assert result.data["uploaded"] is True
        assert result.data["venv_created"] is True
        assert result.data["database_ok"] is True
        assert result.data["torch"].startswith("2.")
    gpus = {result.host: result.data["gpus"] for result in first_deploy}
    assert gpus == {name: list(range(count)) for name, count in HOST_GPUS.items()}


def test_deploy_writes_env_file_0600(first_deploy, gpu_hosts, storage_url):
    for host in gpu_hosts.values():
        env_file = host.base_dir / "storage.env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert env_file.stat().st_uid == host.account_ids()[0]
        assert storage_url in env_file.read_text()


def test_second_deploy_uploads_nothing(first_deploy, inventory, payload, env_text, gpu_hosts):
    hash_files = {name: host.base_dir / "payload.sha256" for name, host in gpu_hosts.items()}
    mtimes = {name: path.stat().st_mtime_ns for name, path in hash_files.items()}
    results = fleet.deploy(load_gpu_hosts(inventory),
                           fleet.DeployOptions(payload=payload, env_text=env_text, timeouts=FAST))
    for result in results:
        assert result.ok, f"{result.host}: {result.message}"
        assert result.data["uploaded"] is False
        assert result.data["venv_created"] is False
        assert result.data["env_file_written"] is False
    assert {name: path.stat().st_mtime_ns for name, path in hash_files.items()} == mtimes


def test_deploy_prunes_old_payloads(fleet_hosts, make_study, gpu_hosts, payload, env_text,
                                                     sleepy_space, tmp_path):
    host = fleet_hosts[0]
    payload_root = gpu_hosts[host.name].base_dir / "payload"
    study = make_study(target_trials=200)
    started = fleet.start([host], sleepy_options(study), FAST)[0]
    assert started.ok, started.message
    marker = tmp_path / "marker.txt"
    changed = []
    try:
        for round_number in range(3):
            marker.write_text(f"round {round_number}\n")
            changed.append(fleet.build_payload([SLEEPY_OBJECTIVE, sleepy_space, marker]))
            (result,) = fleet.deploy([host], fleet.DeployOptions(payload=changed[-1], env_text=env_text,
                                                                 timeouts=FAST))
            assert result.ok, result.message
            assert result.data["uploaded"] is True
        # The running workers still import from the first payload, so it stays.
        assert {path.name for path in payload_root.iterdir()} == {
            payload.sha256, changed[1].sha256, changed[2].sha256}
        assert result.data["payloads_removed"] == [changed[0].short_hash]
    finally:
        fleet.stop([host], FAST, stop_timeout=20)
        # The other tests start workers from the installed payload, with its sleepy objective.
        (restored,) = fleet.deploy([host], fleet.DeployOptions(payload=payload, env_text=env_text, timeouts=FAST))
    assert restored.ok, restored.message
    assert {path.name for path in payload_root.iterdir()} == {payload.sha256, changed[2].sha256}


# Start, status and stop.


@pytest.fixture
def fleet_hosts(first_deploy, inventory):
    assert all(result.ok for result in first_deploy), [result.message for result in first_deploy]
    hosts = load_gpu_hosts(inventory)
    yield hosts
    # Whatever a test left running would take CPU from the next one.
    fleet.stop(hosts, FAST, stop_timeout=20)


def test_start_gives_each_worker_its_own_gpu(fleet_hosts, make_study, gpu_hosts):
    study = make_study(target_trials=200)
    results = fleet.start(fleet_hosts, sleepy_options(study), FAST)
    for result in results:
        assert result.ok, f"{result.host}: {result.message}"

    for result in results:
        host = gpu_hosts[result.host]
        devices = []
        for name, worker in result.data["workers"].items():
            environ = worker_environ(worker["pid"])
            devices.append(environ["CUDA_VISIBLE_DEVICES"])
            assert Path(f"/proc/{worker['pid']}").stat().st_uid == host.account_ids()[0]
            assert "TUNEFLEET_STORAGE_URL" not in environ
        assert sorted(devices) == [str(index) for index in range(HOST_GPUS[result.host])]


def test_workers_survive_operator_disconnect(fleet_hosts, make_study, gpu_hosts):
    study = make_study(target_trials=200)
    host = fleet_hosts[0]
    started = fleet.start([host], sleepy_options(study), FAST)[0]
    assert started.ok, started.message
    pids = [worker["pid"] for worker in started.data["workers"].values()]

    # fleet.start closed its SSH connection on return; sshd itself going away ends
    # every session that is left.
    gpu_hosts[host.name].stop()
    try:
        time.sleep(2)
        for pid in pids:
            assert Path(f"/proc/{pid}").exists(), f"worker {pid} ended with the SSH session"
            assert os.getsid(pid) == pid
            assert Path(f"/proc/{pid}/fd/0").resolve() == Path("/dev/null")
    finally:
        gpu_hosts[host.name].start()
    status = fleet.status([host], FAST)[0]
    assert status.ok, status.message
    assert all(worker["alive"] for worker in status.data["workers"].values())


def test_stop_leaves_no_process_and_no_running_trial(fleet_hosts, make_study, gpu_hosts):
    study = make_study(target_trials=200)
    results = fleet.start(fleet_hosts, sleepy_options(study), FAST)
    assert all(result.ok for result in results), [result.message for result in results]
    # Wait until trials run, so that stop has trials to interrupt.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(fleet_trials.running_trials(study)) < 3:
        time.sleep(0.5)
    assert fleet_trials.running_trials(study), "no worker started a trial within 60 s"

    stopped = fleet.stop(fleet_hosts, FAST, stop_timeout=30)
    for result in stopped:
        assert result.ok, f"{result.host}: {result.message}"
        assert all(worker["result"] == "stopped" for worker in result.data["workers"].values())

    for host in gpu_hosts.values():
        leftover = [pid for pid in account_processes(host) if "trainer.worker" in
                    Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert leftover == [], f"{host.name} still runs workers {leftover}"
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert running == []
    status = fleet.status(fleet_hosts, FAST)
    assert all(result.data["workers"] == {} for result in status)


def test_start_with_unknown_study_fails_per_host(fleet_hosts):
    results = fleet.start(fleet_hosts[:1], fleet.WorkerOptions(study="no-such-study-here"), FAST)
    assert not results[0].ok
    assert "not found" in results[0].message
    assert "tunefleet study create no-such-study-here" in results[0].message


# Run.


def run_options(study: optuna.Study, payload: fleet.Payload, env_text: str, **overrides) -> RunOptions:
    settings = {"deploy": fleet.DeployOptions(payload=payload, env_text=env_text, study=study.study_name,
                                              timeouts=FAST),
                "workers": sleepy_options(study), "timeouts": FAST, "max_restarts": 2, "poll_interval": 1.0,
                "stop_timeout": 20}
    settings.update(overrides)
    return RunOptions(**settings)


def quiet_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def assert_no_lost_or_duplicated_trial(study: optuna.Study, target: int) -> None:
    trials = study.get_trials(deepcopy=False)
    by_state = {state: [trial for trial in trials if trial.state == state] for state in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == target
    assert by_state[TrialState.RUNNING] == []
    retried_from = [trial.system_attrs["failed_trial"] for trial in trials if "failed_trial" in trial.system_attrs]
    assert len(retried_from) == len(set(retried_from)), f"a failed trial was queued twice: {retried_from}"
    for failed in by_state[TrialState.FAIL]:
        assert failed.number in retried_from, f"failed trial {failed.number} was never queued again"


def render_text(watcher: FleetWatcher) -> str:
    console = Console(record=True, width=250, force_terminal=False)
    console.print(watcher.render(take_snapshot(watcher.study), elapsed=5.0))
    return console.export_text()


def test_board_marks_unreachable_host(fleet_hosts, make_study, payload, env_text, gpu_hosts):
    study = make_study(target_trials=200)
    host = fleet_hosts[0]
    started = fleet.start([host], sleepy_options(study), FAST)[0]
    assert started.ok, started.message
    watcher = FleetWatcher([host], study, 200, run_options(study, payload, env_text), quiet_console())
    try:
        watcher.poll()
        assert [row.state for row in watcher.rows] == ["alive", "alive"]

        sshd = gpu_hosts[host.name]
        sshd.stop()
        try:
            watcher.poll()
            watcher.poll()
            rows_during_outage = [(row.state, row.last_known_state) for row in watcher.rows]
            outage = watcher.outages.get(host.name)
            board_during_outage = render_text(watcher)
        finally:
            sshd.start()
        assert rows_during_outage == [("unknown", "alive"), ("unknown", "alive")]
        assert outage is not None
        assert outage.reason.startswith(f"connect to {sshd.address}:{sshd.port} failed")
        assert f"{host.name} unreachable since" in board_during_outage
        assert "dead" not in board_during_outage
        assert watcher.restarts.counts == {}
        assert not any("died" in event for event in watcher.progress.events)

        watcher.poll()
        assert [row.state for row in watcher.rows] == ["alive", "alive"]
        assert watcher.outages == {}
        assert any(f"{host.name} is reachable again" in event for event in watcher.progress.events)
    finally:
        watcher.close()


def test_restart_runs_in_background(fleet_hosts, make_study, payload, env_text):
    study = make_study(target_trials=200)
    host = fleet_hosts[0]
    started = fleet.start([host], sleepy_options(study), FAST)[0]
    assert started.ok, started.message
    watcher = FleetWatcher([host], study, 200, run_options(study, payload, env_text), quiet_console())
    key = (host.name, "gpu0")
    try:
        os.killpg(started.data["workers"]["gpu0"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while key not in watcher.restarts.counts and time.monotonic() < deadline:
            watcher.poll()
        # A restart waits seconds for the worker's start line; poll() returned long before that.
        assert watcher.restarts.in_flight(key)

        # The worker still reads as dead (or as starting) while its restart is in flight.
        watcher.poll()
        assert watcher.restarts.counts == {key: 1}
        states = {row.name: row.state for row in watcher.rows}
        assert states["gpu0"] in ("restarting", "alive")

        assert watcher.restarts.wait(timeout=120)
        watcher.poll()
        assert {row.name: row.state for row in watcher.rows} == {"gpu0": "alive", "gpu1": "alive"}
        assert watcher.restarts.counts == {key: 1}
        assert f"worker {host.name}:gpu0 restarted (1/2)" in watcher.progress.events
    finally:
        watcher.close()


def test_run_finishes_study_while_one_host_is_unreachable(fleet_hosts, make_study, payload, env_text, gpu_hosts):
    study = make_study(target_trials=8)
    dead_host = gpu_hosts["gpu-c"]
    phases: dict[str, list[fleet.HostResult]] = {}
    with dead_host.blackholed():
        started = time.monotonic()
        outcome = run_study(fleet_hosts, study, 8, run_options(study, payload, env_text), quiet_console(),
                            on_phase=phases.__setitem__)
        seconds = time.monotonic() - started

    deploy_results = {result.host: result for result in phases["deploy"]}
    assert not deploy_results["gpu-c"].ok
    assert "timed out" in deploy_results["gpu-c"].message
    assert deploy_results["gpu-c"].seconds < FAST.connect + 5
    assert deploy_results["gpu-a"].ok and deploy_results["gpu-b"].ok
    assert outcome.target_reached
    assert outcome.failed_hosts == ["gpu-c"]
    assert_no_lost_or_duplicated_trial(study, 8)
    print(f"run with one unreachable host took {seconds:.1f} s")


def test_run_requeues_trials_of_killed_workers(fleet_hosts, make_study, payload, env_text, gpu_hosts, storage_url):
    target = 10
    study = make_study(target_trials=target)
    # The test thread reads through a Study object of its own, apart from the one run uses.
    observer = optuna.load_study(study_name=study.study_name, storage=storage_url)
    victim = gpu_hosts["gpu-b"]
    hosts = [host for host in fleet_hosts if host.name != "gpu-c"]
    outcome_box: dict[str, Any] = {}

    def run_in_background() -> None:
        outcome_box["outcome"] = run_study(hosts, study, target, run_options(study, payload, env_text),
                                           quiet_console(), on_phase=lambda phase, results: None)

    runner = threading.Thread(target=run_in_background)
    runner.start()
    try:
        # Killed as soon as a trial runs there, often before its first heartbeat: the
        # surviving workers must fail and queue such a trial too.
        victim_trials = wait_for_running_trials_on(observer, victim, timeout=90)
        for pid in worker_pids(victim):
            os.killpg(pid, signal.SIGKILL)
    finally:
        # Restarting a killed worker waits for its start line, which takes tens of seconds
        # on a loaded two-core machine, so the bound is generous.
        runner.join(timeout=600)
    assert not runner.is_alive(), (
        f"run did not finish within 600 s; trials: {studies.count_states(observer.get_trials(deepcopy=False))}"
    )

    outcome = outcome_box["outcome"]
    assert outcome.target_reached
    assert outcome.restarts >= 1
    assert_no_lost_or_duplicated_trial(study, target)
    states = {trial.number: trial.state for trial in study.get_trials(deepcopy=False)}
    for number in victim_trials:
        assert states[number] == TrialState.FAIL, f"trial {number} of a killed worker ended {states[number]}"


def worker_pids(host: SshHost) -> list[int]:
    state = json.loads((host.base_dir / "workers" / "state.json").read_text())
    return [worker["pid"] for worker in state["workers"].values() if Path(f"/proc/{worker['pid']}").exists()]


def wait_for_running_trials_on(study: optuna.Study, host: SshHost, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (host.base_dir / "workers" / "state.json").exists():
            pids = set(worker_pids(host))
            running = [number for worker, number in fleet_trials.running_trials(study).items()
                       if int(worker.rsplit(":", 1)[1]) in pids]
            if running:
                return running
        time.sleep(0.3)
    raise AssertionError(f"no trial ran on {host.name} within {timeout} s")


# The command line, bad input and host keys.


@pytest.fixture(scope="module")
def cli():
    from ops.cli import cli as top_level
    from ops.fleet_cli import register

    if "workers" not in top_level.commands:
        register(top_level)
    return top_level


@pytest.fixture(scope="module")
def env_file(tmp_path_factory, env_text) -> Path:
    path = tmp_path_factory.mktemp("fleet-env") / "storage.env"
    path.write_text(env_text)
    path.chmod(0o600)
    return path


def invoke(cli, *args: str):
    from click.testing import CliRunner

    # A wide terminal keeps rich from folding table cells over several lines.
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def broken_host(ssh_host_factory) -> SshHost:
    """A fourth host whose optuna fails to import, shadowing the good one in its user site."""
    host = ssh_host_factory("gpu-broken", 44, extra_path="bin", inventory_vars={
        "tunefleet_python": "/usr/bin/python3", "tunefleet_pip_args": "--no-index"})
    host.install_stand_in("nvidia-smi", nvidia_smi_stand_in(2))
    give_host_the_project_packages(host)
    user_site = host.home / ".local" / "lib" / "python3.11" / "site-packages"
    (user_site / "optuna").mkdir()
    (user_site / "optuna" / "__init__.py").write_text("raise ImportError('this optuna build is broken')\n")
    (user_site / "optuna-99.0.dist-info").mkdir()
    (user_site / "optuna-99.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: optuna\nVersion: 99.0\n")
    uid, gid = host.account_ids()
    for path in [user_site / "optuna", user_site / "optuna-99.0.dist-info", *user_site.glob("optuna*/*")]:
        os.chown(path, uid, gid)
    return host


def test_cli_deploy_reports_each_host_as_json(cli, fleet_hosts, inventory, env_file, sleepy_space):
    result = invoke(cli, "workers", "deploy", "-i", str(inventory), "--env-file", str(env_file),
                    "--include", str(SLEEPY_OBJECTIVE), "--include", str(sleepy_space), "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [record["host"] for record in records] == sorted(HOST_GPUS)
    assert all(record["ok"] for record in records)


def test_cli_limit_with_unknown_host_is_one_line(cli, inventory):
    result = invoke(cli, "workers", "status", "-i", str(inventory), "--limit", "gpu-a,gpu-zz")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "--limit names gpu-zz" in result.stderr


def test_cli_inventory_without_gpu_group_is_rejected(cli, tmp_path):
    inventory = tmp_path / "db-only.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"db": {"hosts": {"pg": {}}}}}}))
    result = invoke(cli, "workers", "status", "-i", str(inventory))
    assert result.exit_code == 1
    assert "has no group 'gpu'; add a gpu group" in result.stderr


def test_cli_run_with_unknown_study_is_rejected(cli, inventory, env_file):
    result = invoke(cli, "run", "no-such-study-x", "-i", str(inventory), "--env-file", str(env_file))
    assert result.exit_code == 1
    assert "tunefleet study create no-such-study-x" in result.stderr


def test_bad_hosts_fail_alone_with_a_reason(cli, gpu_hosts, broken_host, env_file, tmp_path, fleet_hosts):
    inventory = write_inventory(tmp_path / "hosts.yml", {"gpu": [gpu_hosts["gpu-a"], gpu_hosts["gpu-b"], broken_host]},
                                host_vars={"gpu-b": {"tunefleet_python": "/nonexistent/python3"}})
    result = invoke(cli, "workers", "deploy", "-i", str(inventory), "--env-file", str(env_file), "--format", "json")
    assert result.exit_code == 1
    records = {record["host"]: record for record in json.loads(result.stdout)}
    assert records["gpu-a"]["ok"]
    assert not records["gpu-b"]["ok"]
    assert "/nonexistent/python3 not found on the host" in records["gpu-b"]["message"]
    assert "set tunefleet_python" in records["gpu-b"]["message"]
    assert not records["gpu-broken"]["ok"]
    assert "trainer failed to import" in records["gpu-broken"]["message"]
    assert "this optuna build is broken" in records["gpu-broken"]["message"]
    assert "failed on 2 of 3 host(s): gpu-b, gpu-broken" in result.stderr


def test_unknown_host_key_needs_accept_new_host_keys(gpu_hosts, tmp_path, payload, env_text):
    host = gpu_hosts["gpu-a"]
    known_hosts = tmp_path / "known_hosts"
    common_args = f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
    inventory = write_inventory(tmp_path / "hosts.yml", {"gpu": [host]},
                                host_vars={"gpu-a": {"ansible_ssh_common_args": common_args}})
    hosts = load_gpu_hosts(inventory)
    options = fleet.DeployOptions(payload=payload, env_text=env_text, timeouts=FAST)

    (refused,) = fleet.status(hosts, FAST)
    assert not refused.ok
    assert "is not in" in refused.message
    assert "--accept-new-host-keys" in refused.message

    (accepted,) = fleet.deploy(hosts, fleet.DeployOptions(**{**options.__dict__, "accept_new_host_keys": True}))
    assert accepted.ok, accepted.message
    assert host.host_public_key.split()[1] in known_hosts.read_text()
    (again,) = fleet.status(hosts, FAST)
    assert again.ok, again.message


def test_changed_host_key_is_rejected(gpu_hosts, tmp_path):
    host = gpu_hosts["gpu-a"]
    other_key = gpu_hosts["gpu-b"].host_public_key
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{host.address}]:{host.port} {' '.join(other_key.split()[:2])}\n")
    inventory = write_inventory(tmp_path / "hosts.yml", {"gpu": [host]}, host_vars={
        "gpu-a": {"ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts}"}})
    for accept_new in (False, True):
        (result,) = fleet.status(load_gpu_hosts(inventory), FAST, accept_new=accept_new)
        assert not result.ok
        assert "does not match known_hosts" in result.message


def test_cli_start_status_logs_stop(cli, fleet_hosts, inventory, env_file, make_study, sleepy_space):
    study = make_study(target_trials=200)
    started = invoke(cli, "workers", "start", study.study_name, "-i", str(inventory), "--limit", "gpu-a",
                     "--objective", "sleepy_objective:objective", "--search-space", str(sleepy_space),
                     "--threads", "1", "--heartbeat-interval", "1")
    assert started.exit_code == 0, started.output
    assert "2 worker(s) started" in started.stdout

    result = invoke(cli, "workers", "status", "-i", str(inventory), "--limit", "gpu-a", "--env-file", str(env_file),
                    "--format", "json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    workers = record["data"]["workers"]
    assert sorted(workers) == ["gpu0", "gpu1"]
    assert all(worker["alive"] for worker in workers.values())
    assert [workers[name]["gpu"] for name in ("gpu0", "gpu1")] == [0, 1]

    table = invoke(cli, "workers", "status", "-i", str(inventory), "--limit", "gpu-a", "--env-file", str(env_file))
    assert table.exit_code == 0
    assert "alive" in table.stdout
    assert study.study_name in table.stdout

    logs = invoke(cli, "workers", "logs", "gpu-a:1", "-i", str(inventory), "-n", "20")
    assert logs.exit_code == 0, logs.output
    assert "starting: study=" + study.study_name in logs.stdout

    stopped = invoke(cli, "workers", "stop", "-i", str(inventory), "--limit", "gpu-a", "--env-file", str(env_file))
    assert stopped.exit_code == 0, stopped.output
    assert study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) == []


@pytest.mark.slow
def test_cli_run_completes_digits_study_on_three_hosts(cli, gpu_hosts, tmp_path, env_file, storage_url):
    # One GPU per host keeps three digits workers on a 2-core machine.
    inventory = write_inventory(tmp_path / "hosts.yml", {"gpu": list(gpu_hosts.values())},
                                host_vars={name: {"gpus": 1} for name in gpu_hosts})
    name = f"fleet-digits-{uuid.uuid4().hex[:6]}"
    created = invoke(cli, "study", "create", name, "--trials", "3", "--pruner", "none", "--seed", "1",
                     "--env-file", str(env_file))
    assert created.exit_code == 0, created.output

    started = time.monotonic()
    result = invoke(cli, "run", name, "-i", str(inventory), "--env-file", str(env_file), "--threads", "1",
                    "--heartbeat-interval", "5", "--poll-interval", "2")
    print(f"digits run on three hosts took {time.monotonic() - started:.1f} s")
    assert result.exit_code == 0, result.output
    assert "target reached" in result.stdout
    study = optuna.load_study(study_name=name, storage=storage_url)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    assert len({trial.user_attrs["worker"] for trial in complete}) >= 2
    assert study.best_value > 0.5
    for host in gpu_hosts.values():
        assert not worker_pids(host)
