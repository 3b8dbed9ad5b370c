"""Shared health checks: one check per node and check port, not one per Service backend.

Every Cluster-policy Service checks the same endpoint on each node (kube-proxy's /healthz on
10256). Checking it once per backend would send Services x nodes x boxes checks per interval
to the nodes (1,000 Services, 3 nodes, 2 boxes, 5 s: 1,200 requests/s). Instead each
(check port, address family) gets one check-only "monitor" backend, and every Service server
`track`s the monitor's server for its node: the check load no longer grows with Services.

HAProxy cannot `track` a server added at runtime, so a server the runtime API adds between
reloads (a new node) checks for itself until the next reload renders it as a tracker.
"""

from __future__ import annotations

from collections.abc import Iterable

from .models import FAMILY_TAG, Backend, DesiredState, Server, family_of, parse_address

MONITOR_PREFIX = "hc_"


def family_tag(address: str) -> str:
    return FAMILY_TAG[family_of(parse_address(address))]


def checked_at(server: Server) -> str:
    """The address `server`'s node is checked at (kube-proxy's health server may listen elsewhere)."""
    return server.check_address or server.address


def monitor_name(check_port: int, server: Server) -> str:
    """The monitor backend checking `server`'s node on `check_port` (per family of the checked address)."""
    return f"{MONITOR_PREFIX}{check_port}_{family_tag(checked_at(server))}"


def is_monitor_name(backend: str) -> bool:
    return backend.startswith(MONITOR_PREFIX)


def is_monitor(backend: Backend) -> bool:
    return is_monitor_name(backend.name)


def service_backends(state: DesiredState) -> list[Backend]:
    """The backends Service servers live in: behind frontends, and the UDP forwards' check-only ones."""
    return [f.backend for f in state.frontends] + [u.backend for u in state.udp]


def health_monitors(state: DesiredState) -> tuple[Backend, ...]:
    """The monitor backends `state` needs, sorted by name; their servers are the union of nodes."""
    return monitors_for(service_backends(state))


def monitors_for(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    members: dict[str, dict[str, Server]] = {}
    first: dict[str, tuple[Backend, Server]] = {}  # what names the monitor: check port, path, family
    seen: set[tuple[int, int]] = set()
    for backend in backends:
        # Backends share their server tuples (one per family and pass): visit each combination once.
        if (id(backend.servers), backend.check_port) in seen:
            continue
        seen.add((id(backend.servers), backend.check_port))
        for server in backend.servers:
            name = monitor_name(backend.check_port, server)
            checked = Server(server.name, checked_at(server))
            members.setdefault(name, {})[server.name] = checked
            first.setdefault(name, (backend, checked))
    return tuple(
        Backend(name=name, servers=tuple(sorted(members[name].values())), port=backend.check_port,
                check_port=backend.check_port, check_path=backend.check_path, proxy_protocol=None,
                affinity_timeout=None, family=family_of(parse_address(server.address)))
        for name, (backend, server) in sorted(first.items())
    )
