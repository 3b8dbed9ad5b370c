"""Kubernetes wire-format objects (camelCase dicts) to core models, and what we handle."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import canonical
from .canonical import shown, truncate
from .metallb import with_aliases
from .models import (
    FINALIZER,
    LABEL_EXCLUDE,
    TAINT_AUTOSCALER_DELETE,
    DesiredState,
    Family,
    Node,
    Service,
    ServicePort,
)

LABEL_SERVICE_NAME = "kubernetes.io/service-name"  # an EndpointSlice's Service


class ObjectError(ValueError):
    """A Kubernetes object the appliance cannot read; names the object and the field."""


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def service_from_object(obj: Mapping[str, Any]) -> Service:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    where = f"Service {shown(namespace)}/{shown(name)}"
    for field, value in (("namespace", namespace), ("name", name)):
        try:
            canonical.dns_label(value)
        except canonical.Invalid as exc:
            raise ObjectError(f"{where}: metadata.name/namespace must be DNS labels: metadata.{field} {exc}") from None
    ports = []
    for i, port in enumerate(spec.get("ports") or []):
        number = _int_or_none(port.get("port"))
        if number is None or not 0 < number < 65536:
            raise ObjectError(f"{where}: spec.ports[{i}].port must be 1-65535, got {truncate(port.get('port'))}")
        node_port = _int_or_none(port.get("nodePort"))
        ports.append(ServicePort(
            name=str(port.get("name") or ""),
            protocol=str(port.get("protocol") or "TCP"),
            port=number,
            node_port=node_port,
        ))
    affinity_cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    timeout = _int_or_none(affinity_cfg.get("timeoutSeconds")) or 10800
    entries = [e for e in (status.get("loadBalancer") or {}).get("ingress") or [] if e.get("ip")]
    ingress = tuple(str(entry["ip"]) for entry in entries)
    return Service(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        creation=str(meta.get("creationTimestamp") or ""),
        type=str(spec.get("type") or "ClusterIP"),
        load_balancer_class=spec.get("loadBalancerClass"),
        ports=tuple(ports),
        external_traffic_policy=str(spec.get("externalTrafficPolicy") or "Cluster"),
        health_check_node_port=_int_or_none(spec.get("healthCheckNodePort")),
        source_ranges=tuple(str(r) for r in spec.get("loadBalancerSourceRanges") or []),
        session_affinity=str(spec.get("sessionAffinity") or "None"),
        affinity_timeout=timeout,
        ip_families=tuple(str(f) for f in spec.get("ipFamilies") or []),
        ip_family_policy=str(spec.get("ipFamilyPolicy") or "SingleStack"),
        allocate_node_ports=spec.get("allocateLoadBalancerNodePorts") is not False,
        load_balancer_ip=spec.get("loadBalancerIP") or None,
        annotations=with_aliases(_str_map(meta.get("annotations"))),  # MetalLB keys as aliases of ours
        labels=_str_map(meta.get("labels")),
        ingress_ips=ingress,
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(str(f) for f in meta.get("finalizers") or []),
        resource_version=str(meta.get("resourceVersion") or ""),
        ingress_modes=tuple(str(entry.get("ipMode") or "") for entry in entries),
    )


def node_from_object(obj: Mapping[str, Any]) -> Node:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name") or "")
    try:
        canonical.dns_subdomain(name)
    except canonical.Invalid as exc:
        raise ObjectError(f"Node {truncate(name)}: metadata.name: {exc}") from None
    return Node(
        name=name,
        addresses=_node_addresses(name, status.get("addresses") or []),
        labels=_str_map(meta.get("labels")),
        taints=tuple(str(t.get("key")) for t in spec.get("taints") or []),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _node_addresses(name: str, entries: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    """status.addresses, each canonical. kube-apiserver checks them only for duplicates, so a
    kubelet can write anything there: one bad address refuses the whole Node (it is never
    rendered, and every other Node is served)."""
    addresses = []
    for i, entry in enumerate(entries):
        if not entry.get("address"):
            continue
        kind = str(entry.get("type"))
        try:
            addresses.append((kind, canonical.node_address(kind, entry.get("address"))))
        except canonical.Invalid as exc:
            raise ObjectError(f"Node {name!r}: status.addresses[{i}].address ({truncate(kind)}): {exc}") from None
    return tuple(addresses)


def is_handled(service: Service, load_balancer_class: str | None) -> bool:
    """Ours: type LoadBalancer of exactly our class (no class when none is configured).

    An appliance given a class runs beside the cluster's default implementation: Services
    without a class belong to that one, and two implementations claiming them would take turns
    overwriting their status.
    """
    return service.type == "LoadBalancer" and service.load_balancer_class == load_balancer_class


def wants_address(service: Service, load_balancer_class: str | None) -> bool:
    """Handled and not being deleted: should hold a VIP."""
    return is_handled(service, load_balancer_class) and not service.deleting


def needs_cleanup(service: Service, load_balancer_class: str | None) -> bool:
    """Carries the finalizer but should no longer be served here: release and remove it.

    Only after a type change away from LoadBalancer, or the deletion of a Service we handle. A
    LoadBalancer Service of another class never was ours (the class cannot change once set), and
    the finalizer is a well-known name its own implementation may use: its finalizer and status
    are left alone.
    """
    if FINALIZER not in service.finalizers:
        return False
    if service.type != "LoadBalancer":
        return True
    return service.deleting and is_handled(service, load_balancer_class)


def node_is_eligible(node: Node) -> bool:
    return not (
        node.deleting or LABEL_EXCLUDE in node.labels or TAINT_AUTOSCALER_DELETE in node.taints
    )


def items_of(document: Any) -> list[Mapping[str, Any]]:
    """Objects from `kubectl get -o yaml` output: a List, a single object, or a plain list."""
    if isinstance(document, Mapping):
        if isinstance(document.get("items"), list):
            return [i for i in document["items"] if isinstance(i, Mapping)]
        return [document]
    if isinstance(document, list):
        return [i for i in document if isinstance(i, Mapping)]
    return []


def parse_objects(
    objects: Iterable[Mapping[str, Any]], kind: str
) -> tuple[list[Service] | list[Node], list[Unreadable]]:
    """Parse every object of `kind`, collecting an error per unreadable one instead of stopping."""
    return ParsedObjects(kind).parse(objects)


@dataclass(frozen=True)
class Unreadable:
    """An object the appliance cannot read: which one, and why (its `str` is the why, naming the
    field). Enough to record an Event on it."""

    kind: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    message: str

    def __str__(self) -> str:
        return self.message


def unreadable(obj: Mapping[str, Any], kind: str, message: str) -> Unreadable:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return Unreadable(kind, str(meta.get("namespace") or "")[:253], str(meta.get("name") or "")[:253],
                      str(meta.get("uid") or "")[:64], str(meta.get("resourceVersion") or "")[:64], message)


class ParsedObjects:
    """`parse_objects` over successive snapshots: an object is read again only when its uid or
    resourceVersion changed, so a pass over 1,000 unchanged Services costs 1,000 dict lookups.

    Only the last snapshot's results are kept; the models are frozen, so sharing them is safe.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._convert = service_from_object if kind == "Service" else node_from_object
        self._last: dict[tuple[str, str], Service | Node | Unreadable] = {}

    def parse(self, objects: Iterable[Mapping[str, Any]]) -> tuple[list[Any], list[Unreadable]]:
        parsed: list[Any] = []
        errors: list[Unreadable] = []
        seen: dict[tuple[str, str], Service | Node | Unreadable] = {}
        for obj in objects:
            if obj.get("kind", self.kind) != self.kind:
                continue
            meta = obj.get("metadata")
            meta = meta if isinstance(meta, Mapping) else {}
            uid, version = meta.get("uid"), meta.get("resourceVersion")
            key = (uid, version) if isinstance(uid, str) and isinstance(version, str) else None
            result = self._last.get(key) if key else None
            if result is None:
                result = self._read(obj)
            if key:
                seen[key] = result
            if isinstance(result, Unreadable):
                errors.append(result)
            else:
                parsed.append(result)
        self._last = seen
        return parsed, errors

    def _read(self, obj: Mapping[str, Any]) -> Service | Node | Unreadable:
        try:
            return self._convert(obj)
        except (ObjectError, AttributeError, TypeError) as exc:
            return unreadable(obj, self.kind, str(exc))


# ---- the leader's writes, decided purely (the publisher only sends what these return) ----------

Patch = dict[str, Any]


def ingress_entries(ips: tuple[str, ...]) -> list[dict[str, str]]:
    """status.loadBalancer.ingress for `ips`: the appliance proxies, so ipMode is Proxy."""
    return [{"ip": ip, "ipMode": "Proxy"} for ip in ips]


def status_is_current(service: Service, ips: tuple[str, ...]) -> bool:
    return service.ingress_ips == ips and all(mode == "Proxy" for mode in service.ingress_modes)


def needs_status_write(service: Service, vips: tuple[str, ...]) -> bool:
    """The finalizer is missing, or the status does not say exactly these addresses as Proxy."""
    return FINALIZER not in service.finalizers or not status_is_current(service, vips)


def finalizer_patch(service: Service, present: bool) -> Patch | None:
    """A merge patch adding or removing our finalizer; None when nothing needs writing.

    resourceVersion makes it a compare-and-swap: a concurrent edit fails instead of being lost.
    """
    if (FINALIZER in service.finalizers) == present:
        return None
    finalizers = [*service.finalizers, FINALIZER] if present else [f for f in service.finalizers if f != FINALIZER]
    return {"metadata": {"finalizers": finalizers, "resourceVersion": service.resource_version}}


def ingress_patch(service: Service, ips: tuple[str, ...]) -> Patch | None:
    """A status merge patch setting the ingress to `ips`; None when it already says so."""
    if status_is_current(service, ips):
        return None
    return {"status": {"loadBalancer": {"ingress": ingress_entries(ips)}}}


def publish_patch(service: Service, ips: tuple[str, ...]) -> Patch | None:
    """Finalizer and addresses in one status write when the finalizer is missing (the status
    subresource of a Service takes metadata.finalizers too, checked against kube-apiserver 1.34),
    so the finalizer can never be missing while an address is published; else only the addresses."""
    with_finalizer = finalizer_patch(service, present=True)
    if with_finalizer is None:
        return ingress_patch(service, ips)
    return {**with_finalizer, "status": {"loadBalancer": {"ingress": ingress_entries(ips)}}}


def published_only(assignments: Mapping[str, tuple[str, ...]],
                   services: Iterable[Service]) -> dict[str, tuple[str, ...]]:
    """Serve only addresses already written to status, of Services carrying our finalizer: both
    boxes then serve the same thing, and no served address can be deleted unnoticed."""
    status = {s.key: s.ingress_ips for s in services if FINALIZER in s.finalizers}
    return {k: v for k, v in assignments.items() if set(v) <= set(status.get(k, ()))}


def vip_users(state: DesiredState) -> dict[str, frozenset[str]]:
    """Served VIP -> the Services served on it (more than one when they share it)."""
    users: dict[str, set[str]] = {}
    for vip, key in [(f.vip, f.service) for f in state.frontends] + [(u.vip, u.service) for u in state.udp]:
        users.setdefault(vip, set()).add(key)
    return {vip: frozenset(keys) for vip, keys in users.items()}


def releasable(service: Service, load_balancer_class: str | None, users: Mapping[str, frozenset[str]]) -> bool:
    """Our finalizer can go: the Service should no longer be served here (`needs_cleanup`) and none
    of its addresses is still served for it alone. An address it shares stays served for the other
    Services and does not hold this one back."""
    if not needs_cleanup(service, load_balancer_class):
        return False
    return all(ip not in users or users[ip] - {service.key} for ip in service.ingress_ips)


def must_clear_status(service: Service, load_balancer_class: str | None) -> bool:
    """Before its finalizer goes, a Service that stays (its type changed) loses its addresses too."""
    return bool(service.ingress_ips) and not service.deleting and not is_handled(service, load_balancer_class)


def endpoint_counts(slices: Iterable[Mapping[str, Any]]) -> dict[str, dict[Family, dict[str, int]]]:
    """Service key -> family -> node -> ready endpoints there, from EndpointSlices.

    Only counts come out (node names serve as keys to Nodes we already know, never as text to
    render), and whatever is malformed is skipped: a slice the API server accepted is the
    EndpointSlice controller's, but a hostile writer's slice must cost no more than its own counts.
    An endpoint whose `ready` condition is unset counts as ready, as the API documents.
    """
    counts: dict[str, dict[Family, dict[str, int]]] = {}
    for piece in slices:
        meta = piece.get("metadata")
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        if not isinstance(meta, Mapping) or not isinstance(labels, Mapping):
            continue
        family = piece.get("addressType")
        try:
            key = f"{canonical.dns_label(meta.get('namespace'))}/{canonical.dns_label(labels.get(LABEL_SERVICE_NAME))}"
        except canonical.Invalid:
            continue
        if family not in ("IPv4", "IPv6"):
            continue  # FQDN slices carry no node endpoints
        per_node = counts.setdefault(key, {}).setdefault(family, {})
        for endpoint in piece.get("endpoints") or []:
            if not isinstance(endpoint, Mapping):
                continue
            conditions = endpoint.get("conditions")
            ready = conditions.get("ready") if isinstance(conditions, Mapping) else None
            node = endpoint.get("nodeName")
            if ready is False or not isinstance(node, str) or len(node) > 253:
                continue
            per_node[node] = per_node.get(node, 0) + 1
    return counts
