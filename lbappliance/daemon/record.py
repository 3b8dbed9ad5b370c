"""After an apply: metrics and status.json (what `lbappliance status` reads) say what runs."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from ..core.models import Allocation, DesiredState, Pool, Reason
from ..core.report import BoxFacts, status_document
from ..edges.files import atomic_write
from ..edges.haproxy import HaproxyError
from ..edges.metrics import Metrics

log = logging.getLogger("lbappliance.record")


class BoxViews(Protocol):
    """What the data plane can tell about this box; any of it may fail while HAProxy restarts."""

    def vrrp_states(self) -> dict[str, str]: ...
    def server_health(self) -> dict[tuple[str, str], str]: ...
    def old_workers(self) -> list[tuple[int, int]]: ...


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Compact JSON: written after every apply, a 1,000-Service document indented costs 4x the CPU
    (`lbappliance status -o json` prints it readably)."""
    try:
        atomic_write(path, json.dumps(document, separators=(",", ":")) + "\n")
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)


def record(metrics: Metrics, views: BoxViews, *, state: DesiredState, allocation: Allocation,
           pools: tuple[Pool, ...], identity: str, leader: bool, apply_kind: str, apply_message: str,
           status_path: Path) -> None:
    metrics.record_pools(pools, allocation)
    for reason in Reason:
        metrics.problems.labels(reason.value).set(sum(1 for p in state.problems if p.reason == reason))
    vrrp = views.vrrp_states()
    metrics.record_vrrp(vrrp)
    bgp = getattr(views, "bgp", None)  # announce.mode bgp: the DataPlane's BgpControl
    if bgp is not None:
        metrics.record_bgp(bgp.last_status)
    health: dict[tuple[str, str], str] = {}
    with contextlib.suppress(OSError, HaproxyError):  # HAProxy may be down; recording must not fail a pass
        metrics.old_workers.set(len(views.old_workers()))
        health = views.server_health()
    facts = BoxFacts(identity, leader, vrrp, health, apply_kind, apply_message, time.time())
    write_status(status_path, status_document(state, facts))
