"""MetalLB compatibility, pure: its Service annotations as aliases of ours, and its IPAddressPools
turned into pools.yaml.

Why: people switching from MetalLB keep their manifests. An alias only renames the key; the value
goes through the same validation as ours (IPAM and the planner read our keys, through
core/canonical), so a MetalLB spelling can never reach a rendered file by another road.

Sharing differs on purpose: MetalLB shares an address between Services of *any* namespace with the
same `allow-shared-ip` key; ours shares only inside one namespace (a tenant can never join someone
else's address). `cross_namespace_keys` finds the keys that would have shared across namespaces,
so they can be reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .canonical import truncate
from .models import ANN_LB_IPS, ANN_POOL, ANN_SHARED, Service

METALLB_PREFIXES = ("metallb.io/", "metallb.universe.tf/")
# Our key for each MetalLB key suffix. The newer `metallb.io/` spelling wins over the older one.
_SUFFIXES = {"loadBalancerIPs": ANN_LB_IPS, "address-pool": ANN_POOL, "allow-shared-ip": ANN_SHARED}
ALIASES: dict[str, str] = {prefix + suffix: ours for prefix in METALLB_PREFIXES for suffix, ours in _SUFFIXES.items()}


def with_aliases(annotations: dict[str, str]) -> dict[str, str]:
    """`annotations` with each MetalLB key also under our key, unless ours is set (ours win).

    The MetalLB keys stay as they are (nothing else reads them); the map is returned unchanged
    when no MetalLB key is present, which is the common case and costs one scan.
    """
    if not any(key in ALIASES for key in annotations):
        return annotations
    merged = dict(annotations)
    for prefix in METALLB_PREFIXES:  # metallb.io/ first: it wins over metallb.universe.tf/
        for suffix, ours in _SUFFIXES.items():
            value = annotations.get(prefix + suffix)
            if value is not None and ours not in merged:
                merged[ours] = value
    return merged


def metallb_keys(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """The MetalLB annotation keys a Service carries (sorted): adopted Services are recognised by them."""
    return tuple(sorted(k for k in annotations if k.startswith(METALLB_PREFIXES)))


def _metallb_sharing_key(service: Service) -> str | None:
    """The MetalLB sharing key a Service carries (the metallb.io/ spelling first), or None."""
    for prefix in METALLB_PREFIXES:
        value = service.annotations.get(prefix + "allow-shared-ip")
        if value is not None:
            return value
    return None


def cross_namespace_keys(services: Iterable[Service]) -> dict[str, tuple[str, ...]]:
    """MetalLB sharing key -> the namespaces using it, for keys used in more than one namespace.

    Under MetalLB those Services could share one address; here each namespace gets its own.
    """
    namespaces: dict[str, set[str]] = {}
    for service in services:
        key = _metallb_sharing_key(service)
        if key is not None:
            namespaces.setdefault(key, set()).add(service.namespace)
    return {key: tuple(sorted(ns)) for key, ns in sorted(namespaces.items()) if len(ns) > 1}


# ---- pool import: `kubectl get ipaddresspools -A -o yaml` -> pools.yaml --------------------------

POOL_API_GROUP = "metallb.io/"
# The IPAddressPool fields with a counterpart in pools.yaml (spec.<key> -> our key). Everything else
# under spec is refused by name; metadata other than the name and status are not configuration.
_SPEC_FIELDS = {"addresses": "addresses", "autoAssign": "autoAssign", "avoidBuggyIPs": "avoidBuggyIPs"}
_ALLOCATION_FIELDS = {"priority": "priority", "namespaces": "namespaces", "serviceSelectors": "serviceSelectors"}
_WHY_NOT = {
    "namespaceSelectors": "the appliance does not read Namespace labels; list the namespaces instead "
                          "(serviceAllocation.namespaces)",
}


@dataclass(frozen=True)
class ImportResult:
    """Pools (our schema, as mappings) and one refusal per field that has no counterpart."""

    pools: tuple[dict[str, Any], ...]
    refusals: tuple[str, ...]


def import_pools(document: Any) -> ImportResult:
    """Convert MetalLB IPAddressPool objects (a List, one object, or a plain list) into pool entries.

    Every field with a counterpart is carried over; each one without is a refusal naming it (the
    caller writes nothing then). Values are not validated here: the caller validates the whole
    resulting pools.yaml exactly as `pool add` does (addresses, names, selectors, overlaps).
    """
    if isinstance(document, Mapping) and isinstance(document.get("items"), list):
        items: list[Any] = list(document["items"])
    elif isinstance(document, list):
        items = list(document)
    else:
        items = [document]
    pools: list[dict[str, Any]] = []
    refusals: list[str] = []
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if not isinstance(item, Mapping):
            refusals.append(f"{where}: not an object ({type(item).__name__})")
            continue
        kind, api = item.get("kind"), str(item.get("apiVersion") or "")
        meta = item.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        where = f"{where} ({truncate(name)})" if name else where
        if kind != "IPAddressPool" or not api.startswith(POOL_API_GROUP):
            refusals.append(f"{where}: {truncate(api)} {truncate(kind)} is not a metallb.io IPAddressPool "
                            "(L2Advertisement/BGPAdvertisement have no counterpart: keepalived announces every VIP)")
            continue
        entry, problems = _pool_entry(item.get("spec"), name, where)
        refusals.extend(problems)
        if entry is not None:
            pools.append(entry)
    return ImportResult(tuple(pools), tuple(refusals))


def _pool_entry(spec: Any, name: Any, where: str) -> tuple[dict[str, Any] | None, list[str]]:
    if not isinstance(spec, Mapping):
        return None, [f"{where}: spec: must be a mapping"]
    refusals = [f"{where}: spec.{key}: {_WHY_NOT.get(key, 'no counterpart in pools.yaml')}"
                for key in spec if key not in _SPEC_FIELDS and key != "serviceAllocation"]
    entry: dict[str, Any] = {"name": name}
    for key, ours in _SPEC_FIELDS.items():
        if key in spec:
            entry[ours] = list(spec[key]) if key == "addresses" and isinstance(spec[key], list) else spec[key]
    allocation = spec.get("serviceAllocation")
    if allocation is not None:
        if not isinstance(allocation, Mapping):
            refusals.append(f"{where}: spec.serviceAllocation: must be a mapping")
        else:
            refusals.extend(f"{where}: spec.serviceAllocation.{key}: "
                            f"{_WHY_NOT.get(key, 'no counterpart in pools.yaml')}"
                            for key in allocation if key not in _ALLOCATION_FIELDS)
            carried = {ours: allocation[key] for key, ours in _ALLOCATION_FIELDS.items() if key in allocation}
            if carried:
                entry["serviceAllocation"] = carried
    return entry, refusals


def merge_pools(existing: list[dict[str, Any]], imported: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Existing pools with each imported one replacing the pool of its name, new ones appended.

    Import twice and the second run changes nothing (idempotent).
    """
    merged = list(existing)
    for pool in imported:
        names = [p.get("name") for p in merged]
        if pool["name"] in names:
            merged[names.index(pool["name"])] = pool
        else:
            merged.append(pool)
    return merged
