"""What the appliance says about itself: status.json's document, HAProxy refusals as Event text,
and the one-line verdict of a pass. Pure: the daemon gathers the facts, these shape them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .models import DesiredState, vip_owner_states

REJECTED_KINDS = ("rejected", "failed")


def refusal_message(rejection: str) -> str:
    """HAProxy's complaints about one Service, the same on every pass (no pids, no line numbers,
    which move as other Services come and go), so its Event is sent once."""
    alerts = [line for line in rejection.splitlines() if "ALERT" in line] or rejection.splitlines()[:1]
    text = " | ".join(re.sub(r"\s+", " ", re.sub(r"\(\d+\)", "", line)).strip() for line in alerts)
    text = re.sub(r"\[([^\]\s]*?):\d+\]", r"[\1]", text)
    return f"HAProxy refuses this Service's config (the others are served): {text}"[:1000]


def recorded_state(kind: str, applied: DesiredState, last_good: DesiredState | None) -> DesiredState:
    """What status.json and the metrics report after an apply of `applied` ended as `kind`.

    A rejected or failed apply leaves the previous config serving: report that one, with this
    pass's problems, so `lbappliance status` never shows a refused change as served.
    """
    if kind not in REJECTED_KINDS:
        return applied
    served = last_good or DesiredState(frontends=(), vrrp=(), served={})
    return replace(served, problems=applied.problems)


@dataclass(frozen=True)
class BoxFacts:
    """What the edges report about this box at the end of a pass."""

    identity: str
    leader: bool
    vrrp: Mapping[str, str]  # instance -> MASTER/BACKUP/...
    health: Mapping[tuple[str, str], str]  # (backend, server) -> UP/DOWN/...
    apply_kind: str
    apply_message: str
    now: float


def status_document(state: DesiredState, facts: BoxFacts) -> dict[str, Any]:
    """status.json: per Service its VIPs, ports, which box owns each VIP and each backend's health."""
    owners = vip_owner_states(state, facts.vrrp)
    services: dict[str, dict[str, Any]] = {}
    listeners = [(f.service, f.port, f.protocol, f.backend) for f in state.frontends]
    listeners += [(u.service, u.port, "UDP", u.backend) for u in state.udp]
    for service, port, protocol, backend in listeners:
        vips = list(state.served.get(service, ()))
        entry = services.setdefault(service, {"service": service, "vips": vips, "ports": [], "backends": {},
                                              "owner": {v: owners.get(v, "UNKNOWN") for v in vips}})
        if f"{port}/{protocol}" not in entry["ports"]:
            entry["ports"].append(f"{port}/{protocol}")
        for server in backend.servers:
            target = f"{server.address}:{backend.port}"
            entry["backends"][target] = facts.health.get((backend.name, server.name), "unknown")
    return {
        "identity": facts.identity,
        "leader": facts.leader,
        "vrrp": dict(facts.vrrp),
        "updated": facts.now,
        "services": sorted(services.values(), key=lambda e: e["service"]),
        "problems": [{"service": p.service, "reason": p.reason.value, "message": p.message} for p in state.problems],
        # The last apply: "rejected"/"failed" mean the change above it was refused and the
        # services listed are what still runs.
        "lastApply": {"kind": facts.apply_kind, "message": facts.apply_message},
    }


@dataclass(frozen=True)
class PassVerdict:
    """One pass in a line, logged once and asserted by the unit tests of the pass.

    `apply` is None when the pass published but left serving to the paced apply.
    """

    leader: bool
    wrote: int = 0
    released: int = 0
    apply: str | None = None
    refused: tuple[str, ...] = ()
    failed: str | None = None  # the exception that ended the pass early

    def __str__(self) -> str:
        parts = ["leader" if self.leader else "follower"]
        if self.wrote:
            parts.append(f"wrote {self.wrote}")
        if self.released:
            parts.append(f"released {self.released}")
        parts.append(self.apply if self.apply is not None else "apply paced")
        if self.refused:
            parts.append(f"refused {', '.join(self.refused)}")
        if self.failed:
            parts.append(f"failed: {self.failed}")
        return "; ".join(parts)


def describe_apply(kind: str, reasons: tuple[str, ...], runtime_ops: int) -> str:
    """'reload: frontend fe_x added', 'runtime: 3 ops', 'noop', 'rejected'."""
    if kind == "runtime":
        return f"runtime: {runtime_ops} ops"
    if kind == "reload" and reasons:
        shown = ", ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        return f"reload: {shown}"
    return kind
