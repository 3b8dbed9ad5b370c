"""Immutable values that flow through the pure core: snapshot in, desired state out."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Family = Literal["IPv4", "IPv6"]

FINALIZER = "service.kubernetes.io/load-balancer-cleanup"
ANNOTATION_PREFIX = "lbappliance.io/"
ANN_LB_IPS = ANNOTATION_PREFIX + "load-balancer-ips"
ANN_POOL = ANNOTATION_PREFIX + "pool"
ANN_SHARED = ANNOTATION_PREFIX + "allow-shared-ip"
ANN_PROXY = ANNOTATION_PREFIX + "proxy-protocol"
ANN_VRRP_INSTANCE = ANNOTATION_PREFIX + "vrrp-instance"
LABEL_EXCLUDE = "node.kubernetes.io/exclude-from-external-load-balancers"
TAINT_AUTOSCALER_DELETE = "ToBeDeletedByClusterAutoscaler"
KUBE_PROXY_HEALTH_PORT = 10256


@lru_cache(maxsize=1 << 16)
def parse_address(text: str) -> IPAddress:
    """ipaddress.ip_address, memoised: every reconcile pass re-reads the same addresses."""
    return ipaddress.ip_address(text)


def family_of(address: IPAddress) -> Family:
    return "IPv4" if address.version == 4 else "IPv6"


# The one place for the spellings of an address family: Kubernetes', ours in names, nft's.
FAMILY_VERSION: Mapping[Family, int] = {"IPv4": 4, "IPv6": 6}
FAMILY_TAG: Mapping[Family, str] = {"IPv4": "v4", "IPv6": "v6"}  # in HAProxy, VRRP and nft names
NFT_FAMILY: Mapping[Family, str] = {"IPv4": "ip", "IPv6": "ip6"}


def host_port(address: str, port: int | str, separator: str = ":") -> str:
    """'192.0.2.1:80', '[2001:db8::1]:80' (IPv6 in brackets, as HAProxy, URLs and nft want)."""
    return f"[{address}]{separator}{port}" if ":" in address else f"{address}{separator}{port}"


class Reason(StrEnum):
    """Event reasons the daemon publishes; the core only names them."""

    ALLOCATED = "IPAllocated"
    ALLOCATION_FAILED = "AllocationFailed"
    INVALID = "InvalidConfiguration"
    RELEASED = "IPReleased"


@dataclass(frozen=True, order=True)
class Problem:
    """Why one Service (or one part of it) is not served; never an exception."""

    service: str
    reason: Reason
    message: str


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    node_port: int | None


@dataclass(frozen=True)
class Service:
    """The fields of a Kubernetes Service the appliance acts on, already type-checked."""

    namespace: str
    name: str
    uid: str = ""
    creation: str = ""
    type: str = "LoadBalancer"
    load_balancer_class: str | None = None
    ports: tuple[ServicePort, ...] = ()
    external_traffic_policy: str = "Cluster"
    health_check_node_port: int | None = None
    source_ranges: tuple[str, ...] = ()
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    ip_families: tuple[str, ...] = ()
    ip_family_policy: str = "SingleStack"
    allocate_node_ports: bool = True
    load_balancer_ip: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    ingress_ips: tuple[str, ...] = ()
    deleting: bool = False
    finalizers: tuple[str, ...] = ()
    # What a write needs: resourceVersion makes it a compare-and-swap, ipMode per ingress entry
    # tells whether the status already says Proxy.
    resource_version: str = ""
    ingress_modes: tuple[str, ...] = ()

    @cached_property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def sort_key(self) -> tuple[str, str, str]:
        """Older Services win contested addresses; names break ties deterministically."""
        return (self.creation, self.namespace, self.name)


@dataclass(frozen=True)
class Node:
    name: str
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    taints: tuple[str, ...] = ()
    deleting: bool = False


@dataclass(frozen=True)
class AddressRange:
    first: IPAddress
    last: IPAddress

    @property
    def family(self) -> Family:
        return family_of(self.first)

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    @cached_property
    def bounds(self) -> tuple[int, int, int]:
        return self.first.version, int(self.first), int(self.last)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        version, low, high = self.bounds
        return address.version == version and low <= int(address) <= high

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        if self.operator == "In":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class Pool:
    name: str
    ranges: tuple[AddressRange, ...]
    auto_assign: bool = True
    avoid_buggy_ips: bool = False
    priority: int | None = None
    namespaces: tuple[str, ...] = ()
    service_selectors: tuple[LabelSelector, ...] = ()

    def admits(self, service: Service) -> bool:
        """Whether serviceAllocation lets this Service draw from the pool at all."""
        if self.namespaces and service.namespace not in self.namespaces:
            return False
        return not self.service_selectors or any(s.matches(service.labels) for s in self.service_selectors)

    def contains(self, address: IPAddress) -> bool:
        return any(address in r for r in self.ranges)

    def order_key(self) -> tuple[int, int, str]:
        """Pools with a priority come first (lower number first), then by name."""
        return (0 if self.priority is not None else 1, self.priority or 0, self.name)

    def size(self, family: Family | None = None) -> int:
        return sum(r.size for r in self.ranges if family is None or r.family == family)


@dataclass(frozen=True)
class Allocation:
    """IPAM's answer: addresses per Service key, the pool each address came from, problems."""

    assignments: Mapping[str, tuple[str, ...]]
    pool_of: Mapping[str, str]
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True, order=True)
class Server:
    """One eligible node as a backend target; shared by every backend of its address family."""

    name: str
    address: str
    # Where the node answers this server's health check, when not at `address`: kube-proxy's
    # healthCheckNodePort listens only on the node's primary address of the Service's family.
    check_address: str | None = None
    # A `Local` Service's share for this node: its ready local endpoints (None: HAProxy's default).
    weight: int | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    servers: tuple[Server, ...]
    port: int  # the nodePort every server listens on
    check_port: int
    check_path: str
    proxy_protocol: str | None
    affinity_timeout: int | None
    family: Family


@dataclass(frozen=True)
class Frontend:
    name: str
    service: str
    vip: str
    port: int
    protocol: str
    source_ranges: tuple[str, ...]
    backend: Backend

    @property
    def bind(self) -> str:
        return host_port(self.vip, self.port)


@dataclass(frozen=True)
class UdpForward:
    """One (VIP, port) of a UDP Service port, forwarded by nftables (HAProxy cannot proxy UDP).

    `backend` is a check-only HAProxy backend (no frontend): HAProxy runs the same per-node
    health checks as for TCP, and only the servers it reports UP go into the nftables map.
    """

    name: str
    service: str
    vip: str
    port: int
    source_ranges: tuple[str, ...]
    backend: Backend

    @property
    def family(self) -> Family:
        return self.backend.family


@dataclass(frozen=True)
class VrrpInstance:
    name: str
    family: Family
    router_id: int
    vips: tuple[str, ...]
    index: int = 0  # position among this family's instances (VIPs are spread over them)
    priority: int = 100  # this box's priority on the instance (mirrored on the peer)
    anchor: str = ""  # the only advertised address: constant, never a Service VIP


@dataclass(frozen=True)
class DesiredState:
    """Everything the data plane should serve, derived from one snapshot."""

    frontends: tuple[Frontend, ...]
    vrrp: tuple[VrrpInstance, ...]
    served: Mapping[str, tuple[str, ...]]  # service key -> VIPs it is served on
    problems: tuple[Problem, ...] = ()
    udp: tuple[UdpForward, ...] = ()
    # VIP -> name of the VRRP instance carrying it; with `DataPlane.vrrp_states()` (instance ->
    # MASTER/BACKUP) this tells which box owns each VIP (see `vip_owner_states`).
    vip_instances: Mapping[str, str] = field(default_factory=dict)

    @property
    def vips(self) -> tuple[str, ...]:
        found = {f.vip for f in self.frontends} | {u.vip for u in self.udp}
        return tuple(sorted(found, key=address_sort_key))


def vip_owner_states(state: DesiredState, vrrp_states: Mapping[str, str]) -> dict[str, str]:
    """VIP -> this box's VRRP state for the instance carrying it (MASTER = this box owns it)."""
    return {vip: vrrp_states.get(instance, "UNKNOWN") for vip, instance in sorted(state.vip_instances.items())}


def address_sort_key(address: str) -> tuple[int, int]:
    """IPv4 before IPv6, then numerically: the order every rendered list uses."""
    parsed = parse_address(address)
    return (parsed.version, int(parsed))
