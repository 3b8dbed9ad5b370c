"""VRRP failover between the two lab appliances: planned, hard, link loss, and no flapping when busy.

Outage is the longest gap between two successful requests of a prober on the client that opens
a new connection every few milliseconds (connect timeout 50 ms); it is printed for every case.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbappliance.edges.apply import DataPlane
from lbappliance.testing.netlab import NetworkLab
from lbappliance.testing.prober import finish_multi_probe, start_multi_probe
from tests.integration.test_dataplane import (
    NODE_PORT,
    VIP,
    dataplane,
    lab_nodes,
    lab_state,
    pair_configs,
    vrrp_state,
    wait_for,
    web_service,
)

pytestmark = pytest.mark.integration

HARD_TARGET = 0.5
PLANNED_TARGET = 0.2

@dataclass(frozen=True)
class Probe:
    ok: int
    fail: int
    max_gap: float


def start_probe(lab: NetworkLab, seconds: float, interval: float = 0.005, port: int = 80) -> subprocess.Popen[str]:
    # Connect timeout 50 ms, read 200 ms: a request in flight on the box that dies is lost;
    # it must not hide the outage.
    return start_multi_probe(lab.client.netns, [VIP], seconds, port=port, interval=interval,
                             connect_timeout=0.05, read_timeout=0.2)


def finish_probe(proc: subprocess.Popen[str]) -> Probe:
    data = finish_multi_probe(proc)
    return Probe(data["ok"][VIP], data["fail"][VIP], data["max_gap"])


def measure(lab: NetworkLab, action: Callable[[], None], settle: float = 2.0) -> Probe:
    """Run the prober around `action`; the outage is the largest gap between successes."""
    probe = start_probe(lab, 1.0 + settle + 1.0)
    time.sleep(1.0)
    action()
    return finish_probe(probe)


@dataclass
class Pair:
    lab: NetworkLab
    planes: dict[str, DataPlane]

    def state(self, box: str) -> str:
        return vrrp_state(self.planes[box])

    def master(self) -> str:
        return next(b for b in self.planes if self.state(b) == "MASTER")

    def other(self, box: str) -> str:
        return "app2" if box == "app1" else "app1"

    def hard_kill(self, box: str) -> None:
        """SIGKILL keepalived (parent and VRRP child) and every HAProxy process of the box."""
        dp = self.planes[box]
        dp.keepalived.kill()
        dp.haproxy.stop(sig=9, timeout=5)


def start_pair(lab: NetworkLab, workdir: Path, **config_kw: object) -> Pair:
    """Both appliances from the same cluster state; app1 (higher priority) starts first and takes the VIP."""
    planes = {}
    for box, config in zip(("app1", "app2"), pair_configs(workdir, **config_kw), strict=True):
        dp = dataplane(lab, config, box)
        planes[box] = dp
        dp.start()
        result = dp.apply(lab_state(config, [web_service()], lab_nodes(lab)))
        assert result.kind == "reload", result
        if box == "app1":
            assert wait_for(lambda dp=dp: vrrp_state(dp) == "MASTER", 10), dp.vrrp_states()
    pair = Pair(lab, planes)
    assert wait_for(lambda: pair.state("app2") == "BACKUP", 10), planes["app2"].vrrp_states()
    assert wait_for(lambda: lab.http_get("client", f"http://{VIP}/", timeout=1)[0] == 200, 10)
    return pair


@pytest.fixture(scope="module")
def served(lab: NetworkLab) -> NetworkLab:
    lab.serve_nodeports([NODE_PORT])
    lab.serve_health_ports()
    return lab


@pytest.fixture
def pair(served: NetworkLab, tmp_path: Path) -> Iterator[Pair]:
    p: Pair | None = None
    try:
        p = start_pair(served, tmp_path)
        yield p
    finally:
        for box in ("app1", "app2"):
            served.link_up(box)
        if p is not None:
            for dp in p.planes.values():
                dp.stop()


def _report(case: str, probe: Probe, target: float) -> None:
    verdict = "meets" if probe.max_gap <= target else "MISSES"
    print(f"\n{case}: outage {probe.max_gap:.3f}s ({probe.fail} failed probes, {probe.ok} ok) "
          f"- {verdict} target {target}s")


RUNS = 3  # outages are judged by their median, as the bench does: one sample is at the scheduler's mercy


def outages(served: NetworkLab, tmp_path: Path, case: str, target: float,
            action: Callable[[Pair, str], None]) -> list[float]:
    """Fresh pair per run: fail the active box with `action`, measure, check the peer took over."""
    gaps = []
    for run in range(RUNS):
        pair = start_pair(served, tmp_path / f"run{run}")
        try:
            active = pair.master()
            probe = measure(pair.lab, lambda pair=pair, active=active: action(pair, active))
            _report(f"{case} run {run + 1}", probe, target)
            assert pair.state(pair.other(active)) == "MASTER"
            gaps.append(probe.max_gap)
        finally:
            for box in ("app1", "app2"):
                served.link_up(box)
            for dp in pair.planes.values():
                dp.stop()
    print(f"{case}: median {statistics.median(gaps):.3f}s of {[round(g, 3) for g in gaps]}")
    return gaps


def test_graceful_stop_moves_vip(served: NetworkLab, tmp_path: Path) -> None:
    gaps = outages(served, tmp_path, "planned failover (keepalived SIGTERM)", PLANNED_TARGET,
                   lambda pair, box: pair.planes[box].stop())
    assert statistics.median(gaps) <= PLANNED_TARGET


def test_hard_failure_moves_vip(served: NetworkLab, tmp_path: Path) -> None:
    gaps = outages(served, tmp_path, "hard failure (SIGKILL keepalived + haproxy)", HARD_TARGET,
                   lambda pair, box: pair.hard_kill(box))
    assert statistics.median(gaps) <= HARD_TARGET


@pytest.mark.parametrize("silent", [False, True], ids=["carrier-loss", "silent-cut"])
def test_link_down_moves_vip(served: NetworkLab, tmp_path: Path, silent: bool) -> None:
    gaps = outages(served, tmp_path, f"link down ({'silent' if silent else 'carrier loss'})", HARD_TARGET,
                   lambda pair, box: pair.lab.link_down(box, silent=silent))
    assert statistics.median(gaps) <= HARD_TARGET


def test_haproxy_death_gives_up_vip(pair: Pair) -> None:
    """track_script: a box whose HAProxy is gone hands its VIPs over even though keepalived lives."""
    active = pair.master()
    pair.planes[active].haproxy.stop(sig=9, timeout=5)
    assert wait_for(lambda: pair.state(pair.other(active)) == "MASTER", 10)
    assert wait_for(lambda: pair.lab.http_get("client", f"http://{VIP}/", timeout=1)[0] == 200, 5)


def test_busy_boxes_do_not_flap(pair: Pair) -> None:
    """Both appliance namespaces run CPU hogs for 60 s (bounded by `timeout`): no VRRP transition."""
    before = {box: len(dp.keepalived.transitions()) for box, dp in pair.planes.items()}
    hogs = [pair.lab.spawn(box, ["timeout", "60", "sh", "-c", "while :; do :; done"], f"hog-{box}-{i}")
            for box in pair.planes for i in range(2)]
    try:
        probe = measure(pair.lab, lambda: time.sleep(58), settle=58)
    finally:
        for hog in hogs:
            pair.lab.stop(hog)
    after = {box: len(dp.keepalived.transitions()) for box, dp in pair.planes.items()}
    flaps = {box: after[box] - before[box] for box in after}
    print(f"\nbusy boxes 60 s: VRRP transitions {flaps}, prober {probe.ok} ok / {probe.fail} failed, "
          f"max gap {probe.max_gap:.3f}s")
    assert flaps == {"app1": 0, "app2": 0}
    assert pair.state("app1") == "MASTER" and pair.state("app2") == "BACKUP"
