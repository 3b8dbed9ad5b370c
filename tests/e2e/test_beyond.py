"""Beyond HAProxy, end to end: UDP Services through nftables, active-active VIP placement and
dual-stack, with two real daemons (active-active VRRP) against a real dual-stack kube-apiserver.

The module starts its own control plane: the session one has an IPv4-only Service range, and a
RequireDualStack Service needs both families (2001:db8:ffff::/108 is internal to the apiserver,
never routed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lbappliance.testing.kubenodes import answer_node
from lbappliance.testing.prober import Probe, target
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST

pytestmark = pytest.mark.e2e

ECHO_NODE_PORT, DNS_NODE_PORT, DUAL_NODE_PORT = 30107, 30153, 30180
MANY_BASE, MANY = 30200, 20


@pytest.fixture(scope="module")
def env(dual_cp: Any, lab_available: None, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, Any]]:
    from kubernetes import client, config

    from lbappliance.testing.appliances import running_daemons
    from lbappliance.testing.kubenodes import real_nodes
    from lbappliance.testing.netlab import NetworkLab

    api = config.new_client_from_config(config_file=str(dual_cp.admin_kubeconfig))
    workdir = tmp_path_factory.mktemp("beyond")
    try:
        with NetworkLab(prefix="lbb", nodes=3, workdir=workdir / "lab") as lab, \
                real_nodes(lab, dual_cp, api) as kube, running_daemons(
                    api, lab, workdir, dual_cp.appliance_kubeconfig, rbac=RBAC_MANIFEST, field_manager=FIELD_MANAGER,
                    kube_nodes=kube, active_active=True) as (app1, app2):
            yield {"lab": lab, "core": client.CoreV1Api(api), "apps": {"app1": app1, "app2": app2}}
    finally:
        api.close()


@pytest.fixture
def ns(env: dict[str, Any]) -> str:
    name = f"beyond-{uuid.uuid4().hex[:6]}"
    env["core"].create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def _svc(name: str, ports: list[tuple[str, int, int]], families: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "LoadBalancer", "selector": {"app": name},
                            "ports": [{"name": f"{proto.lower()}{port}", "port": port, "targetPort": 8080,
                                       "nodePort": node_port, "protocol": proto}
                                      for proto, port, node_port in ports]}
    if families:
        spec |= {"ipFamilies": families, "ipFamilyPolicy": "RequireDualStack"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def _ingress(core: Any, ns: str, name: str, count: int = 1, timeout: float = 20) -> list[str]:
    def ips() -> list[str] | None:
        svc = core.read_namespaced_service_status(name, ns)
        found = [i.ip for i in (svc.status.load_balancer.ingress or [])]
        return found if len(found) >= count else None

    return wait_for(ips, timeout, what=f"{count} address(es) in status of {ns}/{name}")


def _answered(lab: Any, vip: str, port: int, timeout: float = 15) -> str:
    return lab.answer("client", vip, port, timeout)  # type: ignore[no-any-return]


def _udp_answered(lab: Any, vip: str, port: int, n: int = 20, timeout: float = 15) -> dict[str, int]:
    wait_for(lambda: "error" not in lab.udp_ask("client", vip, port, 1), timeout, interval=0.3,
             what=f"{vip}:{port}/UDP answering")
    return lab.udp_ask("client", vip, port, n)


def test_udp_echo_and_dns_services_answer_through_their_vips(env: dict[str, Any], ns: str) -> None:
    core, lab = env["core"], env["lab"]
    core.create_namespaced_service(ns, _svc("echo", [("UDP", 7, ECHO_NODE_PORT)]))
    core.create_namespaced_service(ns, _svc("dns", [("UDP", 53, DNS_NODE_PORT), ("TCP", 53, DNS_NODE_PORT)]))
    echo_vip = _ingress(core, ns, "echo")[0]
    dns_vip = _ingress(core, ns, "dns")[0]
    nodes = {h.name for h in lab.nodes}
    echo = _udp_answered(lab, echo_vip, 7)
    dns = _udp_answered(lab, dns_vip, 53)
    tcp = _answered(lab, dns_vip, 53)
    print(f"\nUDP echo {echo_vip}:7 -> {echo}; DNS {dns_vip}:53/UDP -> {dns}; 53/TCP -> {tcp}")
    assert {answer_node(a) for a in echo} <= nodes and sum(echo.values()) == 20, echo
    assert {answer_node(a) for a in dns} <= nodes and sum(dns.values()) == 20, dns
    assert answer_node(tcp) in nodes, tcp
    # The UDP-only Service counts as served: its VIP is carried by VRRP on exactly one box. Waited
    # for, not sampled once: under CI load one run saw no box holding it at a single instant
    # (not reproduced alone; keepalived reloads do not withdraw held VIPs, see test_dataplane).
    wait_for(lambda: sum(echo_vip in held for held in _owners(env, [echo_vip]).values()) == 1, 15,
             what=f"{echo_vip} held by exactly one box")
    svc = core.read_namespaced_service("echo", ns)
    assert "service.kubernetes.io/load-balancer-cleanup" in (svc.metadata.finalizers or [])
    for name in ("echo", "dns"):
        core.delete_namespaced_service(name, ns)


def test_dual_stack_service_gets_both_families_and_both_answer(env: dict[str, Any], ns: str) -> None:
    core, lab = env["core"], env["lab"]
    core.create_namespaced_service(ns, _svc("dual", [("TCP", 80, DUAL_NODE_PORT)], ["IPv4", "IPv6"]))
    ips = _ingress(core, ns, "dual", count=2)
    families = sorted(ipaddress.ip_address(ip).version for ip in ips)
    assert families == [4, 6], ips
    nodes = {h.name for h in lab.nodes}
    answers = {ip: _answered(lab, ip, 80) for ip in ips}
    print(f"\ndual-stack Service status {ips}; answers {answers}")
    assert {answer_node(a) for a in answers.values()} <= nodes, answers

    def listed() -> bool:
        return all(any(e["service"] == f"{ns}/dual" and sorted(e["vips"]) == sorted(ips)
                       for e in (app.status() or {}).get("services", [])) for app in env["apps"].values())

    wait_for(listed, 10, what="both VIPs in both appliances' status")
    core.delete_namespaced_service("dual", ns)


def _owners(env: dict[str, Any], vips: list[str]) -> dict[str, set[str]]:
    return {name: env["lab"].addresses(name) & set(vips) for name in env["apps"]}


def test_active_active_spreads_vips_and_losing_a_box_moves_only_its_share(env: dict[str, Any], ns: str) -> None:

    core, lab, apps = env["core"], env["lab"], env["apps"]
    names = [f"aa{i:02d}" for i in range(MANY)]
    for i, name in enumerate(names):
        core.create_namespaced_service(ns, _svc(name, [("TCP", 80, MANY_BASE + i)]))
    vips = sorted(_ingress(core, ns, name)[0] for name in names)
    for vip in vips:
        _answered(lab, vip, 80)

    def spread() -> dict[str, set[str]] | None:
        owners = _owners(env, vips)
        return owners if all(owners.values()) and sum(len(v) for v in owners.values()) == MANY else None

    owners = wait_for(spread, 20, what="VIPs spread over both boxes")
    share = {name: len(held) for name, held in owners.items()}

    def status_shows_home_instances() -> dict[str, Any] | None:
        # `lbappliance status` reads what the daemon wrote at its last pass (at most RESYNC ago).
        vrrp = {name: (app.status() or {}).get("vrrp") or {} for name, app in apps.items()}
        return vrrp if vrrp["app1"].get("VI_v4") == "MASTER" and vrrp["app2"].get("VI_v4_1") == "MASTER" else None

    vrrp = wait_for(status_shows_home_instances, 15, what="status showing each box master of its home instance")
    print(f"\nactive-active share of {MANY} VIPs: {share}; status vrrp: {vrrp}")
    with Probe(lab.client.netns, [target(v, 80) for v in vips], 8, interval=0.005) as probe:
        time.sleep(2)
        apps["app2"].stop(signal.SIGTERM)  # the daemon stops keepalived (goodbye advert), then HAProxy
    result = probe.result
    kept = sum(result.fail_by[target(v, 80)] for v in owners["app1"])
    moved = sum(result.fail_by[target(v, 80)] for v in owners["app2"])
    print(f"app2 stopped: {result.ok} ok; failed on app1's VIPs {kept}, on app2's VIPs {moved}")
    try:
        assert kept == 0, result
        assert _owners(env, vips)["app1"] == set(vips)
        for vip in sorted(owners["app2"]):
            _answered(lab, vip, 80, timeout=5)
    finally:
        apps["app2"].start()
    # app2 back: after its preempt delay it takes its share back.
    wait_for(lambda: _owners(env, vips) == owners, 30, what="app2 taking its share back")
    for name in names:
        with contextlib.suppress(Exception):
            core.delete_namespaced_service(name, ns)
