"""Classify the difference between two desired states: no-op, runtime-API only, or reload.

Pure. A reload is seamless but not free (a new worker, old workers lingering on long
connections), so everything the HAProxy runtime API can change live — which servers a
backend has and where they point — is expressed as runtime operations instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .health import health_monitors, service_backends
from .models import Backend, DesiredState, Frontend, UdpForward
from .render import server_options, server_target

ChangeKind = Literal["noop", "runtime", "reload"]


@dataclass(frozen=True)
class ServerAdd:
    """`add server <backend>/<name> <target> <options>` then enable it."""

    backend: str
    name: str
    target: str
    options: str


@dataclass(frozen=True)
class ServerRemove:
    """Drain, put in maintenance, then `del server` once it has no connections."""

    backend: str
    name: str


@dataclass(frozen=True)
class ServerReaddress:
    """`set server <backend>/<name> addr <address> port <port>`: a node changed its address."""

    backend: str
    name: str
    address: str
    port: int


@dataclass(frozen=True)
class ServerReweight:
    """`set server <backend>/<name> weight <weight>`: a `Local` Service's endpoints moved."""

    backend: str
    name: str
    weight: int


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    adds: tuple[ServerAdd, ...] = ()
    removes: tuple[ServerRemove, ...] = ()
    readdresses: tuple[ServerReaddress, ...] = ()
    reweights: tuple[ServerReweight, ...] = ()
    keepalived_changed: bool = False
    reasons: tuple[str, ...] = ()

    @property
    def runtime_ops(self) -> int:
        return len(self.adds) + len(self.removes) + len(self.readdresses) + len(self.reweights)


def _skeleton(frontend: Frontend) -> Frontend:
    """The frontend with its server list blanked: what only a reload can change."""
    return replace(frontend, backend=replace(frontend.backend, servers=()))


def _backends(state: DesiredState) -> dict[str, Backend]:
    """Every HAProxy backend: behind frontends, the UDP forwards' check-only ones, and the monitors."""
    return {b.name: b for b in (*service_backends(state), *health_monitors(state))}


def _udp_skeleton(forward: UdpForward) -> UdpForward:
    return replace(forward, backend=replace(forward.backend, servers=()))


def structural_differences(old: DesiredState, new: DesiredState) -> tuple[str, ...]:
    """Why a reload is needed (empty when only server membership/addresses differ)."""
    old_fe = {f.name: _skeleton(f) for f in old.frontends}
    new_fe = {f.name: _skeleton(f) for f in new.frontends}
    reasons = [f"frontend {n} added" for n in sorted(new_fe.keys() - old_fe.keys())]
    reasons += [f"frontend {n} removed" for n in sorted(old_fe.keys() - new_fe.keys())]
    reasons += [f"frontend {n} changed" for n in sorted(old_fe.keys() & new_fe.keys()) if old_fe[n] != new_fe[n]]
    if [f.name for f in old.frontends] != [f.name for f in new.frontends] and not reasons:
        reasons.append("frontend order changed")
    # A UDP forward's check backend is in haproxy.cfg; its VIP, port and ranges only reach nftables,
    # but a changed forward is rare and the backend follows it, so any change but servers reloads.
    old_udp = {u.name: _udp_skeleton(u) for u in old.udp}
    new_udp = {u.name: _udp_skeleton(u) for u in new.udp}
    reasons += [f"udp forward {n} added" for n in sorted(new_udp.keys() - old_udp.keys())]
    reasons += [f"udp forward {n} removed" for n in sorted(old_udp.keys() - new_udp.keys())]
    reasons += [f"udp forward {n} changed" for n in sorted(old_udp.keys() & new_udp.keys())
                if old_udp[n] != new_udp[n]]
    if [u.name for u in old.udp] != [u.name for u in new.udp] and not reasons:
        reasons.append("udp forward order changed")
    # A monitor appears with the first backend on a new check port or address family, and goes
    # with the last; its servers follow the nodes at runtime like any backend's.
    old_hc = {m.name for m in health_monitors(old)}
    new_hc = {m.name for m in health_monitors(new)}
    reasons += [f"health monitor {n} added" for n in sorted(new_hc - old_hc)]
    reasons += [f"health monitor {n} removed" for n in sorted(old_hc - new_hc)]
    # Where a server is checked (`addr`) is set when it is created: a change takes a reload.
    before, after = _check_addresses(old), _check_addresses(new)
    moved = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    reasons += [f"health-check address of {b}/{s} changed" for b, s in moved]
    return tuple(reasons)


def _check_addresses(state: DesiredState) -> dict[tuple[str, str], str | None]:
    return {(b.name, s.name): s.check_address for b in _backends(state).values() for s in b.servers}


def _server_diff(old: Backend, new: Backend) -> tuple[list[ServerAdd], list[ServerRemove], list[ServerReaddress],
                                                      list[ServerReweight]]:
    before = {s.name: s for s in old.servers}
    after = {s.name: s for s in new.servers}
    adds = [ServerAdd(new.name, n, server_target(after[n], new.port), server_options(new, after[n]))
            for n in sorted(after.keys() - before.keys())]
    removes = [ServerRemove(new.name, n) for n in sorted(before.keys() - after.keys())]
    moves = [ServerReaddress(new.name, n, after[n].address, new.port)
             for n in sorted(before.keys() & after.keys()) if before[n].address != after[n].address]
    weights = [ServerReweight(new.name, n, after[n].weight or 1)
               for n in sorted(before.keys() & after.keys()) if before[n].weight != after[n].weight]
    return adds, removes, moves, weights


def runtime_changes(old: DesiredState, new: DesiredState) -> Change:
    """Server-level operations turning `old` into `new`; only valid when there is no structural change."""
    adds: list[ServerAdd] = []
    removes: list[ServerRemove] = []
    moves: list[ServerReaddress] = []
    weights: list[ServerReweight] = []
    old_be = _backends(old)
    for name, backend in sorted(_backends(new).items()):
        a, r, m, w = _server_diff(old_be[name], backend)
        adds += a
        removes += r
        moves += m
        weights += w
    kind: ChangeKind = "runtime" if adds or removes or moves or weights else "noop"
    return Change(kind, tuple(adds), tuple(removes), tuple(moves), tuple(weights))


def classify(old: DesiredState | None, new: DesiredState) -> Change:
    """What applying `new` over `old` takes; `old=None` (nothing known to be running) means reload."""
    keepalived_changed = old is None or old.vrrp != new.vrrp
    if old is None:
        return Change("reload", keepalived_changed=True, reasons=("no previous state",))
    reasons = structural_differences(old, new)
    if reasons:
        return Change("reload", keepalived_changed=keepalived_changed, reasons=reasons)
    change = runtime_changes(old, new)
    return replace(change, keepalived_changed=keepalived_changed)
