"""Data-plane benchmark in the network lab; prints one table.

Throughput and latency through the VIP vs straight to a NodePort (wrk from the client host,
HAProxy `http-request return` responders on the nodes), failed requests during reloads and node
churn, planned and hard failover outage (median of 5), reload time and worker RSS at 1,000 and
5,000 Services; UDP requests/s and loss through the VIP (nftables DNAT) vs straight to the nodes;
active-active VIP share and per-box throughput; and the real path, through kube-proxy to pods
on a real control plane (`real_path`: capacity through the VIP vs straight to the NodePort, and
latency at a fixed rate of half the direct capacity). Needs root; bounded loads only (about 6
minutes).

    ~/.cache/lbappliance/venv/bin/python bench/dataplane.py [real_path | udp active_active ...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbappliance.core.config import ApplianceConfig
from lbappliance.core.models import Backend, DesiredState, Frontend, Server, ServicePort
from lbappliance.core.render import render
from lbappliance.edges.apply import DataPlane
from lbappliance.edges.files import atomic_write
from lbappliance.edges.haproxy import HAProxy
from lbappliance.testing.netlab import NetworkLab
from lbappliance.testing.planes import (
    ECHO_NODE_PORT,
    ECHO_VIP,
    NODE_PORT,
    VIP,
    active_active_configs,
    dataplane,
    dual_nodes,
    dual_state,
    held_vips,
    lab_nodes,
    lab_state,
    many_services,
    measure,
    pair_configs,
    plane_config,
    start_pair,
    udp_services,
    web_service,
)
from lbappliance.testing.wrk import WrkResult, finish_wrk, parse_wrk, run_wrk, start_wrk

Row = tuple[str, str, str]
REPEATS = 3


def throughput(lab: NetworkLab, work: Path) -> list[Row]:
    config = plane_config(work / "tp", "app1", priority=150, check_ms=1000)
    dp = dataplane(lab, config, "app1")
    try:
        dp.start()
        # One backend node, the one the direct runs hit: both sides drive the same responder, so
        # the appliance in the path is the only difference.
        dp.apply(lab_state(config, [web_service()], lab_nodes(lab)[:1]))
        time.sleep(1.5)
        rows = _comparison_rows("shared CPUs", *_compare(lab, dp, {"connections": 32, "threads": 2, "close": False}),
                                "client, appliance and nodes on the same cores: the appliance's CPU is taken from them")
        rows += own_core(lab, dp, config)
        rows += churn(lab, dp, config)
        return rows
    finally:
        dp.stop()


def own_core(lab: NetworkLab, dp: DataPlane, config: ApplianceConfig) -> list[Row]:
    """As deployed: the appliance is its own VM. HAProxy gets the last core; the client and the
    nodes share the others in both runs, so the ratio is what putting the appliance in the path
    costs them. Also HAProxy's CPU per request, the figure that sizes an appliance VM."""
    cpus = os.cpu_count() or 1
    if cpus < 2:
        return [("own core: skipped", "-", "needs 2 CPUs")]
    appliance_cpu, rest = str(cpus - 1), f"0-{cpus - 2}"
    master = dp.haproxy.master_pid()
    try:
        _pin([p for p in [*dp.haproxy.show_proc().workers, master] if p], appliance_cpu)
        _pin(lab.responder_pids(), rest)
        # HAProxy sizes nbthread from its CPU affinity when a worker starts: reload so the worker
        # is what a one-core appliance runs (one thread), not two threads sharing one core.
        assert dp.haproxy.reload().ok
        runs = _compare(lab, dp, {"connections": 32, "threads": 1, "close": False, "cpus": rest})
    finally:
        _pin([p for p in [*dp.haproxy.show_proc().workers, master] if p] + lab.responder_pids(), f"0-{cpus - 1}")
        dp.haproxy.reload()
    return _comparison_rows("own core", *runs, f"target >= 80 %; HAProxy alone on CPU {appliance_cpu}, "
                                                f"client and node on CPU {rest}")


def _compare(lab: NetworkLab, dp: DataPlane, args: dict[str, object]) -> tuple[list[WrkResult], list[WrkResult],
                                                                               list[float]]:
    """Direct and through the VIP, alternated REPEATS times so drift on a shared machine hits both
    alike; with HAProxy's worker CPU per request through the VIP."""
    directs, vias, cpu_us = [], [], []
    for _ in range(REPEATS):
        directs.append(run_wrk(lab, f"http://{lab.nodes[0].ipv4}:{NODE_PORT}/", 6, **args))
        cpu_before = _cpu_seconds(dp.haproxy.show_proc().workers)
        vias.append(run_wrk(lab, f"http://{VIP}/", 6, **args))
        cpu_us.append(1e6 * (_cpu_seconds(dp.haproxy.show_proc().workers) - cpu_before) / max(vias[-1].requests, 1))
    return directs, vias, cpu_us


def _comparison_rows(label: str, directs: list[WrkResult], vias: list[WrkResult], cpu_us: list[float],
                     note: str) -> list[Row]:
    direct, via = _median_run(directs), _median_run(vias)
    ratios = [100 * v.rps / max(d.rps, 1) for d, v in zip(directs, vias, strict=True)]
    conns = "keep-alive, 32 conns"
    return [
        (f"{label}: direct NodePort ({conns})", f"{direct.rps:,.0f} req/s",
         f"median of {REPEATS}; p50 {direct.p50_ms:.2f} ms, p99 {direct.p99_ms:.2f} ms; "
         f"{sum(r.failed for r in directs)} failed"),
        (f"{label}: through VIP ({conns})", f"{via.rps:,.0f} req/s",
         f"median of {REPEATS}; p50 {via.p50_ms:.2f} ms, p99 {via.p99_ms:.2f} ms; "
         f"{sum(r.failed for r in vias)} failed; HAProxy {statistics.median(cpu_us):.1f} us CPU per request"),
        (f"{label}: VIP / direct", f"{statistics.median(ratios):.0f} %",
         f"runs: {', '.join(f'{r:.0f}' for r in ratios)} %; {note}"),
    ]


def _median_run(runs: list[WrkResult]) -> WrkResult:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def _pin(pids: list[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True, timeout=10)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


#: wrk's Lua `delay()` hook as an open-loop pacer (wrk 4 has no -R of its own; this is wrk2's idea):
#: each wrk thread keeps a schedule of one request per INTERVAL ms on a monotonic clock and waits
#: until the next slot, so the offered rate is fixed whatever the latency, as long as enough
#: connections are free (PACED_CONNS, far more than the rate needs).
_PACE_LUA = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } lbts_t;
int clock_gettime(int clk, lbts_t *tp);
]]
local ts = ffi.new("lbts_t")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = INTERVAL
local nxt = nil
function delay()
  local t = now_ms()
  if nxt == nil or nxt < t - 50 then nxt = t end  -- after a stall, no burst to catch up
  nxt = nxt + interval
  local d = nxt - t
  if d < 0 then return 0 end
  return d
end
"""
PACED_THREADS, PACED_CONNS = 2, 64


def real_path(work: Path) -> list[Row]:
    """The real path: client -> VIP -> HAProxy -> node1's NodePort -> kube-proxy -> pod, against
    client -> node1's NodePort -> kube-proxy -> the same pods. kube-proxy v1.34.4 on every node
    (nftables), 2 pods per node, one HAProxy backend (node1). Capacity at saturation (keep-alive,
    32 connections), then latency at a fixed rate of half the direct capacity, where queueing in
    the busiest hop does not decide the tail."""
    from kubernetes import client, config

    from lbappliance.testing.controlplane import ControlPlane, find_binaries
    from lbappliance.testing.kubenodes import KubeNodes

    with ControlPlane(find_binaries()) as cp, NetworkLab(prefix="lbbenchk", nodes=3) as lab:
        api = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
        with KubeNodes(lab, cp, api) as kube:
            for h in lab.nodes:
                for _ in range(2):
                    kube.add_pod(h.name, labels={"app": "web"})
            client.CoreV1Api(api).create_namespaced_service("default", {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"type": "NodePort", "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT}]}})
            kube.sync()
            direct_url, via_url = f"http://{lab.nodes[0].ipv4}:{NODE_PORT}/", f"http://{VIP}/"
            _wait_answering(lab, direct_url)
            plane = plane_config(work / "real", "app1", priority=150, check_ms=1000)
            dp = dataplane(lab, plane, "app1")
            try:
                dp.start()
                dp.apply(lab_state(plane, [web_service()], lab_nodes(lab)[:1]))
                _wait_answering(lab, via_url)
                keep = {"connections": 32, "threads": 2, "close": False}
                directs, vias, cpu_us = [], [], []
                for _ in range(REPEATS):
                    directs.append(run_wrk(lab, direct_url, 6, **keep))  # type: ignore[arg-type]
                    cpu_before = _cpu_seconds(dp.haproxy.show_proc().workers)
                    vias.append(run_wrk(lab, via_url, 6, **keep))  # type: ignore[arg-type]
                    cpu_us.append(1e6 * (_cpu_seconds(dp.haproxy.show_proc().workers) - cpu_before)
                                  / max(vias[-1].requests, 1))
                rows = _comparison_rows("real path (kube-proxy, pods)", directs, vias, cpu_us,
                                        "both through node1's kube-proxy to the same 6 pods")
                capacity = statistics.median(r.rps for r in directs)
                for share, label in ((0.5, "half"), (0.25, "a quarter of")):
                    paced_d, paced_v = [], []
                    for _ in range(REPEATS):
                        paced_d.append(_paced(lab, direct_url, capacity * share, work))
                        paced_v.append(_paced(lab, via_url, capacity * share, work))
                    rows += _paced_rows(capacity * share, label, paced_d, paced_v)
                return rows
            finally:
                dp.stop()
                api.close()


def _wait_answering(lab: NetworkLab, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while lab.http_get("client", url, timeout=1)[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering from the client")
        time.sleep(0.2)


def _paced(lab: NetworkLab, url: str, rate: float, work: Path) -> WrkResult:
    """wrk offering a fixed `rate` of requests/s (the pacer above), keep-alive connections."""
    script = work / "pace.lua"
    script.write_text(_PACE_LUA.replace("INTERVAL", f"{PACED_THREADS * 1000 / rate:.6f}"))
    argv = ["ip", "netns", "exec", lab.client.netns, "wrk", f"-t{PACED_THREADS}", f"-c{PACED_CONNS}", "-d6s",
            "--latency", "--timeout", "2s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    return parse_wrk(done.stdout + done.stderr)


def _paced_rows(rate: float, label: str, directs: list[WrkResult], vias: list[WrkResult]) -> list[Row]:
    d, v = _median_p99(directs), _median_p99(vias)
    note = f"fixed rate {rate:,.0f} req/s offered ({label} the direct capacity), median of {REPEATS}"
    at = f"real path at {label} capacity"
    return [
        (f"{at}: direct NodePort", f"p99 {d.p99_ms:.2f} ms",
         f"p50 {d.p50_ms:.2f} ms, {d.rps:,.0f} req/s done, {sum(r.failed for r in directs)} failed; {note}"),
        (f"{at}: through VIP", f"p99 {v.p99_ms:.2f} ms",
         f"p50 {v.p50_ms:.2f} ms, {v.rps:,.0f} req/s done, {sum(r.failed for r in vias)} failed; {note}"),
        (f"{at}: VIP - direct", f"+{v.p50_ms - d.p50_ms:.2f} ms p50",
         f"+{v.p99_ms - d.p99_ms:.2f} ms p99 (runs p99 direct "
         f"{', '.join(f'{r.p99_ms:.2f}' for r in directs)}; VIP {', '.join(f'{r.p99_ms:.2f}' for r in vias)} ms)"),
    ]


def _median_p99(runs: list[WrkResult]) -> WrkResult:
    return sorted(runs, key=lambda r: r.p99_ms)[len(runs) // 2]


def churn(lab: NetworkLab, dp, config) -> list[Row]:  # type: ignore[no-untyped-def]
    nodes = lab_nodes(lab)
    base = web_service()
    alt = replace(base, ports=(*base.ports, ServicePort("alt", "TCP", 8080, NODE_PORT)))
    load = start_wrk(lab, f"http://{VIP}/", 12)
    time.sleep(1)
    for i in range(30):
        dp.apply(lab_state(config, [alt if i % 2 == 0 else base], nodes))
        time.sleep(0.3)
    reloads = finish_wrk(load)
    before = dp.counts["reload"]
    load = start_wrk(lab, f"http://{VIP}/", 12)
    time.sleep(1)
    for i in range(30):
        dp.apply(lab_state(config, [base], nodes if i % 2 else nodes[:2]))
        time.sleep(0.3)
    runtime = finish_wrk(load)
    return [
        ("failed requests during 30 reloads", f"{reloads.failed} / {reloads.requests:,}", "new connection per request"),
        ("failed requests during 30 node changes", f"{runtime.failed} / {runtime.requests:,}",
         f"reloads during churn: {dp.counts['reload'] - before}"),
    ]


def failover(lab: NetworkLab, work: Path, runs: int = 5) -> list[Row]:
    planned, hard = [], []
    for i in range(runs):
        for kind, out in (("planned", planned), ("hard", hard)):
            pair = start_pair(lab, work / f"fo-{kind}-{i}")
            try:
                active = pair.master()
                action = pair.planes[active].stop if kind == "planned" else (lambda p=pair, a=active: p.hard_kill(a))
                out.append(measure(lab, action).max_gap)
            finally:
                pair.stop()
    return [
        (f"planned failover outage (median of {runs})", f"{statistics.median(planned):.3f} s",
         f"all: {', '.join(f'{x:.3f}' for x in planned)}; target <= 0.2 s"),
        (f"hard failover outage (median of {runs})", f"{statistics.median(hard):.3f} s",
         f"all: {', '.join(f'{x:.3f}' for x in hard)}; target <= 0.5 s"),
    ]


def big_state(services: int, servers: tuple[Server, ...]) -> DesiredState:
    """One frontend + backend per Service on 198.51.100.0/24 and 203.0.113.0/24 VIPs."""
    frontends = []
    for i in range(services):
        vip = f"198.51.100.{1 + i % 250}" if i % 500 < 250 else f"203.0.113.{1 + i % 250}"
        port = 1000 + i // 500
        be = Backend(f"be_svc{i}", servers, 30000 + i % 2000, 10256, "/healthz", None, None, "IPv4")
        frontends.append(Frontend(f"fe_svc{i}", f"bench/svc{i}", vip, port, "TCP", (), be))
    return DesiredState(tuple(frontends), (), {})


def scale(lab: NetworkLab, work: Path) -> list[Row]:
    rows = []
    all_servers = tuple(Server(h.name, h.ipv4) for h in lab.nodes)
    # Servers track one health check per node (lbappliance.core.health), so 5,000 x 3 servers no
    # longer need an fd per check (~36k before, over this container's 20,000 limit); 5,000 x 1
    # stays for comparison with the earlier figure.
    for count, servers in ((1000, all_servers), (5000, all_servers[:1]), (5000, all_servers)):
        config = plane_config(work / f"scale{count}x{len(servers)}", "app1", priority=150, check_ms=60000)
        config = config.model_copy(update={"haproxy": config.haproxy.model_copy(update={"maxconn": 500})})
        paths = config.paths
        Path(paths.state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(paths.haproxy_config), render(big_state(count, servers), config).haproxy)
        hap = HAProxy(paths.haproxy_config, paths.master_socket, paths.runtime_socket, paths.haproxy_pidfile,
                      paths.haproxy_binary, ["ip", "netns", "exec", lab.host("app1").netns],
                      f"{paths.state_dir}/haproxy.log")
        t0 = time.monotonic()
        hap.start(timeout=60)
        started = time.monotonic() - t0
        try:
            times = []
            for _ in range(3):
                result = hap.reload(timeout=60)
                assert result.ok, result
                times.append(result.seconds)
                time.sleep(0.5)
            rss = sum(r for _, r in hap.worker_rss())
            rows.append((f"{count:,} Services x {len(servers)} servers: reload", f"{statistics.median(times):.2f} s",
                         f"start {started:.2f} s; worker RSS {rss / 1024:.0f} MB; target reload <= 1 s"))
        finally:
            hap.stop(timeout=30)
    return rows


# Closed-loop UDP load: `flows` sockets (one source port, so one flow, each), up to `window`
# requests in flight per socket, for `seconds`; answers that never come count as lost.
UDP_LOAD = r"""
import json, selectors, socket, sys, time
targets = [(a, int(p)) for a, p in (t.rsplit(":", 1) for t in sys.argv[1].split(","))]
flows, window, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
socks = []
for i in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect(targets[i % len(targets)])
    sel.register(s, selectors.EVENT_READ, i)
    socks.append(s)
inflight = [0] * flows
last = [0.0] * flows
sent = received = 0


def read_answers(timeout):
    got = 0
    for key, _ in sel.select(timeout=timeout):
        while True:
            try:
                key.fileobj.recv(512)
            except OSError:  # BlockingIOError: drained; ConnectionRefusedError: ICMP unreachable
                break
            got += 1
            inflight[key.data] = max(0, inflight[key.data] - 1)
            last[key.data] = time.monotonic()
    return got


end = time.monotonic() + seconds
while time.monotonic() < end:
    now = time.monotonic()
    for i, s in enumerate(socks):
        if inflight[i] and now - last[i] > 0.2:
            inflight[i] = 0  # unanswered for 200 ms: given up (lost); keeps the window moving
        while inflight[i] < window:
            try:
                s.send(b"x")
            except OSError:
                pass
            inflight[i] += 1
            sent += 1
            last[i] = now
    received += read_answers(0.05)
drain = time.monotonic() + 0.5
while time.monotonic() < drain:
    received += read_answers(0.1)
print(json.dumps({"sent": sent, "received": received, "seconds": seconds}))
"""


def udp_load(lab: NetworkLab, targets: list[str], seconds: float = 6, flows: int = 24, window: int = 4) -> dict:  # type: ignore[type-arg]
    import json
    import subprocess

    out = subprocess.run(["ip", "netns", "exec", lab.client.netns, "python3", "-I", "-S", "-c", UDP_LOAD,
                          ",".join(targets), str(flows), str(window), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def udp(lab: NetworkLab, work: Path) -> list[Row]:
    lab.serve_udp([ECHO_NODE_PORT])
    config, _ = pair_configs(work / "udp", dual=True, check_ms=1000)
    dp = dataplane(lab, config, "app1")
    try:
        dp.start()
        dp.apply(dual_state(config, udp_services(), dual_nodes(lab)))
        time.sleep(1.5)
        direct = udp_load(lab, [f"{h.ipv4}:{ECHO_NODE_PORT}" for h in lab.nodes])
        via = udp_load(lab, [f"{ECHO_VIP}:7"])
    finally:
        dp.stop()

    def row(name: str, r: dict) -> Row:  # type: ignore[type-arg]
        lost = r["sent"] - r["received"]
        return (name, f"{r['received'] / r['seconds']:,.0f} req/s",
                f"loss {lost} / {r['sent']:,} ({100 * lost / max(r['sent'], 1):.2f} %); 24 flows x 4 in flight")

    return [row("UDP echo direct to the 3 nodes", direct), row("UDP echo through VIP (nftables DNAT)", via),
            ("UDP VIP / direct throughput", f"{100 * via['received'] / max(direct['received'], 1):.0f} %",
             "one more hop: DNAT + masquerade + conntrack in the appliance kernel (Python responders)")]


def active_active(lab: NetworkLab, work: Path) -> list[Row]:
    configs = active_active_configs(work / "aa")
    planes = {box: dataplane(lab, config, box) for box, config in configs.items()}
    try:
        states = {}
        for box, dp in planes.items():
            dp.start()
            states[box] = dual_state(configs[box], many_services(), dual_nodes(lab))
            dp.apply(states[box])
        deadline = time.monotonic() + 15
        owned = {box: held_vips(lab, box) for box in planes}
        while time.monotonic() < deadline and not (owned["app1"] and owned["app2"]
                                                   and len(owned["app1"] | owned["app2"]) == 20):
            time.sleep(0.2)
            owned = {box: held_vips(lab, box) for box in planes}
        time.sleep(1.5)
        args = {"connections": 16, "threads": 1, "close": False}
        loads = {box: start_wrk(lab, f"http://{sorted(owned[box])[0]}/", 8, **args) for box in planes if owned[box]}
        results = {box: finish_wrk(proc) for box, proc in loads.items()}
    finally:
        for dp in planes.values():
            dp.stop()
    total = sum(r.rps for r in results.values())
    return [
        ("active-active VIP share (20 Services)", f"{len(owned['app1'])} / {len(owned['app2'])}",
         "app1 / app2, stable hash of the VIP over 2 VRRP instances"),
        *[(f"active-active {box} throughput (keep-alive, 16 conns)", f"{r.rps:,.0f} req/s",
           f"p99 {r.p99_ms:.2f} ms, {r.failed} failed; both boxes loaded at once") for box, r in results.items()],
        ("active-active both boxes together", f"{total:,.0f} req/s", "one wrk per box, concurrently"),
    ]


def main() -> int:
    t0 = time.monotonic()
    only = set(sys.argv[1:])  # e.g. `udp active_active` for just those rows; `real_path` needs the control plane
    if only == {"real_path"}:
        with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp:
            _print(real_path(Path(tmp)), t0)
        return 0
    with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp, NetworkLab(prefix="lbbench", nodes=3) as lab:
        work = Path(tmp)
        if only:
            lab.serve_nodeports([NODE_PORT])
            lab.serve_health_ports()
            rows = [row for name in sorted(only) for row in globals()[name](lab, work)]
            _print(rows, t0)
            return 0
        lab.serve_nodeports([NODE_PORT])
        lab.serve_health_ports()
        rows = throughput(lab, work)
        rows += udp(lab, work)
        rows += active_active(lab, work)
        rows += failover(lab, work)
        rows += scale(lab, work)
    with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp:
        rows += real_path(Path(tmp))
    _print(rows, t0)
    return 0


def _print(rows: list[Row], t0: float) -> None:
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>{vwidth}}  notes")
    print(f"{'-' * width}  {'-' * vwidth}  -----")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}")
    print(f"\n(total {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
