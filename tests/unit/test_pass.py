"""The reconcile pass's decisions, with the cluster and the data plane faked (pure logic only;
the e2e tier proves the same against a real kube-apiserver and real HAProxy).

Each fake appends to one shared journal, so the tests assert the order of what the pass did:
publish before serve, serve only what is published, release only after the withdrawing apply
succeeded, a refused Service costs only itself, a paced follower does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from lbappliance.core.changes import Change
from lbappliance.core.config import load_pools, parse_config
from lbappliance.core.models import FINALIZER, DesiredState, Node, Reason, Service, ServicePort
from lbappliance.daemon.pacing import ApplyPacer
from lbappliance.daemon.publish import LeaderWrites
from lbappliance.daemon.reconcile import Reconciler
from lbappliance.edges.apply import ApplyResult
from lbappliance.edges.cluster import Parsed
from lbappliance.edges.events import DeferredEvents, PendingEvent
from lbappliance.edges.metrics import Metrics

POOLS = load_pools("apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n- name: default\n  addresses: [192.0.2.240-192.0.2.250]\n")
NODES = (Node("node1", (("InternalIP", "198.51.100.11"),)), Node("node2", (("InternalIP", "198.51.100.12"),)))


def lb(name: str, *, port: int = 80, node_port: int = 30080, **fields: object) -> Service:
    return replace(Service("default", name, uid=f"uid-{name}", creation=f"2026-01-01T00:00:{port % 60:02d}Z",
                           ports=(ServicePort("p", "TCP", port, node_port),), resource_version="1"), **fields)


def served(name: str, ip: str, **fields: object) -> Service:
    """A Service whose status already says `ip` and carries our finalizer."""
    return lb(name, ingress_ips=(ip,), ingress_modes=("Proxy",), finalizers=(FINALIZER,), **fields)


@dataclass
class World:
    """The fake cluster (its Services, written to by the fake writer) and the shared journal."""

    services: dict[str, Service]
    journal: list[tuple[str, ...]] = field(default_factory=list)
    failing_writes: set[str] = field(default_factory=set)
    events: list[PendingEvent] = field(default_factory=list)

    # ---- ClusterReader
    def services_(self) -> Parsed:
        return Parsed(tuple(self.services.values()), ())


class FakeCluster:
    def __init__(self, world: World) -> None:
        self.world = world

    def services(self) -> Parsed:
        return self.world.services_()

    def nodes(self) -> Parsed:
        return Parsed(NODES, ())

    def endpoints(self) -> dict[str, dict[str, dict[str, int]]]:
        return {}


class FakeWriter:
    """Writes as the API server would answer them: the Service with a bumped resourceVersion."""

    def __init__(self, world: World) -> None:
        self.world = world

    def _store(self, service: Service) -> Service:
        after = replace(service, resource_version=str(int(service.resource_version or "0") + 1))
        self.world.services[service.key] = after
        return after

    def publish(self, service: Service, ips: tuple[str, ...]) -> Service | None:
        self.world.journal.append(("publish", service.key, *ips))
        if service.key in self.world.failing_writes:
            return None
        return self._store(replace(service, ingress_ips=ips, ingress_modes=("Proxy",) * len(ips),
                                   finalizers=tuple(dict.fromkeys((*service.finalizers, FINALIZER)))))

    def set_ingress(self, service: Service, ips: tuple[str, ...]) -> Service | None:
        self.world.journal.append(("set_ingress", service.key, *ips))
        return self._store(replace(service, ingress_ips=ips, ingress_modes=("Proxy",) * len(ips)))

    def set_finalizer(self, service: Service, present: bool) -> Service | None:
        self.world.journal.append(("set_finalizer", service.key, str(present)))
        kept = tuple(f for f in service.finalizers if f != FINALIZER) + ((FINALIZER,) if present else ())
        return self._store(replace(service, finalizers=kept))

    def event(self, service: Service, reason: Reason, message: str, warning: bool = False) -> None:
        self.world.events.append(PendingEvent(service, reason, message, warning))


class FakeDataPlane:
    """Applies by journaling which Services the state serves; refuses the configs of `refuse`."""

    def __init__(self, world: World, refuse: frozenset[str] = frozenset(), kind: str = "reload",
                 seconds: float = 0.01) -> None:
        self.world, self.refuse, self.kind, self.seconds = world, refuse, kind, seconds

    def apply(self, state: DesiredState) -> ApplyResult:
        keys = sorted(state.served)
        self.world.journal.append(("apply", *keys))
        refused = self.refuse & set(keys)
        if refused:
            return ApplyResult("rejected", message="[ALERT] (12) : config : parsing [x.cfg:7] : bad",
                               seconds=self.seconds, refused_services=frozenset(refused))
        reasons = tuple(f"frontend {f.name} added" for f in state.frontends)
        return ApplyResult(self.kind, Change(self.kind, reasons=reasons), seconds=self.seconds)  # type: ignore[arg-type]

    def vrrp_states(self) -> dict[str, str]:
        return {}

    def server_health(self) -> dict[tuple[str, str], str]:
        return {}

    def old_workers(self) -> list[tuple[int, int]]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse_config(f"paths: {{stateDir: {tmp_path}}}\n")


def reconciler(world: World, data_plane: FakeDataPlane, clock: Clock | None = None) -> Reconciler:
    writer = FakeWriter(world)
    events: DeferredEvents[PendingEvent] = DeferredEvents(lambda e: writer.event(*e))
    writes = LeaderWrites(writer, workers=1, events=events)
    return Reconciler(FakeCluster(world), data_plane, writes, Metrics(), "app1",
                      pacer=ApplyPacer(clock=clock or Clock()))


def flush(r: Reconciler) -> None:
    r.writes.close(timeout=2.0)


def test_the_leader_publishes_a_new_service_before_any_apply_serves_it(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": lb("web")})
    r = reconciler(world, FakeDataPlane(world))
    # While addresses are being written the apply waits (at most MAX_APPLY_GAP); the pass our
    # own writes trigger, with nothing left to write, serves them all at once.
    assert str(r.run_pass(config, POOLS, leader=True)) == "leader; wrote 1; apply paced"
    verdict = r.run_pass(config, POOLS, leader=True)
    assert world.journal == [("publish", "default/web", "192.0.2.240"), ("apply", "default/web")]
    assert str(verdict) == "leader; reload: frontend fe_default_web_tcp80_v4 added"
    flush(r)
    assert [(e.reason, e.message) for e in world.events] == [(Reason.ALLOCATED,
                                                              "Assigned 192.0.2.240 from pool default")]


def test_an_address_whose_write_failed_is_not_served(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": lb("web"), "default/db": lb("db", port=5432, node_port=30432)},
                  failing_writes={"default/web"})
    clock = Clock()
    r = reconciler(world, FakeDataPlane(world), clock)
    assert r.run_pass(config, POOLS, leader=True).wrote == 1
    clock.now += 5.1  # a write that keeps failing holds the apply back at most MAX_APPLY_GAP
    verdict = r.run_pass(config, POOLS, leader=True)  # web's write is retried, and fails again
    assert world.journal[-2:] == [("publish", "default/web", "192.0.2.240"), ("apply", "default/db")]
    assert verdict.wrote == 0 and str(verdict).startswith("leader; reload:")


def test_a_follower_writes_nothing_and_serves_only_what_the_status_says(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": lb("web"), "default/db": served("db", "192.0.2.245", port=5432,
                                                                  node_port=30432)})
    r = reconciler(world, FakeDataPlane(world))
    verdict = r.run_pass(config, POOLS, leader=False)
    assert world.journal == [("apply", "default/db")]
    assert str(verdict).startswith("follower; reload:")


def test_a_deleted_service_is_released_only_after_the_apply_that_withdrew_it(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240", deleting=True),
                   "default/db": served("db", "192.0.2.241", port=5432, node_port=30432)})
    r = reconciler(world, FakeDataPlane(world))
    verdict = r.run_pass(config, POOLS, leader=True)
    assert world.journal == [("apply", "default/db"), ("set_finalizer", "default/web", "False")]
    assert verdict.released == 1 and "released 1" in str(verdict)
    flush(r)
    assert [(e.service.key, e.reason) for e in world.events] == [("default/web", Reason.RELEASED)]


def test_a_rejected_apply_releases_nothing(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240", deleting=True),
                   "default/db": served("db", "192.0.2.241", port=5432, node_port=30432)})
    r = reconciler(world, FakeDataPlane(world, kind="rejected"))
    verdict = r.run_pass(config, POOLS, leader=True)
    assert not any(step[0] == "set_finalizer" for step in world.journal)
    assert verdict.released == 0 and verdict.apply == "rejected"


def test_a_service_whose_type_changed_loses_its_status_then_its_finalizer(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240", type="ClusterIP")})
    r = reconciler(world, FakeDataPlane(world))
    r.run_pass(config, POOLS, leader=True)
    assert world.journal == [("apply",), ("set_ingress", "default/web"), ("set_finalizer", "default/web", "False")]


def test_a_service_haproxy_refuses_costs_only_itself(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240"),
                   "default/bad": served("bad", "192.0.2.241", port=81, node_port=30081)})
    r = reconciler(world, FakeDataPlane(world, refuse=frozenset({"default/bad"})))
    verdict = r.run_pass(config, POOLS, leader=True)
    assert world.journal == [("apply", "default/bad", "default/web"), ("apply", "default/web")]
    assert verdict.refused == ("default/bad",) and "refused default/bad" in str(verdict)
    assert r.last_good is not None and sorted(r.last_good.served) == ["default/web"]
    flush(r)
    [event] = world.events
    assert (event.service.key, event.reason, event.warning) == ("default/bad", Reason.INVALID, True)
    assert "HAProxy refuses this Service's config" in event.message


def test_a_problem_is_reported_once_not_every_pass(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/nope": lb("nope", annotations={"lbappliance.io/pool": "missing"})})
    r = reconciler(world, FakeDataPlane(world))
    r.run_pass(config, POOLS, leader=True)
    r.run_pass(config, POOLS, leader=True)
    flush(r)
    assert [(e.service.key, e.reason) for e in world.events] == [("default/nope", Reason.ALLOCATION_FAILED)]


def test_a_paced_follower_waits_and_applies_once_the_gap_is_over(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240")})
    clock = Clock()
    r = reconciler(world, FakeDataPlane(world, seconds=1.2), clock)  # a slow apply: 3 s gap
    r.run_pass(config, POOLS, leader=False)
    assert len(world.journal) == 1
    clock.now += 1.0
    assert str(r.run_pass(config, POOLS, leader=False)) == "follower; apply paced"
    assert len(world.journal) == 1 and r.pacer.deferred
    clock.now += 2.5
    assert str(r.run_pass(config, POOLS, leader=False)).startswith("follower; reload:")
    assert len(world.journal) == 2 and not r.pacer.deferred


def test_a_paced_leader_still_publishes_and_leaves_serving_to_the_paced_apply(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": served("web", "192.0.2.240")})
    clock = Clock()
    r = reconciler(world, FakeDataPlane(world, seconds=1.2), clock)
    r.run_pass(config, POOLS, leader=True)
    world.services["default/db"] = lb("db", port=5432, node_port=30432)
    verdict = r.run_pass(config, POOLS, leader=True)
    assert world.journal[-1] == ("publish", "default/db", "192.0.2.241")
    assert str(verdict) == "leader; wrote 1; apply paced"


def test_during_a_long_burst_an_apply_serves_what_its_own_pass_just_published(config) -> None:  # type: ignore[no-untyped-def]
    world = World({"default/web": lb("web")})
    clock = Clock()
    r = reconciler(world, FakeDataPlane(world), clock)
    r.run_pass(config, POOLS, leader=True)
    clock.now += 5.1  # writes have gone on for MAX_APPLY_GAP: this pass applies, writes or not
    world.services["default/db"] = lb("db", port=5432, node_port=30432)
    verdict = r.run_pass(config, POOLS, leader=True)
    assert world.journal == [("publish", "default/web", "192.0.2.240"), ("publish", "default/db", "192.0.2.241"),
                             ("apply", "default/db", "default/web")]
    assert str(verdict).startswith("leader; wrote 1; reload:")


def test_a_metallb_sharing_key_used_across_namespaces_is_logged_once(config, caplog) -> None:  # type: ignore[no-untyped-def]
    shared = {"metallb.io/allow-shared-ip": "dns"}
    world = World({"a/dns": replace(lb("dns"), namespace="a", annotations=shared),
                   "b/dns": replace(lb("dns", port=53, node_port=30053), namespace="b", annotations=shared)})
    r = reconciler(world, FakeDataPlane(world))
    with caplog.at_level("WARNING", logger="lbappliance.daemon"):
        r.run_pass(config, POOLS, leader=False)
        r.run_pass(config, POOLS, leader=False)
    notes = [m for m in caplog.messages if "MetalLB sharing key 'dns'" in m]
    assert len(notes) == 1 and "a, b" in notes[0]
