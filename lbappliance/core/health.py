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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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


# ---- draining versus dead ---------------------------------------------------------------------
# A node that *says* it is going away (kube-proxy's /healthz answers 503 once the node carries the
# ToBeDeletedByClusterAutoscaler taint or is being deleted) gets no new connections, and its
# established ones go on until they end or the drain timeout; a node that stopped answering (a
# refused or timed-out check) has its sessions cut at once: they are dead anyway, and clients learn
# it now instead of at their timeout. HAProxy's own `on-marked-down shutdown-sessions` cannot tell
# the two apart, so the daemon decides from each check's status.

ServerKey = tuple[str, str]  # (backend, server)


def says_draining(check_status: str) -> bool:
    """The node answered its check, with a status other than 200 (HAProxy's L7STS)."""
    return check_status.strip().upper().startswith("L7STS")


def trackers(state: DesiredState) -> dict[ServerKey, tuple[ServerKey, ...]]:
    """(monitor, node) -> the Service servers that follow that node's check."""
    out: dict[ServerKey, list[ServerKey]] = {}
    for backend in service_backends(state):
        for server in backend.servers:
            out.setdefault((monitor_name(backend.check_port, server), server.name), []).append(
                (backend.name, server.name))
    return {key: tuple(value) for key, value in out.items()}


@dataclass(frozen=True)
class DrainState:
    """When each DOWN check was first seen draining, and which checks' sessions were cut already."""

    draining_since: Mapping[ServerKey, float] = field(default_factory=dict)
    cut: frozenset[ServerKey] = frozenset()


def sessions_to_cut(checks: Mapping[ServerKey, tuple[str, str]], follow: Mapping[ServerKey, tuple[ServerKey, ...]],
                    before: DrainState, now: float, drain_timeout: float) -> tuple[tuple[ServerKey, ...], DrainState]:
    """The servers whose sessions to shut down now, from each check's (status, check_status).

    `checks` holds the servers that check (monitors and self-checking servers); a monitor's cut
    applies to the Service servers that `follow` it. A check back UP forgets its history.
    """
    since: dict[ServerKey, float] = {}
    cut: set[ServerKey] = set()
    now_cut: list[ServerKey] = []
    for key, (status, check_status) in sorted(checks.items()):
        if status != "DOWN":
            continue
        if says_draining(check_status):
            since[key] = before.draining_since.get(key, now)
            due = now - since[key] >= drain_timeout
        else:
            due = True
        if due:
            cut.add(key)
            if key not in before.cut:
                now_cut.extend(follow.get(key, ()) if is_monitor_name(key[0]) else (key,))
    return tuple(now_cut), DrainState(since, frozenset(cut))
