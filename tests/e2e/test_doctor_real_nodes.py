"""`lbappliance doctor` against real kube-proxy (the lab of lbappliance.testing.kubenodes: kube-proxy
v1.34.4 on every node, pods behind it) and a real appliance pair: every check ✓ (the VRRP peer answers
too); a node whose kube-proxy is stopped is named (its /healthz on 10256 no longer answers) while its
NodePort, kept by the nftables rules kube-proxy left, still works."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from lbappliance.testing.kubenodes import V4
from lbappliance.testing.wait import wait_for
from tests.e2e.test_real_nodes import _env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(dual_cp: Any, lab_available: None, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[dict[str, Any]]:
    yield from _env(dual_cp, tmp_path_factory.mktemp("doctor"), "lbd", {f"node{k}": V4 for k in (1, 2)})


def _doctor(env: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    app = env["apps"][0]
    result = subprocess.run([sys.executable, "-m", "lbappliance", "doctor", "--config", str(app.config_path),
                             "--netns", app.netns, "-o", "json"], capture_output=True, text=True, timeout=120,
                            check=False)
    try:
        return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    except ValueError:
        raise AssertionError(result.stdout + result.stderr) from None


def test_doctor_with_real_kube_proxy(env: dict[str, Any]) -> None:
    core, kube = env["core"], env["kube"]
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doc"}})
    kube.add_pod("node1", labels={"app": "doc"})
    core.create_namespaced_service("doc", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "doc"},
                                           "spec": {"type": "LoadBalancer", "selector": {"app": "doc"}, "ports": [
                                               {"port": 80, "targetPort": 8080, "nodePort": 30290}]}})
    wait_for(lambda: core.read_namespaced_service_status("doc", "doc").status.load_balancer.ingress, 30,
             what="the Service's address")
    code, checks = _doctor(env)
    failed = {n: c["detail"] for n, c in checks.items() if c["verdict"] == "fail"}
    assert code == 0 and failed == {}, failed
    assert checks["kube-proxy node1"]["verdict"] == checks["kube-proxy node2"]["verdict"] == "ok"
    assert checks["NodePort node2"]["verdict"] == "ok"  # kube-proxy forwards node2's NodePort to node1's pod
    assert any(n.startswith("VRRP peer ") and c["verdict"] == "ok" for n, c in checks.items())
    kube.stop_kube_proxy("node2")
    try:
        code, checks = _doctor(env)
    finally:
        kube.start_kube_proxy("node2")
    failed = {n: c["detail"] for n, c in checks.items() if c["verdict"] == "fail"}
    assert code == 1 and set(failed) == {"kube-proxy node2"}, failed
    assert ":10256/healthz" in failed["kube-proxy node2"]
