"""core/doctor: each check's verdict from the facts the edges gather (pure; the e2e proves the facts)."""

from __future__ import annotations

from typing import Any

from lbappliance.core import doctor
from lbappliance.core.config import load_pools, parse_config
from lbappliance.core.kube import service_from_object
from lbappliance.core.models import FINALIZER

PAIR = parse_config("vrrp: {unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3]}\n")
ONE = parse_config("vrrp: {interface: eth0}\n")
POOLS = load_pools("apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n"
                   "- {name: web, addresses: [192.0.2.192/26]}\n")


def _svc(name: str, ips: list[str], **meta: Any) -> Any:
    return service_from_object({"metadata": {"name": name, "namespace": "ns", **meta},
                                "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]},
                                "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}})


def test_permissions_exactly_the_needed_ones() -> None:
    answers = {p: True for p in doctor.required_permissions(PAIR)} | {
        p: False for p in doctor.forbidden_permissions(PAIR)}
    assert doctor.permission_check(answers, PAIR).verdict is doctor.Verdict.OK
    missing = {**answers, doctor.Permission("patch", "services", subresource="status"): False}
    check = doctor.permission_check(missing, PAIR)
    assert check.verdict is doctor.Verdict.FAIL and "missing: patch services/status" in check.detail
    wide = {**answers, doctor.Permission("list", "secrets"): True}
    check = doctor.permission_check(wide, PAIR)
    assert check.verdict is doctor.Verdict.FAIL and "more than needed: list secrets" in check.detail
    assert "secrets" in {p.resource for p in doctor.forbidden_permissions(PAIR)}


def test_a_foreign_status_writer_is_named() -> None:
    obj = {"metadata": {"managedFields": [
        {"manager": "lbappliance", "fieldsV1": {"f:metadata": {"f:finalizers": {}}}},
        {"manager": "controller", "subresource": "status",
         "fieldsV1": {"f:status": {"f:loadBalancer": {"f:ingress": {}}}}}]}}
    assert doctor.status_managers(obj) == ("controller",)
    svc = _svc("a", ["192.0.2.200"])
    checks = doctor.foreign_controller_checks([(svc, ("controller",))], PAIR, False, [], None)
    assert checks[0].verdict is doctor.Verdict.FAIL and "'controller' wrote the status of ns/a" in checks[0].detail
    quiet = doctor.foreign_controller_checks([(svc, ("lbappliance",))], PAIR, True, ["k1"], ["kube-system/svclb-x"])
    assert [c.verdict for c in quiet] == [doctor.Verdict.OK, doctor.Verdict.FAIL, doctor.Verdict.FAIL,
                                          doctor.Verdict.FAIL]


def test_k3s_servicelb_is_seen_from_node_args() -> None:
    on = {"metadata": {"annotations": {"k3s.io/node-args": '["server","--disable","traefik"]'}}}
    off = {"metadata": {"annotations": {"k3s.io/node-args": '["server","--disable","servicelb"]'}}}
    assert doctor.k3s_servicelb_enabled(on) and not doctor.k3s_servicelb_enabled(off)
    assert not doctor.k3s_servicelb_enabled({"metadata": {}})


def test_pool_overlaps_name_the_thing() -> None:
    checks = doctor.pool_overlap_checks(POOLS, {"node1": ["192.0.2.201", "2001:db8::1"]},
                                        [("Pod CIDR of node1", "192.0.2.224/27"), ("Pod CIDR of node2", "10.0.0.0/24")],
                                        ["192.0.2.250", "10.96.0.1"], PAIR)
    detail = checks[0].detail
    assert checks[0].verdict is doctor.Verdict.FAIL
    assert "contains node node1's address 192.0.2.201" in detail and "overlaps Pod CIDR of node1" in detail
    assert "ClusterIP 192.0.2.250" in detail and "10.0.0.0" not in detail and "10.96.0.1" not in detail
    clean = doctor.pool_overlap_checks(POOLS, {"node1": ["198.51.100.1"]}, [], [], PAIR)
    assert clean[0].verdict is doctor.Verdict.OK


def test_an_address_outside_every_pool_is_reported_per_service() -> None:
    checks = doctor.out_of_pool_checks([_svc("in", ["192.0.2.200"]), _svc("out", ["198.51.100.7"])], POOLS, PAIR)
    assert [(c.name, c.verdict) for c in checks] == [("address of ns/out", doctor.Verdict.FAIL)]
    assert "198.51.100.7/32" in checks[0].fix


def test_adoption_is_a_note_and_ours_are_not_listed() -> None:
    theirs = _svc("theirs", ["192.0.2.200"], annotations={"metallb.universe.tf/address-pool": "web"})
    ours = service_from_object({"metadata": {"name": "ours", "namespace": "ns", "finalizers": [FINALIZER]},
                                "spec": {"type": "LoadBalancer"},
                                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.201", "ipMode": "Proxy"}]}}})
    check = doctor.adoption_check([theirs, ours], PAIR)
    assert check is not None and check.verdict is doctor.Verdict.NOTE and "ns/theirs" in check.detail
    assert "ns/ours" not in check.detail
    assert doctor.adoption_check([ours], PAIR) is None


def test_clock_skew() -> None:
    assert doctor.clock_check(0.4, PAIR, "s").verdict is doctor.Verdict.OK
    check = doctor.clock_check(-30, PAIR, "s")
    assert check.verdict is doctor.Verdict.FAIL and "30.0 s behind" in check.detail
    assert doctor.clock_check(None, PAIR, "s").verdict is doctor.Verdict.FAIL


def test_one_box_says_there_is_no_failover_and_peers_must_answer() -> None:
    (check,) = doctor.vrrp_checks(ONE, {})
    assert check.verdict is doctor.Verdict.NOTE and "there is no failover" in check.detail
    assert doctor.exit_code([check]) == 0
    (peer,) = doctor.vrrp_checks(PAIR, {"192.0.2.3": False})
    assert peer.verdict is doctor.Verdict.FAIL and doctor.exit_code([peer]) == 1


def test_nodes_and_host() -> None:
    checks = doctor.node_checks({"n1": (True, "200"), "n2": (False, "answered 503")}, 30080,
                                {"n1": (True, "ok"), "n2": (False, "refused")})
    assert [c.name for c in checks if c.verdict is doctor.Verdict.FAIL] == ["kube-proxy n2", "NodePort n2"]
    assert doctor.node_checks({}, None, {})[0].verdict is doctor.Verdict.FAIL
    host = doctor.host_checks({"net.ipv4.ip_nonlocal_bind": "0", "net.ipv4.ip_forward": "0"},
                              {"/usr/sbin/haproxy": True, "/usr/sbin/nft": False}, udp_needed=False)
    verdicts = {c.name: c.verdict for c in host}
    assert verdicts == {"sysctl net.ipv4.ip_nonlocal_bind": doctor.Verdict.FAIL,
                        "sysctl net.ipv4.ip_forward": doctor.Verdict.NOTE,
                        "binary /usr/sbin/haproxy": doctor.Verdict.OK, "binary /usr/sbin/nft": doctor.Verdict.FAIL}


def test_credential_expiry() -> None:
    assert doctor.credential_check(None, "token") is None
    assert doctor.credential_check(90 * 86400, "token").verdict is doctor.Verdict.OK  # type: ignore[union-attr]
    assert doctor.credential_check(10 * 86400, "token").verdict is doctor.Verdict.FAIL  # type: ignore[union-attr]


def test_each_other_stick_table_peer_is_checked_and_a_silent_one_names_the_port() -> None:
    from lbappliance.core.config import parse_config
    from lbappliance.core.doctor import table_peer_checks, table_peers_to_probe

    config = parse_config("name: lb1\nhaproxy:\n  peers:\n    - {name: lb1, address: '192.0.2.2:10000'}\n"
                          "    - {name: lb2, address: '192.0.2.3:10000'}\n    - {name: lb3, address: '192.0.2.4:10000'}\n",
                          "c.yaml")
    assert table_peers_to_probe(config) == {"lb2": ("192.0.2.3", 10000), "lb3": ("192.0.2.4", 10000)}  # not itself
    checks = table_peer_checks(config, {"lb2": (True, "192.0.2.3:10000 accepts connections"),
                                        "lb3": (False, "192.0.2.4:10000: Connection refused")})
    assert [(c.name, c.verdict) for c in checks] == [("stick-table peer lb2", doctor.Verdict.OK),
                                                     ("stick-table peer lb3", doctor.Verdict.FAIL)]
    assert "allow TCP 10000" in checks[1].fix
    assert table_peer_checks(parse_config("name: lb1\n", "c.yaml"), {}) == []
