"""Loading the gpu group through Ansible's parser: connection settings and tunefleet variables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ops.errors import TunefleetError
from ops.inventory import DEFAULT_BASE_DIR, load_gpu_hosts


def write(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def inventory(tmp_path) -> Path:
    return write(tmp_path / "hosts.yml", {"all": {"children": {
        "db": {"hosts": {"pg": {"ansible_host": "127.0.0.9"}}},
        "gpu": {
            "vars": {"workers_per_gpu": 2, "tunefleet_python": "/opt/conda/bin/python"},
            "hosts": {
                "box-b": {"ansible_host": "127.0.0.12", "ansible_port": 2222, "ansible_user": "ml",
                          "ansible_ssh_private_key_file": "~/.ssh/fleet",
                          "ansible_ssh_common_args": "-o UserKnownHostsFile=/etc/fleet/known_hosts "
                                                     "-o StrictHostKeyChecking=yes",
                          "gpus": [1, 3], "tunefleet_base_dir": "/scratch/tf",
                          "tunefleet_pip_args": "--no-index --find-links /wheels"},
                "box-a": {"ansible_host": "127.0.0.11", "gpus": 0, "cpu_workers": 3, "workers_per_gpu": 1},
            },
        },
    }}})


def test_gpu_hosts_carry_connection_settings(inventory):
    hosts = {host.name: host for host in load_gpu_hosts(inventory)}
    box = hosts["box-b"]
    assert (box.address, box.port, box.user) == ("127.0.0.12", 2222, "ml")
    assert box.private_key_file == Path("~/.ssh/fleet").expanduser()
    assert box.known_hosts_files == (Path("/etc/fleet/known_hosts"),)
    assert box.pip_args == ("--no-index", "--find-links", "/wheels")


def test_group_vars_and_host_vars_merge(inventory):
    hosts = {host.name: host for host in load_gpu_hosts(inventory)}
    assert hosts["box-b"].workers_per_gpu == 2
    assert hosts["box-b"].python == "/opt/conda/bin/python"
    assert hosts["box-b"].base_dir == "/scratch/tf"
    assert hosts["box-b"].gpus == (1, 3)
    assert hosts["box-a"].workers_per_gpu == 1
    assert hosts["box-a"].gpus == ()
    assert hosts["box-a"].cpu_workers == 3
    assert hosts["box-a"].base_dir == DEFAULT_BASE_DIR
    assert hosts["box-a"].port == 22


def test_hosts_come_sorted_by_name(inventory):
    assert [host.name for host in load_gpu_hosts(inventory)] == ["box-a", "box-b"]


def test_limit_selects_hosts(inventory):
    assert [host.name for host in load_gpu_hosts(inventory, limit="box-b")] == ["box-b"]


def test_limit_with_unknown_host_is_rejected(inventory):
    with pytest.raises(TunefleetError, match="--limit names box-z, which is no host of group 'gpu'") as caught:
        load_gpu_hosts(inventory, limit="box-a,box-z")
    assert "box-a, box-b" in str(caught.value)


def test_limit_naming_a_db_host_is_rejected(inventory):
    with pytest.raises(TunefleetError, match="--limit names pg"):
        load_gpu_hosts(inventory, limit="pg")


def test_missing_gpu_group_is_rejected(tmp_path):
    inventory = write(tmp_path / "hosts.yml", {"all": {"children": {"db": {"hosts": {"pg": {}}}}}})
    with pytest.raises(TunefleetError, match="has no group 'gpu'; add a gpu group"):
        load_gpu_hosts(inventory)


def test_missing_inventory_is_rejected(tmp_path):
    with pytest.raises(TunefleetError, match="not found"):
        load_gpu_hosts(tmp_path / "nowhere.yml")


@pytest.mark.parametrize("variable, value", [("gpus", -1), ("workers_per_gpu", 0), ("cpu_workers", "many"),
                                             ("gpus", [0, 0])])
def test_invalid_tunefleet_variable_is_rejected(tmp_path, variable, value):
    inventory = write(tmp_path / "hosts.yml", {"all": {"children": {"gpu": {"hosts": {"h": {variable: value}}}}}})
    with pytest.raises(TunefleetError, match=f"host h: {variable}"):
        load_gpu_hosts(inventory)


def test_known_hosts_default_without_common_args(tmp_path):
    inventory = write(tmp_path / "hosts.yml", {"all": {"children": {"gpu": {"hosts": {"h": {}}}}}})
    (host,) = load_gpu_hosts(inventory)
    assert host.known_hosts_files == (Path("~/.ssh/known_hosts").expanduser(),)
    assert host.address == "h"
