"""Planner: `(snapshot, allocation) -> DesiredState`, pure.

Everything user-supplied that reaches a rendered config is validated here: names are
Kubernetes-validated DNS labels, addresses go through `ipaddress`, and annotation values
are matched against closed sets. Anything the appliance cannot serve becomes a Problem
for that Service; the rest of the cluster is unaffected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .config import ApplianceConfig
from .ipam import allocate
from .kube import node_is_eligible
from .models import (
    ANN_PROXY,
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
    VrrpInstance,
    address_sort_key,
    family_of,
    parse_address,
)

PROXY_PROTOCOLS = {"v1": "send-proxy", "v2": "send-proxy-v2"}
SERVABLE_PROTOCOLS = {"TCP"}


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of everything the appliance acts on."""

    services: tuple[Service, ...]
    nodes: tuple[Node, ...]
    pools: tuple[Pool, ...]
    config: ApplianceConfig


def node_address(node: Node, family: Family, preference: Sequence[str]) -> str | None:
    """The node's address of the VIP's family by type preference, else any preferred address."""
    candidates: list[tuple[int, int, str]] = []
    for kind, text in node.addresses:
        if kind not in preference:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        same_family = 0 if family_of(address) == family else 1
        candidates.append((same_family, list(preference).index(kind), str(address)))
    return min(candidates)[2] if candidates else None


def _source_ranges(service: Service) -> tuple[tuple[str, ...], str | None]:
    ranges = []
    for i, text in enumerate(service.source_ranges):
        try:
            ranges.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            return (), f"spec.loadBalancerSourceRanges[{i}]: {text!r} is not a CIDR"
    ranges.sort(key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(str(n) for n in ranges), None


def _servable_ports(service: Service) -> tuple[list[ServicePort], list[str]]:
    ports, problems = [], []
    for port in sorted(service.ports, key=lambda p: (p.port, p.protocol)):
        label = f"port {port.port}/{port.protocol}"
        if port.protocol not in SERVABLE_PROTOCOLS:
            problems.append(f"{label}: HAProxy cannot proxy {port.protocol}; this port is not served")
        elif port.node_port is None:
            why = ("allocateLoadBalancerNodePorts is false"
                   if not service.allocate_node_ports else "the apiserver has not assigned one yet")
            problems.append(f"{label}: no nodePort ({why}); the appliance forwards to NodePorts, "
                            "so this port is not served")
        else:
            ports.append(port)
    return ports, problems


def _proxy_name(service: Service, port: ServicePort, family: Family) -> str:
    suffix = "v4" if family == "IPv4" else "v6"
    return f"{service.namespace}_{service.name}_{port.protocol.lower()}{port.port}_{suffix}"


def plan_service(
    service: Service, vips: Sequence[str], targets: Mapping[Family, tuple[Server, ...]]
) -> tuple[list[Frontend], list[Problem]]:
    """Frontends for one Service on its VIPs, or the problems that stop it being served."""
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(service.key, Reason.INVALID, message))

    proxy = service.annotations.get(ANN_PROXY)
    if proxy is not None and proxy not in PROXY_PROTOCOLS:
        problem(f"annotation {ANN_PROXY}: {proxy!r} is not one of {sorted(PROXY_PROTOCOLS)}")
        return [], problems
    ranges, range_error = _source_ranges(service)
    if range_error:
        problem(range_error)
        return [], problems
    if service.external_traffic_policy == "Local" and not service.health_check_node_port:
        problem("externalTrafficPolicy Local without spec.healthCheckNodePort; cannot tell which nodes "
                "have endpoints")
        return [], problems
    ports, port_problems = _servable_ports(service)
    for message in port_problems:
        problem(message)
    check_port = (service.health_check_node_port if service.external_traffic_policy == "Local"
                  else KUBE_PROXY_HEALTH_PORT) or 0
    affinity = service.affinity_timeout if service.session_affinity == "ClientIP" else None
    frontends = []
    for vip in vips:
        family = family_of(parse_address(vip))
        for port in ports:
            name = _proxy_name(service, port, family)
            backend = Backend(
                name=f"be_{name}",
                servers=targets[family],
                port=port.node_port or 0,
                check_port=check_port,
                check_path="/healthz",
                proxy_protocol=PROXY_PROTOCOLS.get(proxy or ""),
                affinity_timeout=affinity,
                family=family,
            )
            frontends.append(Frontend(f"fe_{name}", service.key, vip, port.port, port.protocol, ranges, backend))
    return frontends, problems


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


def vrrp_instances(vips: Iterable[str], config: ApplianceConfig) -> tuple[VrrpInstance, ...]:
    """IPv4 always, IPv6 when configured or in use: instances never come and go with Services,
    so a box's VRRP state survives any Service change."""
    by_family: dict[Family, list[str]] = {"IPv4": [], "IPv6": []}
    for vip in vips:
        by_family[family_of(parse_address(vip))].append(vip)
    ids = {"IPv4": config.vrrp.router_ids.ipv4, "IPv6": config.vrrp.router_ids.ipv6}
    wanted: list[Family] = ["IPv4"]
    if by_family["IPv6"] or config.vrrp.unicast_src_ip6:
        wanted.append("IPv6")
    return tuple(
        VrrpInstance(f"VI_{'v4' if f == 'IPv4' else 'v6'}", f, ids[f],
                     tuple(sorted(by_family[f], key=address_sort_key)))
        for f in wanted
    )


def plan(snapshot: Snapshot, allocation: Allocation) -> DesiredState:
    services: Mapping[str, Service] = {s.key: s for s in snapshot.services}
    problems = list(allocation.problems)
    frontends: list[Frontend] = []
    served: dict[str, tuple[str, ...]] = {}
    targets = backend_targets(snapshot.nodes, snapshot.config.cluster.node_address_types)
    for key in sorted(allocation.assignments):
        service = services[key]
        vips = allocation.assignments[key]
        service_frontends, service_problems = plan_service(service, vips, targets)
        problems.extend(service_problems)
        if service_frontends:
            frontends.extend(service_frontends)
            served[key] = tuple(dict.fromkeys(f.vip for f in service_frontends))
    frontends.sort(key=lambda f: (address_sort_key(f.vip), f.port, f.protocol, f.name))
    vips = sorted({f.vip for f in frontends}, key=address_sort_key)
    return DesiredState(
        frontends=tuple(frontends),
        vrrp=vrrp_instances(vips, snapshot.config),
        served=served,
        problems=tuple(sorted(problems)),
    )


def desired_state(snapshot: Snapshot) -> tuple[Allocation, DesiredState]:
    """allocate then plan: the whole pure pipeline short of rendering."""
    allocation = allocate(snapshot.pools, snapshot.services, snapshot.config.cluster.load_balancer_class)
    return allocation, plan(snapshot, allocation)
