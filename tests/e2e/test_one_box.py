"""Adoption in one sitting, on the real control plane and the lab, with ONE appliance (a first-class
deployment: no VRRP peer, this box holds every VIP):

* `lbappliance enroll` against the fresh apiserver writes the kubeconfig the daemon then runs with;
* a cluster as MetalLB leaves it (Services with MetalLB's annotations, status written by another
  field manager without ipMode, no finalizer) and pools from `lbappliance pool import` of its
  IPAddressPools: the daemon adopts every Service with the address it had (0 change), adds the
  finalizer and writes ipMode Proxy, and serves them; the alias annotations are honoured;
* every metric the dashboard and the alert rules name is in a live scrape of the daemon and of
  HAProxy's exporter (haproxy.statsAddress);
* `lbappliance doctor`: all ✓ on the healthy lab (and says there is no failover); each fault named:
  a foreign controller writing status, a pool overlapping a node address, a node whose real
  kube-proxy is down, a skewed clock (faketime);
* the box restarts without changing any address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbappliance.core.models import FINALIZER
from lbappliance.testing.kubenodes import answer_node
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import RBAC_MANIFEST, delete_services
from tests.e2e.test_enroll import csr_signer
from tests.unit.test_monitoring import exported, named_metrics

pytestmark = pytest.mark.e2e
STATS = "127.0.0.1:8405"  # HAProxy's exporter, inside the appliance's namespace
NS = "shop"
METALLB_MANAGER = "metallb-controller"

IPADDRESSPOOLS = {"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
     "metadata": {"name": "production", "namespace": "metallb-system", "uid": "6a8a1e5e-0000-4000-8000-000000000001",
                  "resourceVersion": "4242", "generation": 1, "creationTimestamp": "2026-11-02T10:00:00Z"},
     "spec": {"addresses": ["192.0.2.200-192.0.2.220"], "autoAssign": True, "avoidBuggyIPs": False},
     "status": {"assignedIPv4": 4, "availableIPv4": 17, "assignedIPv6": 0, "availableIPv6": 0}},
    {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
     "metadata": {"name": "reserved", "namespace": "metallb-system"},
     "spec": {"addresses": ["192.0.2.240/29"], "autoAssign": False}},
]}

# name -> (port, nodePort, MetalLB annotations, the address MetalLB gave it)
METALLB_SERVICES = {
    "web": (80, 30101, {}, "192.0.2.203"),
    "api": (8080, 30102, {"metallb.universe.tf/loadBalancerIPs": "192.0.2.211"}, "192.0.2.211"),
    "db": (5432, 30103, {"metallb.io/address-pool": "reserved"}, "192.0.2.241"),
    "dns-a": (53, 30104, {"metallb.io/allow-shared-ip": "dns"}, "192.0.2.205"),
    "dns-b": (853, 30105, {"metallb.io/allow-shared-ip": "dns"}, "192.0.2.205"),
}
NEW_SERVICE = ("fresh", 9000, 30106, {"metallb.io/loadBalancerIPs": "192.0.2.244",
                                      "metallb.io/address-pool": "reserved"})


def lbappliance(*args: str, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "lbappliance", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _service(name: str, port: int, node_port: int, annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "selector": {"app": name},
                     "ports": [{"name": "p", "port": port, "targetPort": 8080, "nodePort": node_port,
                                "protocol": "TCP"}]}}


def _as_metallb_left_it(core: Any, name: str, ip: str) -> None:
    """Status as MetalLB's controller writes it: its field manager, no ipMode, no finalizer."""
    core.patch_namespaced_service_status(name, NS, {"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}},
                                         field_manager=METALLB_MANAGER)


def _status(core: Any, name: str) -> tuple[list[str], list[str | None], list[str]]:
    svc = core.read_namespaced_service_status(name, NS)
    ingress = svc.status.load_balancer.ingress or []
    return [i.ip for i in ingress], [i.ip_mode for i in ingress], list(svc.metadata.finalizers or [])


@pytest.fixture(scope="module")
def box(control_plane: Any, admin_api: Any, lab_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    from lbappliance.testing.appliances import Appliance, appliance_config
    from lbappliance.testing.kubenodes import real_nodes
    from lbappliance.testing.netlab import open_lab

    work = tmp_path_factory.mktemp("onebox")
    core = client.CoreV1Api(admin_api)
    with open_lab("lb1", 2, work / "lab") as lab, real_nodes(lab, control_plane, admin_api, udp=False) as kube:
        # 1. enroll, as an admin would on the box: the kubeconfig the daemon runs with.
        config = appliance_config(lab, "app1", "app2", work / "state", work / "kubeconfig", work / "pools.yaml", 150)
        config["vrrp"] = {"interface": "eth0", "priority": 150, "advertInterval": 0.1, "instances": 1}
        config["haproxy"]["statsAddress"] = STATS
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        (work / "state").mkdir()
        with csr_signer(control_plane, Path(control_plane.bin_dir), work) as signed:
            enrolled = lbappliance("enroll", "--config", str(config_path), "--admin-kubeconfig",
                                   str(control_plane.admin_kubeconfig), "--rbac", str(RBAC_MANIFEST),
                                   *(() if signed else ("--service-account",)))
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        # 2. the pools, from MetalLB's IPAddressPools.
        source = work / "ipaddresspools.yaml"
        source.write_text(yaml.safe_dump(IPADDRESSPOOLS))
        imported = lbappliance("pool", "import", str(source), "--config", str(config_path))
        assert imported.returncode == 0, imported.stdout + imported.stderr
        # 3. the cluster as MetalLB left it (its nodes, real kube-proxy and a pod each, are up already).
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for name, (port, node_port, annotations, ip) in METALLB_SERVICES.items():
            core.create_namespaced_service(NS, _service(name, port, node_port, annotations))
            _as_metallb_left_it(core, name, ip)
        app = Appliance("app1", lab.hosts["app1"].netns, config_path, config, work / "app1.log")
        app.start()
        try:
            wait_for(app.status, 60, what="the daemon's first pass")
            yield {"lab": lab, "core": core, "app": app, "config": config_path, "work": work, "cp": control_plane,
                   "kube": kube}
        finally:
            app.stop()
            delete_services(core, NS)


def test_a_metallb_served_cluster_is_handed_over_with_every_address(box: dict[str, Any]) -> None:
    core, lab = box["core"], box["lab"]

    def adopted() -> bool:
        return all(_status(core, n)[1] == ["Proxy"] and FINALIZER in _status(core, n)[2] for n in METALLB_SERVICES)

    wait_for(adopted, 90, what="finalizer and ipMode Proxy on every MetalLB Service")
    changed = {n: _status(core, n)[0] for n, v in METALLB_SERVICES.items() if _status(core, n)[0] != [v[3]]}
    assert changed == {}, f"Services whose address changed: {changed}"
    for name, (port, *_rest, ip) in METALLB_SERVICES.items():
        assert answer_node(lab.answer("client", ip, port)) in {n.name for n in lab.nodes}, name
    # The alias annotations on a new Service: pool and address by MetalLB's keys.
    name, port, node_port, annotations = NEW_SERVICE
    core.create_namespaced_service(NS, _service(name, port, node_port, annotations))
    assert wait_for(lambda: _status(core, name)[0], 15, what="the new Service's address") == ["192.0.2.244"]
    assert lab.answer("client", "192.0.2.244", port)


def test_every_metric_of_the_dashboard_and_rules_is_exported(box: dict[str, Any]) -> None:
    import urllib.request

    app, lab = box["app"], box["lab"]
    wait_for(lambda: app.metric("lbappliance_vrrp_master", {"vrrp_instance": "VI_v4"}) == 1.0, 15,
             what="this box VRRP master")
    with urllib.request.urlopen(app.metrics_url, timeout=5) as response:
        daemon = response.read().decode()
    status, haproxy = lab.http_get("app1", f"http://{STATS}/metrics", timeout=5)
    assert status == 200
    names = named_metrics()
    assert any(n.startswith("haproxy_") for n in names) and any(n.startswith("lbappliance_") for n in names)
    assert exported(names, daemon + "\n" + haproxy) == set()
    assert exported({"haproxy_no_such_metric"}, daemon + haproxy) == {"haproxy_no_such_metric"}


def _doctor(box: dict[str, Any], *args: str, prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    result = lbappliance("doctor", "--config", str(box["config"]), "--netns", box["lab"].hosts["app1"].netns,
                         "-o", "json", *args, prefix=prefix)
    try:
        return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    except ValueError:
        raise AssertionError(result.stdout + result.stderr) from None


def _failed(checks: dict[str, Any]) -> dict[str, str]:
    return {name: c["detail"] for name, c in checks.items() if c["verdict"] == "fail"}


def test_doctor_on_the_healthy_box_passes_and_says_there_is_no_failover(box: dict[str, Any]) -> None:
    wait_for(lambda: all(_status(box["core"], n)[1] == ["Proxy"] for n in METALLB_SERVICES), 90, what="adoption")
    code, checks = _doctor(box)
    assert _failed(checks) == {} and code == 0
    assert checks["failover"]["verdict"] == "note" and "there is no failover" in checks["failover"]["detail"]
    assert checks["identity permissions"]["verdict"] == "ok"
    assert {f"kube-proxy {n.name}" for n in box["lab"].nodes} <= set(checks)
    assert any(name.startswith("NodePort ") for name in checks)
    table = lbappliance("doctor", "--config", str(box["config"]), "--netns", box["lab"].hosts["app1"].netns)
    assert table.returncode == 0 and "✓" in table.stdout and "✗" not in table.stdout, table.stdout


def test_doctor_names_each_fault(box: dict[str, Any]) -> None:
    core, lab, work = box["core"], box["lab"], box["work"]
    # A node whose kube-proxy is down (stopped; its nftables rules stay, so its NodePorts still answer).
    # (Its drain taint would not do: a tainted node is not eligible, so the doctor rightly skips it.)
    node = lab.nodes[0]
    box["kube"].stop_kube_proxy(node.name)
    try:
        code, checks = _doctor(box)
    finally:
        box["kube"].start_kube_proxy(node.name)
    assert code == 1 and set(_failed(checks)) == {f"kube-proxy {node.name}"}, _failed(checks)
    assert "refused" in checks[f"kube-proxy {node.name}"]["detail"] and checks[f"kube-proxy {node.name}"]["fix"]
    # A pool overlapping a node's address.
    overlapping = work / "overlap-pools.yaml"
    overlapping.write_text((work / "pools.yaml").read_text() + f"- name: nodes\n  addresses: [{node.ipv4}/32]\n")
    code, checks = _doctor(box, "--pools", str(overlapping))
    assert code == 1 and f"contains node {node.name}'s address {node.ipv4}" in _failed(checks)["pool addresses"]
    # A skewed clock.
    if shutil.which("faketime") is None:
        pytest.fail("faketime missing (scripts/setup.sh installs it)")
    code, checks = _doctor(box, prefix=("faketime", "-f", "+30s"))
    assert code == 1 and "ahead of the API server" in _failed(checks)["clock"], _failed(checks)
    # Another controller writing the status of a Service of our class (one the appliance does not
    # serve: it names a pool that does not exist, so nothing overwrites the other's status).
    core.create_namespaced_service(NS, _service("foreign", 7000, 30107, {"lbappliance.io/pool": "elsewhere"}))
    core.patch_namespaced_service_status("foreign", NS, {"status": {"loadBalancer": {"ingress": [
        {"ip": "192.0.2.99", "ipMode": "VIP"}]}}}, field_manager="k3s")
    time.sleep(1)
    code, checks = _doctor(box)
    detail = _failed(checks)["other LoadBalancer controllers"]
    assert code == 1 and "'k3s' wrote the status of shop/foreign" in detail, detail
    assert "address of shop/foreign" in _failed(checks)  # 192.0.2.99 is in no pool: reported, never moved
    core.delete_namespaced_service("foreign", NS)
    # k3s ServiceLB's pods, which only an admin may list (nothing schedules them here: they exist).
    core.create_namespaced_pod("kube-system", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "svclb-web-4x2k9", "labels": {"svccontroller.k3s.cattle.io/svcname": "web"}},
        "spec": {"containers": [{"name": "lb-tcp-80", "image": "rancher/klipper-lb:v0.4.9"}]}})
    try:
        code, checks = _doctor(box, "--admin-kubeconfig", str(box["cp"].admin_kubeconfig))
    finally:
        core.delete_namespaced_pod("svclb-web-4x2k9", "kube-system", grace_period_seconds=0)
    assert code == 1 and "kube-system/svclb-web-4x2k9" in _failed(checks)["LoadBalancer pods"], _failed(checks)


def test_the_box_restarts_without_changing_any_address(box: dict[str, Any]) -> None:
    core, app, lab = box["core"], box["app"], box["lab"]
    names = [*METALLB_SERVICES, NEW_SERVICE[0]]
    wait_for(lambda: all(_status(core, n)[0] for n in names if _exists(core, n)), 20, what="addresses")
    before = {n: _status(core, n)[0] for n in names if _exists(core, n)}
    app.stop()
    app.start()
    wait_for(lambda: app.metric("lbappliance_leader") == 1.0, 30, what="the restarted box leading")
    for name, (port, *_rest, ip) in METALLB_SERVICES.items():
        assert lab.answer("client", ip, port, timeout=20), name
    after = {n: _status(core, n)[0] for n in before}
    assert after == before


def _exists(core: Any, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service(name, NS)
    except ApiException:
        return False
    return True

