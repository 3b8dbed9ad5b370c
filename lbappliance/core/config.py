"""Schemas and validation for config.yaml and pools.yaml.

Parsing takes text (never a path to open) so it stays pure; every error names the file,
the field path and the bad value.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import canonical, yamlsafe
from .bgp import AnnounceSettings
from .canonical import truncate
from .models import FAMILY_TAG, AddressRange, Family, IPAddress, LabelRequirement, LabelSelector, Pool

API_VERSION: Literal["lbappliance.io/v1alpha1"] = "lbappliance.io/v1alpha1"
# Used with fullmatch only: `re.match(r"...$")` accepts a trailing newline.
LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class FieldError:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}" if self.path else f"{self.file}: {self.message}"


class ConfigError(ValueError):
    """Input that cannot be used; carries every problem found, not just the first."""

    def __init__(self, errors: Iterable[FieldError]):
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


def _absolute_path(value: str) -> str:
    return canonical.absolute_path(value)


AbsPath = Annotated[str, Field(min_length=1)]


class ClusterSettings(_Strict):
    kubeconfig: AbsPath | None = None
    load_balancer_class: str | None = Field(default=None, alias="loadBalancerClass")
    node_address_types: tuple[Literal["InternalIP", "ExternalIP", "Hostname"], ...] = Field(
        default=("InternalIP", "ExternalIP"), alias="nodeAddressTypes", min_length=1
    )

    @field_validator("kubeconfig")
    @classmethod
    def _kubeconfig_path(cls, v: str | None) -> str | None:
        return None if v is None else _absolute_path(v)


class RouterIds(_Strict):
    """The first virtual_router_id of each family; instance i of a family uses first + i."""

    ipv4: int = Field(default=51, ge=1, le=255)
    ipv6: int = Field(default=52, ge=1, le=255)


class VrrpSettings(_Strict):
    interface: str = "eth0"
    router_ids: RouterIds = Field(default_factory=RouterIds, alias="routerIds")
    priority: int = Field(default=100, ge=1, le=254)
    # Active-active: VIPs are spread over `instances` VRRP instances per family (by a stable hash
    # of the VIP, or the lbappliance.io/vrrp-instance annotation). This box runs `priority` on
    # its home instances and `backupPriority` on the others; the peer mirrors it (home on the
    # others), so each box is MASTER for its share and the loss of either moves only that share.
    instances: int = Field(default=2, ge=1, le=16)
    home_instances: tuple[int, ...] = Field(default=(0,), alias="homeInstances")
    backup_priority: int | None = Field(default=None, alias="backupPriority", ge=1, le=254)
    # Seconds a higher-priority box waits before taking back its home instances (nopreempt: false).
    preempt_delay: int | None = Field(default=None, alias="preemptDelay", ge=0, le=1000)
    advert_interval: float = Field(default=0.1, alias="advertInterval", ge=0.01, le=40.0)
    unicast_src_ip: str | None = Field(default=None, alias="unicastSrcIp")
    unicast_peers: tuple[str, ...] = Field(default=(), alias="unicastPeers")
    unicast_src_ip6: str | None = Field(default=None, alias="unicastSrcIp6")
    unicast_peers6: tuple[str, ...] = Field(default=(), alias="unicastPeers6")
    # Constant addresses every box advertises. Service VIPs ride along as excluded addresses,
    # so adding or removing one never changes the advert: keepalived drops adverts whose address
    # count differs from its own, and the two boxes never reload at the same instant.
    # Defaults are link-local (IPv6 VRRPv3 wants a link-local first address anyway).
    anchor_address: str | None = Field(default=None, alias="anchorAddress")
    anchor_address6: str | None = Field(default=None, alias="anchorAddress6")
    nopreempt: bool = True
    # Nice level of keepalived's VRRP process, so busy boxes still advertise on time. Not
    # vrrp_rt_priority: with realtime scheduling, keepalived 2.2.7 flaps MASTER/BACKUP on
    # every SIGHUP reload (measured in the lab; 0 transitions with a nice level instead).
    process_priority: int | None = Field(default=-20, alias="processPriority", ge=-20, le=19)
    check_interval: int = Field(default=1, alias="checkIntervalSeconds", ge=1, le=60)

    @field_validator("interface")
    @classmethod
    def _iface(cls, v: str) -> str:
        try:
            return canonical.interface(v)
        except canonical.Invalid as exc:
            raise ValueError(f"not a valid interface name: {exc}") from None

    @field_validator("anchor_address", "anchor_address6", "unicast_src_ip", "unicast_src_ip6")
    @classmethod
    def _src(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _vrrp_address(v, info.field_name or "")

    @field_validator("unicast_peers", "unicast_peers6")
    @classmethod
    def _peers(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return tuple(_vrrp_address(p, info.field_name or "") for p in v)

    @model_validator(mode="after")
    def _instances(self) -> VrrpSettings:
        bad = [i for i in self.home_instances if not 0 <= i < self.instances]
        if bad:
            raise ValueError(f"homeInstances {list(bad)} outside 0..{self.instances - 1} (instances: {self.instances})")
        for family, first in (("ipv4", self.router_ids.ipv4), ("ipv6", self.router_ids.ipv6)):
            if first + self.instances - 1 > 255:
                raise ValueError(f"routerIds.{family} {first} + {self.instances} instances exceeds 255")
        # keepalived refuses a unicast source with no peer to send to.
        pairs = ((self.unicast_src_ip, self.unicast_peers, "unicastSrcIp", "unicastPeers"),
                 (self.unicast_src_ip6, self.unicast_peers6, "unicastSrcIp6", "unicastPeers6"))
        for src, peers, src_name, peers_name in pairs:
            if src and not peers:
                raise ValueError(f"{src_name} without {peers_name}: keepalived needs a unicast peer to send to")
        for configured, name in ((self.anchor_address, "anchorAddress"), (self.anchor_address6, "anchorAddress6")):
            if configured:
                _check_anchors(canonical.address(configured), self.instances, name)
        return self

    def router_id(self, family: str, index: int = 0) -> int:
        return (self.router_ids.ipv4 if family == "IPv4" else self.router_ids.ipv6) + index

    def instance_priority(self, index: int) -> int:
        """This box's priority on instance `index` of a family: high at home, lower elsewhere."""
        if index in self.home_instances:
            return self.priority
        # Default just below `priority`: the other box's home priority wins, and a short VRRP skew
        # ((256 - priority) / 256 advert intervals) keeps failover of this instance fast.
        return self.backup_priority if self.backup_priority is not None else max(1, self.priority - 1)

    def instance_name(self, family: Family, index: int = 0) -> str:
        base = f"VI_{FAMILY_TAG[family]}"
        return base if index == 0 else f"{base}_{index}"

    def anchors(self) -> tuple[IPAddress, ...]:
        """Every configured anchor (instance i advertises anchor + i); the defaults are link-local."""
        found: list[IPAddress] = []
        for configured in (self.anchor_address, self.anchor_address6):
            if configured:
                found += [canonical.address(configured) + i for i in range(self.instances)]
        return tuple(found)

    def anchor(self, family: str, index: int = 0) -> str:
        """Instance `index`'s advertised address: configured anchor + index, else link-local by router id."""
        configured = self.anchor_address if family == "IPv4" else self.anchor_address6
        if configured:
            return str(ipaddress.ip_address(configured) + index)
        rid = self.router_id(family, index)
        return f"169.254.64.{rid}" if family == "IPv4" else f"fe80::64:{rid}"

    @field_validator("advert_interval")
    @classmethod
    def _centiseconds(cls, v: float) -> float:
        if abs(round(v * 100) - v * 100) > 1e-6:
            raise ValueError(f"VRRPv3 advertisement interval is in centiseconds, got {v}")
        return round(v, 2)


class HealthCheckConfig(_Strict):
    interval_ms: int = Field(default=1000, alias="intervalMilliseconds", ge=100, le=60000)
    fall: int = Field(default=2, ge=1, le=10)
    rise: int = Field(default=2, ge=1, le=10)
    # How long the sessions on a node that says it is draining (kube-proxy /healthz 503: the
    # autoscaler's taint, a deletion) or that left the cluster may go on before they are cut. A
    # node that stopped answering has its sessions cut at once (core/health.py).
    drain_timeout_seconds: int = Field(default=300, alias="drainTimeoutSeconds", ge=0, le=86400)


PEERS_PORT = 10000  # HAProxy's `peers` listener (stick tables), unless an address says otherwise


class StickTablePeer(_Strict):
    """One box's HAProxy in the `peers` section: stick tables (sessionAffinity ClientIP) are pushed
    to every listed box, so a client keeps its node when its flows reach another box."""

    name: str  # that box's `name`
    address: str  # ADDRESS:PORT that box's HAProxy listens on for table updates

    @property
    def endpoint(self) -> tuple[IPAddress, int]:
        return canonical.address_and_port(self.address)

    @field_validator("name")
    @classmethod
    def _peer_name(cls, v: str) -> str:
        return canonical.dns_label(v)

    @field_validator("address")
    @classmethod
    def _peer_address(cls, v: str) -> str:
        return canonical.host_port(v)


class HaproxySettings(_Strict):
    hard_stop_after: str = Field(default="30s", alias="hardStopAfter", pattern=r"^[0-9]+(ms|s|m|h)$")
    max_reloads: int = Field(default=50, alias="maxReloads", ge=1, le=10000)
    maxconn: int = Field(default=100000, ge=1, le=100_000_000)
    timeout_connect: str = Field(default="5s", alias="timeoutConnect", pattern=r"^[0-9]+(ms|s|m|h)$")
    timeout_client: str = Field(default="1h", alias="timeoutClient", pattern=r"^[0-9]+(ms|s|m|h)$")
    timeout_server: str = Field(default="1h", alias="timeoutServer", pattern=r"^[0-9]+(ms|s|m|h)$")
    stats_address: str | None = Field(default="127.0.0.1:8405", alias="statsAddress")
    # Every box (this one included) that shares stick tables. Empty: only this box's own old and
    # new workers share them, over `localPeerAddress`, so a reload keeps every client's node.
    peers: tuple[StickTablePeer, ...] = ()
    local_peer_address: str = Field(default=f"127.0.0.1:{PEERS_PORT}", alias="localPeerAddress")

    @model_validator(mode="after")
    def _distinct_peers(self) -> HaproxySettings:
        for what, values in (("name", [p.name for p in self.peers]), ("address", [p.address for p in self.peers])):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"peers: {what} {', '.join(twice)} listed twice")
        return self

    def table_peers(self, own_name: str) -> tuple[StickTablePeer, ...]:
        """The `peers` section's members: the configured boxes, or this box alone."""
        return self.peers or (StickTablePeer(name=own_name, address=self.local_peer_address),)

    @field_validator("stats_address", "local_peer_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        return None if v is None else canonical.host_port(v)

    @field_validator("hard_stop_after", "timeout_connect", "timeout_client", "timeout_server")
    @classmethod
    def _duration(cls, v: str) -> str:
        return canonical.duration(v)


class PathSettings(_Strict):
    pools: AbsPath = "/etc/lbappliance/pools.yaml"
    haproxy_config: AbsPath = Field(default="/etc/haproxy/haproxy.cfg", alias="haproxyConfig")
    keepalived_config: AbsPath = Field(default="/etc/keepalived/keepalived.conf", alias="keepalivedConfig")
    state_dir: AbsPath = Field(default="/run/lbappliance", alias="stateDir")
    haproxy_binary: AbsPath = Field(default="/usr/sbin/haproxy", alias="haproxyBinary")
    keepalived_binary: AbsPath = Field(default="/usr/sbin/keepalived", alias="keepalivedBinary")
    nft_binary: AbsPath = Field(default="/usr/sbin/nft", alias="nftBinary")

    @field_validator("*")
    @classmethod
    def _paths(cls, v: str) -> str:
        return _absolute_path(v)

    @property
    def runtime_socket(self) -> str:
        return f"{self.state_dir}/haproxy.sock"

    @property
    def master_socket(self) -> str:
        return f"{self.state_dir}/haproxy-master.sock"

    @property
    def haproxy_pidfile(self) -> str:
        return f"{self.state_dir}/haproxy.pid"

    @property
    def haproxy_server_state(self) -> str:
        """Servers' health as the running worker knows it, saved before a reload for the next one."""
        return f"{self.state_dir}/haproxy-servers.state"

    @property
    def keepalived_pidfile(self) -> str:
        return f"{self.state_dir}/keepalived.pid"


class LeaderElectionSettings(_Strict):
    namespace: str = "lbappliance-system"
    lease_name: str = Field(default="lbappliance-leader", alias="leaseName")
    lease_duration: float = Field(default=15.0, alias="leaseDurationSeconds", gt=0)
    renew_deadline: float = Field(default=10.0, alias="renewDeadlineSeconds", gt=0)
    retry_period: float = Field(default=2.0, alias="retryPeriodSeconds", gt=0)


class ApplianceConfig(_Strict):
    api_version: Literal["lbappliance.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["ApplianceConfig"] = "ApplianceConfig"
    name: str = "lbappliance"
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    vrrp: VrrpSettings = Field(default_factory=VrrpSettings)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig, alias="healthCheck")
    haproxy: HaproxySettings = Field(default_factory=HaproxySettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    leader_election: LeaderElectionSettings = Field(
        default_factory=LeaderElectionSettings, alias="leaderElection"
    )
    metrics_address: str = Field(default="127.0.0.1:9108", alias="metricsAddress")
    # managed: the daemon starts haproxy and keepalived as its children (lab, tests, containers);
    # external: systemd units run them and the daemon reloads through the master socket / pidfile.
    process_mode: Literal["managed", "external"] = Field(default="managed", alias="processMode")
    log_format: Literal["plain", "json"] = Field(default="plain", alias="logFormat")
    # How VIPs reach the network: VRRP (the pair, default) or BGP (N boxes; core/bgp.py).
    announce: AnnounceSettings = Field(default_factory=AnnounceSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return canonical.dns_label(v)

    @model_validator(mode="after")
    def _listed_among_its_peers(self) -> ApplianceConfig:
        names = [p.name for p in self.haproxy.peers]
        if names and self.name not in names:
            raise ValueError(f"haproxy.peers lists {', '.join(names)} but not this box ({self.name!r}, its `name`): "
                             "HAProxy would not know which peer it is")
        return self

    @field_validator("metrics_address")
    @classmethod
    def _metrics(cls, v: str) -> str:
        return canonical.host_port(v)

    def own_addresses(self) -> tuple[IPAddress, ...]:
        """The appliance's and its peers' addresses (VRRP, stick-table and BGP peers, the BGP router
        id) and the configured VRRP anchors: never to be handed out as VIPs."""
        v = self.vrrp
        raw = [v.unicast_src_ip, v.unicast_src_ip6, *v.unicast_peers, *v.unicast_peers6]
        if self.announce.mode == "bgp" and self.announce.bgp is not None:
            raw += [self.announce.bgp.router_id, *(p.address for p in self.announce.bgp.peers)]
        found = [canonical.address(a) for a in raw if a] + [p.endpoint[0] for p in self.haproxy.peers]
        return tuple(dict.fromkeys(found)) + v.anchors()


class LabelRequirementSpec(_Strict):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class SelectorSpec(_Strict):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[LabelRequirementSpec, ...] = Field(default=(), alias="matchExpressions")


class ServiceAllocationSpec(_Strict):
    priority: int | None = Field(default=None, ge=0)
    namespaces: tuple[str, ...] = ()
    service_selectors: tuple[SelectorSpec, ...] = Field(default=(), alias="serviceSelectors")

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ns in v:
            try:
                canonical.dns_label(ns)
            except canonical.Invalid as exc:
                raise ValueError(f"not a valid namespace name: {exc}") from None
        return v


class PoolSpec(_Strict):
    name: str
    addresses: tuple[str, ...] = Field(min_length=1)
    auto_assign: bool = Field(default=True, alias="autoAssign")
    avoid_buggy_ips: bool = Field(default=False, alias="avoidBuggyIPs")
    service_allocation: ServiceAllocationSpec | None = Field(default=None, alias="serviceAllocation")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return canonical.dns_label(v)
        except canonical.Invalid as exc:
            raise ValueError(f"pool name must be a DNS label: {exc}") from None


class PoolFile(_Strict):
    api_version: Literal["lbappliance.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["AddressPoolList"]
    pools: tuple[PoolSpec, ...] = ()


_FAMILY_OF_FIELD = {"unicast_src_ip": 4, "unicast_peers": 4, "anchor_address": 4,
                    "unicast_src_ip6": 6, "unicast_peers6": 6, "anchor_address6": 6}


def _vrrp_address(text: str, field: str) -> str:
    """A VRRP address of the family its field is for: keepalived refuses mixed families."""
    address = canonical.address(text)
    want = _FAMILY_OF_FIELD.get(field)
    if want is not None and address.version != want:
        raise ValueError(f"{address} is not an IPv{want} address: keepalived refuses mixed families "
                         "(IPv4 in unicastSrcIp/unicastPeers/anchorAddress, IPv6 in the *6 fields)")
    return str(address)


def _check_anchors(first: IPAddress, instances: int, name: str) -> None:
    """Instance i advertises `name` + i: each must exist and be a unicast address of its family."""
    top = (1 << first.max_prefixlen) - 1
    if int(first) + instances - 1 > top:
        raise ValueError(f"{name} {first} + {instances} instances runs past the last IPv{first.version} address; "
                         "choose a lower anchor")
    last = first + (instances - 1)
    if first.is_multicast or last.is_multicast or first.is_unspecified or first.is_loopback or \
            (first.version == 4 and int(last) == top):
        raise ValueError(f"{name} {first}..{last}: anchors must be unicast addresses")


def _range_address(text: str) -> IPAddress:
    """One end of a range; spaces around the '-' are MetalLB's syntax, anything else is refused."""
    return canonical.address(text.strip(" "))


def parse_range(text: str) -> AddressRange:
    """A CIDR (`192.0.2.0/28`) or an inclusive range (`192.0.2.10-192.0.2.20`)."""
    if not isinstance(text, str):
        raise ValueError(f"{truncate(text)} is not an address range")
    text = text.strip(" ")
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        first, last = _range_address(first_text), _range_address(last_text)
        if first.version != last.version:
            raise ValueError(f"range {truncate(text)} mixes IPv4 and IPv6")
        if int(last) < int(first):
            raise ValueError(f"range {truncate(text)} is reversed: {last} comes before {first}")
        return AddressRange(first, last)
    try:
        network = canonical.network(text, strict=True)
    except canonical.Invalid as exc:
        why = str(exc).removeprefix(f"{truncate(text)} is not a CIDR: ")
        raise ValueError(f"invalid CIDR {truncate(text)}: {why}") from None
    return AddressRange(network.network_address, network.broadcast_address)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + canonical.shown(str(part))  # a key may be the user's
    return out


def _value_at(data: Any, loc: tuple[Any, ...]) -> tuple[bool, Any]:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, data


def _pydantic_errors(file: str, data: Any, exc: ValidationError) -> list[FieldError]:
    errors = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            found, value = _value_at(data, loc)
            if found and err["type"] != "value_error":
                msg = f"{msg} (got {truncate(value)})"
        errors.append(FieldError(file, _format_loc(loc), canonical.bounded(msg)))
    return errors


def _load_yaml(file: str, text: str | bytes) -> Any:
    """Bounded (size, depth, aliases, UTF-8): see yamlsafe."""
    try:
        return yamlsafe.load(text, file, yamlsafe.CONFIG_LIMITS)
    except yamlsafe.YamlInputError as exc:
        where = f"line {exc.line}, column {exc.column}: " if exc.line is not None else ""
        raise ConfigError([FieldError(file, "", f"{where}{exc.problem}")]) from None


def _as_json(data: Any) -> str:
    """Validate in JSON mode: strict types, yet YAML lists are accepted as tuples."""
    return json.dumps(data, default=str)


def parse_config(text: str, file: str = "config.yaml") -> ApplianceConfig:
    data = _load_yaml(file, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([FieldError(file, "", f"must be a mapping, got {type(data).__name__}")])
    try:
        return ApplianceConfig.model_validate_json(_as_json(data))
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(file, data, exc)) from None


def parse_pool_file(text: str, file: str = "pools.yaml") -> PoolFile:
    return pool_file_from_data(_load_yaml(file, text), file)


def pool_file_from_data(data: Any, file: str = "pools.yaml") -> PoolFile:
    if not isinstance(data, dict):
        raise ConfigError([FieldError(file, "", "must be a mapping with apiVersion, kind and pools")])
    try:
        return PoolFile.model_validate_json(_as_json(data))
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(file, data, exc)) from None


def _selector(spec: SelectorSpec, path: str, file: str) -> tuple[LabelSelector, list[FieldError]]:
    errors = []
    for key, value in spec.match_labels.items():
        if not LABEL_KEY.fullmatch(key):
            errors.append(FieldError(file, f"{path}.matchLabels", f"invalid label key {truncate(key)}"))
        if not LABEL_VALUE.fullmatch(value):
            errors.append(FieldError(file, f"{path}.matchLabels.{truncate(key)}",
                                     f"invalid label value {truncate(value)}"))
    requirements = []
    for i, expr in enumerate(spec.match_expressions):
        needs_values = expr.operator in ("In", "NotIn")
        if needs_values != bool(expr.values):
            want = "needs at least one value" if needs_values else "takes no values"
            errors.append(FieldError(file, f"{path}.matchExpressions[{i}].values", f"{expr.operator} {want}"))
        requirements.append(LabelRequirement(expr.key, expr.operator, tuple(sorted(expr.values))))
    selector = LabelSelector(tuple(sorted(spec.match_labels.items())), tuple(requirements))
    return selector, errors


def build_pools(
    spec: PoolFile, file: str = "pools.yaml", reserved: Iterable[IPAddress] = ()
) -> tuple[Pool, ...]:
    """Turn the schema into Pools, rejecting bad ranges, overlaps and reserved addresses."""
    errors: list[FieldError] = []
    pools: list[Pool] = []
    seen_names: dict[str, int] = {}
    located: list[_Located] = []  # every range with the indexes it was written at
    reserved = tuple(reserved)
    for i, pool_spec in enumerate(spec.pools):
        base = f"pools[{i}]"
        if pool_spec.name in seen_names:
            errors.append(
                FieldError(file, f"{base}.name", f"duplicate pool name {pool_spec.name!r} "
                           f"(also pools[{seen_names[pool_spec.name]}])")
            )
        seen_names.setdefault(pool_spec.name, i)
        ranges = []
        for j, text in enumerate(pool_spec.addresses):
            try:
                rng = parse_range(text)
            except ValueError as exc:
                errors.append(FieldError(file, f"{base}.addresses[{j}]", str(exc)))
                continue
            never = canonical.never_a_vip(rng.first, rng.last)
            if never:
                errors.append(FieldError(file, f"{base}.addresses[{j}]", f"{text!r} {never}: never a Service VIP"))
            for address in reserved:
                if address in rng:
                    errors.append(FieldError(
                        file, f"{base}.addresses[{j}]",
                        f"{text!r} contains {address}, an address of this appliance or a peer (VRRP, stick "
                        "table, BGP), its BGP router id, or a VRRP anchor",
                    ))
            ranges.append(rng)
            located.append((rng.first.version, int(rng.first), int(rng.last), i, j, pool_spec.name))
        alloc = pool_spec.service_allocation or ServiceAllocationSpec()
        selectors = []
        for k, sel in enumerate(alloc.service_selectors):
            selector, sel_errors = _selector(sel, f"{base}.serviceAllocation.serviceSelectors[{k}]", file)
            selectors.append(selector)
            errors.extend(sel_errors)
        pools.append(Pool(
            name=pool_spec.name,
            ranges=tuple(ranges),
            auto_assign=pool_spec.auto_assign,
            avoid_buggy_ips=pool_spec.avoid_buggy_ips,
            priority=alloc.priority,
            namespaces=tuple(sorted(alloc.namespaces)),
            service_selectors=tuple(selectors),
        ))
    errors.extend(_overlaps(located, spec, file))
    if errors:
        raise ConfigError(errors)
    return tuple(pools)


_Located = tuple[int, int, int, int, int, str]  # version, first, last, pool index, address index, pool name


def _overlaps(located: list[_Located], spec: PoolFile, file: str) -> list[FieldError]:
    """Each range overlapping an earlier one (by start address), named by where each was written:
    a range listed twice in one pool names both of its indexes."""
    errors = []
    widest: _Located | None = None  # the earlier range reaching furthest
    for cur in sorted(located):
        prev = widest
        if prev is None or prev[0] != cur[0] or cur[2] > prev[2]:
            widest = cur
        if prev is not None and prev[0] == cur[0] and cur[1] <= prev[2]:
            errors.append(FieldError(
                file, f"pools[{cur[3]}].addresses[{cur[4]}]",
                f"{spec.pools[cur[3]].addresses[cur[4]]!r} overlaps "
                f"pools[{prev[3]}].addresses[{prev[4]}] {spec.pools[prev[3]].addresses[prev[4]]!r} "
                f"(pool {prev[5]!r})",
            ))
    return errors


def load_pools(text: str, file: str = "pools.yaml", reserved: Iterable[IPAddress] = ()) -> tuple[Pool, ...]:
    return build_pools(parse_pool_file(text, file), file, reserved)


def dump_pool_file(spec: PoolFile) -> str:
    """Canonical YAML for pools.yaml, as the CLI writes it."""
    data = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    for pool in data["pools"]:
        if pool.get("serviceAllocation") is None:
            pool.pop("serviceAllocation", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
