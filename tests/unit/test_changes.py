"""classify(): which changes the runtime API can carry and which need a reload."""

from __future__ import annotations

from dataclasses import replace

from lbappliance.core.changes import ServerAdd, ServerReaddress, ServerRemove, classify
from lbappliance.core.models import ANN_PROXY, DesiredState, Node, Service
from lbappliance.core.plan import Snapshot, desired_state
from tests.shapes import NODES, config, pools, tcp

WEB = Service("default", "web", creation="1", ports=(tcp(80, 30080),), ingress_ips=("192.0.2.200",))


def state(services: tuple[Service, ...] = (WEB,), nodes: tuple[Node, ...] = NODES) -> DesiredState:
    return desired_state(Snapshot(services, nodes, pools(), config()))[1]


def test_first_apply_is_a_reload() -> None:
    change = classify(None, state())
    assert change.kind == "reload"
    assert change.keepalived_changed


def test_identical_states_are_noop() -> None:
    change = classify(state(), state())
    assert change.kind == "noop"
    assert not change.keepalived_changed
    assert change.runtime_ops == 0


def test_node_added_is_runtime_add_with_server_options() -> None:
    new_node = Node("node-6", (("InternalIP", "198.51.100.16"),))
    change = classify(state(), state(nodes=(*NODES, new_node)))
    assert change.kind == "runtime"
    # The Service server checks for itself until the next reload (HAProxy cannot make a server
    # added at runtime track one); the node also joins the monitor.
    assert change.adds == (ServerAdd("be_default_web_tcp80_v4", "node-6", "198.51.100.16:30080", "check port 10256"),
                           ServerAdd("hc_10256_v4", "node-6", "198.51.100.16:10256", "check port 10256"))
    assert change.removes == ()
    assert not change.keepalived_changed


def test_node_removed_is_runtime_remove() -> None:
    change = classify(state(), state(nodes=NODES[1:]))
    assert change.kind == "runtime"
    assert change.removes == (ServerRemove("be_default_web_tcp80_v4", "node-1"), ServerRemove("hc_10256_v4", "node-1"))


def test_node_excluded_by_label_is_runtime_remove() -> None:
    excluded = replace(NODES[1], labels={"node.kubernetes.io/exclude-from-external-load-balancers": ""})
    change = classify(state(), state(nodes=(NODES[0], excluded, *NODES[2:])))
    assert change.kind == "runtime"
    assert [(r.backend, r.name) for r in change.removes] == [("be_default_web_tcp80_v4", "node-2"),
                                                             ("hc_10256_v4", "node-2")]


def test_node_address_change_is_runtime_readdress() -> None:
    moved = replace(NODES[0], addresses=(("InternalIP", "198.51.100.21"),))
    change = classify(state(), state(nodes=(moved, *NODES[1:])))
    assert change.kind == "runtime"
    assert change.readdresses == (ServerReaddress("be_default_web_tcp80_v4", "node-1", "198.51.100.21", 30080),
                                  ServerReaddress("hc_10256_v4", "node-1", "198.51.100.21", 10256))


def test_proxy_protocol_server_options_reach_runtime_add() -> None:
    svc = replace(WEB, annotations={ANN_PROXY: "v2"})
    new_node = Node("node-6", (("InternalIP", "198.51.100.16"),))
    change = classify(state((svc,)), state((svc,), (*NODES, new_node)))
    assert change.adds[0].options == "check port 10256 send-proxy-v2"


def test_new_service_is_reload_and_keepalived_change() -> None:
    other = Service("default", "api", creation="2", ports=(tcp(443, 30443),), ingress_ips=("192.0.2.201",))
    change = classify(state(), state((WEB, other)))
    assert change.kind == "reload"
    assert change.keepalived_changed
    assert any("added" in r for r in change.reasons)


def test_new_port_on_same_vip_reloads_haproxy_only() -> None:
    two = replace(WEB, ports=(tcp(80, 30080), tcp(8080, 30088)))
    change = classify(state(), state((two,)))
    assert change.kind == "reload"
    assert not change.keepalived_changed


def test_removed_service_is_reload() -> None:
    change = classify(state(), state(()))
    assert change.kind == "reload"
    assert change.keepalived_changed


def test_node_port_change_is_reload() -> None:
    change = classify(state(), state((replace(WEB, ports=(tcp(80, 30099),)),)))
    assert change.kind == "reload"


def test_source_ranges_affinity_and_policy_changes_reload() -> None:
    variants = [
        replace(WEB, source_ranges=("198.51.100.0/24",)),
        replace(WEB, session_affinity="ClientIP"),
        replace(WEB, external_traffic_policy="Local", health_check_node_port=32000),
        replace(WEB, annotations={ANN_PROXY: "v1"}),
    ]
    for svc in variants:
        assert classify(state(), state((svc,))).kind == "reload", svc


def test_structural_and_server_changes_together_reload() -> None:
    other = Service("default", "api", creation="2", ports=(tcp(443, 30443),), ingress_ips=("192.0.2.201",))
    change = classify(state(), state((WEB, other), NODES[1:]))
    assert change.kind == "reload"
    assert change.runtime_ops == 0


def test_runtime_ops_cover_every_backend_sharing_the_node() -> None:
    other = Service("default", "api", creation="2", ports=(tcp(443, 30443),), ingress_ips=("192.0.2.201",))
    change = classify(state((WEB, other)), state((WEB, other), NODES[1:]))
    assert change.kind == "runtime"
    assert {r.backend for r in change.removes} == {"be_default_web_tcp80_v4", "be_default_api_tcp443_v4",
                                                   "hc_10256_v4"}


def test_a_service_on_a_new_check_port_adds_a_monitor() -> None:
    local = Service("default", "api", creation="2", ports=(tcp(443, 30443),), ingress_ips=("192.0.2.201",),
                    external_traffic_policy="Local", health_check_node_port=32100)
    change = classify(state(), state((WEB, local)))
    assert change.kind == "reload"
    assert "health monitor hc_32100_v4 added" in change.reasons
    back = classify(state((WEB, local)), state())
    assert "health monitor hc_32100_v4 removed" in back.reasons
