"""Hostile input (issue 14): what a tenant, a kubelet or a file writes never reaches a rendered file.

One case per hole. Each Service case checks three things: the bad value is blamed on its own
Service with a Problem naming the field, it is never assigned or rendered, and the other Services
are served as before.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from lbappliance.core.config import ConfigError, load_pools, parse_config
from lbappliance.core.kube import ObjectError, ParsedObjects, node_from_object, service_from_object
from lbappliance.core.models import (
    ANN_LB_IPS,
    ANN_POOL,
    ANN_PROXY,
    ANN_SHARED,
    ANN_VRRP_INSTANCE,
    Allocation,
    DesiredState,
    Node,
    Pool,
    Reason,
    Service,
    ServicePort,
)
from lbappliance.core.nft import render_nft
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render

from ..shapes import NODES, config, pools

# A payload that opens a new HAProxy section taking another Service's VIP (issue 14, item 1).
INJECTION = "\n\nlisten X\n bind 192.0.2.201:80\n server s 203.0.113.66:80\n#"
ZONED_V6 = "2001:db8:0:1::c9%z" + INJECTION
POOLS_HEADER = "apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n"


def run(*services: Service, nodes: tuple[Node, ...] = NODES, pool_set: tuple[Pool, ...] | None = None,
        cfg_text: str | None = None) -> tuple[Allocation, DesiredState, str]:
    """The whole pure pipeline, and every rendered file concatenated."""
    cfg = config() if cfg_text is None else parse_config(cfg_text)
    allocation, state = desired_state(Snapshot(services, nodes, pools() if pool_set is None else pool_set, cfg))
    files = render(state, cfg)
    return allocation, state, files.haproxy + files.keepalived + render_nft(state.udp)


def problems_of(state: DesiredState, key: str) -> list[str]:
    return [f"{p.reason.value}: {p.message}" for p in state.problems if p.service == key]


def web(name: str = "web", creation: str = "2", **kw: Any) -> Service:
    return Service("default", name, creation=creation, ports=(ServicePort("", "TCP", 80, 30080),), **kw)


def udp_only(name: str = "dns", creation: str = "1", **kw: Any) -> Service:
    return Service("default", name, creation=creation, ports=(ServicePort("", "UDP", 53, 30053),), **kw)


# ---- item 1: zone ids through every address field ---------------------------------------------


def test_zone_id_in_the_requested_address_annotation_is_refused_and_never_rendered() -> None:
    hostile = udp_only(ip_families=("IPv6",), annotations={ANN_LB_IPS: ZONED_V6})
    allocation, state, text = run(hostile, web())
    assert "default/dns" not in allocation.assignments
    assert any(f"annotation {ANN_LB_IPS}" in m and "zone id" in m for m in problems_of(state, "default/dns"))
    assert "listen X" not in text and "%z" not in text
    assert state.served["default/web"] == ("192.0.2.200",)


def test_zone_id_in_spec_load_balancer_ip_is_refused() -> None:
    allocation, state, text = run(udp_only(ip_families=("IPv6",), load_balancer_ip=ZONED_V6))
    assert "default/dns" not in allocation.assignments and "listen X" not in text
    assert any("spec.loadBalancerIP" in m and "zone id" in m for m in problems_of(state, "default/dns"))


def test_zone_id_in_a_source_range_refuses_the_service() -> None:
    hostile = web(source_ranges=("2001:db8::%z" + INJECTION + "/64",))
    _, state, text = run(hostile)
    assert state.frontends == () and "listen X" not in text
    assert any("spec.loadBalancerSourceRanges[0]" in m for m in problems_of(state, "default/web"))


def test_zone_id_in_a_held_status_address_is_not_served() -> None:
    """Offline render reads status from a file: a zoned ingress IP is not held, so not served."""
    hostile = udp_only(ip_families=("IPv6",), ingress_ips=(ZONED_V6,))
    _, state, text = run(hostile)
    assert "listen X" not in text and "%z" not in text
    assert state.served["default/dns"] == ("2001:db8:0:1::c8",)


def test_zone_id_in_a_pool_range_is_refused_naming_file_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_pools(POOLS_HEADER + f"- name: a\n  addresses: [{ZONED_V6!r}]\n".replace("'", '"'), "/etc/p.yaml")
    assert "/etc/p.yaml: pools[0].addresses[0]:" in str(info.value) and "zone id" in str(info.value)


@pytest.mark.parametrize("field", ["unicastSrcIp6", "anchorAddress6"])
def test_zone_id_in_a_config_address_is_refused(field: str) -> None:
    text = f'vrrp:\n  {field}: "2001:db8::2%z\\n}}\\nvrrp_script x {{"\n  unicastPeers6: ["2001:db8::3"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/c.yaml")
    assert f"/etc/c.yaml: vrrp.{field}:" in str(info.value) and "zone id" in str(info.value)


def test_zone_id_in_a_unicast_peer_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('vrrp:\n  unicastSrcIp6: "2001:db8::2"\n  unicastPeers6: ["2001:db8::3%z\\n}"]\n', "c.yaml")
    assert "vrrp.unicastPeers6" in str(info.value) and "zone id" in str(info.value)


@pytest.mark.parametrize("field", ["metricsAddress", "haproxy.statsAddress"])
def test_zone_id_in_a_listen_address_is_refused(field: str) -> None:
    value = '"[::1%z\\n    http-request return status 200]:8405"'
    parent, _, leaf = field.rpartition(".")
    text = f"{parent}:\n  {leaf}: {value}\n" if parent else f"{leaf}: {value}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert f"{field}: must be ADDRESS:PORT" in str(info.value)


def test_stats_address_is_rendered_in_canonical_spelling() -> None:
    cfg = parse_config('haproxy: {statsAddress: "[2001:DB8::0:1]:8405"}\n')
    assert cfg.haproxy.stats_address == "[2001:db8::1]:8405"


# ---- item 2: Node addresses are attacker-controlled -------------------------------------------


def node_object(name: str, *addresses: tuple[str, str]) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "uid": name, "resourceVersion": "1"},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


HOSTILE_NODE = node_object("node-9", ("InternalIP", "2001:db8::13%z\n    server X 203.0.113.66:80\n#"))


def test_a_node_with_a_hostile_address_is_refused_naming_node_and_field() -> None:
    with pytest.raises(ObjectError) as info:
        node_from_object(HOSTILE_NODE)
    assert "Node 'node-9': status.addresses[0].address" in str(info.value) and "zone id" in str(info.value)


def test_a_hostile_node_is_skipped_and_every_other_node_serves() -> None:
    good = node_object("node-1", ("InternalIP", "198.51.100.11"))
    nodes, errors = ParsedObjects("Node").parse([good, HOSTILE_NODE])
    assert [n.name for n in nodes] == ["node-1"] and len(errors) == 1 and "node-9" in str(errors[0])
    _, state, text = run(web(), nodes=tuple(nodes))
    assert "server X" not in text and "203.0.113.66" not in text
    assert [s.name for s in state.frontends[0].backend.servers] == ["node-1"]


@pytest.mark.parametrize("kind", ["Hostname", "InternalDNS"])
def test_a_hostile_host_name_address_refuses_the_node(kind: str) -> None:
    with pytest.raises(ObjectError) as info:
        node_from_object(node_object("node-9", (kind, "2001:db8::13%z\n server X 203.0.113.66:80")))
    assert "status.addresses[0].address" in str(info.value)


def test_plain_host_names_and_addresses_are_accepted() -> None:
    node = node_from_object(node_object("node-1", ("InternalIP", "198.51.100.11"), ("Hostname", "node-1"),
                                        ("InternalDNS", "node-1.cluster.example"), ("ExternalIP", "2001:db8::11")))
    assert node.addresses[-1] == ("ExternalIP", "2001:db8::11")


# ---- item 8 (in names): re.match(r"...$") accepts a trailing newline ---------------------------


def test_a_node_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ObjectError):
        node_from_object(node_object("node-1\n", ("InternalIP", "198.51.100.11")))


@pytest.mark.parametrize("meta", [{"name": "web\n", "namespace": "default"}, {"name": "web", "namespace": "ns\n"}])
def test_a_service_name_with_a_trailing_newline_is_refused(meta: dict[str, str]) -> None:
    with pytest.raises(ObjectError):
        service_from_object({"metadata": meta, "spec": {"type": "LoadBalancer"}})


@pytest.mark.parametrize("text", ["name: \"edge-a\\n\"", "vrrp: {interface: \"eth0\\n\"}",
                                  "paths: {stateDir: \"/run/lbappliance\\n\"}"])
def test_config_values_with_a_trailing_newline_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, "c.yaml")


def test_a_sharing_key_with_a_trailing_newline_is_a_problem() -> None:
    _, state, _ = run(web(annotations={ANN_SHARED: "key\n"}))
    assert state.frontends == () and any(ANN_SHARED in m for m in problems_of(state, "default/web"))


# ---- item 4: a requested address the API will refuse is never assigned -----------------------


def test_a_non_canonical_request_blocks_nobody() -> None:
    """The older Service's zoned request does not take the address the newer one asks for properly."""
    zoned = udp_only("zoned", creation="1", ip_families=("IPv6",), annotations={ANN_LB_IPS: "2001:db8:0:1::c9%eth0"})
    plain = udp_only("plain", creation="2", ip_families=("IPv6",), annotations={ANN_LB_IPS: "2001:db8:0:1::c9"})
    allocation, state, _ = run(zoned, plain)
    assert allocation.assignments == {"default/plain": ("2001:db8:0:1::c9",)}
    assert [p.reason for p in state.problems if p.service == "default/zoned"] == [Reason.INVALID]


def test_an_ipv4_mapped_request_is_refused() -> None:
    allocation, state, _ = run(udp_only(ip_families=("IPv6",), annotations={ANN_LB_IPS: "::ffff:192.0.2.201"}))
    assert "default/dns" not in allocation.assignments
    assert any("IPv4-mapped" in m for m in problems_of(state, "default/dns"))


# ---- item 5: limits of rendered formats are met by construction ------------------------------


LONG = "a" * 63


def test_nft_comments_stay_within_128_characters_and_stay_distinct() -> None:
    one = Service(LONG, LONG, creation="1", ports=(ServicePort("", "UDP", 65535, 30053),))
    two = Service(LONG, LONG[:-1] + "b", creation="2", ports=(ServicePort("", "UDP", 65535, 30054),))
    _, state, _ = run(one, two)
    comments = [line.split('comment "', 1)[1] for line in render_nft(state.udp).splitlines() if 'comment "' in line]
    assert len(comments) == 2 and len(set(comments)) == 2
    assert all(len(c.rstrip('"')) <= 128 for c in comments)


def test_many_source_ranges_fit_haproxys_64_words_per_line() -> None:
    ranges = tuple(f"198.51.{i // 256}.{i % 256}/32" for i in range(200))
    _, state, text = run(web(source_ranges=ranges))
    assert state.served["default/web"] == ("192.0.2.200",)
    acl = [line.split() for line in text.splitlines() if line.strip().startswith("acl allowed_sources")]
    assert all(len(words) <= 64 for words in acl)
    assert sorted(w for words in acl for w in words[3:]) == sorted(ranges)


# ---- item 9: pools refuse addresses that can never be VIPs ------------------------------------


@pytest.mark.parametrize(("text", "why"), [
    ("0.0.0.0/32", "unspecified"), ("127.0.0.1/32", "loopback"), ("224.0.0.18/32", "multicast"),
    ("239.0.0.0-239.0.0.9", "multicast"), ("255.255.255.255/32", "broadcast"), ("169.254.10.0/24", "link-local"),
    ("'::/128'", "unspecified"), ("'::1/128'", "loopback"), ("'fe80::/64'", "link-local"),
    ("'ff02::12/128'", "multicast"), ("'::ffff:192.0.2.0/120'", "IPv4-mapped"),
])
def test_pools_refuse_addresses_that_can_never_be_vips(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pools(POOLS_HEADER + f"- name: a\n  addresses: [{text}]\n", "/etc/p.yaml")
    assert "/etc/p.yaml: pools[0].addresses[0]:" in str(info.value) and why in str(info.value)


def test_pools_refuse_the_configured_vrrp_anchors() -> None:
    cfg = parse_config("vrrp: {anchorAddress: 192.0.2.100, instances: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_pools(POOLS_HEADER + "- name: a\n  addresses: [192.0.2.101/32]\n", "p.yaml", cfg.own_addresses())
    assert "pools[0].addresses[0]" in str(info.value) and "192.0.2.101" in str(info.value)


# ---- item 10: configs keepalived would reject fail `check` ------------------------------------


@pytest.mark.parametrize(("text", "field", "words"), [
    ("vrrp: {unicastSrcIp: 192.0.2.2}", "vrrp", "unicastSrcIp without unicastPeers"),
    ("vrrp: {unicastSrcIp6: '2001:db8::2'}", "vrrp", "unicastSrcIp6 without unicastPeers6"),
    ("vrrp: {unicastSrcIp: '2001:db8::2', unicastPeers: ['2001:db8::3']}", "vrrp.unicastSrcIp", "IPv4"),
    ("vrrp: {unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3, '2001:db8::3']}", "vrrp.unicastPeers", "IPv4"),
    ("vrrp: {unicastSrcIp6: 192.0.2.2, unicastPeers6: ['2001:db8::3']}", "vrrp.unicastSrcIp6", "IPv6"),
    ("vrrp: {anchorAddress: '2001:db8::1'}", "vrrp.anchorAddress", "IPv4"),
    ("vrrp: {anchorAddress: 255.255.255.255, instances: 2}", "vrrp", "anchorAddress"),
])
def test_configs_keepalived_rejects_are_refused_with_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/c.yaml")
    assert f"/etc/c.yaml: {field}" in str(info.value) and words in str(info.value)


# ---- item 12: nodePort, healthCheckNodePort and the affinity timeout are range-checked --------


@pytest.mark.parametrize("node_port", [-1, 0, 65536])
def test_a_node_port_out_of_range_is_a_problem_never_rendered(node_port: int) -> None:
    bad = Service("default", "np", creation="1", ports=(ServicePort("", "TCP", 80, node_port),))
    _, state, text = run(bad)
    assert state.frontends == () and not re.search(rf"\.[0-9]+:{node_port}\s", text)
    assert any(f"spec.ports[0].nodePort: {node_port} is not a port" in m for m in problems_of(state, "default/np"))


def test_a_health_check_node_port_out_of_range_is_a_problem() -> None:
    bad = web(external_traffic_policy="Local", health_check_node_port=-1)
    _, state, text = run(bad)
    assert state.frontends == () and "port -1" not in text
    assert any("healthCheckNodePort" in m for m in problems_of(state, "default/web"))


@pytest.mark.parametrize("timeout", [-1, 86401])
def test_an_affinity_timeout_out_of_range_is_a_problem(timeout: int) -> None:
    _, state, text = run(web(session_affinity="ClientIP", affinity_timeout=timeout))
    assert state.frontends == () and f"expire {timeout}s" not in text
    assert any("timeoutSeconds" in m for m in problems_of(state, "default/web"))


def test_a_negative_affinity_timeout_on_the_wire_is_not_taken_as_given() -> None:
    obj = {"metadata": {"name": "web", "namespace": "default"},
           "spec": {"type": "LoadBalancer", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -1}},
                    "ports": [{"port": 80, "nodePort": 30080}]}}
    _, state, text = run(service_from_object(obj))
    assert "expire -1s" not in text and state.frontends == ()


# ---- item 13: problem messages do not repeat a 1 MiB value -----------------------------------


MIB = "x" * (1 << 20)


@pytest.mark.parametrize("service", [
    web(annotations={ANN_LB_IPS: MIB}), web(load_balancer_ip=MIB), web(annotations={ANN_POOL: MIB}),
    web(annotations={ANN_SHARED: MIB}), web(annotations={ANN_PROXY: MIB}),
    web(annotations={ANN_VRRP_INSTANCE: MIB}), web(source_ranges=(MIB,)),
    Service("default", "web", creation="1", ports=(ServicePort("", MIB, 80, 30080),)),
], ids=["lb-ips", "loadBalancerIP", "pool", "shared", "proxy", "vrrp-instance", "source-range", "protocol"])
def test_problem_messages_truncate_the_value(service: Service) -> None:
    _, state, _ = run(service)
    messages = problems_of(state, "default/web")
    assert messages and all(len(m) < 1100 for m in messages)
    assert any("1048576 characters" in m for m in messages)


def test_object_errors_truncate_the_value() -> None:
    with pytest.raises(ObjectError) as info:
        service_from_object({"metadata": {"name": MIB, "namespace": "default"}, "spec": {}})
    assert len(str(info.value)) < 1100


def test_config_errors_truncate_an_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"vrrp:\n  ? {MIB[:100_000]}\n  : 1\n")
    assert len(str(info.value)) < 1100 and "unknown field" in str(info.value)


def test_config_errors_truncate_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"vrrp: {{interface: {MIB[:100_000]}}}\n")  # files are bounded to 1 MiB as a whole
    assert len(str(info.value)) < 1100


# ---- item 17: the overlap message names the right index -------------------------------------


def test_a_range_listed_twice_names_both_of_its_indexes() -> None:
    with pytest.raises(ConfigError) as info:
        load_pools(POOLS_HEADER + "- name: a\n  addresses: [192.0.2.0/28, 198.51.100.0/28, 192.0.2.0/28]\n")
    assert "pools[0].addresses[2]: '192.0.2.0/28' overlaps pools[0].addresses[0] '192.0.2.0/28'" in str(info.value)


def test_canonical_address_spelling_of_a_request_is_what_is_assigned() -> None:
    allocation, _, _ = run(udp_only(ip_families=("IPv6",), annotations={ANN_LB_IPS: "2001:DB8:0:1:0::C9"}))
    assert allocation.assignments["default/dns"] == (str(ipaddress.ip_address("2001:db8:0:1::c9")),)
