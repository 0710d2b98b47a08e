"""Tests of the loopback test hosts against real sshd, ssh, Fabric and Ansible."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest
import yaml

from .sshd_hosts import (
    FreshDebianHost,
    HostSetupError,
    debian_mirror,
    debootstrap_tarball,  # noqa: F401  (fixture used by fresh_debian_host)
    fresh_debian_host,  # noqa: F401  (fixture)
    generate_ed25519_key,
    known_hosts_line,
    mounts_under,
    network_namespace,
    require_root_and_tools,
    ssh_host_factory,  # noqa: F401  (fixture)
    write_inventory,
)

NVIDIA_SMI_STAND_IN = """#!/bin/sh
# Stand-in for nvidia-smi that reports two GPUs, in the format of `nvidia-smi -L`.
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-1111-1111-1111-111111111111)"
"""


def connect_error(address: str, port: int, timeout_s: float) -> tuple[type[BaseException] | None, float]:
    """Try a TCP connect and return the exception class it raised (or None) and its duration."""
    started = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return None, time.monotonic() - started
    except OSError as error:
        return type(error), time.monotonic() - started


def test_ssh_runs_command_as_account(ssh_host_factory):
    host = ssh_host_factory("plain", 2)

    result = host.run("id -un; pwd; stat -c %U " + str(host.base_dir))

    assert result.returncode == 0, result.stderr
    user, working_dir, base_dir_owner = result.stdout.split()
    assert user == host.user
    assert working_dir == str(host.home)
    assert base_dir_owner == host.user
    assert host.client_key.stat().st_mode & 0o777 == 0o600


def test_sshd_listens_only_on_its_address(ssh_host_factory):
    host = ssh_host_factory("bound", 3)

    error, _ = connect_error("127.0.0.1", host.port, timeout_s=2)

    assert error is ConnectionRefusedError
    assert connect_error(host.address, host.port, timeout_s=2)[0] is None


def test_host_key_mismatch_rejected(ssh_host_factory, tmp_path):
    host = ssh_host_factory("pinned", 4)
    other_key = generate_ed25519_key(tmp_path / "other_host_key", "some other host")
    wrong_known_hosts = tmp_path / "known_hosts"
    wrong_known_hosts.write_text(known_hosts_line(host.address, host.port, other_key))
    argv = host.ssh_argv("true")
    argv[argv.index(f"UserKnownHostsFile={host.known_hosts}")] = f"UserKnownHostsFile={wrong_known_hosts}"

    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_unknown_host_key_rejected_by_fabric(ssh_host_factory):
    host = ssh_host_factory("fabric-unknown", 4)
    connection = host.fabric_connection()
    connection.client.get_host_keys().clear()

    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connection.open()
    connection.close()


def test_fabric_connects_with_pinned_key(ssh_host_factory):
    host = ssh_host_factory("fabric", 5)

    with host.fabric_connection() as connection:
        result = connection.run("id -un", hide=True)

    assert result.stdout.strip() == host.user


def test_extra_path_stand_in_found_non_interactively(ssh_host_factory):
    host = ssh_host_factory("gpu", 6, extra_path="fake-bin")
    host.install_stand_in("nvidia-smi", NVIDIA_SMI_STAND_IN)

    over_ssh = host.run("command -v nvidia-smi; nvidia-smi -L")
    with host.fabric_connection() as connection:
        over_fabric = connection.run("nvidia-smi -L", hide=True)

    assert over_ssh.returncode == 0, over_ssh.stderr
    found_at, *gpu_lines = over_ssh.stdout.splitlines()
    assert found_at == str(host.home / "fake-bin" / "nvidia-smi")
    assert len(gpu_lines) == 2
    assert over_fabric.stdout.count("GPU ") == 2


def test_stop_refuses_connects_and_start_restores(ssh_host_factory):
    host = ssh_host_factory("stoppable", 7)
    session = subprocess.Popen(host.ssh_argv("echo logged-in; sleep 120"), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert session.stdout.readline().strip() == "logged-in"
        host.stop()
        error, seconds = connect_error(host.address, host.port, timeout_s=5)
        after_stop = host.run("true", timeout_s=30)
        session_code = session.wait(timeout=10)
    finally:
        session.kill()
        session.wait()

    assert error is ConnectionRefusedError
    assert seconds < 1
    assert after_stop.returncode == 255
    assert "Connection refused" in after_stop.stderr
    assert session_code != 0

    host.start()
    assert host.run("true").returncode == 0


def test_stop_can_end_detached_processes(ssh_host_factory):
    host = ssh_host_factory("crashing", 7)
    started = host.run("setsid sleep 300 < /dev/null > /dev/null 2>&1 & echo $!")
    pid = int(started.stdout.strip())

    host.stop()
    survived_plain_stop = Path(f"/proc/{pid}").exists()
    host.stop(kill_account_processes=True)

    assert survived_plain_stop
    assert not Path(f"/proc/{pid}").exists()


def test_blackhole_makes_connects_time_out(ssh_host_factory):
    host = ssh_host_factory("unreachable", 8)

    with host.blackholed():
        error, seconds = connect_error(host.address, host.port, timeout_s=1.5)
        blocked = host.run("true", timeout_s=30, connect_timeout_s=2)
    reachable_again = host.run("true")

    assert error is TimeoutError
    assert seconds >= 1.4
    assert blocked.returncode == 255
    assert "timed out" in blocked.stderr
    assert reachable_again.returncode == 0


def test_sudo_host_runs_sudo_noninteractively(ssh_host_factory):
    with_sudo = ssh_host_factory("with-sudo", 9, sudo=True)
    without_sudo = ssh_host_factory("without-sudo", 9)

    granted = with_sudo.run("sudo -n true && sudo -n id -un")
    denied = without_sudo.run("sudo -n true")

    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.strip() == "root"
    assert denied.returncode == 1


def test_close_removes_account_home_and_sudo_rule(ssh_host_factory):
    host = ssh_host_factory("removable", 10, sudo=True)
    host.run("setsid sleep 300 < /dev/null > /dev/null 2>&1 &")

    host.close()

    with pytest.raises(KeyError):
        pwd.getpwnam(host.user)
    assert not host.home.exists()
    assert not Path("/etc/sudoers.d", host.user).exists()
    assert not host.config_dir.exists()
    assert connect_error(host.address, host.port, timeout_s=2)[0] is ConnectionRefusedError


def test_inventory_reaches_hosts_with_ansible(ssh_host_factory, tmp_path):
    db = ssh_host_factory("db1", 11, sudo=True)
    gpu = ssh_host_factory("gpu1", 12, extra_path="fake-bin", inventory_vars={"gpu_count": 2})
    gpu.install_stand_in("nvidia-smi", NVIDIA_SMI_STAND_IN)
    inventory = write_inventory(
        tmp_path / "inventory.yml",
        {"db": [db], "gpu": [gpu]},
        host_vars={"db1": {"base_dir": str(db.base_dir)}},
        group_vars={"gpu": {"workers_per_gpu": 1}},
    )
    ansible = Path(sys.executable).with_name("ansible")
    environment = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1"}

    ping = subprocess.run([str(ansible), "all", "-i", str(inventory), "-m", "ping"],
                          capture_output=True, text=True, timeout=120, env=environment, check=False)
    gpus = subprocess.run([str(ansible), "gpu", "-i", str(inventory), "-m", "command", "-a", "nvidia-smi -L"],
                          capture_output=True, text=True, timeout=120, env=environment, check=False)

    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("SUCCESS") == 2
    assert gpus.returncode == 0, gpus.stdout + gpus.stderr
    assert gpus.stdout.count("GPU ") == 2
    written = yaml.safe_load(inventory.read_text())["all"]["children"]
    assert written["db"]["hosts"]["db1"]["base_dir"] == str(db.base_dir)
    assert written["gpu"]["hosts"]["gpu1"]["gpu_count"] == 2
    assert written["gpu"]["vars"] == {"workers_per_gpu": 1}
    assert "StrictHostKeyChecking=yes" in written["gpu"]["hosts"]["gpu1"]["ansible_ssh_common_args"]


def test_inventory_rejects_duplicate_host_names(ssh_host_factory, tmp_path):
    first = ssh_host_factory("twin", 13)
    second = ssh_host_factory("twin", 13)

    with pytest.raises(ValueError, match="'twin'"):
        write_inventory(tmp_path / "inventory.yml", {"gpu": [first, second]})


def test_netns_client_seen_at_its_own_address():
    require_root_and_tools(("ip",))
    with network_namespace(7) as namespace:
        listener = socket.create_server((namespace.root_address, 0))
        port = listener.getsockname()[1]
        listener.settimeout(20)
        peers: list[str] = []
        accepting = threading.Thread(target=lambda: peers.append(listener.accept()[1][0]))
        accepting.start()
        client_code = (
            "import socket, sys\n"
            f"s = socket.create_connection(({namespace.root_address!r}, {port}), timeout=10)\n"
            "print(s.getsockname()[0])\n"
        )

        client = namespace.run_in_netns([sys.executable, "-c", client_code], timeout=30)
        accepting.join(timeout=20)
        listener.close()
        loopback_from_namespace = namespace.run_in_netns(
            [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 1), timeout=2)"],
            timeout=30,
        )
        name = namespace.name

    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == namespace.namespace_address
    assert peers == [namespace.namespace_address]
    assert "ConnectionRefusedError" in loopback_from_namespace.stderr
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert name not in listed
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert namespace.root_interface not in links


def test_netns_rejects_subnet_of_existing_route():
    require_root_and_tools(("ip",))
    with network_namespace(8):
        with pytest.raises(HostSetupError, match="overlaps"):
            with network_namespace(8):
                pass


@pytest.mark.parametrize(
    ("file_name", "text", "expected"),
    [
        (
            "sources.list.d/debian.sources",
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
            "Suites: bookworm-security\nComponents: main\n",
            "http://mirror.example/debian",
        ),
        (
            "sources.list",
            "# deb http://old.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n",
            "http://mirror.example/debian",
        ),
    ],
)
def test_debian_mirror_read_from_apt_sources(tmp_path, file_name, text, expected):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / file_name).write_text(text)

    assert debian_mirror(tmp_path) == expected


def test_debian_mirror_missing_raises(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian trixie main\n")

    with pytest.raises(HostSetupError, match="no apt source for Debian bookworm"):
        debian_mirror(tmp_path)


@pytest.mark.slow
def test_fresh_debian_host_boots_and_answers(fresh_debian_host, debootstrap_tarball):
    host: FreshDebianHost = fresh_debian_host("fresh", 14, extra_path="fake-bin")
    host.install_stand_in("nvidia-smi", NVIDIA_SMI_STAND_IN)

    result = host.run(
        "id -un; cat /etc/debian_version; python3 -c 'print(1 + 1)'; sudo -n id -un; "
        "nvidia-smi -L | wc -l; test -d /run/systemd/system && echo systemd || echo no-systemd"
    )
    mounts_while_running = mounts_under(host.root)
    host.close()

    assert result.returncode == 0, result.stderr + host.log_tail()
    user, debian_version, two, sudo_user, gpu_count, init = result.stdout.split()
    assert user == host.user
    assert debian_version.startswith("12.")
    assert two == "2"
    assert sudo_user == "root"
    assert gpu_count == "2"
    assert init == "no-systemd"
    assert len(mounts_while_running) == 5
    assert mounts_under(host.root) == []
    assert not host.root.exists()
    assert Path("/dev/null").is_char_device()
    build_seconds = debootstrap_tarball.with_suffix(".json").read_text().strip()
    print(f"debootstrap build {build_seconds}, host start {host.start_seconds:.1f} s")
