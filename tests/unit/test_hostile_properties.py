"""Property (issue 14): for every field that reaches a template, hostile text never reaches the output.

Each hostile value is a plausible value for its field (an address, a CIDR, a name...) followed by
a character no rendered format may receive from a user (a zone id's '%', a newline, a quote, a
brace, '#', a control character...), a marker, and configuration syntax. Whatever the pipeline
makes of it — refusing the object, dropping the value with a Problem — the marker must appear in
none of haproxy.cfg, keepalived.conf and the nft ruleset.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbappliance.core.config import ConfigError, load_pools, parse_config
from lbappliance.core.kube import ObjectError, node_from_object, service_from_object
from lbappliance.core.models import ANN_LB_IPS, ANN_POOL, ANN_PROXY, ANN_SHARED, ANN_VRRP_INSTANCE, Node, Service
from lbappliance.core.nft import render_nft
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render

from ..shapes import CONFIG_TEXT, POOLS_TEXT, config

MARKER = "zqhostile"
BREAKERS = ["%", "%z\n", "\n", "\r", "\r\n", " ", "\t", "{", "}", '"', "'", "#", ";", "\\", "\x00", "\x1b", "\x7f",
            "\x85", "\u2028", "\v", "\f", "/", ",", "|", "$", "`"]
SYNTAX = ["\n\nlisten X\n bind 192.0.2.201:80\n server s 203.0.113.66:80\n#", "\n}\nvrrp_script x {\n",
          '" ; drop ; comment "', "\n    server X 203.0.113.66:80\n", "}", "{", "#", "\n", " ", ""]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assemble(prefix: str, breaker: str, noise: str, syntax: str, breaker_first: bool) -> str:
    payload = breaker + noise + MARKER + syntax
    if "{}" in prefix:  # inside the value: `2001:db8::%z{}/64`, `[::1%{}]:8405`
        return prefix.replace("{}", payload)
    return breaker + MARKER + prefix + syntax if breaker_first else prefix + payload


def hostile(prefixes: list[str]) -> st.SearchStrategy[str]:
    """A plausible value with a breaker, the marker and config syntax after it, inside it (where the
    prefix has `{}`) or before it: to be refused or dropped, never rendered."""
    noise = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
    parts = st.tuples(st.sampled_from(prefixes), st.sampled_from(BREAKERS), noise, st.sampled_from(SYNTAX),
                      st.booleans())
    return parts.map(lambda p: _assemble(*p))


ADDRESSES = ["2001:db8:0:1::c9", "192.0.2.201", "198.51.100.11", "2001:db8:0:2::11", "fe80::1",
             "2001:db8:0:1::c9%{}", "2001:db8:0:2::11%z{}"]
CIDRS = ["198.51.100.0/24", "2001:db8::/64", "192.0.2.7/32", "2001:db8::%{}/64", "2001:db8:0:9::%z{}/64"]
NAMES = ["web", "node-1", "default", "a"]


def service_object() -> dict[str, Any]:
    """A Service the pipeline serves on TCP and UDP, with every optional field that reaches a template set."""
    return {
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "uid": "u1", "creationTimestamp": "1",
                     "annotations": {ANN_PROXY: "v2", ANN_SHARED: "k", ANN_VRRP_INSTANCE: "1"}},
        "spec": {"type": "LoadBalancer", "sessionAffinity": "ClientIP",
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                 "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8:0:9::/64"],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080},
                           {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.210"}]}},
    }


def node_object(name: str = "node-1") -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.11"},
                                     {"type": "InternalIP", "address": "2001:db8:0:2::11"},
                                     {"type": "Hostname", "address": name}]}}


OTHER = Service("default", "other", creation="0",
                ports=service_from_object(service_object()).ports)  # an ordinary neighbour
CONFIG_WITH_HOSTNAMES = config().model_copy(
    update={"cluster": config().cluster.model_copy(update={"node_address_types": ("Hostname", "InternalIP")})})


def outputs(services: tuple[Service, ...], nodes: tuple[Node, ...], cfg: Any = None,
            pool_text: str = POOLS_TEXT) -> tuple[str, Any]:
    cfg = cfg or CONFIG_WITH_HOSTNAMES
    pools = load_pools(pool_text, "pools.yaml", cfg.own_addresses())
    _, state = desired_state(Snapshot(services, nodes, pools, cfg))
    files = render(state, cfg)
    return files.haproxy + files.keepalived + render_nft(state.udp), state


def set_at(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


def assert_well_formed_numbers(text: str) -> None:
    """Every rendered port is 1-65535 and every stick-table expiry 1-86400 s (no `:-1` port offsets)."""
    target = r"(?:\[[0-9a-f:.]+\]|[0-9.]+)"
    ports = re.findall(rf"(?:bind|server \S+|to) {target}:(-?[0-9]+)", text)
    ports += re.findall(r"(?:dport|check port|\] \.|[0-9] \.) (-?[0-9]+)", text)
    assert ports
    for port in ports:
        assert 0 < int(port) < 65536, port
    for expire in re.findall(r"expire (-?[0-9]+)s", text):
        assert 0 < int(expire) <= 86400, expire


SERVICE_FIELDS: dict[str, tuple[tuple[Any, ...], list[str], bool]] = {
    # field: (path in the object, plausible prefixes, whether the Service must get a Problem)
    "metadata.namespace": (("metadata", "namespace"), NAMES, False),
    "metadata.name": (("metadata", "name"), NAMES, False),
    f"annotation {ANN_LB_IPS}": (("metadata", "annotations", ANN_LB_IPS), [*ADDRESSES, "192.0.2.201,"], True),
    f"annotation {ANN_POOL}": (("metadata", "annotations", ANN_POOL), ["default", "reserved"], True),
    f"annotation {ANN_SHARED}": (("metadata", "annotations", ANN_SHARED), ["k", "dns"], True),
    f"annotation {ANN_PROXY}": (("metadata", "annotations", ANN_PROXY), ["v1", "v2"], True),
    f"annotation {ANN_VRRP_INSTANCE}": (("metadata", "annotations", ANN_VRRP_INSTANCE), ["0", "1"], True),
    "spec.loadBalancerIP": (("spec", "loadBalancerIP"), ADDRESSES, True),
    "spec.loadBalancerSourceRanges[0]": (("spec", "loadBalancerSourceRanges", 0), CIDRS, True),
    "spec.ports[0].protocol": (("spec", "ports", 0, "protocol"), ["TCP", "UDP"], True),
    "spec.ports[0].name": (("spec", "ports", 0, "name"), ["http"], False),
    "status.loadBalancer.ingress[0].ip": (("status", "loadBalancer", "ingress", 0, "ip"), ADDRESSES, False),
}


@pytest.mark.parametrize("field", sorted(SERVICE_FIELDS))
def test_hostile_service_fields_never_reach_a_rendered_file(field: str) -> None:
    path, prefixes, needs_problem = SERVICE_FIELDS[field]

    @PROPERTY
    @given(hostile(prefixes))
    def check(value: str) -> None:
        try:
            service = service_from_object(set_at(service_object(), path, value))
        except ObjectError:
            return  # refused whole: ignored like any unreadable object
        text, state = outputs((service, OTHER), (node_from_object(node_object()),))
        assert MARKER not in text
        assert "default/other" in state.served  # the neighbour is served whatever this one says
        if needs_problem:
            assert any(p.service == service.key for p in state.problems), value

    check()


NODE_FIELDS: dict[str, tuple[tuple[Any, ...], list[str]]] = {
    "metadata.name": (("metadata", "name"), NAMES),
    "status.addresses[0].address (InternalIP)": (("status", "addresses", 0, "address"), ADDRESSES),
    "status.addresses[1].address (InternalIP, v6)": (("status", "addresses", 1, "address"), ADDRESSES),
    "status.addresses[2].address (Hostname)": (("status", "addresses", 2, "address"), ADDRESSES + NAMES),
}


@pytest.mark.parametrize("field", sorted(NODE_FIELDS))
def test_hostile_node_fields_refuse_the_node_and_every_other_node_serves(field: str) -> None:
    path, prefixes = NODE_FIELDS[field]
    service = service_from_object(service_object())

    @PROPERTY
    @given(hostile(prefixes))
    def check(value: str) -> None:
        good = node_from_object(node_object("node-2"))
        try:
            nodes: tuple[Node, ...] = (node_from_object(set_at(node_object(), path, value)), good)
        except ObjectError as exc:
            assert "Node " in str(exc)
            nodes = (good,)
        text, state = outputs((service,), nodes)
        assert MARKER not in text
        assert "node-2" in {s.name for f in state.frontends for s in f.backend.servers}

    check()


CONFIG_FIELDS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "name": (("name",), ["edge-a"]),
    "vrrp.interface": (("vrrp", "interface"), ["eth0"]),
    "vrrp.unicastSrcIp": (("vrrp", "unicastSrcIp"), ["192.0.2.2"]),
    "vrrp.unicastSrcIp6": (("vrrp", "unicastSrcIp6"), ["2001:db8:0:1::2", "2001:db8:0:1::2%{}"]),
    "vrrp.unicastPeers[0]": (("vrrp", "unicastPeers"), ["192.0.2.3"]),
    "vrrp.unicastPeers6[0]": (("vrrp", "unicastPeers6"), ["2001:db8:0:1::3", "2001:db8:0:1::3%{}"]),
    "vrrp.anchorAddress": (("vrrp", "anchorAddress"), ["192.0.2.100"]),
    "vrrp.anchorAddress6": (("vrrp", "anchorAddress6"), ["2001:db8:0:1::100", "fe80::64:1", "fe80::64:1%{}"]),
    "haproxy.statsAddress": (("haproxy", "statsAddress"), ["127.0.0.1:8405", "[::1]:8405", "[::1%{}]:8405",
                                                           " 127.0.0.1{}:8405"]),
    "haproxy.timeoutConnect": (("haproxy", "timeoutConnect"), ["5s"]),
    "haproxy.hardStopAfter": (("haproxy", "hardStopAfter"), ["30s"]),
    "paths.stateDir": (("paths", "stateDir"), ["/run/lbappliance"]),
    "paths.haproxyConfig": (("paths", "haproxyConfig"), ["/etc/haproxy/haproxy.cfg"]),
    "metricsAddress": (("metricsAddress",), ["127.0.0.1:9108", "[::1%{}]:9108"]),
}


def config_data() -> dict[str, Any]:
    return {"name": "edge-a", "vrrp": {"interface": "eth0", "unicastSrcIp": "192.0.2.2", "unicastPeers": ["192.0.2.3"],
                                       "unicastSrcIp6": "2001:db8:0:1::2", "unicastPeers6": ["2001:db8:0:1::3"]}}


@pytest.mark.parametrize("field", sorted(CONFIG_FIELDS))
def test_hostile_config_fields_are_refused_by_check(field: str) -> None:
    path, prefixes = CONFIG_FIELDS[field]
    service = service_from_object(service_object())
    node = node_from_object(node_object())

    strategy = hostile(prefixes)
    if field.startswith("paths."):
        # "/" is a breaker elsewhere, but `/run/lbappliance/zqhostile` is a fine path: not hostile.
        strategy = strategy.filter(lambda v: not re.fullmatch(r"/[\w./-]*", v, re.ASCII))

    @PROPERTY
    @given(strategy)
    def check(value: str) -> None:
        data = config_data()
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = [value] if path[-1].startswith("unicastPeers") else value
        try:
            cfg = parse_config(json.dumps(data), "config.yaml")  # JSON is YAML: every string survives
        except ConfigError as exc:
            assert field.split("[")[0] in str(exc) or "vrrp" in str(exc)
            return
        text, _ = outputs((service,), (node,), cfg)
        assert MARKER not in text

    check()


@PROPERTY
@given(hostile(ADDRESSES + CIDRS + ["192.0.2.200-192.0.2.250", "2001:db8:0:1::c8-2001:db8:0:1::fa",
                                     "2001:db8:0:5::%{}/120", "2001:db8:0:5::1%z{}-2001:db8:0:5::9"]))
def test_hostile_pool_ranges_are_refused(value: str) -> None:
    text = POOLS_TEXT.replace("[203.0.113.0/28]", json.dumps(["203.0.113.0/28", value]))
    try:
        load_pools(text, "pools.yaml", config().own_addresses())
    except ConfigError as exc:
        assert "pools[1].addresses[1]" in str(exc)
        return
    pytest.fail(f"hostile range {value!r} accepted")


NUMBERS = st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([-1, 0, 65535, 65536, 86400, 86401, 2**31]))
NUMBER_FIELDS = {
    "spec.ports[0].port": ("spec", "ports", 0, "port"),
    "spec.ports[0].nodePort": ("spec", "ports", 0, "nodePort"),
    "spec.ports[1].nodePort": ("spec", "ports", 1, "nodePort"),
    "spec.healthCheckNodePort": ("spec", "healthCheckNodePort"),
    "spec.sessionAffinityConfig.clientIP.timeoutSeconds": ("spec", "sessionAffinityConfig", "clientIP",
                                                           "timeoutSeconds"),
}


@pytest.mark.parametrize("field", sorted(NUMBER_FIELDS))
def test_numbers_out_of_range_never_render(field: str) -> None:
    path = NUMBER_FIELDS[field]
    base = set_at(service_object(), ("spec", "externalTrafficPolicy"), "Local")
    base = set_at(base, ("spec", "healthCheckNodePort"), 32100)

    @PROPERTY
    @given(NUMBERS)
    def check(number: int) -> None:
        try:
            service = service_from_object(set_at(base, path, number))
        except ObjectError:
            return
        text, _ = outputs((service,), (node_from_object(node_object()),))
        assert_well_formed_numbers(text)

    check()


def test_the_property_sees_the_holes_it_guards_against() -> None:
    """The assertions are not vacuous: the ordinary object renders each value the test looks for."""
    text, state = outputs((service_from_object(service_object()),), (node_from_object(node_object()),))
    assert "default/web" in state.served and "198.51.100.0/24" in text and "send-proxy-v2" in text
    assert "expire 600s" in text and "198.51.100.11:30080" in text and "dport 53" in text
    with pytest.raises(AssertionError):
        assert_well_formed_numbers(text.replace("198.51.100.11:30080", "198.51.100.11:-1"))
    assert json.loads(json.dumps(CONFIG_TEXT)) == CONFIG_TEXT
