"""BGP announce mode with real FRR, real HAProxy, real traffic: three boxes behind an FRR ToR.

The ToR (its own zebra/bfdd/bgpd in a namespace) spreads new connections over the boxes by ECMP
with layer-4 hashing; BFD (50 ms x 3) withdraws a dead box. Each box is a DataPlane in
`announce.mode: bgp` (HAProxy, VIPs on lo, its own FRR configured through vtysh/frr-reload.py),
ticked like the daemon's loop. Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import ctypes
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lbappliance.cli.main import cli
from lbappliance.core.models import Service, ServicePort
from lbappliance.edges.frr import check_frr
from lbappliance.testing.bgplab import BgpBox, BgpLab, WindowProbe, bgp_state, frr_unavailable_reason
from lbappliance.testing.netlab import LabError, lab_unavailable_reason
from lbappliance.testing.planes import lab_nodes
from lbappliance.testing.prober import probe_in, target
from lbappliance.testing.wait import wait_for

from .conftest import skip_or_fail

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
VIP, VIP_LOCAL, VIP_STICKY = "203.0.113.10", "203.0.113.11", "203.0.113.12"
NODE_PORT, LOCAL_NODE_PORT, LOCAL_HEALTH_PORT, STICKY_NODE_PORT = 30080, 30081, 32081, 30082
STICKY_CLIENTS = 200
BOXES = ("app1", "app2", "app3")
RUNS = 5
OUTAGE_TARGET = 0.3


def web() -> Service:
    return Service("default", "web", creation="1", ports=(ServicePort("http", "TCP", 80, NODE_PORT),),
                   ingress_ips=(VIP,))


def local() -> Service:
    """externalTrafficPolicy Local: only nodes answering its health port get its traffic."""
    return Service("default", "local", creation="2", ports=(ServicePort("http", "TCP", 80, LOCAL_NODE_PORT),),
                   ingress_ips=(VIP_LOCAL,), external_traffic_policy="Local",
                   health_check_node_port=LOCAL_HEALTH_PORT)


def sticky() -> Service:
    """sessionAffinity ClientIP: a client's connections go to one node, whichever box they reach."""
    return Service("default", "sticky", creation="3", ports=(ServicePort("http", "TCP", 80, STICKY_NODE_PORT),),
                   ingress_ips=(VIP_STICKY,), session_affinity="ClientIP", affinity_timeout=600)


@pytest.fixture(scope="module")
def bgplab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BgpLab]:
    reason = lab_unavailable_reason() or frr_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    lab = BgpLab(prefix="lbgt", boxes=3, nodes=3, workdir=tmp_path_factory.mktemp("bgplab"),
                 resilient=os.environ.get("LBAPPLIANCE_BGP_RESILIENT") == "1")
    try:
        lab.up()
        lab.serve_nodeports([NODE_PORT, LOCAL_NODE_PORT, STICKY_NODE_PORT])
        lab.serve_health_ports([LOCAL_HEALTH_PORT])
        yield lab
    finally:
        lab.down()


class Boxes:
    """The three boxes from one cluster state; restart one after a test broke it."""

    def __init__(self, lab: BgpLab) -> None:
        self.lab = lab
        self.boxes: dict[str, BgpBox] = {}

    def state(self, box: str):  # type: ignore[no-untyped-def]
        return bgp_state(self.lab.box_config(box), [web(), local()], lab_nodes(self.lab))

    def start(self, box: str) -> float:
        """Start a box; seconds until the ToR forwards VIP to it too (a box joining)."""
        config = self.lab.box_config(box)
        self.boxes[box] = BgpBox(self.lab, box, config)
        before = self.lab.next_hops(VIP)
        start = time.monotonic()
        self.boxes[box].start(self.state(box))
        self.lab.wait_next_hops(VIP, before | {box}, timeout=30)
        joined = time.monotonic() - start
        self.lab.wait_balanced(VIP, before | {box})
        return joined

    def stop_all(self) -> None:
        for box in list(self.boxes):
            try:
                self.boxes.pop(box).stop()
            except (LabError, OSError) as exc:
                print(f"stopping {box}: {exc}")


@pytest.fixture
def boxes(bgplab: BgpLab) -> Iterator[Boxes]:
    b = Boxes(bgplab)
    try:
        joins = [b.start(box) for box in BOXES]
        print(f"\nbox joins: the ToR routed to each new box {[round(j, 2) for j in joins]} s after it started")
        yield b
    finally:
        for box in BOXES:
            try:
                bgplab.link_up(box)
            except LabError as exc:
                print(f"link_up {box}: {exc}")
        b.stop_all()
        for node in ("node1", "node2", "node3"):
            bgplab.set_health(node, LOCAL_HEALTH_PORT, True)


# ---- FRR's own check


@pytest.mark.parametrize("shape", sorted(p.name for p in GOLDEN.glob("bgp-*")))
def test_golden_frr_conf_passes_vtysh_check(shape: str) -> None:
    if frr_unavailable_reason():
        skip_or_fail(frr_unavailable_reason() or "")
    verdict = check_frr(GOLDEN / shape / "frr.conf")
    assert verdict.ok, verdict.output


def test_vtysh_check_refuses_a_bad_line(tmp_path: Path) -> None:
    if frr_unavailable_reason():
        skip_or_fail(frr_unavailable_reason() or "")
    text = (GOLDEN / "bgp-dual-stack" / "frr.conf").read_text().replace("timers bgp 3 9", "timers bgp 3 nine")
    (tmp_path / "frr.conf").write_text(text)
    verdict = check_frr(tmp_path / "frr.conf")
    assert not verdict.ok and "timers bgp 3 nine" in verdict.output


# ---- traffic


def frontend_totals(b: Boxes, service: str = "web") -> dict[str, int]:
    """Connections each box's HAProxy accepted on `service`'s frontend so far (`stot`)."""
    totals = {}
    for name, box in b.boxes.items():
        assert box.dp is not None
        rows = box.dp.haproxy.stat_rows("-1 1 -1")
        totals[name] = sum(int(r.get("stot") or 0) for r in rows if r.get("svname") == "FRONTEND"
                           and f"_{service}_" in r.get("pxname", ""))
    return totals


def test_all_three_boxes_carry_one_vip(boxes: Boxes) -> None:
    """3,000 new connections from one client: each box's share within +-15 % of a third."""
    lab = boxes.lab
    assert lab.next_hops(VIP) == set(BOXES)
    before = frontend_totals(boxes)
    result = probe_in(lab.client.netns, [target(VIP, 80)], 3000, connect_timeout=2.0, read_timeout=2.0)
    after = frontend_totals(boxes)
    shares = {box: after[box] - before[box] for box in BOXES}
    print(f"\nshares of 3000 new connections: {shares}; answered by nodes {result.counts()}")
    assert result.failed == 0 and result.ok == 3000
    assert sum(shares.values()) == 3000
    for box, n in shares.items():
        assert 850 <= n <= 1150, (box, shares)


def _outages(boxes: Boxes, case: str, fail: Callable[[BgpBox], None], restore: Callable[[str], None]) -> None:
    lab = boxes.lab
    windows, withdrawn = [], []
    for run in range(RUNS):
        victim = BOXES[run % 3]
        with WindowProbe(lab, VIP, 80, seconds=2.5) as probe:
            time.sleep(0.5)
            t = time.monotonic()
            fail(boxes.boxes[victim])
            lab.wait_next_hops(VIP, set(BOXES) - {victim}, timeout=10)
            withdrawn.append(time.monotonic() - t)
        windows.append(probe.result.window)
        late = [f for f in probe.result.fails if f > 0.5 + 1.0]
        assert not late, f"{case} run {run}: new connections still failed {late} s into the probe"
        restore(victim)
    median = statistics.median(windows)
    print(f"\n{case}: failure window for new connections {[round(w, 3) for w in windows]} s, median "
          f"{median:.3f} s (target {OUTAGE_TARGET}); ToR withdrew after {[round(w, 3) for w in withdrawn]} s")
    assert median <= OUTAGE_TARGET


def test_hard_failure_is_withdrawn_by_bfd(boxes: Boxes) -> None:
    """SIGKILL of a box's FRR daemons and HAProxy: the ToR's BFD drops its sessions, new connections
    fail for at most 0.3 s (median of 5; the BGP hold timer alone would be 9 s)."""

    def restore(box: str) -> None:
        boxes.boxes.pop(box)
        boxes.start(box)

    _outages(boxes, "hard failure (SIGKILL bgpd, bfdd, zebra, haproxy)", lambda b: b.hard_kill(), restore)


def test_link_down_is_withdrawn_by_bfd(boxes: Boxes) -> None:
    """A box cut off the segment (its switch port detached: the box keeps carrier, notices nothing)."""
    lab = boxes.lab

    def restore(box: str) -> None:
        lab.link_up(box)
        lab.wait_next_hops(VIP, set(BOXES), timeout=30)

    _outages(boxes, "link down (silent)", lambda b: lab.link_down(b.name, silent=True), restore)


def test_a_box_whose_haproxy_dies_withdraws(boxes: Boxes) -> None:
    lab = boxes.lab
    box = boxes.boxes["app2"]
    assert box.dp is not None
    start = time.monotonic()
    box.dp.haproxy.stop(sig=9, timeout=5)
    lab.wait_next_hops(VIP, {"app1", "app3"}, timeout=10)
    print(f"\nhaproxy killed on app2: the ToR stopped routing to it after {time.monotonic() - start:.3f} s")
    assert lab.next_hops(VIP_LOCAL) == {"app1", "app3"}
    assert box.status()["withdrawn"] == {VIP: "haproxy is not running", VIP_LOCAL: "haproxy is not running"}
    shown = CliRunner().invoke(cli, ["status", "--config", str(lab.workdir / "app2" / "config.yaml")])
    assert shown.exit_code == 0, shown.output
    assert "bgp sessions: 192.0.2.1=Established, 2001:db8:0:1::1=Established" in shown.output
    assert f"{VIP}" in shown.output and "no: haproxy is not running" in shown.output
    other = CliRunner().invoke(cli, ["status", "--config", str(lab.workdir / "app1" / "config.yaml")])
    assert any(line.split() == [VIP, "yes"] for line in other.output.splitlines()), other.output
    result = probe_in(lab.client.netns, [target(VIP, 80)], 200, connect_timeout=1.0, read_timeout=1.0)
    assert result.failed == 0


def test_a_service_without_healthy_backends_here_is_withdrawn_from_this_box_only(boxes: Boxes) -> None:
    """The Local Service answers only on node3; app1 cannot reach node3 (a blackhole route in app1 only):
    app1 withdraws that VIP alone and keeps the other; app2 and app3 keep both."""
    lab = boxes.lab
    for node in ("node1", "node2"):
        lab.set_health(node, LOCAL_HEALTH_PORT, False)
    node3 = lab.host("node3").ipv4
    lab.exec("app1", ["ip", "route", "add", "blackhole", f"{node3}/32"])
    try:
        lab.wait_next_hops(VIP_LOCAL, {"app2", "app3"}, timeout=10)
        for _ in range(10):  # the other VIP stays announced by all three, app1 included, for a second
            assert lab.next_hops(VIP) == set(BOXES)
            time.sleep(0.1)
        assert boxes.boxes["app1"].status()["withdrawn"] == {VIP_LOCAL: "no healthy backend from this box"}
        result = probe_in(lab.client.netns, [target(VIP_LOCAL, 80)], 100, connect_timeout=1.0, read_timeout=1.0)
        assert result.failed == 0 and set(result.answered_by) == {"node3"}
    finally:
        lab.exec("app1", ["ip", "route", "del", "blackhole", f"{node3}/32"], check=False)
    lab.wait_next_hops(VIP_LOCAL, set(BOXES), timeout=10)


def test_planned_removal_drops_nothing(boxes: Boxes) -> None:
    """A clean stop of app1 while a new connection starts every 3 ms: the box withdraws, waits until
    the ToR has it, and only then stops HAProxy, so no new connection meets a stopped HAProxy.

    The one exposure left is the router's: when its ECMP group shrinks, plain ECMP rehashes flows,
    so a connection in flight at that instant (a few ms long here) may land on another box and be
    reset. The test allows failures only within 50 ms of the ToR's route change and none else."""
    lab = boxes.lab
    times: dict[str, float] = {}

    def watch() -> None:
        while "changed" not in times and time.monotonic() < deadline:
            if lab.next_hops(VIP) != set(BOXES):
                times["changed"] = time.monotonic()
            time.sleep(0.005)

    def stop() -> None:
        boxes.boxes.pop("app1").stop()
        times["stopped"] = time.monotonic()
        times["routes_at_stop"] = float(len(lab.next_hops(VIP)))

    deadline = time.monotonic() + 30
    with WindowProbe(lab, VIP, 80, seconds=4.0, timeout=1.0) as probe:
        time.sleep(1.0)
        watcher, stopper = threading.Thread(target=watch), threading.Thread(target=stop)
        watcher.start()
        stopper.start()
        stopper.join(timeout=30)
        watcher.join(timeout=30)
    result = probe.result
    fails = [round(result.start + f - times["changed"], 3) for f in result.fails]
    print(f"\nplanned removal: {result.ok} new connections ok, {len(fails)} failed at {fails} s from the ToR's "
          f"route change; HAProxy stopped {times['stopped'] - times['changed']:.3f} s after it")
    assert times["routes_at_stop"] == 2 and times["stopped"] > times["changed"]
    assert all(abs(f) <= 0.05 for f in fails), fails
    assert len(fails) <= 2 and result.ok > 300


# ---- established connections when a box goes


def _client_connections(lab: BgpLab, n: int) -> list[tuple[socket.socket, int]]:
    """`n` TCP connections to VIP:80 opened inside the client's namespace (a thread joins it with
    setns, so the sockets belong to it) and left idle: (socket, client port)."""
    made: list[tuple[socket.socket, int]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{lab.client.netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            for _ in range(n):
                sock = socket.create_connection((VIP, 80), timeout=2.0)
                made.append((sock, sock.getsockname()[1]))
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    if errors:
        raise errors[0]
    return made


CLONE_NEWNET = 0x40000000


def _box_of_ports(lab: BgpLab) -> dict[int, str]:
    """Client port -> the box whose kernel holds that established connection to the VIP."""
    owner = {}
    for box in BOXES:
        out = lab.exec(box, ["ss", "-Htn", "state", "established", "dst", lab.client.ipv4]).stdout
        for line in out.splitlines():
            peer = line.split()[-1]
            owner[int(peer.rsplit(":", 1)[1])] = box
    return owner


def _answered(sock: socket.socket) -> bool:
    try:
        sock.settimeout(2.0)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        return sock.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        sock.close()


def test_established_connections_to_surviving_boxes(boxes: Boxes) -> None:
    """120 idle connections spread by the ToR; app3 dies hard; then each connection asks once. The
    dead box's are lost by nature; the surviving boxes' survive only where the ToR did not move
    their flows. Prints the fraction (the goal is all; plain ECMP at the ToR rehashes some)."""
    lab = boxes.lab
    held = _client_connections(lab, 120)
    owners = _box_of_ports(lab)
    assert {owners.get(port) for _, port in held} == set(BOXES), owners
    boxes.boxes["app3"].hard_kill()
    lab.wait_next_hops(VIP, {"app1", "app2"}, timeout=10)
    kept = {box: [0, 0] for box in BOXES}
    for sock, port in held:
        box = owners[port]
        kept[box][1] += 1
        kept[box][0] += _answered(sock)
    survivors = [kept[b] for b in ("app1", "app2")]
    fraction = sum(k for k, _ in survivors) / sum(t for _, t in survivors)
    print(f"\nestablished connections answered after app3 died (kept/total): {kept}; "
          f"surviving boxes' connections kept: {fraction:.0%} ({lab.multipath_kind} next-hop group at the ToR)")
    assert kept["app3"][0] == 0  # its connections died with it
    if lab.multipath_kind == "resilient":
        assert fraction == 1.0
    else:
        assert 0.0 < fraction < 1.0  # hash-threshold moves part of the surviving flows


def stick_entries(box: BgpBox, table: str) -> int:
    """How many clients `table` on this box's HAProxy holds (`used:` in `show table`)."""
    assert box.dp is not None
    head = box.dp.haproxy.runtime(f"show table {table}").splitlines()[0]
    return int(head.rpartition("used:")[2].split()[0])


def test_sticky_clients_keep_their_node_when_a_box_dies(boxes: Boxes) -> None:
    """200 ClientIP-affinity clients, each on the node its first request chose; the box that served
    most of them is killed; every client's next request, now through another box, lands on the same
    node. HAProxy `peers` pushed every box's stick table to the others."""
    lab = boxes.lab
    for box in boxes.boxes.values():
        box.apply(bgp_state(box.config, [web(), local(), sticky()], lab_nodes(lab)))
    lab.wait_next_hops(VIP_STICKY, set(BOXES), timeout=15)
    sources = lab.client_addresses(STICKY_CLIENTS)
    table = "be_default_sticky_tcp80_v4"
    before = frontend_totals(boxes, "sticky")
    first = probe_in(lab.client.netns, [target(VIP_STICKY, 80)], STICKY_CLIENTS, sources=sources,
                     connect_timeout=2.0, read_timeout=2.0)
    served = {box: n - before[box] for box, n in frontend_totals(boxes, "sticky").items()}
    assert first.failed == 0, first
    assert set(first.by_source) == set(sources)
    wait_for(lambda: all(stick_entries(b, table) == STICKY_CLIENTS for b in boxes.boxes.values()), 10, 0.1,
             what=f"every box's {table} holding all {STICKY_CLIENTS} clients")
    victim = max(served, key=lambda box: served[box])
    boxes.boxes[victim].hard_kill()
    lab.wait_next_hops(VIP_STICKY, set(BOXES) - {victim}, timeout=10)
    second = probe_in(lab.client.netns, [target(VIP_STICKY, 80)], STICKY_CLIENTS, sources=sources,
                      connect_timeout=2.0, read_timeout=2.0)
    moved = {s: (first.by_source[s], second.by_source[s]) for s in sources if first.by_source[s] != second.by_source[s]}
    print(f"\nsticky clients per box before the kill {served}; {victim} killed; "
          f"{len(moved)} of {STICKY_CLIENTS} clients changed node; nodes before {first.counts()}, after {second.counts()}")
    assert served[victim] > 0 and len(set(first.by_source.values())) > 1, (served, first.counts())
    assert second.failed == 0, second
    assert not moved, moved
    boxes.boxes.pop(victim)
    boxes.start(victim)


def test_lab_up_bgp_routes_the_vip_over_every_box_and_leaves_nothing_after_sigterm() -> None:
    """`lbappliance lab up --bgp --boxes 2` as a newcomer runs it: the ToR routes the VIP to both
    boxes, a request through it is answered, and SIGTERM tears every namespace down."""
    reason = lab_unavailable_reason() or frr_unavailable_reason()
    if reason:
        skip_or_fail(reason)
    proc = subprocess.Popen([sys.executable, "-m", "lbappliance", "lab", "up", "--bgp", "--boxes", "2", "--nodes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BGP lab up") or len(lines) > 2000:
                break
        banner = "".join(lines[-8:])
        assert "the ToR routes 203.0.113.10 to ['app1', 'app2']" in banner, "".join(lines[-40:])
        answer = subprocess.run(["ip", "netns", "exec", "lbg-client", sys.executable, "-I", "-S", "-c",
                                 "import urllib.request as u; print(u.urlopen('http://203.0.113.10/', timeout=5).read().decode())"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert answer.returncode == 0 and answer.stdout.strip() in ("node1", "node2"), answer.stdout + answer.stderr
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in namespaces.split() if n.startswith("lbg-")], namespaces
