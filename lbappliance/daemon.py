"""`lbappliance run`: one level-triggered reconcile loop around the pure core.

Signal handlers and watchers only set flags; the loop does all the work. Every pass
recomputes the whole desired state from the caches and applies the difference, so nothing
depends on having seen a particular event.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .core.config import ApplianceConfig, ConfigError, load_pools, parse_config
from .core.ipam import allocate
from .core.kube import ParsedObjects, is_handled, needs_cleanup
from .core.models import (
    FINALIZER,
    Allocation,
    DesiredState,
    Pool,
    Problem,
    Reason,
    Service,
    vip_owner_states,
)
from .core.perf import gc_paused
from .core.plan import Snapshot, plan
from .edges import systemd
from .edges.apply import ApplyResult, DataPlane
from .edges.cluster import Cluster, LeaderElector, api_client_from_kubeconfig
from .edges.events import DeferredEvents
from .edges.files import atomic_write, read_text
from .edges.haproxy import HaproxyError
from .edges.metrics import Metrics

log = logging.getLogger("lbappliance.daemon")
EXIT_CONFIG = 78
WRITERS = 16
RESYNC = 5.0  # seconds between full passes when nothing changed
MAX_DEBOUNCE = 2.0  # seconds a pass may wait for a burst of events to settle
# An apply (validate + reload at thousands of Services: most of a box's CPU) may start only
# APPLY_PACING x the part of the last apply's duration beyond FREE_APPLY after it ended, at
# most MAX_APPLY_GAP seconds: a burst then costs a few reloads, while a change to a small or
# quiet cluster (applies well under FREE_APPLY) is served at once.
APPLY_PACING = 3.0
FREE_APPLY = 0.2
MAX_APPLY_GAP = 5.0
MAX_REFUSAL_ROUNDS = 3  # applies left to find every Service HAProxy refuses, before keeping the last good config


def apply_gap(apply_seconds: float) -> float:
    """Seconds the next apply waits after one that took `apply_seconds` (see APPLY_PACING)."""
    return min(MAX_APPLY_GAP, APPLY_PACING * max(0.0, apply_seconds - FREE_APPLY))


def apply_at(paced_until: float, writing_since: float | None) -> float:
    """When the next apply may run: after the pacing gap and, while the leader is still writing
    new addresses, at most every MAX_APPLY_GAP.

    An apply (validate + reload, ~1 s at 1,000 Services) in the middle of a burst delays the next
    addresses by as long; the pass after the writes, which our own writes trigger, serves them
    all at once.
    """
    return max(paced_until, writing_since + MAX_APPLY_GAP if writing_since is not None else 0.0)


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
    if kind not in ("rejected", "failed"):
        return applied
    served = last_good or DesiredState(frontends=(), vrrp=(), served={})
    return replace(served, problems=applied.problems)


class StartupError(Exception):
    """Invalid configuration at start: exit 78 so systemd does not restart-loop."""


@dataclass
class Flags:
    """What signal handlers and watchers ask of the loop."""

    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload_config: bool = False
    reload_pools: bool = False

    def poke(self) -> None:
        self.wake.set()


def read_config(path: Path) -> ApplianceConfig:
    if not path.exists():
        return parse_config("", str(path))
    return parse_config(read_text(path), str(path))


def read_pools(config: ApplianceConfig) -> tuple[Pool, ...]:
    path = Path(config.paths.pools)
    if not path.exists():
        raise ConfigError([])  # handled by the caller with a clear message
    return load_pools(read_text(path), str(path), config.own_addresses())


def orphaned_addresses(old: tuple[Pool, ...], new: tuple[Pool, ...], services: list[Service]) -> list[str]:
    """Addresses in use that an edit would drop from every pool: the edit is refused instead."""
    out = []
    for service in services:
        for text in service.ingress_ips:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if any(p.contains(address) for p in old) and not any(p.contains(address) for p in new):
                out.append(f"{text} ({service.key})")
    return sorted(out)


class Daemon:
    def __init__(self, config_path: Path, identity: str | None = None, netns: str | None = None,
                 debounce: float = 0.05) -> None:
        self.config_path = config_path
        try:
            self.config = read_config(config_path)
        except (ConfigError, OSError) as exc:
            raise StartupError(str(exc)) from None
        try:
            self.pools = read_pools(self.config)
        except (ConfigError, OSError) as exc:
            raise StartupError(str(exc) or f"{self.config.paths.pools}: file not found") from None
        self.identity = identity or self.config.name or socket.gethostname()
        self.debounce = debounce
        self.flags = Flags()
        self.metrics = Metrics()
        self.dataplane = DataPlane(self.config, ["ip", "netns", "exec", netns] if netns else None)
        api = api_client_from_kubeconfig(self.config.cluster.kubeconfig)
        self.cluster = Cluster(api, self.flags.poke, self.identity)
        le = self.config.leader_election
        self.elector = LeaderElector(api, le.namespace, le.lease_name, self.identity, le.lease_duration,
                                     le.renew_deadline)
        self.emitted: dict[tuple[str, str], str] = {}
        self.parsed_services, self.parsed_nodes = ParsedObjects("Service"), ParsedObjects("Node")
        # Parallel API writes (status, finalizers) off the loop's path; Events, best effort, wait
        # until a pass has nothing left to publish, so a burst's 1,000 Events never delay its addresses.
        self.writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="api-writer")
        self.events = DeferredEvents(self.cluster.publisher.event)
        self.metrics.api_requests.set_function(lambda: self.cluster.requests)  # Events land between passes
        self.metrics.events_pending.set_function(self.events.pending)
        self.metrics.events_dropped.set_function(lambda: self.events.dropped)
        self.last_state: DesiredState | None = None
        self.ready = False
        self.next_apply_at = 0.0  # monotonic; see APPLY_PACING
        self.apply_deferred = False
        self.writing_since: float | None = None  # monotonic; see _apply_at
        self.refusals: tuple[Problem, ...] = ()  # Services HAProxy refused at the last apply
        self._observer: Any = None

    # ---- wiring ---------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_term(signum: int, _frame: Any) -> None:
            self.flags.stop = True
            self.flags.poke()

        def on_hup(signum: int, _frame: Any) -> None:
            self.flags.reload_config = True
            self.flags.poke()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def watch_pools_file(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        target = Path(self.config.paths.pools).resolve()
        flags = self.flags

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
                if str(target) in paths:
                    flags.reload_pools = True
                    flags.poke()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(target.parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _elect_forever(self) -> None:
        period = self.config.leader_election.retry_period
        while not self.flags.stop:
            was = self.elector.is_leader
            now = self.elector.try_acquire_or_renew()
            self.metrics.leader.set(1 if now else 0)
            if now != was:
                self.flags.poke()
            time.sleep(period * (0.5 if now else 1.0))

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self.metrics.serve(self.config.metrics_address)
        self.watch_pools_file()
        self.cluster.start()
        threading.Thread(target=self._elect_forever, name="leader-election", daemon=True).start()
        if not self.cluster.wait_synced(timeout=60):
            log.warning("caches not synced after 60s; serving what is known (API unreachable?)")
        self.dataplane.start()
        watchdog = systemd.watchdog_interval()
        last_full = 0.0
        while not self.flags.stop:
            # Between passes, follow health checks (UDP maps) at the check interval; a full pass
            # on every change and at least every RESYNC seconds (level-triggered).
            period = min(self.config.health_check.interval_ms / 1000, watchdog or RESYNC)
            if self.apply_deferred:
                period = min(period, max(0.0, self._apply_at() - time.monotonic()))
            woke = self.flags.wake.wait(timeout=period)
            self.flags.wake.clear()
            if woke:
                self._debounce()
            if self.flags.stop:
                break
            self._handle_reloads()
            due = self.apply_deferred and self._apply_due()
            if woke or due or time.monotonic() - last_full >= RESYNC:
                # A follower's pass is all apply: while applies are paced, it just waits.
                if self.elector.is_leader or self._apply_due():
                    self.reconcile_once()
                    last_full = time.monotonic()
                else:
                    self.apply_deferred = True
            else:
                self.dataplane.sync_health()
            systemd.notify("WATCHDOG=1")
        systemd.notify("STOPPING=1")
        log.info("stopping: releasing leadership; the data plane keeps serving until the peer takes over")
        self.elector.release()
        self.cluster.stop()
        self.writers.shutdown(wait=True, cancel_futures=True)
        self.events.close(timeout=1.0)
        self.dataplane.stop()
        if self._observer is not None:
            self._observer.stop()
        return 0

    def _apply_at(self) -> float:
        return apply_at(self.next_apply_at, self.writing_since)

    def _apply_due(self) -> bool:
        return time.monotonic() >= self._apply_at()

    def _debounce(self) -> None:
        """Let a burst of events settle, but never delay a pass by more than MAX_DEBOUNCE.

        A lone change waits only `debounce`; during a burst (a thousand Services at once) each
        pass then takes in many changes, so both boxes validate and reload far less often and
        leave the CPU to the API server."""
        deadline = time.monotonic() + MAX_DEBOUNCE
        while time.monotonic() < deadline and self.flags.wake.wait(self.debounce):
            self.flags.wake.clear()

    def _handle_reloads(self) -> None:
        if self.flags.reload_config:
            self.flags.reload_config = False
            systemd.notify("RELOADING=1")
            self._reload_config()
            systemd.notify("READY=1")
        if self.flags.reload_pools:
            self.flags.reload_pools = False
            self._reload_pools(self.config)

    def _reload_config(self) -> None:
        try:
            config = read_config(self.config_path)
        except (ConfigError, OSError) as exc:
            log.error("config reload refused, keeping the running config:\n%s", exc)
            self.metrics.config_stale.labels("config").set(1)
            return
        if not self._reload_pools(config):
            return
        self.config = config
        self.dataplane.config = config
        self.metrics.config_stale.labels("config").set(0)
        log.info("config reloaded from %s", self.config_path)

    def _reload_pools(self, config: ApplianceConfig) -> bool:
        path = config.paths.pools
        try:
            pools = read_pools(config)
        except (ConfigError, OSError) as exc:
            log.error("pools reload refused, keeping the last good pools:\n%s", str(exc) or f"{path}: missing")
            self.metrics.config_stale.labels("pools").set(1)
            return False
        services, _ = self._services()
        orphans = orphaned_addresses(self.pools, pools, services)
        if orphans:
            log.error("pools reload refused: %s would drop addresses in use: %s; release them first "
                      "(delete the Services or move them with lbappliance.io/load-balancer-ips)",
                      path, ", ".join(orphans))
            self.metrics.config_stale.labels("pools").set(1)
            return False
        if pools != self.pools:
            log.info("pools reloaded from %s (%d pools)", path, len(pools))
        self.pools = pools
        self.metrics.config_stale.labels("pools").set(0)
        return True

    def _services(self) -> tuple[list[Service], dict[str, dict[str, Any]]]:
        objects = self.cluster.services.items()
        services, errors = self.parsed_services.parse(objects)
        for error in errors:
            log.warning("ignoring unreadable object: %s", error)
        by_key = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects}
        return services, by_key  # type: ignore[return-value]

    def reconcile_once(self) -> DesiredState | None:
        start = time.perf_counter()
        try:
            with gc_paused():
                state = self._pass()
        except Exception:
            self.metrics.errors.inc()
            log.exception("reconcile pass failed; the data plane keeps its last good state")
            return None
        finally:
            self.metrics.reconciles.inc()
            self.metrics.reconcile_seconds.observe(time.perf_counter() - start)
        return state

    def _pass(self) -> DesiredState:
        services, objects = self._services()
        nodes, node_errors = self.parsed_nodes.parse(self.cluster.nodes.items())
        for error in node_errors:
            log.warning("ignoring unreadable object: %s", error)
        cls = self.config.cluster.load_balancer_class
        snapshot = Snapshot(tuple(services), tuple(nodes), self.pools, self.config)  # type: ignore[arg-type]
        allocation = allocate(self.pools, services, cls)
        proposed = plan(snapshot, allocation)
        leader = self.elector.is_leader
        if leader:
            services = self._publish(proposed, allocation, services, objects)
        else:
            self.writing_since = None
        if self._apply_due():
            state = self._serve(replace(snapshot, services=tuple(services)), allocation, leader, objects)
        else:
            self.apply_deferred = True  # published now; served by the paced apply (see run)
            state = proposed  # what is served is planned only when it is applied
        if leader:  # refusals are those of the last apply, so a paced pass keeps their Events
            self._emit_problems((*proposed.problems, *self.refusals), objects)
        return state

    def _serve(self, snapshot: Snapshot, allocation: Allocation, leader: bool,
               objects: dict[str, dict[str, Any]]) -> DesiredState:
        """Apply what is published, then clean up what was withdrawn and record what runs."""
        self.writing_since = None
        self.apply_deferred = False
        served = self._published_only(allocation, snapshot.services)
        state, result, self.refusals = self._apply_isolating(snapshot, served)
        self.next_apply_at = time.monotonic() + apply_gap(result.seconds)
        self.metrics.applies.labels(result.kind).inc()
        if result.kind in ("rejected", "failed"):
            log.error("data plane %s the new config; still serving the previous one: %s", result.kind,
                      result.message)
        else:
            self.last_state = state
            if leader:
                self._cleanup(state, snapshot.services, objects)
            if not self.ready:
                self.ready = True
                systemd.notify("READY=1")
        self._record(recorded_state(result.kind, state, self.last_state), allocation, leader, result)
        return state

    def _apply_isolating(self, snapshot: Snapshot,
                         served: Allocation) -> tuple[DesiredState, ApplyResult, tuple[Problem, ...]]:
        """Apply; when HAProxy refuses the config of some Services only, serve the others without them.

        Every apply tries them again (level-triggered), so a Service whose cause goes away comes
        back on its own; each refused one gets an InvalidConfiguration problem, hence an Event.
        Returns the state applied (with those problems), the last apply's result and the problems.
        """
        refused: dict[str, str] = {}
        state = plan(snapshot, served)
        result = self.dataplane.apply(state)
        for _ in range(MAX_REFUSAL_ROUNDS):
            if result.kind != "rejected" or not result.refused_services:
                break
            for key in sorted(result.refused_services - set(refused)):
                log.error("Service %s: HAProxy refuses its config; serving the other Services without it", key)
                refused[key] = refusal_message(result.message)
            kept = {k: v for k, v in served.assignments.items() if k not in refused}
            state = plan(snapshot, replace(served, assignments=kept))
            result = self.dataplane.apply(state)
        refusals = tuple(Problem(key, Reason.INVALID, message) for key, message in sorted(refused.items()))
        return replace(state, problems=tuple(sorted({*state.problems, *refusals}))), result, refusals

    def _published_only(self, allocation: Allocation, services: Iterable[Service]) -> Allocation:
        """Serve only addresses already written to status, of Services carrying our finalizer:
        both boxes then serve the same thing, and no served address can be deleted unnoticed."""
        status = {s.key: s.ingress_ips for s in services if FINALIZER in s.finalizers}
        kept = {k: v for k, v in allocation.assignments.items() if set(v) <= set(status.get(k, ()))}
        return replace(allocation, assignments=kept)

    def _publish(self, proposed: DesiredState, allocation: Allocation, services: list[Service],
                 objects: dict[str, dict[str, Any]]) -> list[Service]:
        """Finalizer first, then status; returns the Services as they are after our writes.

        Writes for different Services are independent, so they go out in parallel: a burst of
        new Services is bounded by API latency / WRITERS, not by their sum.
        """
        by_key = {s.key: s for s in services}
        work = [(key, vips, objects[key]) for key, vips in proposed.served.items()
                if key in objects and _needs_write(objects[key], vips)]
        if work:
            self.events.hold()
            self.writing_since = self.writing_since or time.monotonic()
        else:
            self.events.release()
            self.writing_since = None
        results = list(self.writers.map(lambda item: self._publish_one(*item, allocation), work))
        updated = {key: replace(by_key[key], ingress_ips=vips, finalizers=finalizers)
                   for (key, vips, _), finalizers in zip(work, results, strict=True) if finalizers is not None}
        return [updated.get(s.key, s) for s in services]

    def _publish_one(self, key: str, vips: tuple[str, ...], obj: dict[str, Any],
                     allocation: Allocation) -> tuple[str, ...] | None:
        publisher = self.cluster.publisher
        after = publisher.publish(obj, vips)
        if after is None:
            return None
        self.cluster.services.update_local(after)
        if _ingress_of(obj) != vips:
            pools = sorted({allocation.pool_of.get(v, "?") for v in vips})
            self.events.submit(after, Reason.ALLOCATED,
                               f"Assigned {', '.join(vips)} from pool {', '.join(pools)}")
        return tuple(after["metadata"].get("finalizers") or ())

    def _emit_problems(self, problems: Iterable[Problem], objects: dict[str, dict[str, Any]]) -> None:
        """One Event per distinct problem; repeated passes do not spam the Service."""
        current = {}
        for problem in problems:
            current[(problem.service, problem.message)] = problem.reason.value
            if (problem.service, problem.message) in self.emitted:
                continue
            log.warning("Service %s: %s: %s", problem.service, problem.reason.value, problem.message)
            obj = objects.get(problem.service)
            if obj is not None:
                self.events.submit(obj, problem.reason, problem.message, True)
        self.emitted = current

    def _cleanup(self, state: DesiredState, services: Iterable[Service],
                 objects: dict[str, dict[str, Any]]) -> None:
        """After the VIP is withdrawn: clear status and drop the finalizer."""
        cls = self.config.cluster.load_balancer_class
        served_vips = set(state.vips)
        publisher = self.cluster.publisher
        for service in services:
            if not needs_cleanup(service, cls):
                continue
            if any(ip in served_vips for ip in service.ingress_ips if not self._shared_with_others(ip, service, state)):
                continue
            obj = objects.get(service.key)
            if obj is None:
                continue
            if service.ingress_ips and not service.deleting and not is_handled(service, cls):
                cleared = publisher.set_ingress(obj, ())
                if cleared is None:
                    continue
                obj = cleared
            done = publisher.set_finalizer(obj, present=False)
            if done is not None:
                self.cluster.services.update_local(done)
                self.events.submit(done, Reason.RELEASED,
                                   f"Released {', '.join(service.ingress_ips) or 'no address'}")

    @staticmethod
    def _shared_with_others(ip: str, service: Service, state: DesiredState) -> bool:
        users = [(f.vip, f.service) for f in state.frontends] + [(u.vip, u.service) for u in state.udp]
        return any(vip == ip and key != service.key for vip, key in users)

    def _record(self, state: DesiredState, allocation: Allocation, leader: bool, result: ApplyResult) -> None:
        self.metrics.record_pools(self.pools, allocation)
        for reason in Reason:
            self.metrics.problems.labels(reason.value).set(sum(1 for p in state.problems if p.reason == reason))
        vrrp = self.dataplane.vrrp_states()
        self.metrics.record_vrrp(vrrp)
        with contextlib.suppress(OSError, HaproxyError):  # HAProxy may be down; metrics must not fail a pass
            self.metrics.old_workers.set(len(self.dataplane.old_workers()))
        write_status(Path(self.config.paths.state_dir) / "status.json",
                     status_document(state, leader, vrrp, self.identity, self.dataplane, result))


def _ingress_of(obj: dict[str, Any]) -> tuple[str, ...]:
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return tuple(i.get("ip") for i in ingress)


def _needs_write(obj: dict[str, Any], vips: tuple[str, ...]) -> bool:
    meta = obj.get("metadata") or {}
    modes = {i.get("ipMode") for i in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []}
    return FINALIZER not in (meta.get("finalizers") or []) or _ingress_of(obj) != vips or modes - {"Proxy"} != set()


def status_document(state: DesiredState, leader: bool, vrrp: dict[str, str], identity: str,
                    dataplane: DataPlane, result: ApplyResult) -> dict[str, Any]:
    try:
        health = dataplane.server_health()
    except (OSError, HaproxyError):
        health = {}
    owners = vip_owner_states(state, vrrp)
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
            entry["backends"][target] = health.get((backend.name, server.name), "unknown")
    return {
        "identity": identity,
        "leader": leader,
        "vrrp": vrrp,
        "updated": time.time(),
        "services": sorted(services.values(), key=lambda e: e["service"]),
        "problems": [{"service": p.service, "reason": p.reason.value, "message": p.message} for p in state.problems],
        # The last apply: "rejected"/"failed" mean the change above it was refused and the
        # services listed are what still runs.
        "lastApply": {"kind": result.kind, "message": result.message},
    }


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Compact JSON: written after every apply, a 1,000-Service document indented costs 4x the CPU
    (`lbappliance status -o json` prints it readably)."""
    try:
        atomic_write(path, json.dumps(document, separators=(",", ":")) + "\n")
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)


def main(config_path: Path, identity: str | None = None, netns: str | None = None) -> int:
    try:
        daemon = Daemon(config_path, identity, netns)
    except StartupError as exc:
        log.error("invalid configuration, not starting:\n%s", exc)
        return EXIT_CONFIG
    daemon.install_signal_handlers()
    log.info("lbappliance %s starting (pid %d)", daemon.identity, os.getpid())
    return daemon.run()
