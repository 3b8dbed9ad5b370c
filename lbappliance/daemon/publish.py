"""The leader's writes: finalizer and status per Service, cleanup after withdrawal, and Events.

What to write is decided in the core (`core/kube.py`); the writer (`edges/cluster.Publisher`)
sends it. Writes for different Services are independent, so they go out in parallel: a burst
of new Services is bounded by API latency / WRITERS, not by their sum. Events wait until a pass
has nothing left to publish (`edges/events.DeferredEvents`), so they never delay addresses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from ..core.kube import Unreadable, must_clear_status, needs_status_write, releasable, vip_users
from ..core.models import DesiredState, Problem, Reason, Service
from ..edges.events import DeferredEvents, PendingEvent

log = logging.getLogger("lbappliance.publish")
WRITERS = 16


class Writer(Protocol):
    """The API writes the leader makes; each returns the Service as written, or None on failure."""

    def publish(self, service: Service, ips: tuple[str, ...]) -> Service | None: ...
    def set_ingress(self, service: Service, ips: tuple[str, ...]) -> Service | None: ...
    def set_finalizer(self, service: Service, present: bool) -> Service | None: ...
    def event(self, about: Service | Unreadable, reason: Reason, message: str, warning: bool = False) -> None: ...


@dataclass(frozen=True)
class Published:
    """The Services as they are after this pass's writes, and how many writes it wanted and made."""

    services: tuple[Service, ...]
    wanted: int
    written: int


class LeaderWrites:
    """Owns the writer pool, the Event queue and the memory of which problems were reported."""

    def __init__(self, writer: Writer, *, workers: int = WRITERS, events: DeferredEvents[PendingEvent] | None = None):
        self.writer = writer
        self.events = events or DeferredEvents(lambda e: writer.event(e.service, e.reason, e.message, e.warning))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="api-writer")
        self._reported: set[tuple[str, str]] = set()

    def publish(self, served: Mapping[str, tuple[str, ...]], pool_of: Mapping[str, str],
                services: Iterable[Service]) -> Published:
        """Finalizer and status for every Service whose status does not say its addresses yet."""
        current = tuple(services)
        work = [(s, served[s.key]) for s in current if s.key in served and needs_status_write(s, served[s.key])]
        if work:
            self.events.hold()
        else:
            self.events.release()
        results = list(self._pool.map(lambda item: self._publish_one(item[0], item[1], pool_of), work))
        updated = {s.key: after for (s, _), after in zip(work, results, strict=True) if after is not None}
        return Published(tuple(updated.get(s.key, s) for s in current), len(work), len(updated))

    def _publish_one(self, service: Service, vips: tuple[str, ...], pool_of: Mapping[str, str]) -> Service | None:
        after = self.writer.publish(service, vips)
        if after is None:
            return None
        if service.ingress_ips != vips:
            pools = sorted({pool_of.get(v, "?") for v in vips})
            self.events.submit(PendingEvent(after, Reason.ALLOCATED,
                                            f"Assigned {', '.join(vips)} from pool {', '.join(pools)}"))
        # The write's answer carries the new resourceVersion; what the pass plans with is the
        # Service it read, with the finalizer and addresses now written.
        return replace(service, ingress_ips=vips, finalizers=after.finalizers, ingress_modes=after.ingress_modes,
                       resource_version=after.resource_version)

    def report(self, problems: Iterable[Problem], services: Iterable[Service]) -> int:
        """One log line and one Event per distinct problem; repeated passes do not spam the Service.
        Returns how many were new."""
        by_key = {s.key: s for s in services}
        current = {(p.service, p.message): p for p in problems}
        new = [p for key, p in sorted(current.items()) if key not in self._reported]
        for problem in new:
            log.warning("Service %s: %s: %s", problem.service, problem.reason.value, problem.message)
            if problem.service in by_key:
                self.events.submit(PendingEvent(by_key[problem.service], problem.reason, problem.message, True))
        self._reported = set(current)
        return len(new)

    def release(self, state: DesiredState, services: Iterable[Service], load_balancer_class: str | None) -> int:
        """After the VIP is withdrawn (`state` is what now runs): clear the status of a Service that
        stays, then drop the finalizer. Returns how many Services were released."""
        users = vip_users(state)
        released = 0
        for service in services:
            if not releasable(service, load_balancer_class, users):
                continue
            current: Service | None = service
            if must_clear_status(service, load_balancer_class):
                current = self.writer.set_ingress(service, ())
            done = None if current is None else self.writer.set_finalizer(current, present=False)
            if done is not None:
                released += 1
                self.events.submit(PendingEvent(done, Reason.RELEASED,
                                                f"Released {', '.join(service.ingress_ips) or 'no address'}"))
        return released

    def close(self, timeout: float = 1.0) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.events.close(timeout=timeout)
