"""nftables rendering for UDP forwards and the active-active VRRP settings (pure)."""

from __future__ import annotations

import pytest

from lbappliance.core.config import ConfigError, parse_config
from lbappliance.core.models import Service, ServicePort, vip_owner_states
from lbappliance.core.nft import map_members, render_nft
from lbappliance.core.plan import Snapshot, desired_state, hashed_instance

from ..shapes import NODES, SHAPES, config, pools


def state_of(shape: str):  # type: ignore[no-untyped-def]
    services, nodes = SHAPES[shape]
    return desired_state(Snapshot(services, nodes, pools(), config()))[1]


def test_unhealthy_nodes_leave_the_map_and_none_left_means_no_rule() -> None:
    state = state_of("udp-dns")
    dns4 = next(u for u in state.udp if u.name == "udp_dns_coredns_udp53_v4")
    text = render_nft(state.udp, {dns4.backend.name: frozenset({"node-2"})})
    assert "ip daddr 192.0.2.200 udp dport 53 dnat ip to 198.51.100.12:30053" in text
    assert map_members(state.udp, {dns4.backend.name: frozenset()})[dns4.name] == ()
    empty = render_nft(state.udp, {dns4.backend.name: frozenset()})
    assert "# udp_dns_coredns_udp53_v4: no healthy node; not forwarded" in empty
    assert "192.0.2.200 udp dport 53 dnat" not in empty


def test_only_our_table_is_named() -> None:
    text = render_nft(state_of("udp-dns").udp)
    tables = {line.split("{")[0].strip() for line in text.splitlines() if "table " in line and not line.startswith("#")}
    assert tables == {"table inet lbappliance", "delete table inet lbappliance"}
    assert render_nft(()).splitlines()[1:] == ["table inet lbappliance", "delete table inet lbappliance"]


def test_affinity_hashes_the_client_address_only_and_ranges_filter_per_family() -> None:
    text = render_nft(state_of("udp-dns").udp)
    assert "jhash ip saddr mod 2" in text  # syslog: sessionAffinity ClientIP
    assert "ip daddr 192.0.2.201 udp dport 514 ip saddr != { 198.51.100.0/24 } drop" in text


def test_ipv6_forward_only_targets_ipv6_nodes() -> None:
    v6 = next(u for u in state_of("udp-dns").udp if u.family == "IPv6")
    assert [s.address for s in v6.backend.servers] == ["2001:db8:0:2::11"]


def test_hash_placement_is_stable_and_spreads() -> None:
    vips = [f"192.0.2.{200 + i}" for i in range(40)]
    first = [hashed_instance(v, 2) for v in vips]
    assert first == [hashed_instance(v, 2) for v in vips]
    assert 10 <= first.count(0) <= 30


def test_active_active_mirrored_priorities_and_owner_states() -> None:
    state = state_of("active-active")
    pinned = "192.0.2.200"  # web0 is pinned to instance 1
    assert state.vip_instances[pinned] == "VI_v4_1"
    assert {v.name: (v.priority, v.anchor) for v in state.vrrp} == {
        "VI_v4": (150, "169.254.64.51"), "VI_v4_1": (149, "169.254.64.52"),
        "VI_v6": (150, "fe80::64:52"), "VI_v6_1": (149, "fe80::64:53")}
    owners = vip_owner_states(state, {"VI_v4": "MASTER", "VI_v4_1": "BACKUP"})
    assert owners[pinned] == "BACKUP" and set(owners.values()) == {"MASTER", "BACKUP"}


def test_peer_config_mirrors_and_bad_settings_are_refused() -> None:
    peer = parse_config("vrrp: {priority: 150, homeInstances: [1], backupPriority: 100, instances: 2}")
    assert [peer.vrrp.instance_priority(i) for i in range(2)] == [100, 150]
    with pytest.raises(ConfigError, match="homeInstances"):
        parse_config("vrrp: {homeInstances: [2], instances: 2}")
    with pytest.raises(ConfigError, match="exceeds 255"):
        parse_config("vrrp: {routerIds: {ipv4: 255}, instances: 2}")
    one = parse_config("vrrp: {instances: 1, anchorAddress: 169.254.10.1}")
    assert one.vrrp.anchor("IPv4", 0) == "169.254.10.1"


def test_conflicting_pins_on_a_shared_vip_keep_the_oldest() -> None:
    port = (ServicePort("a", "TCP", 80, 30080),)
    a = Service("default", "a", creation="1", ports=port, annotations={
        "lbappliance.io/allow-shared-ip": "k", "lbappliance.io/vrrp-instance": "0"})
    b = Service("default", "b", creation="2", ports=(ServicePort("b", "TCP", 81, 30081),), annotations={
        "lbappliance.io/allow-shared-ip": "k", "lbappliance.io/vrrp-instance": "1"})
    state = desired_state(Snapshot((a, b), NODES, pools(), config()))[1]
    vip = state.served["default/a"][0]
    assert state.served["default/b"] == (vip,) and state.vip_instances[vip] == "VI_v4"
    assert any("pinned to instance 0; 1 is ignored" in p.message for p in state.problems if p.service == "default/b")
