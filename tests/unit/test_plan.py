"""Planner: per-Service problems instead of crashes; eligibility and health checks as designed."""

from __future__ import annotations

from lbappliance.core.kube import ParsedObjects, parse_objects, service_from_object
from lbappliance.core.models import ANN_PROXY, Reason, Service, ServicePort
from lbappliance.core.plan import Snapshot, desired_state

from ..shapes import NODES, config, pools


def plan_for(*services: Service):  # type: ignore[no-untyped-def]
    return desired_state(Snapshot(services, NODES, pools(), config()))[1]


def messages(state, key: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.message for p in state.problems if p.service == key]


def test_udp_ports_become_forwards_sctp_is_a_problem_tcp_is_proxied() -> None:
    s = Service("default", "dns", creation="1", ports=(ServicePort("d", "UDP", 53, 30053),
                                                      ServicePort("t", "TCP", 53, 30054),
                                                      ServicePort("s", "SCTP", 9, 30009)))
    state = plan_for(s)
    assert [(f.port, f.protocol) for f in state.frontends] == [(53, "TCP")]
    assert [(u.name, u.vip, u.port, u.backend.port, u.backend.check_port) for u in state.udp] == [
        ("udp_default_dns_udp53_v4", "192.0.2.200", 53, 30053, 10256)]
    assert [s.name for s in state.udp[0].backend.servers] == ["node-1", "node-2"]
    assert messages(state, "default/dns") == [
        "port 9/SCTP: SCTP is not supported (HAProxy proxies TCP, nftables forwards UDP); this port is not served",
    ]


def test_udp_only_service_is_served_and_its_vip_is_carried_by_vrrp() -> None:
    s = Service("default", "echo", creation="1", ports=(ServicePort("e", "UDP", 7, 30007),),
                external_traffic_policy="Local", health_check_node_port=32107)
    state = plan_for(s)
    assert state.frontends == () and state.served == {"default/echo": ("192.0.2.200",)}
    assert state.vips == ("192.0.2.200",)
    assert state.udp[0].backend.check_port == 32107
    assert any("192.0.2.200" in v.vips for v in state.vrrp)
    assert state.vip_instances["192.0.2.200"] in {v.name for v in state.vrrp}


def test_no_node_ports_is_a_problem_not_a_crash() -> None:
    s = Service("default", "nonp", creation="1", ports=(ServicePort("", "TCP", 80, None),), allocate_node_ports=False)
    state = plan_for(s)
    assert state.frontends == () and "default/nonp" not in state.served
    assert "no nodePort (allocateLoadBalancerNodePorts is false)" in messages(state, "default/nonp")[0]


def test_bad_proxy_annotation_is_invalid_and_not_served() -> None:
    s = Service("default", "pp", creation="1", ports=(ServicePort("", "TCP", 80, 30080),),
                annotations={ANN_PROXY: "v3\n    server evil 192.0.2.66:80"})
    state = plan_for(s)
    assert state.frontends == ()
    assert state.problems[0].reason is Reason.INVALID and "is not one of ['v1', 'v2']" in state.problems[0].message


def test_bad_source_range_refuses_service_rather_than_opening_it() -> None:
    s = Service("default", "sr", creation="1", ports=(ServicePort("", "TCP", 80, 30080),),
                source_ranges=("198.51.100.0/24", "everyone"))
    state = plan_for(s)
    assert state.frontends == ()
    assert [m.split(":", 1)[0] for m in messages(state, "default/sr")] == ["spec.loadBalancerSourceRanges[1]"]
    assert "'everyone' is not a CIDR" in messages(state, "default/sr")[0]


def test_local_policy_without_health_check_node_port_is_a_problem() -> None:
    s = Service("default", "loc", creation="1", ports=(ServicePort("", "TCP", 80, 30080),),
                external_traffic_policy="Local")
    assert "without spec.healthCheckNodePort" in messages(plan_for(s), "default/loc")[0]


def test_other_services_are_unaffected_by_a_broken_one() -> None:
    good = Service("default", "good", creation="2", ports=(ServicePort("", "TCP", 80, 30080),))
    bad = Service("default", "bad", creation="1", ports=(ServicePort("", "TCP", 80, 30081),),
                  annotations={ANN_PROXY: "v9"})
    state = plan_for(good, bad)
    assert list(state.served) == ["default/good"]
    assert sorted(vip for v in state.vrrp for vip in v.vips) == list(state.served["default/good"])
    assert [v.name for v in state.vrrp] == ["VI_v4", "VI_v4_1", "VI_v6", "VI_v6_1"]


def test_vrrp_instances_exist_without_services_so_service_changes_never_add_or_remove_one() -> None:
    empty = plan_for()
    assert [(v.name, v.router_id, v.vips, v.anchor) for v in empty.vrrp] == [
        ("VI_v4", 51, (), "169.254.64.51"), ("VI_v4_1", 52, (), "169.254.64.52"),
        ("VI_v6", 52, (), "fe80::64:52"), ("VI_v6_1", 53, (), "fe80::64:53")]


def test_node_address_type_preference() -> None:
    cfg = config().model_copy(update={"cluster": config().cluster.model_copy(
        update={"node_address_types": ("ExternalIP", "InternalIP")})})
    s = Service("default", "web", creation="1", ports=(ServicePort("", "TCP", 80, 30080),))
    state = desired_state(Snapshot((s,), NODES, pools(), cfg))[1]
    servers = {srv.name: srv.address for srv in state.frontends[0].backend.servers}
    assert servers == {"node-1": "198.51.100.11", "node-2": "203.0.113.99"}


def test_wire_format_objects_parse_and_bad_ones_are_named() -> None:
    obj = {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "annotations": {"a": "b"}},
           "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}],
                    "ipFamilies": ["IPv4"], "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
           "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.200", "ipMode": "Proxy"}]}}}
    s = service_from_object(obj)
    assert (s.key, s.ports[0].node_port, s.ingress_ips, s.affinity_timeout) == (
        "default/web", 30080, ("192.0.2.200",), 60)
    bad = {"kind": "Service", "metadata": {"name": "x", "namespace": "default"}, "spec": {"ports": [{"port": 0}]}}
    parsed, errors = parse_objects([obj, bad], "Service")
    assert len(parsed) == 1 and [str(e) for e in errors] == ["Service default/x: spec.ports[0].port must be 1-65535, got 0"]
    assert (errors[0].kind, errors[0].namespace, errors[0].name) == ("Service", "default", "x")  # for its Event


def _svc(name: str, version: str, port: int = 80) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": version},
            "spec": {"type": "LoadBalancer", "ports": [{"port": port, "nodePort": 30080}]}}


def test_parsed_objects_reread_only_what_changed() -> None:
    cache = ParsedObjects("Service")
    first, _ = cache.parse([_svc("a", "1"), _svc("b", "1")])
    second, _ = cache.parse([_svc("a", "1"), _svc("b", "2", port=8080)])
    assert second[0] is first[0]  # same uid and resourceVersion: the model from the last pass
    assert second[1] is not first[1] and second[1].ports[0].port == 8080
    # Unreadable objects are reported on every pass, not only the first.
    bad = _svc("c", "1", port=0)
    for _ in range(2):
        parsed, errors = cache.parse([_svc("a", "1"), bad])
        assert [s.name for s in parsed] == ["a"] and [str(e) for e in errors] == [
            "Service default/c: spec.ports[0].port must be 1-65535, got 0"]
    # Objects without a uid/resourceVersion (hand-written files) are simply read each time.
    plain = {"metadata": {"name": "d", "namespace": "default"}, "spec": {"ports": [{"port": 53}]}}
    one, two = cache.parse([plain])[0][0], cache.parse([plain])[0][0]
    assert one == two and one is not two


def _servers(state, service: str) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """frontend family tag -> its servers' addresses."""
    return {f.name.rsplit("_", 1)[1]: [s.address for s in f.backend.servers] for f in state.frontends
            if f.service == service}


def test_a_single_stack_service_is_sent_only_to_node_addresses_of_its_family() -> None:
    """kube-proxy programs a single-stack Service's NodePort only in its family: node-2, without an
    IPv6 address, must not get the IPv6-only Service's traffic on its IPv4 address."""
    v6 = Service("default", "v6", creation="1", ports=(ServicePort("p", "TCP", 80, 30086),), ip_families=("IPv6",))
    v4 = Service("default", "v4", creation="2", ports=(ServicePort("p", "TCP", 81, 30087),), ip_families=("IPv4",))
    state = plan_for(v6, v4)
    assert _servers(state, "default/v6") == {"v6": ["2001:db8:0:2::11"]}
    assert _servers(state, "default/v4") == {"v4": ["198.51.100.11", "198.51.100.12"]}


def test_a_dual_stack_service_may_cross_families_and_is_checked_where_kube_proxy_listens() -> None:
    dual = Service("default", "dual", creation="1", ports=(ServicePort("p", "TCP", 80, 30088),),
                   ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack",
                   external_traffic_policy="Local", health_check_node_port=32100)
    state = plan_for(dual)
    assert _servers(state, "default/dual") == {"v4": ["198.51.100.11", "198.51.100.12"],
                                               "v6": ["2001:db8:0:2::11", "198.51.100.12"]}
    [v6] = [f.backend for f in state.frontends if f.name.endswith("_v6")]
    # The healthCheckNodePort answers on the node's IPv4 (primary) address only.
    assert {s.name: s.check_address for s in v6.servers} == {"node-1": "198.51.100.11", "node-2": None}
    from lbappliance.core.health import health_monitors
    assert [m.name for m in health_monitors(state)] == ["hc_32100_v4"]


def test_local_servers_weigh_their_ready_endpoints_and_a_change_is_a_runtime_op() -> None:
    """A node with 3 pods gets 3 shares, one with 1 pod one share: every pod an even part."""
    from lbappliance.core.changes import classify
    from lbappliance.core.kube import endpoint_counts
    from lbappliance.core.render import render

    local = Service("default", "local", creation="1", ports=(ServicePort("p", "TCP", 80, 31080),),
                    external_traffic_policy="Local", health_check_node_port=32100, ip_families=("IPv4",))

    def slice_(node_pods: dict[str, int], ready: bool = True) -> dict:  # type: ignore[type-arg]
        return {"metadata": {"namespace": "default", "labels": {"kubernetes.io/service-name": "local"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["198.51.100.99"], "nodeName": node, "conditions": {"ready": ready}}
                              for node, pods in node_pods.items() for _ in range(pods)]}

    counts = endpoint_counts([slice_({"node-1": 3, "node-2": 1}), slice_({"node-2": 5}, ready=False),
                              {"metadata": {"namespace": "default", "labels": {}}, "addressType": "IPv4"}])
    assert counts == {"default/local": {"IPv4": {"node-1": 3, "node-2": 1}}}
    snap = Snapshot((local,), NODES, pools(), config(), counts)
    _, state = desired_state(snap)
    [fe] = state.frontends
    assert {s.name: s.weight for s in fe.backend.servers} == {"node-1": 3, "node-2": 1}
    assert "track hc_32100_v4/node-1 weight 3" in render(state, config()).haproxy
    moved = desired_state(Snapshot((local,), NODES, pools(), config(),
                                   endpoint_counts([slice_({"node-1": 1, "node-2": 1})])))[1]
    change = classify(state, moved)
    assert change.kind == "runtime"
    assert [(w.name, w.weight) for w in change.reweights] == [("node-1", 1)]
