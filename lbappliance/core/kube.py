"""Kubernetes wire-format objects (camelCase dicts) to core models, and what we handle."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .models import (
    FINALIZER,
    LABEL_EXCLUDE,
    TAINT_AUTOSCALER_DELETE,
    Node,
    Service,
    ServicePort,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


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
    where = f"Service {namespace}/{name}"
    if not DNS_LABEL.match(namespace) or not DNS_LABEL.match(name):
        raise ObjectError(f"{where}: metadata.name/namespace must be DNS labels")
    ports = []
    for i, port in enumerate(spec.get("ports") or []):
        number = _int_or_none(port.get("port"))
        if number is None or not 0 < number < 65536:
            raise ObjectError(f"{where}: spec.ports[{i}].port must be 1-65535, got {port.get('port')!r}")
        node_port = _int_or_none(port.get("nodePort"))
        ports.append(ServicePort(
            name=str(port.get("name") or ""),
            protocol=str(port.get("protocol") or "TCP"),
            port=number,
            node_port=node_port,
        ))
    affinity_cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    timeout = _int_or_none(affinity_cfg.get("timeoutSeconds")) or 10800
    ingress = tuple(
        str(entry["ip"]) for entry in (status.get("loadBalancer") or {}).get("ingress") or [] if entry.get("ip")
    )
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
        annotations=_str_map(meta.get("annotations")),
        labels=_str_map(meta.get("labels")),
        ingress_ips=ingress,
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(str(f) for f in meta.get("finalizers") or []),
    )


def node_from_object(obj: Mapping[str, Any]) -> Node:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name") or "")
    if not DNS_SUBDOMAIN.match(name):
        raise ObjectError(f"Node {name!r}: metadata.name must be a DNS subdomain")
    return Node(
        name=name,
        addresses=tuple(
            (str(a.get("type")), str(a.get("address"))) for a in status.get("addresses") or [] if a.get("address")
        ),
        labels=_str_map(meta.get("labels")),
        taints=tuple(str(t.get("key")) for t in spec.get("taints") or []),
        deleting=bool(meta.get("deletionTimestamp")),
    )


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
) -> tuple[list[Service] | list[Node], list[str]]:
    """Parse every object of `kind`, collecting an error per unreadable one instead of stopping."""
    return ParsedObjects(kind).parse(objects)


class ParsedObjects:
    """`parse_objects` over successive snapshots: an object is read again only when its uid or
    resourceVersion changed, so a pass over 1,000 unchanged Services costs 1,000 dict lookups.

    Only the last snapshot's results are kept; the models are frozen, so sharing them is safe.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._convert = service_from_object if kind == "Service" else node_from_object
        self._last: dict[tuple[str, str], Service | Node | str] = {}

    def parse(self, objects: Iterable[Mapping[str, Any]]) -> tuple[list[Any], list[str]]:
        parsed: list[Any] = []
        errors: list[str] = []
        seen: dict[tuple[str, str], Service | Node | str] = {}
        for obj in objects:
            if obj.get("kind", self.kind) != self.kind:
                continue
            meta = obj.get("metadata") or {}
            uid, version = meta.get("uid"), meta.get("resourceVersion")
            key = (uid, version) if isinstance(uid, str) and isinstance(version, str) else None
            result = self._last.get(key) if key else None
            if result is None:
                result = self._read(obj)
            if key:
                seen[key] = result
            (errors if isinstance(result, str) else parsed).append(result)
        self._last = seen
        return parsed, errors

    def _read(self, obj: Mapping[str, Any]) -> Service | Node | str:
        try:
            return self._convert(obj)
        except (ObjectError, AttributeError, TypeError) as exc:
            return str(exc)
