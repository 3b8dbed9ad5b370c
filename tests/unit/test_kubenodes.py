"""The lab's real nodes, the parts that need no namespace: pod addressing, what the lab endpoints
controller writes for a Service, and how an answer names its pod, node and entry node."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lbappliance.testing.kubenodes import (
    POD_HTTP_PORTS,
    POD_PROXY_PORT,
    POD_SOURCE_PORT,
    KubeNodes,
    LabError,
    Pod,
    answer_node,
    answer_pod,
    entry_node,
    pod_haproxy_config,
    pod_ranges,
)

DOC_V4 = ipaddress.ip_network("198.51.100.0/24")
DOC_V6 = ipaddress.ip_network("2001:db8::/32")


def test_pod_ranges_are_disjoint_documentation_ranges() -> None:
    ranges = [pod_ranges(f"node{k}") for k in range(1, 17)]
    v4 = [ipaddress.ip_network(a) for a, _ in ranges]
    v6 = [ipaddress.ip_network(b) for _, b in ranges]
    assert all(n.subnet_of(DOC_V4) for n in v4) and all(n.subnet_of(DOC_V6) for n in v6)
    assert not any(a.overlaps(b) for i, a in enumerate(v4) for b in v4[i + 1:])
    assert len(set(v6)) == 16
    with pytest.raises(LabError, match=r"node1\.\.node16"):
        pod_ranges("node17")


def test_answers_name_pod_node_and_entry_node() -> None:
    assert answer_pod("pod3@node2") == "pod3" and answer_node("pod3@node2") == "node2"
    nodes = {"node1": ["192.0.2.11", "2001:db8:0:1::b"], "node2": ["192.0.2.12"]}
    # Forwarded by node1's kube-proxy (masqueraded to node1's address) to a pod on node2.
    assert entry_node("pod3@node2 192.0.2.11", nodes) == "node1"
    assert entry_node("pod3@node2 2001:db8:0:1::b", nodes) == "node1"
    # Not forwarded: the source is the appliance's own address, so the pod's node took it.
    assert entry_node("pod3@node2 192.0.2.2", nodes) == "node2"


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _service(name: str, selector: dict[str, str] | None, ports: list[tuple[str, str, int, Any]],
             families: list[str] | None = None) -> Any:
    return _Obj(metadata=_Obj(name=name, namespace="ns"),
                spec=_Obj(selector=selector, type="LoadBalancer", ip_families=families,
                          ports=[_Obj(name=n, protocol=p, port=port, target_port=t) for n, p, port, t in ports]))


def _controller(pods: list[Pod]) -> KubeNodes:
    kube = KubeNodes.__new__(KubeNodes)  # only the pure part: no lab, no API
    kube.pods = {p.name: p for p in pods}
    return kube


def test_slices_follow_selectors_families_and_conditions() -> None:
    pods = [Pod("a", "node1", "198.51.100.1", "2001:db8:1:1::1", {"app": "web"}),
            Pod("b", "node2", "198.51.100.17", None, {"app": "web"}, terminating=True),
            Pod("c", "node3", None, "2001:db8:1:3::1", {"app": "other"}),
            Pod("any", "node3", "198.51.100.33", "2001:db8:1:3::2", None)]
    kube = _controller(pods)
    web = _service("web", {"app": "web"}, [("http", "TCP", 80, 8080), ("pp", "TCP", 81, "proxy")], ["IPv4", "IPv6"])
    bare = _service("bare", None, [("http", "TCP", 80, 8080)])
    dns = _service("dns", {"app": "dns"}, [("dns", "UDP", 53, None)])
    slices = kube.desired_slices([web, bare, dns])
    assert set(slices) == {("ns", "web-lab-v4"), ("ns", "web-lab-v6"), ("ns", "dns-lab-v4")}  # no selector: none
    v4, v6 = slices[("ns", "web-lab-v4")], slices[("ns", "web-lab-v6")]
    assert v4["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    assert v4["addressType"] == "IPv4" and v6["addressType"] == "IPv6"
    by_pod = {e["targetRef"]["name"]: e for e in v4["endpoints"]}
    assert set(by_pod) == {"a", "b", "any"}  # "c" is not selected; "any" matches every selector
    assert by_pod["a"]["nodeName"] == "node1" and by_pod["a"]["addresses"] == ["198.51.100.1"]
    assert by_pod["b"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert {e["targetRef"]["name"] for e in v6["endpoints"]} == {"a", "any"}  # b has no IPv6 address
    assert [p["port"] for p in v4["ports"]] == [8080, POD_PROXY_PORT]
    assert slices[("ns", "dns-lab-v4")]["ports"] == [{"name": "dns", "protocol": "UDP", "port": 53}]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")
def test_a_pods_haproxy_config_is_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "pod.cfg"
    cfg.write_text(pod_haproxy_config(Pod("p1", "node1", "198.51.100.1", "2001:db8:1:1::1")))
    text = cfg.read_text()
    assert all(f"198.51.100.1:{p}" in text for p in (*POD_HTTP_PORTS, POD_PROXY_PORT, POD_SOURCE_PORT))
    assert f"[2001:db8:1:1::1]:{POD_PROXY_PORT} accept-proxy" in text
    done = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
