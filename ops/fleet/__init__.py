"""Fan-out of Optuna workers to the inventory's GPU hosts over SSH (Fabric).

Every function here acts on all given hosts in parallel and returns one HostResult per
host. A host that fails or cannot be reached never stops the others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import paramiko

from ops.fleet.connection import HostConnection, HostError, Timeouts
from ops.fleet.deploy import DeployOptions, deploy_host
from ops.fleet.fanout import HostResult, for_each_host
from ops.fleet.payload import Payload, build_payload
from ops.fleet.placement import WorkerSlot, place_workers
from ops.fleet.workers import WorkerOptions, start_host, status_host, stop_host
from ops.inventory import FleetHost

__all__ = [
    "DeployOptions", "HostError", "HostResult", "Payload", "Timeouts", "WorkerOptions", "WorkerSlot",
    "accept_new_host_keys", "build_payload", "deploy", "place_workers", "start", "status", "stop",
]

logger = logging.getLogger("tunefleet.fleet")


def accept_new_host_keys(hosts: Sequence[FleetHost], timeouts: Timeouts) -> dict[str, HostResult]:
    """Record the key of each host that no known_hosts file has yet, one host at a time.

    Returns a failed result for each host whose first contact failed, so that the
    caller skips it. Hosts with a known key are not contacted here.
    """
    failures = {}
    for host in hosts:
        if _key_is_known(host):
            continue
        try:
            with HostConnection(host, timeouts, accept_new_host_keys=True) as connection:
                connection.open()
            logger.info("recorded the host key of %s in %s", host.label, host.known_hosts_files[0])
        except HostError as error:
            failures[host.name] = HostResult(host.name, False, str(error))
    return failures


def _key_is_known(host: FleetHost) -> bool:
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    for path in host.known_hosts_files:
        if path.is_file() and paramiko.HostKeys(str(path)).lookup(name):
            return True
    return False


def _with_trust_pass(hosts: Sequence[FleetHost], timeouts: Timeouts, accept_new: bool,
                     action) -> list[HostResult]:
    failures = accept_new_host_keys(hosts, timeouts) if accept_new else {}
    reachable = [host for host in hosts if host.name not in failures]
    results = {result.host: result for result in for_each_host(reachable, action)}
    results.update(failures)
    return [results[host.name] for host in hosts]


def deploy(hosts: Sequence[FleetHost], options: DeployOptions) -> list[HostResult]:
    """Ship the payload to every host, build its virtualenv and run its preflight."""
    return _with_trust_pass(hosts, options.timeouts, options.accept_new_host_keys,
                            functools.partial(deploy_host, options=options))


def start(hosts: Sequence[FleetHost], options: WorkerOptions, timeouts: Timeouts, *,
          accept_new: bool = False) -> list[HostResult]:
    """Start the workers of `options.study` on every host."""
    return _with_trust_pass(hosts, timeouts, accept_new,
                            functools.partial(start_host, options=options, timeouts=timeouts))


def stop(hosts: Sequence[FleetHost], timeouts: Timeouts, *, stop_timeout: float,
         accept_new: bool = False) -> list[HostResult]:
    """Stop every worker on every host."""
    return _with_trust_pass(hosts, timeouts, accept_new,
                            functools.partial(stop_host, timeouts=timeouts, stop_timeout=stop_timeout))


def status(hosts: Sequence[FleetHost], timeouts: Timeouts, *, accept_new: bool = False) -> list[HostResult]:
    """Read the workers' state on every host."""
    return _with_trust_pass(hosts, timeouts, accept_new, functools.partial(status_host, timeouts=timeouts))
