"""Convergence against the real control plane and the network lab. Prints a table.

    sudo python bench/convergence.py [--one-by-one 200] [--burst 1000]

Measures, with both appliances running under the least-privilege identity:
  * create -> status written, p50/p99 over N Services created one by one;
  * create -> VIP answering from the client host, p50/p99 (each Service requests its address
    so the client can start probing at once);
  * B Services created at once -> time until all have addresses (groups of 4 share an address
    with lbappliance.io/allow-shared-ip, since the documentation ranges hold < 1,000 addresses);
  * ... -> time until all their IPAllocated Events are recorded (the leader sends Events once
    a pass has no status left to write, so they never slow the addresses down);
  * Kubernetes API requests per Service, Events included (both daemons, from their metrics);
  * passes, reloads and CPU seconds per process from the burst's start to its last Event.
Targets: p99 create->status <= 1 s, create->serving <= 2 s, 1,000 at once <= 15 s.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
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

from lbappliance.edges.cluster import stream_lines  # noqa: E402
from lbappliance.testing.appliances import pools_yaml, start_daemons  # noqa: E402
from lbappliance.testing.wait import wait_for  # noqa: E402

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


def tree_cpu() -> dict[str, float]:
    """CPU seconds of this process's descendants by command name, including the children they
    reaped (so each daemon's count holds its haproxy -c / keepalived -t validations)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = (comm, sum(int(f) for f in fields[11:15]) / tick)
    ours = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    totals: dict[str, float] = {}
    for pid in ours - {os.getpid()}:
        comm, seconds = stats[pid]
        label = _label(pid, comm)
        totals[label] = totals.get(label, 0.0) + seconds
    return totals


def _label(pid: int, comm: str) -> str:
    if not comm.startswith("python"):
        return comm
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return comm
    if b"run" in argv and b"lbappliance" in argv:
        identity = argv[argv.index(b"--identity") + 1].decode() if b"--identity" in argv else "?"
        return f"lbappliance daemon {identity} (with its haproxy -c, keepalived -t)"
    if b"lbappliance.testing.healthserver" in argv:
        return "lab health responders"
    return comm


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
        for line in stream_lines(resp):
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


def pass_figures(apps: tuple[Any, ...]) -> dict[str, float]:
    """Reconcile passes, seconds spent in them and HAProxy reloads, summed over the daemons."""
    out = {"passes": 0.0, "seconds in passes": 0.0, "reloads": 0.0}
    for app in apps:
        out["passes"] += app.metric("lbappliance_reconcile_total") or 0
        out["seconds in passes"] += app.metric("lbappliance_reconcile_duration_seconds_sum") or 0
        out["reloads"] += app.metric("lbappliance_applies_total", {"kind": "reload"}) or 0
    return out


def serving_all(apps: tuple[Any, ...], ns: str, count: int) -> bool:
    """Both boxes' status.json (written after each apply) list all `count` Services of `ns`."""
    for app in apps:
        status = app.status() or {}
        if sum(1 for s in status.get("services", []) if s["service"].startswith(f"{ns}/")) < count:
            return False
    return True


def allocated_events(core: Any, ns: str) -> int:
    """IPAllocated Events recorded in `ns` (the leader sends them after the status writes)."""
    resp = core.list_namespaced_event(ns, field_selector="reason=IPAllocated", _preload_content=False)
    try:
        return len(json.loads(resp.data)["items"])
    finally:
        resp.release_conn()


def burst(core: Any, ns: str, count: int, apps: tuple[Any, ...]) -> tuple[float, float, float, float]:
    """(all addressed, of which after the last creation, all served by both boxes), from the start,
    and when the last of the burst's IPAllocated Events was recorded."""
    addressed = AddressWatch(core, ns, count)  # watching before the first creation misses nothing
    t0 = time.time()
    created = create_burst(core, ns, count)
    total = addressed.wait(300) - t0
    wait_for(lambda: serving_all(apps, ns, count), 300, interval=0.25, what="both boxes serving the burst")
    served = time.time() - t0
    wait_for(lambda: allocated_events(core, ns) >= count, 300, interval=0.25, what="the burst's IPAllocated Events")
    return total, total - created, served, time.time() - t0


def main() -> None:
    from kubernetes import client, config

    from lbappliance.testing.controlplane import ControlPlane, find_binaries
    from lbappliance.testing.netlab import NetworkLab

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one-by-one", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbappliance-bench-"))
    with ControlPlane(find_binaries(REPO)) as cp, NetworkLab(prefix="lbb", nodes=3, workdir=work / "lab") as lab:
        admin = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
        core = client.CoreV1Api(admin)
        pools = pools_yaml(["192.0.2.128/25", "198.51.100.0/24", "203.0.113.0/24"])
        for extra in ("198.51.100.0/24", "203.0.113.0/24"):  # VIPs beyond the lab subnet are on-link too
            lab.exec("client", ["ip", "route", "add", extra, "dev", "eth0"])
        baseline = api_server_alone(core, args.burst)
        app1, app2 = start_daemons(admin, lab, work, cp.appliance_kubeconfig, rbac=REPO / "deploy" / "rbac.yaml",
                                   nodeports=range(30100, 30100 + args.one_by_one), pools=pools, health_ms=5000)
        try:
            for ns in ("one", "burst"):
                core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            req0 = sum(a.metric("lbappliance_api_requests") or 0 for a in (app1, app2))
            to_status, to_serving = one_by_one(core, lab, "one", args.one_by_one) if args.one_by_one else ([], [])
            wait_for(lambda: allocated_events(core, "one") >= args.one_by_one, 60, what="one-by-one Events")
            req1 = sum(a.metric("lbappliance_api_requests") or 0 for a in (app1, app2))
            cpu0, passes0 = tree_cpu(), pass_figures((app1, app2))
            burst_s, after_created, served_s, events_s = burst(core, "burst", args.burst, (app1, app2))
            cpu1, passes1 = tree_cpu(), pass_figures((app1, app2))
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
        (f"{args.burst} Services at once -> served by both boxes (s)", served_s, None),
        (f"{args.burst} Services at once -> all IPAllocated Events recorded (s)", events_s, None),
        (f"  baseline: API server alone creates {args.burst} (s)", baseline, None),
        *([("API requests per Service, one by one (both daemons)", (req1 - req0) / args.one_by_one, None)]
          if args.one_by_one else []),
        ("API requests per Service, burst (both daemons)", (req2 - req1) / max(1, args.burst), None),
    ]
    print(f"{'figure':<58} {'value':>8} {'target':>8}  verdict")
    for name, value, target in rows:
        verdict = "" if target is None else ("ok" if value <= target else "OVER")
        print(f"{name:<58} {value:>8.3f} {'-' if target is None else f'{target:.2f}':>8}  {verdict}")
    print(f"\nburst of {args.burst}, first creation to last Event ({events_s:.1f} s wall on {os.cpu_count()} CPUs)")
    for name in passes1:
        print(f"  {name + ' (both daemons)':<56} {passes1[name] - passes0[name]:>8.1f}")
    spent = sorted(((cpu1[k] - cpu0.get(k, 0.0), k) for k in cpu1), reverse=True)
    for seconds, name in spent:
        if seconds >= 0.1:
            print(f"  CPU s, {name:<49} {seconds:>8.1f}")
    print(json.dumps({"to_status": to_status[:5], "to_serving": to_serving[:5]}), file=sys.stderr)


if __name__ == "__main__":
    main()
