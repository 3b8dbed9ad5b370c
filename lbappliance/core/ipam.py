"""IPAM: `(pools, services) -> Allocation`, pure and deterministic.

The cluster is the only store of assignments: an address a Service already shows in
`status.loadBalancer.ingress` is kept while it is still valid, so nothing reshuffles
when another Service goes away or the appliance restarts. Allocation runs in three
passes over Services in a fixed order (oldest first): held addresses, then requested
ones, then automatic picks, so a newer request never displaces an address in use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import canonical
from .canonical import truncate
from .kube import wants_address
from .models import (
    ANN_LB_IPS,
    ANN_POOL,
    ANN_SHARED,
    Allocation,
    Family,
    IPAddress,
    Pool,
    Problem,
    Reason,
    Service,
    family_of,
)

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


class IntentError(ValueError):
    pass


@dataclass(frozen=True)
class Intent:
    """What one Service asks of IPAM, read and validated from its spec and annotations."""

    service: Service
    families: tuple[Family, ...]
    required: frozenset[Family]
    requested: dict[Family, IPAddress]
    pool: str | None
    sharing: tuple[str, str] | None
    ports: frozenset[tuple[str, int]]
    held: tuple[IPAddress, ...]


@dataclass
class Owner:
    """Who holds one address in this pass: a sharing key (or none) and the ports in use."""

    sharing: tuple[str, str] | None
    ports: set[tuple[str, int]]
    services: list[str]

    def admits_key(self, intent: Intent) -> bool:
        return self.sharing is not None and self.sharing == intent.sharing

    def admits(self, intent: Intent) -> bool:
        return self.admits_key(intent) and not (self.ports & intent.ports)


@dataclass
class _State:
    pools: Sequence[Pool]
    used: dict[tuple[int, int], Owner] = field(default_factory=dict)  # (version, int): cheap to hash
    cursors: dict[tuple[str, int], int] = field(default_factory=dict)
    assigned: dict[str, dict[Family, IPAddress]] = field(default_factory=dict)
    pool_of: dict[IPAddress, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def read_intent(service: Service) -> Intent:
    """Validate the allocation-related fields of one Service; raise IntentError naming the field."""
    requested: dict[Family, IPAddress] = {}
    sources: list[tuple[str, object]] = []
    if service.load_balancer_ip:
        sources.append(("spec.loadBalancerIP", service.load_balancer_ip))
    ann = service.annotations.get(ANN_LB_IPS)
    if ann is not None:
        # A comma list; spaces around the commas are list syntax, anything else is the address's.
        sources.extend((f"annotation {ANN_LB_IPS}", part.strip(" ")) for part in ann.split(","))
    for where, text in sources:
        try:
            # The API server refuses what is not canonical (a zone id, IPv4-mapped IPv6): such a
            # request is never assigned, so it never blocks the address for anyone else.
            address = canonical.address(text)
        except canonical.Invalid as exc:
            raise IntentError(f"{where}: {exc}") from None
        family = family_of(address)
        if family in requested and requested[family] != address:
            raise IntentError(f"{where}: more than one {family} address requested "
                              f"({requested[family]} and {address})")
        requested[family] = address
    sharing = None
    if ANN_SHARED in service.annotations:
        try:
            key = canonical.label_value(service.annotations[ANN_SHARED])
        except canonical.Invalid as exc:
            raise IntentError(f"annotation {ANN_SHARED}: not a valid sharing key: {exc}") from None
        sharing = (service.namespace, key)
    families = _families(service, requested)
    required = frozenset(families if service.ip_family_policy == "RequireDualStack" else families[:1])
    for family in requested:
        if family not in families:
            raise IntentError(f"requested {family} address {requested[family]} but the Service's "
                              f"ipFamilies are {list(families)}")
    held = []
    for text in service.ingress_ips:
        try:
            held.append(canonical.address(text))
        except canonical.Invalid:
            continue  # the API server never stores it; only a file read offline can hold one
    return Intent(
        service=service,
        families=families,
        required=required,
        requested=requested,
        pool=service.annotations.get(ANN_POOL),
        sharing=sharing,
        ports=frozenset((p.protocol, p.port) for p in service.ports),
        held=tuple(held),
    )


def _families(service: Service, requested: dict[Family, IPAddress]) -> tuple[Family, ...]:
    listed = tuple(f for f in service.ip_families if f in FAMILIES)
    if not listed:
        listed = tuple(f for f in FAMILIES if f in requested) or ("IPv4",)
    if service.ip_family_policy == "SingleStack":
        return listed[:1]
    return listed


def allocate(
    pools: Sequence[Pool], services: Iterable[Service], load_balancer_class: str | None = None
) -> Allocation:
    state = _State(pools=sorted(pools, key=Pool.order_key))
    intents: list[Intent] = []
    for service in sorted((s for s in services if wants_address(s, load_balancer_class)),
                          key=Service.sort_key):
        try:
            intents.append(read_intent(service))
        except IntentError as exc:
            state.problems.append(Problem(service.key, Reason.INVALID, str(exc)))
    known = {p.name for p in pools}
    usable = []
    for intent in intents:
        if intent.pool is not None and intent.pool not in known:
            state.problems.append(Problem(intent.service.key, Reason.ALLOCATION_FAILED,
                                          f"annotation {ANN_POOL}: no pool named {truncate(intent.pool)}"))
            continue
        usable.append(intent)
        state.assigned[intent.service.key] = {}
    for intent in usable:
        _keep_held(state, intent)
    for intent in usable:
        _take_requested(state, intent)
    for intent in usable:
        _pick_automatic(state, intent)
    assignments = {}
    for intent in usable:
        got = state.assigned[intent.service.key]
        missing = sorted(intent.required - got.keys())
        if missing:
            for address in got.values():
                _release(state, intent, address)
            continue
        assignments[intent.service.key] = tuple(str(got[f]) for f in intent.families if f in got)
    pool_of = {str(a): p for a, p in state.pool_of.items() if _slot(a) in state.used}
    return Allocation(assignments=assignments, pool_of=pool_of, problems=tuple(sorted(state.problems)))


def _admitting_pool(state: _State, intent: Intent, address: IPAddress) -> Pool | None:
    """The pool this address is in, if that pool may serve this Service."""
    for pool in state.pools:
        if pool.contains(address):
            if intent.pool is not None:
                return pool if pool.name == intent.pool else None
            return pool if pool.admits(intent.service) else None
    return None


def _claim(state: _State, intent: Intent, address: IPAddress, pool: Pool) -> None:
    owner = state.used.get(_slot(address))
    if owner is None:
        state.used[_slot(address)] = Owner(intent.sharing, set(intent.ports), [intent.service.key])
    else:
        owner.ports |= intent.ports
        owner.services.append(intent.service.key)
    state.pool_of[address] = pool.name
    state.assigned[intent.service.key][family_of(address)] = address


def _release(state: _State, intent: Intent, address: IPAddress) -> None:
    owner = state.used[_slot(address)]
    owner.services.remove(intent.service.key)
    owner.ports -= intent.ports
    if not owner.services:
        del state.used[_slot(address)]


def _usable(state: _State, intent: Intent, address: IPAddress) -> tuple[Pool | None, str]:
    pool = _admitting_pool(state, intent, address)
    if pool is None:
        where = f"pool {intent.pool!r}" if intent.pool else "any pool that admits this Service"
        return None, f"{address} is not in {where}"
    owner = state.used.get(_slot(address))
    if owner is not None and not owner.admits(intent):
        why = "without a matching sharing key" if not owner.admits_key(intent) else "with a port clash"
        return None, f"{address} is already used by {', '.join(owner.services)} {why}"
    return pool, ""


def _keep_held(state: _State, intent: Intent) -> None:
    for address in intent.held:
        family = family_of(address)
        if family not in intent.families or family in state.assigned[intent.service.key]:
            continue
        if intent.requested.get(family, address) != address:
            continue
        pool, _ = _usable(state, intent, address)
        if pool is not None:
            _claim(state, intent, address, pool)


def _take_requested(state: _State, intent: Intent) -> None:
    for family, address in sorted(intent.requested.items()):
        if family in state.assigned[intent.service.key]:
            continue
        pool, why = _usable(state, intent, address)
        if pool is None:
            state.problems.append(Problem(intent.service.key, Reason.ALLOCATION_FAILED,
                                          f"requested address {why}"))
            continue
        _claim(state, intent, address, pool)


def _pick_automatic(state: _State, intent: Intent) -> None:
    got = state.assigned[intent.service.key]
    for family in intent.families:
        if family in got or family in intent.requested:
            continue
        stray = _held_outside_pools(state, intent, family)
        if stray is not None:
            # Another implementation's address (a MetalLB range not configured here, say): moving
            # it would break whoever uses it, so it is reported and left alone.
            state.problems.append(Problem(intent.service.key, Reason.ALLOCATION_FAILED,
                                          f"holds {stray}, which is in no pool: not served and not moved; add it to "
                                          "a pool to adopt it, or clear its status to get a new address"))
            continue
        address, pool = _shared_address(state, intent, family) or _free_address(state, intent, family)
        if address is None or pool is None:
            if family in intent.required:
                state.problems.append(Problem(intent.service.key, Reason.ALLOCATION_FAILED,
                                              f"no free {family} address in {_pool_scope(intent)}"))
            continue
        _claim(state, intent, address, pool)


def _held_outside_pools(state: _State, intent: Intent, family: Family) -> IPAddress | None:
    """The Service's status address of `family` when no pool contains it at all."""
    for address in intent.held:
        if family_of(address) == family and not any(p.contains(address) for p in state.pools):
            return address
    return None


def _pool_scope(intent: Intent) -> str:
    return f"pool {intent.pool!r}" if intent.pool else "the pools that admit this Service"


def _shared_address(state: _State, intent: Intent, family: Family) -> tuple[IPAddress, Pool] | None:
    if intent.sharing is None:
        return None
    shared = sorted(slot for slot, o in state.used.items() if o.sharing == intent.sharing)
    for version, value in shared:
        address: IPAddress = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
        if family_of(address) != family:
            continue
        pool, _ = _usable(state, intent, address)
        if pool is not None:
            return address, pool
    return None


def _candidate_pools(state: _State, intent: Intent) -> list[Pool]:
    if intent.pool is not None:
        return [p for p in state.pools if p.name == intent.pool]
    return [p for p in state.pools if p.auto_assign and p.admits(intent.service)]


def _free_address(state: _State, intent: Intent, family: Family) -> tuple[IPAddress | None, Pool | None]:
    for pool in _candidate_pools(state, intent):
        for index, rng in enumerate(pool.ranges):
            if rng.family != family:
                continue
            start = state.cursors.get((pool.name, index), int(rng.first))
            version = rng.first.version
            value = start
            last = int(rng.last)
            while value <= last:
                if (version, value) not in state.used and not (pool.avoid_buggy_ips and _buggy_value(version, value)):
                    state.cursors[(pool.name, index)] = value + 1
                    return type(rng.first)(value), pool
                value += 1
            state.cursors[(pool.name, index)] = value
    return None, None


def _buggy_value(version: int, value: int) -> bool:
    """Addresses ending in .0 or .255, which some old client stacks mistake for broadcast."""
    return version == 4 and (value & 0xFF) in (0, 0xFF)


def _slot(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)



def orphaned_addresses(old: Sequence[Pool], new: Sequence[Pool], services: Iterable[Service]) -> list[str]:
    """Addresses in use that a pools edit would drop from every pool: the edit is refused instead
    (like MetalLB refusing pools that would orphan assigned IPs), so an address is never yanked."""
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
