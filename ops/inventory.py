"""The fleet as the Ansible inventory describes it, read through Ansible's own parser.

Fabric and Ansible reach the same hosts with the same settings: `ansible_host`,
`ansible_port`, `ansible_user`, `ansible_ssh_private_key_file` and the
`UserKnownHostsFile` option inside `ansible_ssh_common_args` mean the same thing to
both. tunefleet's own per-host variables carry the `gpus`, `workers_per_gpu`,
`cpu_workers` and `tunefleet_*` names.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ops.errors import TunefleetError

GPU_GROUP = "gpu"
DEFAULT_PYTHON = "python3"
# Relative to the SSH account's home directory, because every remote command runs there.
DEFAULT_BASE_DIR = "tunefleet"
DEFAULT_CPU_WORKERS = 1
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


@dataclass(frozen=True)
class FleetHost:
    """One worker host with its SSH connection settings and tunefleet variables."""

    name: str
    address: str
    port: int = 22
    user: str | None = None
    private_key_file: Path | None = None
    known_hosts_files: tuple[Path, ...] = (DEFAULT_KNOWN_HOSTS,)
    # None means "ask nvidia-smi"; a list of device indexes overrides discovery.
    gpus: tuple[int, ...] | None = None
    workers_per_gpu: int = 1
    cpu_workers: int = DEFAULT_CPU_WORKERS
    python: str = DEFAULT_PYTHON
    base_dir: str = DEFAULT_BASE_DIR
    # Extra arguments for `pip install`, such as "--no-index --find-links DIR" on hosts
    # without access to a package index.
    pip_args: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{self.name} ({user}{self.address}:{self.port})"


def load_gpu_hosts(inventory: Path, *, group: str = GPU_GROUP, limit: str | None = None) -> list[FleetHost]:
    """Return the hosts of `group`, narrowed to the comma-separated names in `limit`.

    Raises TunefleetError when the inventory, the group or a name in `limit` is missing.
    """
    inventory = Path(inventory)
    data = load_inventory(inventory)
    manager, variable_manager = data.manager, data.variables
    if group not in manager.groups:
        raise TunefleetError(f"inventory {inventory} has no group {group!r}",
                             f"add a {group} group that lists the worker hosts")
    members = sorted(manager.groups[group].get_hosts(), key=lambda host: host.name)
    if not members:
        raise TunefleetError(f"group {group!r} in inventory {inventory} has no hosts",
                             f"list the worker hosts under {group}")
    members = _apply_limit(inventory, group, members, limit)
    return [host_from_variables(host.name, variable_manager.get_vars(host=host)) for host in members]


@dataclass
class InventoryData:
    """An inventory as Ansible's own parser reads it, so group_vars and host_vars mean what they mean to Ansible."""

    manager: Any
    variables: Any


def require_inventory_file(inventory: Path) -> None:
    """Raise a one-line error when `inventory` is not a file."""
    if not Path(inventory).is_file():
        raise TunefleetError(f"inventory {inventory} not found",
                             "pass -i/--inventory, or copy inventory/example.yml to inventory/hosts.yml")


def load_inventory(inventory: Path) -> InventoryData:
    """Parse `inventory` with Ansible's own parser, or raise a one-line error."""
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    _check_inventory_syntax(inventory)
    loader = DataLoader()
    try:
        manager = InventoryManager(loader=loader, sources=[str(inventory)])
    except AnsibleError as error:
        raise TunefleetError(f"cannot parse inventory {inventory}: {error}") from None
    return InventoryData(manager, VariableManager(loader=loader, inventory=manager))


def _check_inventory_syntax(inventory: Path) -> None:
    """Reject a missing or malformed YAML inventory with the parser's own position.

    Ansible only warns about a source it cannot parse and goes on with an empty
    inventory, which would surface later as a misleading "no db group".
    """
    require_inventory_file(inventory)
    if Path(inventory).suffix not in (".yml", ".yaml"):
        return
    try:
        yaml.safe_load(Path(inventory).read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise TunefleetError(f"inventory {inventory} is not valid YAML{where}: {problem}",
                             "fix the file and run the command again") from None


def _apply_limit(inventory: Path, group: str, members: list[Any], limit: str | None) -> list[Any]:
    if not limit:
        return members
    by_name = {host.name: host for host in members}
    selected = []
    for name in (part.strip() for part in re.split(r"[,:]", limit)):
        if not name:
            continue
        if name not in by_name:
            known = ", ".join(sorted(by_name))
            raise TunefleetError(f"--limit names {name}, which is no host of group {group!r} in {inventory}",
                                 f"use one of: {known}")
        if by_name[name] not in selected:
            selected.append(by_name[name])
    return selected


def host_from_variables(name: str, variables: dict[str, Any]) -> FleetHost:
    """Build a FleetHost from one host's merged inventory variables."""
    key_file = variables.get("ansible_ssh_private_key_file") or variables.get("ansible_private_key_file")
    return FleetHost(
        name=name,
        address=str(variables.get("ansible_host", name)),
        port=_integer(name, "ansible_port", variables.get("ansible_port", 22), minimum=1),
        user=variables.get("ansible_user") or variables.get("ansible_ssh_user"),
        private_key_file=Path(str(key_file)).expanduser() if key_file else None,
        known_hosts_files=_known_hosts_files(str(variables.get("ansible_ssh_common_args", ""))),
        gpus=_gpu_override(name, variables.get("gpus")),
        workers_per_gpu=_integer(name, "workers_per_gpu", variables.get("workers_per_gpu", 1), minimum=1),
        cpu_workers=_integer(name, "cpu_workers", variables.get("cpu_workers", DEFAULT_CPU_WORKERS), minimum=0),
        python=str(variables.get("tunefleet_python", DEFAULT_PYTHON)),
        base_dir=str(variables.get("tunefleet_base_dir", DEFAULT_BASE_DIR)),
        pip_args=tuple(shlex.split(str(variables.get("tunefleet_pip_args", "")))),
        variables=dict(variables),
    )


def _integer(host: str, name: str, value: Any, *, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise TunefleetError(f"host {host}: {name} must be an integer of at least {minimum}, got {value!r}",
                             "fix the variable in the inventory")
    return number


def _gpu_override(host: str, value: Any) -> tuple[int, ...] | None:
    """Read `gpus`: a count (2 means devices 0 and 1) or a list of device indexes."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        indexes = tuple(_integer(host, "gpus", item, minimum=0) for item in value)
        if len(set(indexes)) != len(indexes):
            raise TunefleetError(f"host {host}: gpus lists a device twice: {list(indexes)}",
                                 "list each GPU index once")
        return indexes
    return tuple(range(_integer(host, "gpus", value, minimum=0)))


def _known_hosts_files(common_args: str) -> tuple[Path, ...]:
    """Return the UserKnownHostsFile paths of an OpenSSH argument string, else the default."""
    words = shlex.split(common_args)
    options = []
    for index, word in enumerate(words):
        if word == "-o" and index + 1 < len(words):
            options.append(words[index + 1])
        elif word.startswith("-o") and len(word) > 2:
            options.append(word[2:])
    for option in options:
        key, _, value = option.replace("=", " ", 1).partition(" ")
        if key.strip().lower() == "userknownhostsfile" and value.strip():
            return tuple(Path(path).expanduser() for path in value.split())
    return (DEFAULT_KNOWN_HOSTS.expanduser(),)
