"""IPAM: examples for each rule, and hypothesis properties over random clusters."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lbappliance.core.config import load_pools
from lbappliance.core.ipam import allocate
from lbappliance.core.models import ANN_LB_IPS, ANN_POOL, ANN_SHARED, Pool, Reason, Service, ServicePort

POOLS = load_pools("""
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
- name: small
  addresses: [192.0.2.0/29, "2001:db8::/126"]
  avoidBuggyIPs: true
- name: manual
  addresses: [198.51.100.0/30]
  autoAssign: false
- name: team-a
  addresses: [203.0.113.0/30]
  serviceAllocation: {priority: 1, namespaces: [a]}
""")


def svc(name: str, ns: str = "a", ports: tuple[int, ...] = (80,), created: str = "", **kw: object) -> Service:
    return Service(ns, name, creation=created or name, ports=tuple(ServicePort("", "TCP", p, 30000 + p) for p in ports),
                   **kw)  # type: ignore[arg-type]


def by_key(result_problems: tuple) -> dict[str, str]:  # type: ignore[type-arg]
    return {p.service: p.message for p in result_problems}


def test_priority_pool_first_for_admitted_namespace_then_default() -> None:
    result = allocate(POOLS, [svc("x", "a"), svc("y", "b")])
    assert result.assignments == {"a/x": ("203.0.113.0",), "b/y": ("192.0.2.1",)}


def test_avoid_buggy_ips_skips_dot_zero() -> None:
    result = allocate(POOLS, [svc("y", "b")])
    assert result.assignments["b/y"] == ("192.0.2.1",)


def test_held_address_is_kept_even_when_an_older_service_would_get_it() -> None:
    held = svc("new", "b", created="2", ingress_ips=("192.0.2.1",))
    older = svc("old", "b", created="1")
    result = allocate(POOLS, [held, older])
    assert result.assignments == {"b/new": ("192.0.2.1",), "b/old": ("192.0.2.2",)}


def test_requested_address_in_manual_pool() -> None:
    result = allocate(POOLS, [svc("m", "b", annotations={ANN_LB_IPS: "198.51.100.2"})])
    assert result.assignments == {"b/m": ("198.51.100.2",)}
    assert result.pool_of == {"198.51.100.2": "manual"}


def test_manual_pool_is_never_picked_automatically() -> None:
    services = [svc(f"s{i}", "b") for i in range(8)]
    result = allocate(POOLS, services)
    assert all(not ip.startswith("198.51.100.") for ips in result.assignments.values() for ip in ips)


def test_requested_address_outside_every_pool_fails_only_that_service() -> None:
    result = allocate(POOLS, [svc("bad", "b", load_balancer_ip="192.0.2.99"), svc("good", "b")])
    assert "b/bad" not in result.assignments and "b/good" in result.assignments
    assert by_key(result.problems)["b/bad"] == "requested address 192.0.2.99 is not in any pool that admits this Service"


def test_requested_address_taken_is_an_error_naming_the_holder() -> None:
    result = allocate(POOLS, [svc("first", "b", created="1", load_balancer_ip="192.0.2.3"),
                              svc("second", "b", created="2", load_balancer_ip="192.0.2.3")])
    assert result.assignments == {"b/first": ("192.0.2.3",)}
    assert "already used by b/first" in by_key(result.problems)["b/second"]


def test_invalid_annotation_is_invalid_configuration() -> None:
    result = allocate(POOLS, [svc("x", annotations={ANN_LB_IPS: "192.0.2.1,banana"})])
    assert result.problems[0].reason is Reason.INVALID
    assert "annotation lbappliance.io/load-balancer-ips: 'banana' is not an IP address" in result.problems[0].message


def test_two_addresses_of_one_family_is_invalid() -> None:
    result = allocate(POOLS, [svc("x", annotations={ANN_LB_IPS: "192.0.2.1,192.0.2.2"})])
    assert "more than one IPv4 address requested" in result.problems[0].message


def test_unknown_pool_annotation() -> None:
    result = allocate(POOLS, [svc("x", annotations={ANN_POOL: "nope"})])
    assert result.problems[0].message == "annotation lbappliance.io/pool: no pool named 'nope'"


def test_exhaustion_is_a_per_service_error() -> None:
    services = [svc(f"s{i:02d}", "b") for i in range(10)]
    result = allocate(POOLS, services)
    assert len(result.assignments) == 7  # 192.0.2.0/29 less the "buggy" .0
    failed = sorted(k for k in by_key(result.problems))
    assert failed == [f"b/s{i:02d}" for i in range(7, 10)]
    assert all("no free IPv4 address" in m for m in by_key(result.problems).values())


def test_sharing_within_namespace_without_port_clash() -> None:
    a = svc("a1", "b", ports=(53,), annotations={ANN_SHARED: "dns"})
    b = svc("a2", "b", ports=(853,), annotations={ANN_SHARED: "dns"})
    result = allocate(POOLS, [a, b])
    assert result.assignments["b/a1"] == result.assignments["b/a2"]


def test_sharing_refused_on_port_clash() -> None:
    a = svc("a1", "b", ports=(53,), annotations={ANN_SHARED: "dns"})
    b = svc("a2", "b", ports=(53,), annotations={ANN_SHARED: "dns"})
    result = allocate(POOLS, [a, b])
    assert result.assignments["b/a1"] != result.assignments["b/a2"]


def test_sharing_key_never_crosses_namespaces() -> None:
    a = svc("a1", "b", ports=(53,), annotations={ANN_SHARED: "dns", ANN_LB_IPS: "192.0.2.5"})
    b = svc("a2", "c", ports=(853,), annotations={ANN_SHARED: "dns", ANN_LB_IPS: "192.0.2.5"})
    result = allocate(POOLS, [a, b])
    assert result.assignments == {"b/a1": ("192.0.2.5",)}
    assert "without a matching sharing key" in by_key(result.problems)["c/a2"]


def test_require_dual_stack_gets_one_of_each() -> None:
    s = svc("ds", "b", ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack")
    assert allocate(POOLS, [s]).assignments == {"b/ds": ("192.0.2.1", "2001:db8::")}


def test_prefer_dual_stack_degrades_when_a_family_is_exhausted() -> None:
    fillers = [svc(f"v6-{i}", "b", ip_families=("IPv6",)) for i in range(4)]
    s = svc("zz", "b", ip_families=("IPv4", "IPv6"), ip_family_policy="PreferDualStack")
    result = allocate(POOLS, [*fillers, s])
    assert result.assignments["b/zz"] == ("192.0.2.1",)


def test_require_dual_stack_fails_whole_when_a_family_is_exhausted() -> None:
    fillers = [svc(f"v6-{i}", "b", ip_families=("IPv6",)) for i in range(4)]
    s = svc("zz", "b", ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack")
    result = allocate(POOLS, [*fillers, s])
    assert "b/zz" not in result.assignments and "no free IPv6 address" in by_key(result.problems)["b/zz"]


def test_non_loadbalancer_other_class_and_deleting_are_ignored() -> None:
    services = [svc("cip", type="ClusterIP"), svc("other", load_balancer_class="example.com/other"),
                svc("gone", deleting=True)]
    assert allocate(POOLS, services).assignments == {}
    assert allocate(POOLS, [svc("mine", load_balancer_class="lb.example/x")], "lb.example/x").assignments


def test_an_appliance_with_a_class_leaves_services_without_one_to_the_default() -> None:
    services = [svc("classless"), svc("mine", load_balancer_class="lb.example/x")]
    assert set(allocate(POOLS, services, "lb.example/x").assignments) == {"a/mine"}
    assert set(allocate(POOLS, services).assignments) == {"a/classless"}


def test_held_address_outside_every_pool_is_reported_and_never_moved() -> None:
    """Changed on purpose (issue 16, migration): it used to be replaced by a pool address, which
    silently moved a Service another implementation (MetalLB) had given an address outside our
    pools. Now it is left alone and named; a requested address still wins."""
    result = allocate(POOLS, [svc("x", "b", ingress_ips=("192.0.2.99",))])
    assert result.assignments == {}
    [problem] = result.problems
    assert problem.reason == Reason.ALLOCATION_FAILED and "192.0.2.99, which is in no pool" in problem.message
    asked = allocate(POOLS, [svc("x", "b", ingress_ips=("192.0.2.99",),
                                 annotations={"lbappliance.io/load-balancer-ips": "192.0.2.1"})])
    assert asked.assignments == {"b/x": ("192.0.2.1",)}


# ---- properties -------------------------------------------------------------------------------

CANDIDATES = ["192.0.2.1", "192.0.2.6", "198.51.100.1", "203.0.113.2", "2001:db8::2", "192.0.2.200"]


@st.composite
def services(draw: st.DrawFn) -> list[Service]:
    count = draw(st.integers(0, 12))
    out = []
    for i in range(count):
        annotations: dict[str, str] = {}
        if draw(st.booleans()):
            annotations[ANN_SHARED] = draw(st.sampled_from(["k1", "k2"]))
        requested = draw(st.sampled_from([None, *CANDIDATES]))
        if requested:
            annotations[ANN_LB_IPS] = requested
        if draw(st.integers(0, 4)) == 0:
            annotations[ANN_POOL] = draw(st.sampled_from(["small", "manual", "team-a"]))
        families = draw(st.sampled_from([(), ("IPv4",), ("IPv6",), ("IPv4", "IPv6")]))
        policy = draw(st.sampled_from(["SingleStack", "PreferDualStack", "RequireDualStack"]))
        held = tuple(draw(st.lists(st.sampled_from(CANDIDATES), max_size=2, unique=True)))
        out.append(svc(f"s{i}", draw(st.sampled_from(["a", "b"])),
                       ports=tuple(draw(st.lists(st.sampled_from([53, 80, 443]), min_size=1, max_size=2, unique=True))),
                       created=draw(st.sampled_from(["1", "2", "3"])), annotations=annotations,
                       ip_families=families, ip_family_policy=policy, ingress_ips=held))
    return out


def admitted(pool: Pool, service: Service) -> bool:
    wanted = service.annotations.get(ANN_POOL)
    return pool.name == wanted if wanted else pool.admits(service)


@settings(max_examples=200, deadline=None)
@given(services(), st.randoms())
def test_property_deterministic_under_permutation(items: list[Service], rng: random.Random) -> None:
    shuffled = items[:]
    rng.shuffle(shuffled)
    pools = list(POOLS)
    rng.shuffle(pools)
    assert allocate(POOLS, items) == allocate(pools, shuffled)


@settings(max_examples=200, deadline=None)
@given(services())
def test_property_no_address_twice_except_within_a_sharing_key(items: list[Service]) -> None:
    result = allocate(POOLS, items)
    index = {s.key: s for s in items}
    holders: dict[str, list[Service]] = {}
    for key, ips in result.assignments.items():
        for ip in ips:
            holders.setdefault(ip, []).append(index[key])
    for group in holders.values():
        if len(group) > 1:
            keys = {(s.namespace, s.annotations.get(ANN_SHARED)) for s in group}
            assert len(keys) == 1 and None not in {k[1] for k in keys}
            ports = [(p.protocol, p.port) for s in group for p in s.ports]
            assert len(ports) == len(set(ports))


@settings(max_examples=200, deadline=None)
@given(services())
def test_property_every_assignment_in_a_pool_that_admits_the_service(items: list[Service]) -> None:
    result = allocate(POOLS, items)
    index = {s.key: s for s in items}
    for key, ips in result.assignments.items():
        for ip in ips:
            address = ipaddress.ip_address(ip)
            pool = next(p for p in POOLS if p.contains(address))
            assert admitted(pool, index[key])
            assert result.pool_of[ip] == pool.name


@settings(max_examples=200, deadline=None)
@given(services(), st.randoms())
def test_property_held_addresses_never_move(items: list[Service], rng: random.Random) -> None:
    first = allocate(POOLS, items)
    settled = [replace(s, ingress_ips=first.assignments.get(s.key, ())) for s in items]
    survivors = [s for s in settled if rng.random() < 0.6]
    rng.shuffle(survivors)
    second = allocate(POOLS, survivors)
    for s in survivors:
        # A Service may gain a family it could not get before (its rival is gone), never lose or move one.
        assert set(first.assignments.get(s.key, ())) <= set(second.assignments.get(s.key, ())), s.key
