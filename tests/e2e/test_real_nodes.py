"""Real nodes, end to end: client -> VIP -> HAProxy (nftables for UDP) -> NodePort -> kube-proxy -> pod.

Both daemons against a real dual-stack kube-apiserver, and on every lab node a real kube-proxy
v1.34.4 (nftables mode, identity system:kube-proxy) with pods behind it
(:mod:`lbappliance.testing.kubenodes`). What only the real kube-proxy can prove: Cluster and
Local traffic decided by its NodePorts and healthCheckNodePort, a drain as Kubernetes does it
(the ToBeDeletedByClusterAutoscaler taint, a Node deletion held by a finalizer), UDP through its
NodePort, session affinity, source ranges and the PROXY protocol down to the pod, and the IP
family rule on mixed-family nodes.

Pods answer ``"<pod>@<node>"``; "answered by" below means that pod on that node.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbappliance.testing.kubenodes import DUAL, V4, V6, KubeNodes, answer_node, answer_pod, entry_node
from lbappliance.testing.prober import Probe, probe_in, target
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST, dual_stack_control_plane

pytestmark = pytest.mark.e2e

HEALTH_MS, FALL = 500, 2
#: How long a node may still get new requests after it says it cannot take them: `fall` failed
#: checks at the interval, the first one up to an interval late, and a second of slack for a busy CI.
OUT_WITHIN = HEALTH_MS / 1000 * (FALL + 1) + 1.0
CLIENT = "192.0.2.100"


@pytest.fixture(scope="module")
def mixed_cp(control_plane_bin: Path) -> Iterator[Any]:
    """Its own control plane: two labs' Nodes of the same names on one would overwrite each other,
    and both daemon pairs would serve both labs' Services."""
    yield from dual_stack_control_plane(control_plane_bin)


def _env(dual_cp: Any, workdir: Path, prefix: str, families: dict[str, tuple[str, ...]]) -> Iterator[dict[str, Any]]:
    """Lab, real nodes (kube-proxy, no pods yet) and both daemons; all torn down however it ends."""
    from kubernetes import client, config

    from lbappliance.testing.appliances import running_daemons
    from lbappliance.testing.netlab import NetworkLab

    api = config.new_client_from_config(config_file=str(dual_cp.admin_kubeconfig))
    try:
        with NetworkLab(prefix=prefix, nodes=len(families), workdir=workdir / "lab") as lab, \
                KubeNodes(lab, dual_cp, api, families) as kube, running_daemons(  # type: ignore[arg-type]
                    api, lab, workdir, dual_cp.appliance_kubeconfig, rbac=RBAC_MANIFEST,
                    field_manager=FIELD_MANAGER, kube_nodes=kube, health_ms=HEALTH_MS) as apps:
            yield {"lab": lab, "kube": kube, "core": client.CoreV1Api(api), "apps": apps}
    finally:
        api.close()


@pytest.fixture(scope="module")
def env(dual_cp: Any, lab_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three dual-stack nodes."""
    yield from _env(dual_cp, tmp_path_factory.mktemp("realnodes"), "lbk", {f"node{k}": DUAL for k in (1, 2, 3)})


@pytest.fixture
def ns(env: dict[str, Any]) -> Iterator[str]:
    from tests.e2e.conftest import delete_services

    name = f"real-{uuid.uuid4().hex[:6]}"
    env["core"].create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    delete_services(env["core"], name)
    for pod in list(env["kube"].pods):
        env["kube"].remove_pod(pod)


def _svc(name: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": spec.pop("ann", {})},
            "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": ports, **spec}}


def _http(port: int = 80, node_port: int | None = None, target_port: int | str = 8080) -> dict[str, Any]:
    return {"name": f"http{port}", "port": port, "targetPort": target_port, "protocol": "TCP",
            **({"nodePort": node_port} if node_port else {})}


def _ingress(core: Any, ns: str, name: str, count: int = 1, timeout: float = 30) -> list[str]:
    def ips() -> list[str] | None:
        svc = core.read_namespaced_service_status(name, ns)
        found = [i.ip for i in (svc.status.load_balancer.ingress or [])]
        return found if len(found) >= count else None

    return wait_for(ips, timeout, what=f"{count} address(es) in status of {ns}/{name}")


def _sample(lab: Any, vip: str, port: int = 80, n: int = 60, proto: str = "http") -> dict[str, int]:
    """Who answered `n` fresh connections (datagrams) from the client; failures under "error"."""
    return probe_in(lab.client.netns, [target(vip, port)], n, proto=proto, connect_timeout=1.0,
                    read_timeout=1.0).counts()


def _serving(lab: Any, vip: str, port: int = 80, proto: str = "http", timeout: float = 30) -> None:
    wait_for(lambda: "error" not in _sample(lab, vip, port, 5, proto), timeout, interval=0.3,
             what=f"{vip}:{port}/{proto} answering every request")


def _nodes(counts: dict[str, int]) -> set[str]:
    return {answer_node(a) for a in counts if a != "error"}


def _pods(counts: dict[str, int]) -> set[str]:
    return {answer_pod(a) for a in counts if a != "error"}


def _holder(env: dict[str, Any], vip: str) -> str:
    return wait_for(lambda: next((h.name for h in env["lab"].appliances if vip in env["lab"].addresses(h)), None),
                    15, what=f"a box holding {vip}")


def test_the_nodes_run_the_real_kube_proxy_in_nftables_mode_as_node_proxier(env: dict[str, Any]) -> None:
    """kube-proxy v1.34.4 (truthful --version), its nftables tables in every node, and its identity
    system:kube-proxy with the bootstrap node-proxier rights only: no admin."""
    from kubernetes import client, config

    lab, kube = env["lab"], env["kube"]
    version = subprocess.run([str(kube.kube_proxy), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "Kubernetes v1.34.4", version.stdout
    for h in lab.nodes:
        tables = lab.exec(h, ["nft", "list", "tables"]).stdout
        assert "table ip kube-proxy" in tables and "table ip6 kube-proxy" in tables, (h.name, tables)
    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    try:
        auth = client.AuthorizationV1Api(api)

        def may(verb: str, resource: str, group: str = "") -> bool:
            review = auth.create_self_subject_access_review({"spec": {"resourceAttributes": {
                "verb": verb, "resource": resource, "group": group}}})
            return bool(review.status.allowed)

        assert may("watch", "endpointslices", "discovery.k8s.io") and may("list", "nodes")
        assert not may("list", "secrets") and not may("update", "services") and not may("create", "nodes")
        who = client.AuthenticationV1Api(api).create_self_subject_review({"apiVersion": "authentication.k8s.io/v1",
                                                                          "kind": "SelfSubjectReview"})
        assert who.status.user_info.username == "system:kube-proxy"
    finally:
        api.close()


def test_cluster_policy_is_answered_by_pods_on_every_node(env: dict[str, Any], ns: str) -> None:
    """Cluster: each node's kube-proxy spreads over all pods, so every node's pod answers."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    pods = {kube.add_pod(h.name, labels={"app": "cluster"}).name: h.name for h in lab.nodes}
    core.create_namespaced_service(ns, _svc("cluster", [_http()]))
    vip = _ingress(core, ns, "cluster")[0]
    _serving(lab, vip)
    counts = _sample(lab, vip, n=90)
    print(f"\nCluster {vip}: {counts}")
    assert "error" not in counts, counts
    assert _pods(counts) == set(pods), counts
    assert _nodes(counts) == {h.name for h in lab.nodes}, counts


def test_local_policy_sends_only_to_nodes_with_ready_local_pods(env: dict[str, Any], ns: str) -> None:
    """Local: kube-proxy's healthCheckNodePort decides; moving node2's last pod to node3 takes node2
    out within the check interval and brings node3 in, without one failed request."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    kube.add_pod("node1", labels={"app": "local"})
    moving = kube.add_pod("node2", labels={"app": "local"})
    core.create_namespaced_service(ns, _svc("local", [_http(node_port=30281)], externalTrafficPolicy="Local",
                                            healthCheckNodePort=30211))
    vip = _ingress(core, ns, "local")[0]
    _serving(lab, vip)
    wait_for(lambda: kube.healthz("node3", 30211)[0] == 503, 10, what="node3's healthCheckNodePort 503 (no pod)")
    # Both pods' nodes in the rotation first: on a loaded machine a new check may still be rising.
    wait_for(lambda: _nodes(_sample(lab, vip, n=20)) == {"node1", "node2"}, 20, interval=0.2,
             what="node1 and node2 both in the VIP's rotation")
    before = _sample(lab, vip, n=60)
    assert "error" not in before, before
    assert _nodes(before) == {"node1", "node2"}, before  # node3 would drop them (timeouts): it has no pod

    with Probe(lab.client.netns, [target(vip, 80)], 12, interval=0.01, connect_timeout=1.0,
               read_timeout=1.0) as probe:
        time.sleep(1)
        kube.add_pod("node3", labels={"app": "local"})
        kube.set_pod(moving.name, terminating=True)  # still serving while it terminates, not ready
        wait_for(lambda: kube.healthz("node2", 30211)[0] == 503, 10, interval=0.05,
                 what="node2's healthCheckNodePort 503 (no ready local pod)")
        marked = time.monotonic()
        wait_for(lambda: "node2" not in _nodes(_sample(lab, vip, n=20)), 10, interval=0,
                 what="node2 out of the VIP's rotation")
        out_after = time.monotonic() - marked
        time.sleep(1)
        kube.remove_pod(moving.name)
    after = _sample(lab, vip, n=60)
    print(f"\nLocal {vip}: before {before}; node2 out after {out_after:.2f}s; during {probe.result.counts()}; "
          f"after {after}")
    assert probe.result.failed == 0, probe.result.counts()
    assert out_after <= OUT_WITHIN, f"node2 still got requests {out_after:.2f}s after it had no ready pod"
    assert "error" not in after and _nodes(after) == {"node1", "node3"}, after


def test_local_policy_weighs_nodes_by_their_ready_pods_so_each_pod_gets_an_even_share(
        env: dict[str, Any], ns: str) -> None:
    """Local with 3 pods on node1 and 1 on node2: per node, the lone pod would get half the traffic;
    weighted by ready local endpoints (what kube-proxy's healthCheckNodePort and the EndpointSlices
    say), each of the 4 pods gets a quarter of 4,000 requests, within 10 % of it."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    for _ in range(3):
        kube.add_pod("node1", labels={"app": "weighted"})
    kube.add_pod("node2", labels={"app": "weighted"})
    core.create_namespaced_service(ns, _svc("weighted", [_http(node_port=30282)], externalTrafficPolicy="Local",
                                            healthCheckNodePort=30213))
    vip = _ingress(core, ns, "weighted")[0]
    _serving(lab, vip)
    wait_for(lambda: kube.local_endpoints("node1", 30213) == 3, 10, what="node1's healthCheckNodePort saying 3")
    time.sleep(2)  # the daemon's pass that sets the weights
    counts = _sample(lab, vip, n=4000)
    shares = {pod: n / 4000 for pod, n in counts.items()}
    print(f"\nweighted Local {vip}: {counts}")
    assert "error" not in counts and len(counts) == 4, counts
    assert all(0.225 <= share <= 0.275 for share in shares.values()), shares


def test_udp_through_kube_proxy_and_a_node_without_pods_leaves_the_udp_map(env: dict[str, Any], ns: str) -> None:
    """UDP: the appliance's nftables DNAT to the NodePort, kube-proxy to a pod; with Local, a node
    whose pods are gone is taken out of the appliance's UDP map."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    pods = {h.name: kube.add_pod(h.name, labels={"app": "echo"}, udp=True) for h in lab.nodes}
    core.create_namespaced_service(ns, _svc("echo", [{"name": "echo", "port": 7, "targetPort": 8080,
                                                      "protocol": "UDP", "nodePort": 30207}],
                                            externalTrafficPolicy="Local", healthCheckNodePort=30212))
    vip = _ingress(core, ns, "echo")[0]
    _serving(lab, vip, 7, "udp")
    holder = _holder(env, vip)

    def udp_map_has(node: str) -> bool:
        return lab.host(node).ipv4 in lab.exec(holder, ["nft", "list", "ruleset"]).stdout

    wait_for(lambda: all(udp_map_has(h.name) for h in lab.nodes), 15, what="every node in the UDP map")
    counts = _sample(lab, vip, 7, 60, "udp")
    assert "error" not in counts and _nodes(counts) == {h.name for h in lab.nodes}, counts
    kube.remove_pod(pods["node3"].name)
    wait_for(lambda: not udp_map_has("node3"), 15, what="node3 out of the UDP map")
    after = _sample(lab, vip, 7, 60, "udp")
    print(f"\nUDP {vip}:7 on {holder}: {counts}; node3 without pods -> {after}")
    assert "error" not in after and _nodes(after) == {"node1", "node2"}, after


def test_session_affinity_client_ip_keeps_a_client_on_one_pod(env: dict[str, Any], ns: str) -> None:
    """sessionAffinity ClientIP: the same pod for every connection of a client; without it, several."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    for h in lab.nodes:
        for _ in range(2):
            kube.add_pod(h.name, labels={"app": "sticky"})
            kube.add_pod(h.name, labels={"app": "spread"})
    core.create_namespaced_service(ns, _svc("sticky", [_http()], sessionAffinity="ClientIP"))
    core.create_namespaced_service(ns, _svc("spread", [_http()]))
    sticky, spread = _ingress(core, ns, "sticky")[0], _ingress(core, ns, "spread")[0]
    _serving(lab, sticky)
    _serving(lab, spread)
    one, many = _sample(lab, sticky, n=40), _sample(lab, spread, n=40)
    print(f"\nClientIP affinity {sticky}: {one}; none {spread}: {many}")
    assert "error" not in one and len(one) == 1, one
    assert "error" not in many and len(_pods(many)) > 1, many


def test_load_balancer_source_ranges_on_the_real_path(env: dict[str, Any], ns: str) -> None:
    """loadBalancerSourceRanges: a client outside the ranges gets nothing; added, it reaches a pod."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    kube.add_pod("node1", labels={"app": "ranges"})
    core.create_namespaced_service(ns, _svc("ranges", [_http()], loadBalancerSourceRanges=["203.0.113.0/24"]))
    vip = _ingress(core, ns, "ranges")[0]
    _holder(env, vip)
    time.sleep(2)  # the VIP is up; give a wrongly open frontend the time to answer
    refused = _sample(lab, vip, n=10)
    assert refused == {"error": 10}, refused
    core.patch_namespaced_service("ranges", ns, {"spec": {"loadBalancerSourceRanges": ["203.0.113.0/24",
                                                                                     f"{CLIENT}/32"]}})
    _serving(lab, vip)
    allowed = _sample(lab, vip, n=20)
    print(f"\nsource ranges {vip}: outside {refused}; inside {allowed}")
    assert "error" not in allowed and _nodes(allowed) == {"node1"}, allowed


def test_proxy_protocol_v2_reaches_the_pod_with_the_clients_address(env: dict[str, Any], ns: str) -> None:
    """PROXY v2 from HAProxy through the NodePort and kube-proxy: the pod reads the client's own address."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    for h in lab.nodes:
        kube.add_pod(h.name, labels={"app": "pp"})
    core.create_namespaced_service(ns, _svc("pp", [_http(target_port="proxy")],
                                            ann={"lbappliance.io/proxy-protocol": "v2"}))
    vip = _ingress(core, ns, "pp")[0]
    _serving(lab, vip, timeout=30)
    counts = _sample(lab, vip, n=30)
    print(f"\nPROXY v2 {vip}: {counts}")
    assert "error" not in counts, counts
    assert {a.split()[-1] for a in counts} == {CLIENT}, counts  # "<pod>@<node> <address the pod read>"
    assert _nodes({a.split()[0]: n for a, n in counts.items()}) == {h.name for h in lab.nodes}, counts


def test_rolling_drain_and_kube_proxy_restarts_lose_no_request(env: dict[str, Any], ns: str) -> None:
    """One node at a time, under load: ToBeDeletedByClusterAutoscaler (kube-proxy's /healthz 503 by
    itself), out of rotation, kube-proxy restarted, back; then a Node deletion held by a finalizer.
    Not one request fails."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    for h in lab.nodes:
        kube.add_pod(h.name, labels={"app": "rolling"})
    core.create_namespaced_service(ns, _svc("rolling", [_http(target_port="source")]))
    vip = _ingress(core, ns, "rolling")[0]
    _serving(lab, vip)
    names = [h.name for h in lab.nodes]
    addresses = {name: kube.node_addresses(name) for name in names}

    def entered(n: int = 20) -> set[str]:
        """The nodes whose NodePort `n` fresh requests through the VIP entered."""
        return {entry_node(a, addresses) for a in _sample(lab, vip, n=n) if a != "error"}

    assert entered(60) == set(names)
    seen_out: dict[str, float] = {}
    duration = 18.0 * len(names) + 20  # the prober runs its whole course: long enough, not more
    started = time.monotonic()
    with Probe(lab.client.netns, [target(vip, 80)], duration, interval=0.01, connect_timeout=1.0,
               read_timeout=1.0) as probe:
        for node in names:
            kube.taint(node)
            kube.wait_healthz(node, 503, timeout=10)
            start = time.monotonic()
            wait_for(lambda node=node: node not in entered(), 15, interval=0, what=f"{node} out of rotation")
            seen_out[node] = time.monotonic() - start
            kube.restart_kube_proxy(node, wait=False)
            kube.wait_healthz(node, 503, timeout=60)  # still tainted after the restart
            kube.untaint(node)
            kube.wait_healthz(node, 200, timeout=10)
            wait_for(lambda node=node: node in entered(30), 15, interval=0, what=f"{node} back in rotation")
        last = names[-1]
        kube.delete_node(last)  # held by a finalizer: the deletion is seen, /healthz 503
        kube.wait_healthz(last, 503, timeout=10)
        wait_for(lambda: last not in entered(), 15, interval=0, what=f"{last} out")
        kube.release_node(last)
        wait_for(lambda: not [n for n in core.list_node().items if n.metadata.name == last], 10,
                 what=f"Node {last} gone")
        time.sleep(2)
        kube.recreate_node(last)
        wait_for(lambda: last in entered(30), 20, interval=0, what=f"{last} back")
        acted = time.monotonic() - started
    print(f"\nrolling drain {vip} ({acted:.0f} s of {duration:.0f}): out after {seen_out}; {probe.result.counts()}, "
          f"max gap {probe.result.max_gap}s")
    assert acted < duration - 1, f"the probe ({duration}s) ended before the drain did ({acted:.1f}s)"
    assert probe.result.failed == 0, probe.result.counts()
    assert all(s <= OUT_WITHIN for s in seen_out.values()), seen_out


_KEEPALIVE_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
for _ in sys.stdin:
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed by the far end")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed mid-answer")
            body += chunk
        print(body.decode().strip(), flush=True)
    except Exception as e:
        print("error: %s: %s" % (type(e).__name__, e), flush=True)
"""


class _KeepAlive:
    """One long-lived TCP connection from the client through the VIP; `ask()` sends a request on it."""

    def __init__(self, netns: str, vip: str, port: int = 80) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-u", "-c",
                                      _KEEPALIVE_CLIENT, vip, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_draining_node_keeps_established_connections_a_dead_one_has_them_cut(env: dict[str, Any], ns: str) -> None:
    """A node that says it drains (taint: kube-proxy's /healthz 503) gets no new connections, but an
    established one through it keeps working; a node that stops answering (kube-proxy gone) has
    its established connections cut at once."""
    core, lab, kube = env["core"], env["lab"], env["kube"]
    for h in lab.nodes:
        kube.add_pod(h.name, labels={"app": "long"})
    core.create_namespaced_service(ns, _svc("long", [_http(target_port="source")]))
    vip = _ingress(core, ns, "long")[0]
    _serving(lab, vip)
    addresses = {h.name: kube.node_addresses(h.name) for h in lab.nodes}

    def entered(n: int = 20) -> set[str]:
        return {entry_node(a, addresses) for a in _sample(lab, vip, n=n) if a != "error"}

    draining = _KeepAlive(lab.client.netns, vip)
    try:
        first = draining.ask()
        node = entry_node(first, addresses)
        kube.taint(node)
        kube.wait_healthz(node, 503, timeout=10)
        wait_for(lambda: node not in entered(), 15, interval=0, what=f"{node} out of rotation")
        time.sleep(HEALTH_MS / 1000 * 3)
        later = draining.ask()
        print(f"\ndraining {node}: {first!r} then {later!r}")
        assert later == first, f"the established connection through draining {node} was not kept: {later!r}"
    finally:
        draining.close()
        kube.untaint(node)
    kube.wait_healthz(node, 200, timeout=10)
    wait_for(lambda: node in entered(30), 15, interval=0, what=f"{node} back in rotation")

    dead = _KeepAlive(lab.client.netns, vip)
    try:
        first = dead.ask()
        node = entry_node(first, addresses)
        kube.stop_kube_proxy(node)  # its rules stay: the connection could go on, but the node is silent
        wait_for(lambda: node not in entered(), 15, interval=0, what=f"{node} out of rotation")
        time.sleep(HEALTH_MS / 1000 * 2)
        later = dead.ask()
        print(f"dead {node}: {first!r} then {later!r}")
        assert later.startswith("error"), f"the connection through silent {node} was kept: {later!r}"
    finally:
        dead.close()
        if kube.kube_proxy_pid(node) is None:
            kube.start_kube_proxy(node)


# ---------------------------------------------------------------- mixed-family nodes

MIXED = {"node1": DUAL, "node2": V4, "node3": V6}


@pytest.fixture(scope="module")
def mixed(mixed_cp: Any, lab_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """node1 dual-stack, node2 IPv4 only, node3 IPv6 only."""
    yield from _env(mixed_cp, tmp_path_factory.mktemp("mixed"), "lbm", MIXED)  # type: ignore[arg-type]


def test_single_and_dual_stack_services_on_mixed_family_nodes_answer_every_request(mixed: dict[str, Any]) -> None:
    """IPv4-only, IPv6-only and dual-stack Services (Cluster, and dual-stack Local) on nodes of mixed
    families: every request through every VIP answered, each by a pod of a family the Service has."""
    core, lab, kube = mixed["core"], mixed["lab"], mixed["kube"]
    ns = f"mixed-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for h in lab.nodes:
        kube.add_pod(h.name, labels=None)  # every Service's pod on every node
    shapes = {
        "v4": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"]},
        "v6": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"]},
        "dual": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]},
        "duallocal": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                      "externalTrafficPolicy": "Local"},
    }
    for name, spec in shapes.items():
        core.create_namespaced_service(ns, _svc(name, [_http()], **spec))
    results = {}
    for name, spec in shapes.items():
        for vip in _ingress(core, ns, name, count=len(spec["ipFamilies"])):
            with contextlib.suppress(TimeoutError):  # what it does then is counted below
                _serving(lab, vip, timeout=20)
            results[f"{name} {vip}"] = _sample(lab, vip, n=60)
    print(f"\nmixed families: {results}")
    v4_nodes, v6_nodes = {"node1", "node2"}, {"node1", "node3"}
    for key, counts in results.items():
        assert "error" not in counts, (key, counts)
    assert set().union(*(_nodes(c) for k, c in results.items() if k.startswith("v4 "))) <= v4_nodes, results
    assert set().union(*(_nodes(c) for k, c in results.items() if k.startswith("v6 "))) <= v6_nodes, results
