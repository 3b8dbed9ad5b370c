"""`lbappliance doctor` and `enroll`, the pure part: what the identity must and must not be allowed,
and every check's verdict from facts the edges gathered. No I/O here, so each verdict is unit-tested.

A check is ok (✓), failed (✗: exit non-zero) or a note (!: true and worth saying, not an error,
such as "one box: no failover").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from . import canonical
from .canonical import truncate
from .config import ApplianceConfig
from .kube import is_handled
from .metallb import cross_namespace_keys, metallb_keys
from .models import FINALIZER, Pool, Service

MARKS = {"ok": "✓", "fail": "✗", "note": "!"}


class Verdict(StrEnum):
    OK = "ok"
    FAIL = "fail"
    NOTE = "note"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table: what was checked, what was found, and a one-line fix."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        return out


def ok(name: str, detail: str) -> Check:
    return Check(name, Verdict.OK, canonical.bounded(detail))


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, Verdict.FAIL, canonical.bounded(detail), fix)


def note(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, Verdict.NOTE, canonical.bounded(detail), fix)


def exit_code(checks: Iterable[Check]) -> int:
    return 1 if any(c.verdict is Verdict.FAIL for c in checks) else 0


# ---- permissions ----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Permission:
    """One SelfSubjectAccessReview question (resourceAttributes)."""

    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    def attributes(self) -> dict[str, str]:
        out = {"verb": self.verb, "resource": self.resource, "group": self.group}
        for key in ("subresource", "namespace", "name"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        what = f"{self.group}/{what}" if self.group else what
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {what}{f' {self.name!r}' if self.name else ''}{where}"


def required_permissions(config: ApplianceConfig) -> tuple[Permission, ...]:
    """Exactly the calls edges/cluster.py makes (deploy/rbac.yaml grants these and nothing else)."""
    ns, lease = config.leader_election.namespace, config.leader_election.lease_name
    return (
        Permission("list", "services"), Permission("watch", "services"), Permission("patch", "services"),
        Permission("patch", "services", subresource="status"),
        Permission("list", "nodes"), Permission("watch", "nodes"),
        Permission("create", "events"),
        Permission("create", "leases", "coordination.k8s.io", namespace=ns),
        Permission("get", "leases", "coordination.k8s.io", namespace=ns, name=lease),
        Permission("update", "leases", "coordination.k8s.io", namespace=ns, name=lease),
    )


def forbidden_permissions(config: ApplianceConfig) -> tuple[Permission, ...]:
    """What the identity must not be able to do: read Secrets anywhere, or write beyond its own objects."""
    ns = config.leader_election.namespace
    return (
        Permission("get", "secrets"), Permission("list", "secrets"), Permission("watch", "secrets"),
        Permission("get", "secrets", namespace=ns), Permission("list", "secrets", namespace=ns),
        Permission("update", "services"), Permission("delete", "services"), Permission("create", "services"),
        Permission("patch", "nodes"), Permission("list", "pods"), Permission("get", "configmaps"),
        Permission("delete", "leases", "coordination.k8s.io", namespace=ns),
        Permission("update", "leases", "coordination.k8s.io", namespace=ns, name="someone-elses-lease"),
        Permission("create", "events", "events.k8s.io"),
        Permission("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
    )


def permission_check(answers: Mapping[Permission, bool], config: ApplianceConfig) -> Check:
    """Every required permission allowed and every forbidden one denied, by SelfSubjectAccessReview."""
    missing = [str(p) for p in required_permissions(config) if not answers.get(p, False)]
    extra = [str(p) for p in forbidden_permissions(config) if answers.get(p, True)]
    name = "identity permissions"
    if missing or extra:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"more than needed: {', '.join(extra)}"] if extra else [])
        return failed(name, "; ".join(parts), "apply deploy/rbac.yaml and bind nothing else to this identity "
                                              "(`lbappliance enroll` does both)")
    return ok(name, f"all {len(required_permissions(config))} needed allowed; the "
                    f"{len(forbidden_permissions(config))} checked beyond them (Secrets, other writes) denied")


# ---- another LoadBalancer implementation --------------------------------------------------------

OUR_MANAGERS = frozenset({"lbappliance"})  # the daemon's user agent (edges/cluster.api_client_from_kubeconfig)


def status_managers(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """Field managers that wrote status.loadBalancer of a wire-format Service (managedFields)."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    found = set()
    for entry in (meta or {}).get("managedFields") or []:
        if not isinstance(entry, Mapping):
            continue
        fields = entry.get("fieldsV1") if isinstance(entry.get("fieldsV1"), Mapping) else {}
        status = (fields or {}).get("f:status")
        if isinstance(status, Mapping) and "f:loadBalancer" in status and (status.get("f:loadBalancer") or {}):
            found.add(str(entry.get("manager") or "")[:128])
    return tuple(sorted(found))


def foreign_controller_checks(services: Sequence[tuple[Service, tuple[str, ...]]], config: ApplianceConfig,
                              metallb_api: bool, k3s_servicelb_nodes: Sequence[str],
                              svclb_pods: Sequence[str] | None) -> list[Check]:
    """Another implementation serving our class: status written by another manager, MetalLB's API group
    served, k3s nodes without --disable=servicelb, svclb-* or MetalLB pods (seen only with an admin kubeconfig)."""
    cls = config.cluster.load_balancer_class
    writers: dict[str, list[str]] = {}
    for service, managers in services:
        if not is_handled(service, cls):
            continue
        for manager in managers:
            if manager not in OUR_MANAGERS:
                writers.setdefault(manager, []).append(service.key)
    checks = []
    name = "other LoadBalancer controllers"
    if writers:
        detail = "; ".join(f"{truncate(m)} wrote the status of {', '.join(sorted(keys)[:5])}"
                           + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                           for m, keys in sorted(writers.items()))
        checks.append(failed(name, detail, "stop that controller (MetalLB: scale its controller to 0; k3s: "
                                           "--disable=servicelb) or give the appliance a loadBalancerClass"))
    else:
        checks.append(ok(name, "no other field manager writes the status of Services of this class"))
    if metallb_api:
        checks.append(failed("MetalLB", "the metallb.io API group is served (MetalLB's CRDs are installed)",
                             "after `lbappliance pool import`, remove MetalLB (docs/migrate.md)"))
    else:
        checks.append(ok("MetalLB", "no metallb.io API group"))
    if k3s_servicelb_nodes:
        checks.append(failed("k3s ServiceLB", f"k3s nodes without --disable=servicelb: "
                                              f"{', '.join(sorted(k3s_servicelb_nodes)[:5])}",
                             "restart k3s with --disable=servicelb (docs/migrate.md)"))
    if svclb_pods:
        checks.append(failed("LoadBalancer pods", f"k3s svclb or MetalLB pods running: "
                                                  f"{', '.join(sorted(svclb_pods)[:5])}",
                             "k3s: --disable=servicelb; MetalLB: remove it (docs/migrate.md)"))
    return checks


def k3s_servicelb_enabled(node: Mapping[str, Any]) -> bool:
    """A k3s node (annotation k3s.io/node-args) whose arguments do not disable servicelb."""
    meta = node.get("metadata") if isinstance(node.get("metadata"), Mapping) else {}
    args = ((meta or {}).get("annotations") or {}).get("k3s.io/node-args")
    if not isinstance(args, str):
        return False
    try:
        parsed = json.loads(args)
    except ValueError:
        return True
    flat = " ".join(str(a) for a in parsed) if isinstance(parsed, list) else str(parsed)
    return "servicelb" not in flat or "--disable" not in flat


# ---- addresses: pools against nodes, cluster CIDRs, this appliance ------------------------------


def pool_overlap_checks(pools: Sequence[Pool], node_addresses: Mapping[str, Sequence[str]],
                        cluster_networks: Sequence[tuple[str, str]], cluster_ips: Sequence[str],
                        config: ApplianceConfig) -> list[Check]:
    """No pool contains a node's address, a Pod or Service CIDR we could learn, a ClusterIP, or an
    address of this appliance (its VRRP source, VRRP/stick-table/BGP peers, router id, anchors)."""
    def holder(address: Any) -> str | None:
        for pool in pools:
            if pool.contains(address):
                return pool.name
        return None

    clashes = []
    # Every value came from the cluster: canonical first, and the message shows the canonical form.
    for node, addresses in sorted(node_addresses.items()):
        for text in addresses:
            with _ignored():
                address = canonical.address(text)
                pool = holder(address)
                if pool:
                    clashes.append(f"pool {pool!r} contains node {node}'s address {address}")
    for what, cidr in cluster_networks:
        with _ignored():
            network = canonical.network(cidr)
            for each in pools:
                if any(r.first.version == network.version and int(r.first) <= int(network.broadcast_address)
                       and int(network.network_address) <= int(r.last) for r in each.ranges):
                    clashes.append(f"pool {each.name!r} overlaps {what} {network}")
    for text in cluster_ips:
        with _ignored():
            address = canonical.address(text)
            pool = holder(address)
            if pool:
                clashes.append(f"pool {pool!r} contains ClusterIP {address}")
    for address in config.own_addresses():
        pool = holder(address)
        if pool:
            clashes.append(f"pool {pool!r} contains {address}, an address of this appliance or a peer")
    name = "pool addresses"
    if clashes:
        shown_clashes = sorted(set(clashes))
        return [failed(name, "; ".join(shown_clashes[:6]) + (f" and {len(shown_clashes) - 6} more"
                                                             if len(shown_clashes) > 6 else ""),
                       "remove those addresses from pools.yaml (`lbappliance pool set NAME --remove-address ...`)")]
    learned = len(cluster_networks)
    return [ok(name, f"no pool contains a node address, a ClusterIP, this appliance's addresses"
                     f"{f' or {learned} learned Pod/Service CIDRs' if learned else ''}")]


class _ignored:
    """Skip one unparsable value (it came from the cluster; the daemon blames it elsewhere)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, ValueError)


def out_of_pool_checks(services: Iterable[Service], pools: Sequence[Pool], config: ApplianceConfig) -> list[Check]:
    """Each handled Service whose status shows an address no pool contains (left by MetalLB, say):
    it would not be kept. One line per Service, never moved silently."""
    checks = []
    for service in sorted(services, key=lambda s: s.key):
        if not is_handled(service, config.cluster.load_balancer_class) or service.deleting:
            continue
        outside = []
        for text in service.ingress_ips:
            with _ignored():
                address = canonical.address(text)
                if not any(p.contains(address) for p in pools):
                    outside.append(str(address))
        if outside:
            checks.append(failed(f"address of {service.key}", f"{', '.join(outside)} is in no pool",
                                 f"add it to a pool: lbappliance pool set NAME --add-address {outside[0]}/"
                                 f"{32 if ':' not in outside[0] else 128}"))
    return checks


def adoption_check(services: Iterable[Service], config: ApplianceConfig) -> Check | None:
    """Services another implementation served (status without our finalizer or without ipMode Proxy):
    the leader adopts them with the addresses they show."""
    cls = config.cluster.load_balancer_class
    waiting = [s.key for s in services if is_handled(s, cls) and not s.deleting and s.ingress_ips
               and (FINALIZER not in s.finalizers or any(m != "Proxy" for m in s.ingress_modes))]
    if not waiting:
        return None
    with_metallb = [s for s in services if metallb_keys(s.annotations)]
    return note("adoption", f"{len(waiting)} Services show an address not yet written by the appliance "
                            f"({', '.join(sorted(waiting)[:5])}); the leader keeps each address and adds the "
                            f"finalizer and ipMode Proxy ({len(with_metallb)} carry MetalLB annotations)")


def sharing_check(services: Iterable[Service]) -> Check | None:
    keys = cross_namespace_keys(services)
    if not keys:
        return None
    detail = "; ".join(f"{truncate(k)} in {', '.join(ns)}" for k, ns in keys.items())
    return note("MetalLB sharing keys", f"keys used across namespaces share only within each namespace here: {detail}",
                "expected: one address per namespace and key")


# ---- this box -----------------------------------------------------------------------------------


def clock_check(skew_seconds: float | None, config: ApplianceConfig, server: str) -> Check:
    """The leader lease needs clocks that agree: allow a quarter of (lease duration - renew deadline)."""
    name = "clock"
    if skew_seconds is None:
        return failed(name, f"no Date header from {server}", "check the API server address")
    allowed = max(1.0, (config.leader_election.lease_duration - config.leader_election.renew_deadline) / 2)
    if abs(skew_seconds) > allowed:
        ahead = "ahead of" if skew_seconds > 0 else "behind"
        return failed(name, f"this box is {abs(skew_seconds):.1f} s {ahead} the API server (allowed {allowed:.1f} s)",
                      "run NTP on this box and the control plane (systemd-timesyncd or chrony)")
    return ok(name, f"{skew_seconds:+.1f} s from the API server")


def node_checks(results: Mapping[str, tuple[bool, str]], node_port: int | None,
                port_results: Mapping[str, tuple[bool, str]]) -> list[Check]:
    """kube-proxy's /healthz (10256) and one NodePort on every eligible node, from this box."""
    checks = []
    if not results:
        return [failed("nodes", "no eligible node with an address of the configured types",
                       "check cluster.nodeAddressTypes and the Nodes' status.addresses")]
    for node, (good, detail) in sorted(results.items()):
        if good:
            checks.append(ok(f"kube-proxy {node}", detail))
        else:
            checks.append(failed(f"kube-proxy {node}", detail,
                                 f"start kube-proxy on {node} and allow TCP 10256 from this box"))
    if node_port is None:
        checks.append(note("NodePort", "no Service with a nodePort to try yet"))
    for node, (good, detail) in sorted(port_results.items()):
        if good:
            checks.append(ok(f"NodePort {node}", detail))
        else:
            checks.append(failed(f"NodePort {node}", detail,
                                 f"allow TCP {node_port} (the NodePort range) from this box to {node}"))
    return checks


def vrrp_checks(config: ApplianceConfig, reachable: Mapping[str, bool]) -> list[Check]:
    """One box is a first-class deployment, said plainly; with peers, each must answer."""
    peers = [*config.vrrp.unicast_peers, *config.vrrp.unicast_peers6]
    if not peers:
        return [note("failover", "one box: no VRRP peer is configured, this box holds every VIP and "
                                 "there is no failover", "add a second box with unicastPeers for failover")]
    checks = []
    for peer in peers:
        if reachable.get(peer):
            checks.append(ok(f"VRRP peer {peer}", "answers"))
        else:
            checks.append(failed(f"VRRP peer {peer}", "does not answer",
                                 f"allow VRRP (IP protocol 112) and ICMP between this box and {peer}"))
    return checks


def table_peers_to_probe(config: ApplianceConfig) -> dict[str, tuple[str, int]]:
    """The other boxes this one shares stick tables with: name -> (address, port)."""
    others = (p for p in config.haproxy.peers if p.name != config.name)
    return {p.name: (str(p.endpoint[0]), p.endpoint[1]) for p in others}


def table_peer_checks(config: ApplianceConfig, results: Mapping[str, tuple[bool, str]]) -> list[Check]:
    """Each box listed in haproxy.peers accepts the peers protocol: else sticky clients lose their
    node when they move to it."""
    checks = []
    for name, (_host, port) in sorted(table_peers_to_probe(config).items()):
        good, detail = results.get(name, (False, "not probed"))
        checks.append(ok(f"stick-table peer {name}", detail) if good else
                      failed(f"stick-table peer {name}", detail,
                             f"allow TCP {port} between the boxes, and run lbappliance on {name} with the same peers"))
    return checks


def host_checks(sysctls: Mapping[str, str | None], binaries: Mapping[str, bool], udp_needed: bool) -> list[Check]:
    """The sysctls of systemd/99-lbappliance.conf and the data-plane binaries."""
    checks = []
    for key, value in sorted(sysctls.items()):
        needed = key.startswith("net.ipv4.ip_nonlocal_bind") or key.startswith("net.ipv6.ip_nonlocal_bind") \
            or udp_needed
        if value == "1":
            checks.append(ok(f"sysctl {key}", "1"))
        elif needed:
            checks.append(failed(f"sysctl {key}", f"is {value if value is not None else 'missing'}",
                                 "install systemd/99-lbappliance.conf and run `sysctl --system`"))
        else:
            checks.append(note(f"sysctl {key}", f"is {value}; needed once a UDP Service exists",
                               "install systemd/99-lbappliance.conf"))
    for binary, present in sorted(binaries.items()):
        checks.append(ok(f"binary {binary}", "present") if present else
                      failed(f"binary {binary}", "missing or not executable",
                             "apt-get install haproxy keepalived nftables (or fix paths.* in config.yaml)"))
    return checks


def credential_check(seconds_left: float | None, kind: str) -> Check | None:
    if seconds_left is None:
        return None
    days = seconds_left / 86400
    if days < 0:
        return failed("credential", f"the {kind} expired", "run `lbappliance enroll` again")
    if days < 30:
        return failed("credential", f"the {kind} expires in {days:.0f} days", "run `lbappliance enroll` again")
    return ok("credential", f"the {kind} is valid for {days:.0f} more days")


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, *checks: Check | None) -> None:
        self.checks.extend(c for c in checks if c is not None)

    def rows(self) -> list[dict[str, str]]:
        return [{"": MARKS[c.verdict.value], "check": c.name, "found": c.detail, "fix": c.fix} for c in self.checks]
