"""BGP announce mode: config.yaml's `announce` block, which VIPs this box may announce, and frr.conf.

In `announce.mode: bgp` every appliance announces the /32 (/128) of each VIP it can serve to its
routers (FRR's bgpd, BFD from bfdd); the routers spread flows over the boxes by ECMP. Pure: the
edge that runs FRR's tools is `edges/frr.py`. Every value that reaches frr.conf has passed
`core/canonical.py` (a space or a newline in a value would be another FRR command).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import canonical
from .models import DesiredState, Pool, address_sort_key, parse_address
from .templates import environment

AddressFamily = Literal["ipv4", "ipv6"]
#: HAProxy's server states in which a server takes new connections (`show stat` status column).
SERVING_STATES = frozenset({"UP", "UP 1/2", "UP 1/3", "NOLB", "no check"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


def _canonical(check: Any, value: Any, what: str) -> Any:
    """`check(value)`, its refusal as the ValueError pydantic reports at the field's path (`what` names
    the value when it is not the field itself, a dict key say)."""
    try:
        return check(value)
    except canonical.Invalid as exc:
        raise ValueError(f"{what} {exc}" if what.endswith("name") else str(exc)) from None


class BfdSettings(_Strict):
    """One BFD profile: failure is declared after `detectMultiplier` missed packets of
    max(our receive interval, the peer's transmit interval)."""

    profile: str | None = None  # the FRR profile's name; default derived from the timers
    receive_interval_ms: int = Field(default=300, alias="receiveIntervalMs", ge=10, le=60000)
    transmit_interval_ms: int = Field(default=300, alias="transmitIntervalMs", ge=10, le=60000)
    detect_multiplier: int = Field(default=3, alias="detectMultiplier", ge=2, le=255)

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        return None if v is None else str(_canonical(canonical.frr_name, v, "profile"))

    @property
    def name(self) -> str:
        return self.profile or f"lb-{self.receive_interval_ms}-{self.transmit_interval_ms}-{self.detect_multiplier}"

    @property
    def detect_ms(self) -> int:
        return self.receive_interval_ms * self.detect_multiplier


class BgpPeer(_Strict):
    address: str
    asn: int
    password: str | None = None
    bfd: BfdSettings | None = None
    # The address families announced on this session; default: the peer address's family.
    families: tuple[AddressFamily, ...] | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return str(_canonical(canonical.address_text, v, "address"))

    @field_validator("asn")
    @classmethod
    def _asn(cls, v: int) -> int:
        return int(_canonical(canonical.asn, v, "asn"))

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        return None if v is None else str(_canonical(canonical.bgp_password, v, "password"))

    @property
    def address_families(self) -> tuple[AddressFamily, ...]:
        if self.families is not None:
            return tuple(sorted(set(self.families)))
        return ("ipv6",) if ":" in self.address else ("ipv4",)


class PoolAnnounce(_Strict):
    """How the VIPs of one pool are announced: communities the routers can match, and local-pref
    (carried on iBGP sessions only; eBGP routers ignore it)."""

    communities: tuple[str, ...] = ()
    local_preference: int | None = Field(default=None, alias="localPreference", ge=0, le=4294967295)

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({str(_canonical(canonical.community, c, "community")) for c in v}))

    @property
    def standard_communities(self) -> tuple[str, ...]:
        return tuple(c for c in self.communities if not canonical.is_large_community(c))

    @property
    def large_communities(self) -> tuple[str, ...]:
        return tuple(c for c in self.communities if canonical.is_large_community(c))


class BgpSettings(_Strict):
    asn: int
    router_id: str = Field(alias="routerId")
    peers: tuple[BgpPeer, ...] = Field(min_length=1)
    families: tuple[AddressFamily, ...] = ("ipv4", "ipv6")
    pools: dict[str, PoolAnnounce] = Field(default_factory=dict)
    keepalive_seconds: int = Field(default=3, alias="keepaliveSeconds", ge=1, le=21845)
    hold_time_seconds: int = Field(default=9, alias="holdTimeSeconds", ge=3, le=65535)
    # How soon bgpd tries a session again after it failed (FRR's default is 120 s: a box that
    # restarts, or a ToR that reboots, would be out of ECMP for two minutes).
    connect_retry_seconds: int = Field(default=2, alias="connectRetrySeconds", ge=1, le=65535)
    # A clean stop withdraws every VIP, waits until the routers have it (the withdrawal left
    # bgpd's Adj-RIB-Out, then this much longer for them to reprogram), and only then lets
    # HAProxy finish its connections (at most drainSeconds) and stop.
    withdraw_settle_seconds: float = Field(default=0.5, alias="withdrawSettleSeconds", ge=0, le=60)
    drain_seconds: float = Field(default=30.0, alias="drainSeconds", ge=0, le=86400)
    # Where FRR lives on the box (Debian's frr package); the lab points these into its namespaces.
    config_path: str = Field(default="/etc/frr/frr.conf", alias="configPath")
    vty_socket_dir: str = Field(default="/var/run/frr", alias="vtySocketDir")
    vtysh_binary: str = Field(default="/usr/bin/vtysh", alias="vtyshBinary")
    frr_reload_binary: str = Field(default="/usr/lib/frr/frr-reload.py", alias="frrReloadBinary")

    @field_validator("asn")
    @classmethod
    def _asn(cls, v: int) -> int:
        return int(_canonical(canonical.asn, v, "asn"))

    @field_validator("router_id")
    @classmethod
    def _router_id(cls, v: str) -> str:
        return str(_canonical(canonical.router_id, v, "routerId"))

    @field_validator("families")
    @classmethod
    def _families(cls, v: tuple[AddressFamily, ...]) -> tuple[AddressFamily, ...]:
        if not v:
            raise ValueError("at least one address family (ipv4, ipv6)")
        return tuple(sorted(set(v)))

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, v: dict[str, PoolAnnounce]) -> dict[str, PoolAnnounce]:
        for name in v:
            _canonical(canonical.dns_label, name, "pool name")
        return dict(sorted(v.items()))

    @field_validator("config_path", "vty_socket_dir", "vtysh_binary", "frr_reload_binary")
    @classmethod
    def _paths(cls, v: str) -> str:
        return str(_canonical(canonical.absolute_path, v, "path"))

    @model_validator(mode="after")
    def _consistent(self) -> BgpSettings:
        seen: set[str] = set()
        for peer in self.peers:
            if peer.address in seen:
                raise ValueError(f"peer {peer.address} is listed twice")
            seen.add(peer.address)
            missing = set(peer.address_families) - set(self.families)
            if missing:
                raise ValueError(f"peer {peer.address} carries {sorted(missing)}, "
                                 f"not in families {list(self.families)}")
        if self.hold_time_seconds < 3 * self.keepalive_seconds:
            raise ValueError(f"holdTimeSeconds {self.hold_time_seconds} is less than 3 x keepaliveSeconds "
                             f"{self.keepalive_seconds}")
        return self

    def bfd_profiles(self) -> tuple[BfdSettings, ...]:
        """Every distinct profile the peers use, by name; two different timers under one name are refused
        by `_unique_profiles` at load time, so the name identifies the timers."""
        found = {p.bfd.name: p.bfd for p in self.peers if p.bfd is not None}
        return tuple(found[name] for name in sorted(found))

    @model_validator(mode="after")
    def _unique_profiles(self) -> BgpSettings:
        found: dict[str, BfdSettings] = {}
        for peer in self.peers:
            if peer.bfd is not None:
                other = found.setdefault(peer.bfd.name, peer.bfd)
                if other != peer.bfd:
                    raise ValueError(f"BFD profile {peer.bfd.name!r} is given two different sets of timers")
        return self


class AnnounceSettings(_Strict):
    """How VIPs reach the network: VRRP (a pair floats them on one segment) or BGP (N boxes route them)."""

    mode: Literal["vrrp", "bgp"] = "vrrp"
    bgp: BgpSettings | None = None

    @model_validator(mode="after")
    def _bgp_needs_settings(self) -> AnnounceSettings:
        if self.mode == "bgp" and self.bgp is None:
            raise ValueError("mode bgp needs the bgp settings (asn, routerId, peers)")
        return self


# ---- what to announce


@dataclass(frozen=True)
class AnnounceDecision:
    """Which VIPs this box announces, and why each other VIP is withdrawn."""

    announced: tuple[str, ...]
    withdrawn: Mapping[str, str]  # VIP -> reason


def announce_decision(state: DesiredState, haproxy_up: bool,
                      server_states: Mapping[tuple[str, str], str]) -> AnnounceDecision:
    """A VIP is announced only while this box can serve it: HAProxy is up and some Service port on
    the VIP has a server HAProxy reports serving here. Server states come from this box's own
    checks, so a Service with no healthy backend seen from one box is withdrawn from that box only."""
    backends: dict[str, set[str]] = {}
    for frontend in state.frontends:
        backends.setdefault(frontend.vip, set()).add(frontend.backend.name)
    for forward in state.udp:
        backends.setdefault(forward.vip, set()).add(forward.backend.name)
    serving: dict[str, bool] = {}
    for (backend, _server), status in server_states.items():
        if status in SERVING_STATES:
            serving[backend] = True
    announced: list[str] = []
    withdrawn: dict[str, str] = {}
    for vip in state.vips:
        if not haproxy_up:
            withdrawn[vip] = "haproxy is not running"
        elif not any(serving.get(b, False) for b in backends.get(vip, ())):
            withdrawn[vip] = "no healthy backend from this box"
        else:
            announced.append(vip)
    return AnnounceDecision(tuple(announced), withdrawn)


# ---- frr.conf


@dataclass(frozen=True)
class Announcement:
    prefix: str  # VIP/32 or VIP/128
    family: AddressFamily
    route_map: str | None  # the pool's route-map (communities, local-pref), if it sets any


def pool_route_map(pool: str) -> str:
    return f"LB-POOL-{pool}"


def announcements(vips: Iterable[str], pools: Sequence[Pool], bgp: BgpSettings) -> tuple[Announcement, ...]:
    """Each VIP of a family BGP carries as a host prefix, with its pool's route-map when it has one."""
    out = []
    for vip in sorted(set(vips), key=address_sort_key):
        parsed = parse_address(vip)
        family: AddressFamily = "ipv4" if parsed.version == 4 else "ipv6"
        if family not in bgp.families:
            continue
        pool = next((p.name for p in pools if any(parsed in r for r in p.ranges)), None)
        route_map = pool_route_map(pool) if pool is not None and _sets_anything(bgp.pools.get(pool)) else None
        out.append(Announcement(f"{parsed}/{parsed.max_prefixlen}", family, route_map))
    return tuple(out)


def _sets_anything(spec: PoolAnnounce | None) -> bool:
    return spec is not None and (bool(spec.communities) or spec.local_preference is not None)


def render_frr(name: str, bgp: BgpSettings, announced: Iterable[str], pools: Sequence[Pool]) -> str:
    """frr.conf for this box: its sessions, BFD profiles, the VIPs it announces now and the pools'
    route-maps. Byte-stable (sorted everywhere); applied by frr-reload.py, which sends only the diff."""
    routes = announcements(announced, pools, bgp)
    return environment().get_template("frr.conf.j2").render(
        hostname=canonical.dns_label(name),
        bgp=bgp,
        peers=sorted(bgp.peers, key=lambda p: address_sort_key(p.address)),
        profiles=bgp.bfd_profiles(),
        families=bgp.families,
        routes=routes,
        pool_maps=[(pool_route_map(n), spec) for n, spec in bgp.pools.items() if _sets_anything(spec)],
    )
