"""Convergence against the real control plane and the network lab. Prints a table.

    sudo python bench/convergence.py [--one-by-one 200] [--burst 1000]

Measures, with both appliances running under the least-privilege identity:
  * create -> status written, p50/p99 over N Services created one by one;
  * create -> VIP answering from the client host, p50/p99 (each Service requests its address
    so the client can start probing at once);
  * B Services created at once -> time until all have addresses (groups of 4 share an address
    with lbappliance.io/allow-shared-ip, since the documentation ranges hold < 1,000 addresses);
  * Kubernetes API requests per Service (both daemons, from their metrics).
Targets: p99 create->status <= 1 s, create->serving <= 2 s, 1,000 at once <= 15 s.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lbappliance.testing.appliances import make_pair, node_objects, pools_yaml, wait_for  # noqa: E402

WAITER = r"""
import http.client, sys, time
for line in sys.stdin:
    vip, port = line.split()
    while True:
        c = http.client.HTTPConnection(vip, int(port), timeout=0.2)
        try:
            c.request("GET", "/"); r = c.getresponse(); r.read()
            if r.status == 200: break
        except OSError: pass
        finally: c.close()
        time.sleep(0.005)
    print(vip, repr(time.time()), flush=True)
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def service(name: str, port: int, node_port: int | None, annotations: dict[str, str]) -> dict[str, Any]:
    spec_port: dict[str, Any] = {"name": "p", "port": port, "targetPort": 8080, "protocol": "TCP"}
    if node_port:
        spec_port["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [spec_port]}}


def status_time(core: Any, ns: str, name: str, deadline: float) -> float | None:
    while time.time() < deadline:
        svc = core.read_namespaced_service_status(name, ns)
        if svc.status.load_balancer.ingress:
            return time.time()
        time.sleep(0.005)
    return None


def one_by_one(core: Any, lab: Any, ns: str, count: int) -> tuple[list[float], list[float]]:
    addresses = [str(a) for a in ipaddress.ip_network("198.51.100.0/24").hosts()][:count]
    waiter = subprocess.Popen(["ip", "netns", "exec", lab.hosts["client"].netns, sys.executable, "-I", "-c", WAITER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    to_status, to_serving = [], []
    assert waiter.stdin is not None and waiter.stdout is not None
    for i, vip in enumerate(addresses):
        name = f"one-{i}"
        t0 = time.time()
        core.create_namespaced_service(ns, service(name, 80, 30100 + i,
                                                   {"lbappliance.io/load-balancer-ips": vip}))
        waiter.stdin.write(f"{vip} 80\n")
        waiter.stdin.flush()
        written = status_time(core, ns, name, t0 + 30)
        answered = float(waiter.stdout.readline().split()[1])
        if written is not None:
            to_status.append(written - t0)
        to_serving.append(answered - t0)
    waiter.stdin.close()
    waiter.wait(10)
    return to_status, to_serving


def create_burst(core: Any, ns: str, count: int, load_balancer_class: str | None = None) -> float:
    """Seconds to create `count` LoadBalancer Services, 16 at a time ("at once": as fast as the
    API server takes them)."""
    t0 = time.time()

    def create(i: int) -> None:
        body = service(f"burst-{i}", 1000 + i % 4, None, {"lbappliance.io/allow-shared-ip": f"k{i // 4}"})
        if load_balancer_class:
            body["spec"]["loadBalancerClass"] = load_balancer_class
        # Raw answer, read and dropped: deserializing 1,000 V1Service models would burn the CPU the
        # daemons are measured on (the same for the baseline and the measured burst).
        resp = core.create_namespaced_service(ns, body, _preload_content=False)
        resp.drain_conn()
        resp.release_conn()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(count)))
    return time.time() - t0


def api_server_alone(core: Any, count: int) -> float:
    """Baseline, before the appliances start: the same creations with nothing watching."""
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "baseline"}})
    seconds = create_burst(core, "baseline", count, load_balancer_class="example.com/not-ours")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: core.delete_namespaced_service(f"burst-{i}", "baseline"), range(count)))
    wait_for(lambda: not core.list_namespaced_service("baseline").items, 120, what="baseline Services deleted")
    return seconds


class AddressWatch:
    """When each Service of a namespace first shows status.loadBalancer.ingress, from one watch
    of raw JSON started before the creations. (Listing all 1,000 Services through the client
    every 0.25 s loaded the API server and burned the CPU being measured.)"""

    def __init__(self, core: Any, ns: str, count: int) -> None:
        self.core, self.ns, self.count = core, ns, count
        self.addressed: dict[str, float] = {}
        self.done = threading.Event()
        self.error: BaseException | None = None
        listing = core.list_namespaced_service(ns, _preload_content=False)
        self.version: str = json.loads(listing.data)["metadata"]["resourceVersion"]
        listing.release_conn()
        threading.Thread(target=self._run, name=f"watch-{ns}", daemon=True).start()

    def _run(self) -> None:
        try:
            while not self.done.is_set():  # a watch the server ends (timeout) resumes where it was
                resp = self.core.list_namespaced_service(self.ns, watch=True, resource_version=self.version,
                                                         allow_watch_bookmarks=True, timeout_seconds=120,
                                                         _preload_content=False)
                try:
                    self._follow(resp)
                finally:
                    resp.close()
                    resp.release_conn()
        except BaseException as exc:  # reported by wait()
            self.error = exc
            self.done.set()

    def _follow(self, resp: Any) -> None:
        pending = b""
        for chunk in resp.stream(amt=None):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in filter(bytes.strip, lines):
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise RuntimeError(f"watch of namespace {self.ns} failed: {obj}")
                meta = obj["metadata"]
                self.version = meta["resourceVersion"]
                name = meta.get("name")
                if (event["type"] in ("ADDED", "MODIFIED") and name not in self.addressed
                        and ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")):
                    self.addressed[name] = time.time()
                    if len(self.addressed) >= self.count:
                        self.done.set()
                        return

    def wait(self, timeout: float) -> float:
        """The time the last of `count` Services got its address."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"timed out after {timeout}s waiting for all burst Services addressed "
                               f"({len(self.addressed)}/{self.count})")
        if self.error is not None:
            raise self.error
        return max(self.addressed.values())


def burst(core: Any, ns: str, count: int) -> tuple[float, float]:
    addressed = AddressWatch(core, ns, count)  # watching before the first creation misses nothing
    t0 = time.time()
    created = create_burst(core, ns, count)
    total = addressed.wait(300) - t0
    return total, total - created


def main() -> None:
    from kubernetes import client, config

    from lbappliance.testing.controlplane import ControlPlane, apply_manifest, find_binaries
    from lbappliance.testing.netlab import NetworkLab

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one-by-one", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbappliance-bench-"))
    with ControlPlane(find_binaries(REPO)) as cp, NetworkLab(prefix="lbb", nodes=3, workdir=work / "lab") as lab:
        admin = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
        core = client.CoreV1Api(admin)
        apply_manifest(admin, REPO / "deploy" / "rbac.yaml")
        for node in node_objects(lab):
            core.create_node(node)
        if args.one_by_one:
            lab.serve_nodeports(range(30100, 30100 + args.one_by_one))
        lab.serve_health_ports()
        pools = pools_yaml(["192.0.2.128/25", "198.51.100.0/24", "203.0.113.0/24"])
        for extra in ("198.51.100.0/24", "203.0.113.0/24"):  # VIPs beyond the lab subnet are on-link too
            lab.exec("client", ["ip", "route", "add", extra, "dev", "eth0"])
        baseline = api_server_alone(core, args.burst)
        app1, app2 = make_pair(lab, work, cp.appliance_kubeconfig, pools=pools, health_ms=5000)
        app1.start()
        app2.start()
        try:
            wait_for(lambda: app1.status() and app2.status(), 60, what="daemons")
            for ns in ("one", "burst"):
                core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            req0 = sum(a.metric("lbappliance_api_requests") or 0 for a in (app1, app2))
            to_status, to_serving = one_by_one(core, lab, "one", args.one_by_one) if args.one_by_one else ([], [])
            req1 = sum(a.metric("lbappliance_api_requests") or 0 for a in (app1, app2))
            burst_s, after_created = burst(core, "burst", args.burst)
            req2 = sum(a.metric("lbappliance_api_requests") or 0 for a in (app1, app2))
        finally:
            app1.stop()
            app2.stop()
    rows = [
        (f"create -> status written, p50 ({len(to_status)} one by one)", statistics.median(to_status), None),
        ("create -> status written, p99", pct(to_status, 0.99), 1.0),
        ("create -> VIP answering from client, p50", statistics.median(to_serving), None),
        ("create -> VIP answering from client, p99", pct(to_serving, 0.99), 2.0),
    ] if to_status else []
    rows += [
        (f"{args.burst} Services at once -> all addressed (s)", burst_s, 15.0),
        ("  of which after the API server accepted the last one (s)", after_created, None),
        (f"  baseline: API server alone creates {args.burst} (s)", baseline, None),
        *([("API requests per Service, one by one (both daemons)", (req1 - req0) / args.one_by_one, None)]
          if args.one_by_one else []),
        ("API requests per Service, burst (both daemons)", (req2 - req1) / max(1, args.burst), None),
    ]
    print(f"{'figure':<58} {'value':>8} {'target':>8}  verdict")
    for name, value, target in rows:
        verdict = "" if target is None else ("ok" if value <= target else "OVER")
        print(f"{name:<58} {value:>8.3f} {'-' if target is None else f'{target:.2f}':>8}  {verdict}")
    print(json.dumps({"to_status": to_status[:5], "to_serving": to_serving[:5]}), file=sys.stderr)


if __name__ == "__main__":
    main()
