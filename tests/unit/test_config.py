"""Bad config and pool input is rejected with the file, the field path and the bad value."""

from __future__ import annotations

import ipaddress

import pytest

from lbappliance.core.config import ConfigError, load_pools, parse_config, parse_range

HEADER = "apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n"


def pools_error(body: str, reserved: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_pools(HEADER + body, "/etc/lbappliance/pools.yaml", [ipaddress.ip_address(a) for a in reserved])
    return str(info.value)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/lbappliance/config.yaml")
    return str(info.value)


def test_valid_pools_parse_cidrs_and_ranges_of_both_families() -> None:
    pools = load_pools(HEADER + "- name: a\n  addresses: [192.0.2.0/28, 198.51.100.10-198.51.100.12, "
                       "'2001:db8::/126']\n  avoidBuggyIPs: true\n")
    assert [str(r) for r in pools[0].ranges] == [
        "192.0.2.0-192.0.2.15", "198.51.100.10-198.51.100.12", "2001:db8::-2001:db8::3"]
    assert pools[0].size() == 16 + 3 + 4 and pools[0].avoid_buggy_ips


def test_invalid_cidr_names_file_field_and_value() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/33]\n")
    assert "/etc/lbappliance/pools.yaml: pools[0].addresses[0]: invalid CIDR '192.0.2.0/33'" in msg


def test_cidr_with_host_bits_is_rejected() -> None:
    assert "pools[0].addresses[0]: invalid CIDR '192.0.2.1/24'" in pools_error("- name: a\n  addresses: [192.0.2.1/24]\n")


def test_reversed_range_is_rejected() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.20-192.0.2.10]\n")
    assert "pools[0].addresses[0]: range '192.0.2.20-192.0.2.10' is reversed" in msg


def test_mixed_family_range_is_rejected() -> None:
    assert "mixes IPv4 and IPv6" in pools_error("- name: a\n  addresses: ['192.0.2.1-2001:db8::1']\n")


def test_overlapping_pools_are_rejected_naming_both() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/24]\n- name: b\n  addresses: [192.0.2.100-192.0.2.110]\n")
    assert "pools[1].addresses[0]: '192.0.2.100-192.0.2.110' overlaps pools[0].addresses[0] '192.0.2.0/24'" in msg


def test_overlap_hidden_behind_a_wide_range_is_found() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/24]\n- name: b\n  addresses: [192.0.2.10/32]\n"
                      "- name: c\n  addresses: [192.0.2.200/32]\n")
    assert "pools[2].addresses[0]" in msg and "pools[1].addresses[0]" in msg


def test_pool_containing_appliance_or_peer_address_is_rejected() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/28]\n", reserved=("192.0.2.2", "192.0.2.3"))
    assert "pools[0].addresses[0]: '192.0.2.0/28' contains 192.0.2.2, an address of this appliance" in msg
    assert "contains 192.0.2.3" in msg


def test_unknown_key_is_rejected() -> None:
    assert "pools[0].autoassign: unknown field" in pools_error("- name: a\n  addresses: [192.0.2.0/28]\n  autoassign: false\n")


def test_wrong_type_is_rejected_with_value() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/28]\n  autoAssign: 'no'\n")
    assert "pools[0].autoAssign: Input should be a valid boolean (got 'no')" in msg


def test_missing_addresses_and_bad_name() -> None:
    msg = pools_error("- name: Bad_Name\n")
    assert "pools[0].name: pool name must be a DNS label" in msg and "'Bad_Name'" in msg
    assert "pools[0].addresses: required field is missing" in msg


def test_duplicate_pool_names_are_rejected() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/28]\n- name: a\n  addresses: [192.0.2.16/28]\n")
    assert "pools[1].name: duplicate pool name 'a'" in msg


def test_wrong_api_version_and_kind() -> None:
    with pytest.raises(ConfigError) as info:
        load_pools("apiVersion: v1\nkind: Pools\npools: []\n", "p.yaml")
    assert "p.yaml: apiVersion:" in str(info.value) and "p.yaml: kind:" in str(info.value)


def test_malformed_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_pools("pools: [\n", "p.yaml")
    assert str(info.value).startswith("p.yaml: ") and "not valid YAML" in str(info.value)
    assert "line 2" in str(info.value)


def test_selector_expression_without_values_is_rejected() -> None:
    msg = pools_error("- name: a\n  addresses: [192.0.2.0/28]\n  serviceAllocation:\n    serviceSelectors:\n"
                      "    - matchExpressions: [{key: tier, operator: In}]\n")
    assert "pools[0].serviceAllocation.serviceSelectors[0].matchExpressions[0].values: In needs at least one value" in msg


def test_config_errors_name_every_bad_field() -> None:
    msg = config_error("vrrp:\n  priority: 300\n  unicastPeers: [192.0.2.3, not-an-ip]\n  bogus: 1\n"
                       "metricsAddress: nowhere\n")
    assert "/etc/lbappliance/config.yaml: vrrp.priority: Input should be less than or equal to 254 (got 300)" in msg
    assert "vrrp.unicastPeers: 'not-an-ip' is not an IP address" in msg
    assert "vrrp.bogus: unknown field" in msg
    assert "metricsAddress: must be ADDRESS:PORT, got 'nowhere'" in msg


def test_config_rejects_interface_names_that_could_inject() -> None:
    assert "vrrp.interface: not a valid interface name" in config_error('vrrp: {interface: "eth0 }\\nfoo"}')


def test_config_rejects_non_centisecond_advert_interval() -> None:
    assert "vrrp.advertInterval: VRRPv3 advertisement interval is in centiseconds" in config_error(
        "vrrp: {advertInterval: 0.105}")


def test_config_rejects_relative_paths() -> None:
    assert "paths.haproxyConfig: must be an absolute path" in config_error("paths: {haproxyConfig: haproxy.cfg}")


def test_empty_config_gives_defaults() -> None:
    cfg = parse_config("", "c.yaml")
    assert cfg.vrrp.advert_interval == 0.1 and cfg.vrrp.nopreempt and cfg.own_addresses() == ()


def test_parse_range_single_address_cidr() -> None:
    assert parse_range("192.0.2.7/32").size == 1


PEERS = """
name: lb1
haproxy:
  peers:
    - {name: lb1, address: "198.51.100.1:10000"}
    - {name: lb2, address: "[2001:db8::2]:10000"}
"""


def test_stick_table_peers_render_as_a_peers_section_with_this_box_as_the_local_peer() -> None:
    from lbappliance.core.plan import Snapshot, desired_state
    from lbappliance.core.render import render_haproxy
    from tests.shapes import SHAPES, pools

    config = parse_config(PEERS, "c.yaml")
    services, nodes = SHAPES["affinity"]
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools(), config))
    text = render_haproxy(state, config)
    assert "    localpeer lb1\n" in text
    assert "peers lbappliance\n    peer lb1 198.51.100.1:10000\n    peer lb2 [2001:db8::2]:10000\n" in text
    assert "srvkey name peers lbappliance" in text
    assert {"198.51.100.1", "2001:db8::2"} <= {str(a) for a in config.own_addresses()}  # never handed out as VIPs
    _, plain = desired_state(Snapshot((), tuple(nodes), pools(), config))
    assert "peer lb2 [2001:db8::2]:10000" in render_haproxy(plain, config)  # listed peers always listen
    alone = parse_config("name: lb1\n", "c.yaml")
    assert "peers" not in render_haproxy(plain, alone)  # alone and no sticky Service: no listener


@pytest.mark.parametrize(("text", "complaint"), [
    (PEERS.replace("name: lb1\n", "name: lb3\n", 1), "not this box ('lb3'"),
    (PEERS.replace("name: lb2", "name: lb1"), "name lb1 listed twice"),
    (PEERS.replace("[2001:db8::2]", "198.51.100.1"), "address 198.51.100.1:10000 listed twice"),
    (PEERS.replace("[2001:db8::2]:10000", "2001:db8::2%eth0\\n    peer x 203.0.113.66:1"), "ADDRESS:PORT"),
    (PEERS.replace("name: lb2", "name: 'lb2 x'"), "DNS label"),
])
def test_bad_stick_table_peers_are_refused_by_field(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.yaml")
    assert complaint in str(err.value) and "haproxy" in str(err.value)
