"""Planner: `(snapshot, allocation) -> DesiredState`, pure.

Everything user-supplied that reaches a rendered config goes through `canonical` first: names
are DNS labels (checked in `kube`), addresses, CIDRs and port numbers are canonicalised here or
in IPAM, and annotation values are matched against closed sets. Anything the appliance cannot
serve becomes a Problem for that Service; the rest of the cluster is unaffected.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from . import canonical
from .canonical import truncate
from .config import ApplianceConfig
from .ipam import allocate
from .kube import node_is_eligible
from .models import (
    ANN_PROXY,
    ANN_VRRP_INSTANCE,
    FAMILY_TAG,
    FAMILY_VERSION,
    KUBE_PROXY_HEALTH_PORT,
    Allocation,
    Backend,
    DesiredState,
    Family,
    Frontend,
    Node,
    Pool,
    Problem,
    Reason,
    Server,
    Service,
    ServicePort,
    UdpForward,
    VrrpInstance,
    address_sort_key,
    family_of,
    parse_address,
)

PROXY_PROTOCOLS = {"v1": "send-proxy", "v2": "send-proxy-v2"}
# TCP through HAProxy; UDP through nftables DNAT (HAProxy community edition cannot proxy UDP).
SERVABLE_PROTOCOLS = {"TCP", "UDP"}
PROTOCOL_WORD = re.compile(r"[A-Z]{1,8}")  # shown as is in a message; anything else is quoted, truncated


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of everything the appliance acts on."""

    services: tuple[Service, ...]
    nodes: tuple[Node, ...]
    pools: tuple[Pool, ...]
    config: ApplianceConfig
    # Service key -> family -> node -> ready endpoints there (from EndpointSlices; see core/kube.py).
    endpoints: Mapping[str, Mapping[Family, Mapping[str, int]]] = field(default_factory=dict)


def node_address(node: Node, family: Family, preference: Sequence[str]) -> str | None:
    """The node's address of the VIP's family by type preference, else any preferred address."""
    candidates: list[tuple[int, int, str]] = []
    for kind, text in node.addresses:
        if kind not in preference:
            continue
        try:
            address = canonical.address(text)
        except canonical.Invalid:
            continue  # a host name (node_from_object refuses a Node whose IP addresses are bad)
        same_family = 0 if family_of(address) == family else 1
        candidates.append((same_family, list(preference).index(kind), str(address)))
    return min(candidates)[2] if candidates else None


def _source_ranges(service: Service) -> tuple[tuple[str, ...], str | None]:
    """The Service's loadBalancerSourceRanges, canonical, sorted and deduplicated, or why not."""
    ranges = service.source_ranges
    if not ranges:
        return (), None
    if sum(len(r) for r in ranges if isinstance(r, str)) <= 4096 and all(isinstance(r, str) for r in ranges):
        return _canonical_ranges(ranges)  # memoised: most Services keep their ranges pass after pass
    return _canonical_ranges.__wrapped__(ranges)


@lru_cache(maxsize=1 << 12)
def _canonical_ranges(texts: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    ranges = set()
    for i, text in enumerate(texts):
        try:
            # Surrounding spaces are the API's leniency (it trims them); inside, nothing but a CIDR.
            ranges.add(canonical.network(text.strip(" ") if isinstance(text, str) else text))
        except canonical.Invalid as exc:
            return (), f"spec.loadBalancerSourceRanges[{i}]: {exc}"
    ordered = sorted(ranges, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(str(n) for n in ordered), None


def _servable_ports(service: Service) -> tuple[list[ServicePort], list[str]]:
    ports, problems = [], []
    for i, port in sorted(enumerate(service.ports), key=lambda item: (item[1].port, item[1].protocol)):
        protocol = port.protocol if PROTOCOL_WORD.fullmatch(str(port.protocol)) else truncate(port.protocol)
        label = f"port {truncate(port.port)}/{protocol}"
        bad_port = _bad_number(canonical.port, port.port)
        bad_node_port = None if port.node_port is None else _bad_number(canonical.node_port, port.node_port)
        if port.protocol not in SERVABLE_PROTOCOLS:
            problems.append(f"{label}: {protocol} is not supported (HAProxy proxies TCP, nftables "
                            "forwards UDP); this port is not served")
        elif bad_port or bad_node_port:
            field = "port" if bad_port else "nodePort"
            problems.append(f"{label}: spec.ports[{i}].{field}: {bad_port or bad_node_port}; this port is not served")
        elif port.node_port is None:
            why = ("allocateLoadBalancerNodePorts is false"
                   if not service.allocate_node_ports else "the apiserver has not assigned one yet")
            problems.append(f"{label}: no nodePort ({why}); the appliance forwards to NodePorts, "
                            "so this port is not served")
        else:
            ports.append(port)
    return ports, problems


def _bad_number(check: Callable[[object], int], value: object) -> str | None:
    """Why `check` refuses `value`, or None."""
    try:
        check(value)
    except canonical.Invalid as exc:
        return str(exc)
    return None


def _proxy_name(service: Service, port: ServicePort, family: Family) -> str:
    return f"{service.namespace}_{service.name}_{port.protocol.lower()}{port.port}_{FAMILY_TAG[family]}"


@dataclass(frozen=True)
class ServicePlan:
    """What one Service contributes: TCP frontends, UDP forwards, a pinned VRRP instance, problems."""

    frontends: tuple[Frontend, ...] = ()
    udp: tuple[UdpForward, ...] = ()
    pin: int | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def vips(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(f.vip for f in self.frontends), *(u.vip for u in self.udp)]))


def vrrp_pin(service: Service, instances: int) -> tuple[int | None, str | None]:
    """The `lbappliance.io/vrrp-instance` annotation: an index below the configured instance count."""
    text = service.annotations.get(ANN_VRRP_INSTANCE)
    if text is None:
        return None, None
    if not (text.isascii() and text.isdigit() and len(text) <= 3) or int(text) >= instances:
        return None, (f"annotation {ANN_VRRP_INSTANCE}: {truncate(text)} is not an instance index "
                      f"0..{instances - 1}")
    return int(text), None


def plan_service(
    service: Service, vips: Sequence[str], targets: Mapping[Family, tuple[Server, ...]], instances: int = 1,
    endpoints: Mapping[Family, Mapping[str, int]] | None = None,
) -> ServicePlan:
    """Frontends (TCP) and forwards (UDP) for one Service on its VIPs, or the problems that stop it."""
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(service.key, Reason.INVALID, message))

    def refused() -> ServicePlan:
        return ServicePlan(problems=tuple(problems))

    proxy = service.annotations.get(ANN_PROXY)
    if proxy is not None and proxy not in PROXY_PROTOCOLS:
        problem(f"annotation {ANN_PROXY}: {truncate(proxy)} is not one of {sorted(PROXY_PROTOCOLS)}")
        return refused()
    pin, pin_error = vrrp_pin(service, instances)
    if pin_error:
        problem(pin_error)
        return refused()
    ranges, range_error = _source_ranges(service)
    if range_error:
        problem(range_error)
        return refused()
    local = service.external_traffic_policy == "Local"
    families = _service_families(service, vips)
    if local and not service.health_check_node_port:
        problem("externalTrafficPolicy Local without spec.healthCheckNodePort; cannot tell which nodes "
                "have endpoints")
        return refused()
    if local and (why := _bad_number(canonical.node_port, service.health_check_node_port)):
        problem(f"spec.healthCheckNodePort: {why}")
        return refused()
    client_ip = service.session_affinity == "ClientIP"
    if client_ip and (why := _bad_number(canonical.affinity_timeout, service.affinity_timeout)):
        problem(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {why}")
        return refused()
    ports, port_problems = _servable_ports(service)
    for message in port_problems:
        problem(message)
    check_port = (service.health_check_node_port if service.external_traffic_policy == "Local"
                  else KUBE_PROXY_HEALTH_PORT) or 0
    affinity = service.affinity_timeout if client_ip else None
    frontends: list[Frontend] = []
    forwards: list[UdpForward] = []
    for vip in vips:
        family = family_of(parse_address(vip))
        for port in ports:
            name = _proxy_name(service, port, family)
            udp = port.protocol == "UDP"
            servers = targets[family]
            if udp or families == {family}:
                # kube-proxy programs a single-stack Service's NodePort only in its family, and a
                # kernel DNAT stays in its family; a dual-stack Service's NodePort is in both.
                servers = _same_family(servers, family)
            primary = families_primary(service, vips)
            if local and families != {family} and family != primary:
                servers = _checked_at(servers, targets[primary], primary)
            if local and endpoints:
                servers = weighted(servers, endpoints.get(family) or next(iter(endpoints.values())))
            backend = Backend(
                name=f"be_{name}",
                servers=servers,
                port=port.node_port or 0,
                check_port=check_port,
                check_path="/healthz",
                proxy_protocol=None if udp else PROXY_PROTOCOLS.get(proxy or ""),
                affinity_timeout=affinity,
                family=family,
            )
            if udp:
                forwards.append(UdpForward(f"udp_{name}", service.key, vip, port.port, ranges, backend))
            else:
                frontends.append(Frontend(f"fe_{name}", service.key, vip, port.port, port.protocol, ranges,
                                          backend))
    return ServicePlan(tuple(frontends), tuple(forwards), pin, tuple(problems))


def _service_families(service: Service, vips: Sequence[str]) -> set[Family]:
    """The families the Service has (spec.ipFamilies; offline files may lack it: its VIPs' then)."""
    named = {f for f in service.ip_families if f in FAMILY_VERSION}
    return named or {family_of(parse_address(v)) for v in vips}  # type: ignore[return-value]


def families_primary(service: Service, vips: Sequence[str]) -> Family:
    """The Service's primary family: the first of spec.ipFamilies (kube-proxy's health server for a
    `Local` Service listens on the node's address of this family only)."""
    for family in service.ip_families:
        if family in FAMILY_VERSION:
            return family  # type: ignore[return-value]
    return family_of(parse_address(vips[0]))


def _checked_at(servers: tuple[Server, ...], primary: tuple[Server, ...], family: Family) -> tuple[Server, ...]:
    """`servers`, each checked at its node's address of the primary `family` (a node without one
    cannot be checked where kube-proxy listens, so it is left out)."""
    version = FAMILY_VERSION[family]
    at = {s.name: s.address for s in primary if parse_address(s.address).version == version}
    return tuple(s if parse_address(s.address).version == version else replace(s, check_address=at[s.name])
                 for s in servers if s.name in at)


MAX_WEIGHT = 256  # HAProxy's highest server weight


def weighted(servers: tuple[Server, ...], ready: Mapping[str, int]) -> tuple[Server, ...]:
    """Each node's weight is its count of ready local endpoints, so every pod of a `Local` Service
    gets an even share (per node, a node with 1 pod got as much as one with 5). A node without one
    keeps weight 1: its health check (kube-proxy's 503) takes it out, not a weight of 0."""
    return tuple(replace(s, weight=min(MAX_WEIGHT, max(1, ready.get(s.name, 0)))) for s in servers)


def _same_family(servers: tuple[Server, ...], family: Family) -> tuple[Server, ...]:
    version = FAMILY_VERSION[family]
    if all(parse_address(s.address).version == version for s in servers):
        return servers  # the shared tuple: render builds each server block once
    return tuple(s for s in servers if parse_address(s.address).version == version)


def backend_targets(nodes: Sequence[Node], preference: Sequence[str]) -> dict[Family, tuple[Server, ...]]:
    """Eligible nodes per VIP family, computed once per pass and shared by every backend."""
    eligible = sorted((n for n in nodes if node_is_eligible(n)), key=lambda n: n.name)
    out: dict[Family, tuple[Server, ...]] = {}
    for family in ("IPv4", "IPv6"):
        servers = []
        for node in eligible:
            address = node_address(node, family, preference)
            if address is not None:
                servers.append(Server(node.name, address))
        out[family] = tuple(servers)
    return out


def hashed_instance(vip: str, instances: int) -> int:
    """A stable instance index for a VIP: the same on every box, every run, every Python."""
    if instances <= 1:
        return 0
    digest = hashlib.sha256(parse_address(vip).packed).digest()
    return int.from_bytes(digest[:8], "big") % instances


def vrrp_instances(
    vips: Iterable[str], config: ApplianceConfig, pins: Mapping[str, int] | None = None
) -> tuple[VrrpInstance, ...]:
    """`vrrp.instances` per family: IPv4 always, IPv6 when configured or in use. Instances never
    come and go with Services, so a box's VRRP state survives any Service change. Each VIP goes
    to its pinned instance or the one its hash picks."""
    settings = config.vrrp
    pins = pins or {}
    count = settings.instances
    by_slot: dict[tuple[Family, int], list[str]] = {}
    for vip in vips:
        family = family_of(parse_address(vip))
        index = pins.get(vip, hashed_instance(vip, count))
        by_slot.setdefault((family, index), []).append(vip)
    wanted: list[Family] = ["IPv4"]
    if any(f == "IPv6" for f, _ in by_slot) or settings.unicast_src_ip6:
        wanted.append("IPv6")
    return tuple(
        VrrpInstance(
            settings.instance_name(f, i), f, settings.router_id(f, i),
            tuple(sorted(by_slot.get((f, i), ()), key=address_sort_key)),
            index=i, priority=settings.instance_priority(i), anchor=settings.anchor(f, i),
        )
        for f in wanted
        for i in range(count)
    )


def plan(snapshot: Snapshot, allocation: Allocation) -> DesiredState:
    services: Mapping[str, Service] = {s.key: s for s in snapshot.services}
    problems = list(allocation.problems)
    frontends: list[Frontend] = []
    forwards: list[UdpForward] = []
    served: dict[str, tuple[str, ...]] = {}
    pin_claims: dict[str, list[tuple[tuple[str, str, str], int, str]]] = {}
    instances = snapshot.config.vrrp.instances
    targets = backend_targets(snapshot.nodes, snapshot.config.cluster.node_address_types)
    for key in sorted(allocation.assignments):
        service = services[key]
        result = plan_service(service, allocation.assignments[key], targets, instances,
                              snapshot.endpoints.get(key))
        problems.extend(result.problems)
        if result.frontends or result.udp:
            frontends.extend(result.frontends)
            forwards.extend(result.udp)
            served[key] = result.vips
            if result.pin is not None:
                for vip in result.vips:
                    pin_claims.setdefault(vip, []).append((service.sort_key(), result.pin, key))
    pins: dict[str, int] = {}
    for vip, claims in pin_claims.items():
        claims.sort()
        pins[vip] = claims[0][1]
        for _, index, key in claims[1:]:
            if index != pins[vip]:
                problems.append(Problem(key, Reason.INVALID,
                                        f"annotation {ANN_VRRP_INSTANCE}: {vip} is shared with {claims[0][2]}, "
                                        f"pinned to instance {pins[vip]}; {index} is ignored"))
    frontends.sort(key=lambda f: (address_sort_key(f.vip), f.port, f.protocol, f.name))
    forwards.sort(key=lambda u: (address_sort_key(u.vip), u.port, u.name))
    vips = sorted({*(f.vip for f in frontends), *(u.vip for u in forwards)}, key=address_sort_key)
    vrrp = vrrp_instances(vips, snapshot.config, pins)
    return DesiredState(
        frontends=tuple(frontends),
        vrrp=vrrp,
        served=served,
        problems=tuple(sorted(bounded_problems(problems))),
        udp=tuple(forwards),
        vip_instances={vip: inst.name for inst in vrrp for vip in inst.vips},
    )


def bounded_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Every message cut to `canonical.MESSAGE_LIMIT`: it becomes a log line, an Event and a
    status.json entry, and values in it are user-supplied."""
    return [p if len(p.message) <= canonical.MESSAGE_LIMIT
            else Problem(p.service, p.reason, canonical.bounded(p.message)) for p in problems]


def desired_state(snapshot: Snapshot) -> tuple[Allocation, DesiredState]:
    """allocate then plan: the whole pure pipeline short of rendering."""
    allocation = allocate(snapshot.pools, snapshot.services, snapshot.config.cluster.load_balancer_class)
    return allocation, plan(snapshot, allocation)
