"""One reconcile pass, level-triggered: read the caches, allocate, publish (leader), serve,
release, report. Returns its verdict in one line.

The order is the contract, and the unit tests of the pass hold it: the leader publishes before
anything is served; only what is published is served; a finalizer goes only after the apply that
withdrew its VIP succeeded; a Service HAProxy refuses costs only itself; a follower's pass is all
apply, so while applies are paced it just waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..core.config import ApplianceConfig
from ..core.ipam import allocate
from ..core.kube import Unreadable
from ..core.metallb import cross_namespace_keys
from ..core.models import Allocation, DesiredState, Family, Node, Pool, Problem, Reason, Service
from ..core.perf import gc_paused
from ..core.plan import Snapshot, plan
from ..core.report import REJECTED_KINDS, PassVerdict, describe_apply, recorded_state
from ..edges.cluster import Parsed
from ..edges.events import PendingEvent
from ..edges.metrics import Metrics
from .pacing import ApplyPacer
from .publish import LeaderWrites
from .record import BoxViews, record
from .serve import Applier, serve

log = logging.getLogger("lbappliance.daemon")


class ClusterReader(Protocol):
    def services(self) -> Parsed: ...
    def nodes(self) -> Parsed: ...
    def endpoints(self) -> Mapping[str, Mapping[Family, Mapping[str, int]]]: ...


class DataPlanePort(Applier, BoxViews, Protocol):
    """The data plane as a pass sees it: apply, and the views status.json reports."""


@dataclass
class Reconciler:
    """The pass and the little it remembers between passes (what runs, what HAProxy refused)."""

    cluster: ClusterReader
    data_plane: DataPlanePort
    writes: LeaderWrites
    metrics: Metrics
    identity: str
    pacer: ApplyPacer = field(default_factory=ApplyPacer)
    last_good: DesiredState | None = None
    refusals: tuple[Problem, ...] = ()  # Services HAProxy refused at the last apply
    served_once: bool = False  # the first apply succeeded (systemd READY=1)
    _unreadable: frozenset[Unreadable] = frozenset()
    _cross_namespace_noted: set[str] = field(default_factory=set)

    def run_pass(self, config: ApplianceConfig, pools: tuple[Pool, ...], leader: bool) -> PassVerdict:
        if not leader and not self.pacer.due():
            self.pacer.defer()  # a follower's pass is all apply: while applies are paced, it waits
            return PassVerdict(leader)
        start = time.perf_counter()
        try:
            with gc_paused():
                return self._pass(config, pools, leader)
        except Exception as exc:
            self.metrics.errors.inc()
            log.exception("reconcile pass failed; the data plane keeps its last good state")
            return PassVerdict(leader, failed=f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.reconciles.inc()
            self.metrics.reconcile_seconds.observe(time.perf_counter() - start)

    def _read(self, leader: bool) -> tuple[tuple[Service, ...], tuple[Node, ...]]:
        """The readable objects. One that is not is ignored — it never stops the others — and
        reported once per version: a log line and, from the leader, an Event on it naming the field."""
        services, nodes = self.cluster.services(), self.cluster.nodes()
        errors = frozenset((*services.errors, *nodes.errors))
        for error in sorted(errors - self._unreadable, key=str):
            log.warning("ignoring unreadable %s: %s", error.kind, error)
            if leader:
                self.writes.events.submit(PendingEvent(error, Reason.INVALID, f"Ignored by lbappliance: {error}",
                                                       True))
        self._unreadable = errors
        self._note_cross_namespace_sharing(services.items)
        return services.items, nodes.items

    def _note_cross_namespace_sharing(self, services: tuple[Service, ...]) -> None:
        """Once per key: a MetalLB sharing key used in several namespaces shared one address under
        MetalLB; here sharing stays within a namespace, so each namespace gets its own."""
        for key, namespaces in cross_namespace_keys(services).items():
            if key not in self._cross_namespace_noted:
                self._cross_namespace_noted.add(key)
                log.warning("MetalLB sharing key %r is used in namespaces %s: lbappliance shares addresses only "
                            "within a namespace, so each of them gets its own address", key, ", ".join(namespaces))

    def _unreadable_problems(self) -> tuple[Problem, ...]:
        def key(e: Unreadable) -> str:
            return f"{e.namespace}/{e.name}" if e.kind == "Service" else f"{e.kind.lower()}/{e.name}"

        return tuple(sorted(Problem(key(e), Reason.INVALID, e.message) for e in self._unreadable))

    def _pass(self, config: ApplianceConfig, pools: tuple[Pool, ...], leader: bool) -> PassVerdict:
        services, nodes = self._read(leader)
        allocation = allocate(pools, list(services), config.cluster.load_balancer_class)
        snapshot = Snapshot(services, nodes, pools, config, self.cluster.endpoints())
        proposed = plan(snapshot, allocation)
        wrote = 0
        if leader:
            published = self.writes.publish(proposed.served, allocation.pool_of, services)
            self.pacer.writes(published.wanted > 0)
            services, wrote = published.services, published.written
        else:
            self.pacer.writes(False)
        verdict = PassVerdict(leader, wrote=wrote)
        if self.pacer.due():
            verdict = self._serve(replace(snapshot, services=services), allocation, pools, leader, verdict)
        else:
            self.pacer.defer()  # published now; served by the paced apply (see Daemon.run)
        if leader:  # refusals are those of the last apply, so a paced pass keeps their Events
            self.writes.report((*proposed.problems, *self.refusals), services)
        return verdict

    def _serve(self, snapshot: Snapshot, allocation: Allocation, pools: tuple[Pool, ...], leader: bool,
               verdict: PassVerdict) -> PassVerdict:
        """Apply what is published, then release what was withdrawn and record what runs."""
        served = serve(snapshot, allocation, self.data_plane)
        result = served.result
        self.refusals = served.refusals
        self.pacer.applied(result.seconds)
        self.metrics.applies.labels(result.kind).inc()
        released = 0
        if result.kind in REJECTED_KINDS:
            log.error("data plane %s the new config; still serving the previous one: %s", result.kind,
                      result.message)
        else:
            self.last_good = served.state
            if leader:
                released = self.writes.release(served.state, snapshot.services,
                                               snapshot.config.cluster.load_balancer_class)
            self.served_once = True
        recorded = recorded_state(result.kind, served.state, self.last_good)
        recorded = replace(recorded, problems=(*recorded.problems, *self._unreadable_problems()))
        record(self.metrics, self.data_plane, state=recorded,
               allocation=allocation, pools=pools, identity=self.identity, leader=leader,
               apply_kind=result.kind, apply_message=result.message,
               status_path=Path(snapshot.config.paths.state_dir) / "status.json")
        change = result.change
        apply = describe_apply(result.kind, change.reasons if change else (), change.runtime_ops if change else 0)
        return replace(verdict, released=released, apply=apply, refused=tuple(p.service for p in served.refusals))

