"""DataPlane on real haproxy/keepalived in the network lab: reloads, runtime updates, health, rejection.

The helpers (lab appliance configs, lab states, wrk) live in lbappliance.testing, shared with
test_failover.py, test_udp.py and bench/dataplane.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lbappliance.core.config import ApplianceConfig
from lbappliance.core.models import ANN_SHARED, Service, ServicePort
from lbappliance.core.render import RenderedConfigs, render
from lbappliance.edges.apply import DataPlane
from lbappliance.testing.netlab import NetworkLab
from lbappliance.testing.planes import (
    NODE_PORT,
    VIP,
    VIP2,
    dataplane,
    lab_nodes,
    lab_state,
    node_counts,
    plane_config,
    vrrp_state,
    web_service,
)
from lbappliance.testing.wait import holds_within
from lbappliance.testing.wrk import finish_wrk, start_wrk

pytestmark = pytest.mark.integration

LOCAL_NODE_PORT = 30090
HC_NODE_PORT = 32100

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served_lab(lab: NetworkLab) -> NetworkLab:
    lab.serve_nodeports([NODE_PORT, LOCAL_NODE_PORT])
    lab.serve_health_ports([HC_NODE_PORT])
    return lab


@pytest.fixture
def plane(served_lab: NetworkLab, tmp_path: Path) -> Iterator[tuple[DataPlane, ApplianceConfig]]:
    """app1 alone (no peer answers, so it becomes MASTER and holds the VIP)."""
    config = plane_config(tmp_path, "app1", priority=150)
    dp = dataplane(served_lab, config, "app1")
    try:
        dp.start()
        result = dp.apply(lab_state(config, [web_service()], lab_nodes(served_lab)))
        assert result.kind == "reload", result
        assert holds_within(lambda: vrrp_state(dp) == "MASTER", 10), dp.vrrp_states()
        assert holds_within(lambda: served_lab.http_get("client", f"http://{VIP}/", timeout=1)[0] == 200, 10)
        yield dp, config
    finally:
        dp.stop()


# ---------------------------------------------------------------- tests


def test_first_apply_starts_and_serves(served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    status, body = served_lab.http_get("client", f"http://{VIP}/")
    assert status == 200 and body.startswith("node")
    assert dp.counts["reload"] == 1
    again = dp.apply(lab_state(config, [web_service()], lab_nodes(served_lab)))
    assert again.kind == "noop"
    assert set(dp.server_health().values()) == {"UP"}


def test_fifty_reloads_under_load_drop_nothing(served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    nodes = lab_nodes(served_lab)
    base = web_service()
    alt = replace(base, ports=(*base.ports, ServicePort("alt", "TCP", 8080, NODE_PORT)))
    wrk = start_wrk(served_lab, f"http://{VIP}/", 25)
    try:
        time.sleep(1)
        reload_times = []
        for i in range(50):
            result = dp.apply(lab_state(config, [alt if i % 2 == 0 else base], nodes))
            assert result.kind == "reload", result
            reload_times.append(result.seconds)
            time.sleep(0.3)
    finally:
        load = finish_wrk(wrk)
    workers = dp.old_workers()
    print(f"\n50 reloads under load: {load.requests} requests, {load.failed} failed, {load.rps:.0f} req/s, "
          f"apply+reload median {sorted(reload_times)[25]:.3f}s, old workers now {len(workers)}")
    assert load.requests > 1000
    assert load.failed == 0, load.raw
    assert dp.counts["reload"] == 51


def test_node_churn_goes_through_runtime_api(served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    all_nodes = lab_nodes(served_lab)
    reloads_before = dp.counts["reload"]
    master_reloads = dp.haproxy.show_proc().reloads
    wrk = start_wrk(served_lab, f"http://{VIP}/", 20)
    try:
        time.sleep(1)
        for i in range(50):
            nodes = all_nodes if i % 2 else all_nodes[: 1 + i % 2 + (i // 2) % 2]  # drop 1 or 2 nodes, re-add
            result = dp.apply(lab_state(config, [web_service()], nodes))
            assert result.kind == "runtime", result
            time.sleep(0.25)
    finally:
        load = finish_wrk(wrk)
    print(f"\n50 node changes under load: {load.requests} requests, {load.failed} failed; "
          f"runtime applies {dp.counts['runtime']}, pending deletes {sorted(dp.pending_deletes)}")
    assert load.failed == 0, load.raw
    assert dp.counts["reload"] == reloads_before
    assert dp.haproxy.show_proc().reloads == master_reloads
    assert dp.counts["runtime"] >= 50
    # The file on disk matches what is live, so a restart serves the same servers.
    final = lab_state(config, [web_service()], all_nodes)
    assert dp.apply(final).kind in ("noop", "runtime")
    assert Path(config.paths.haproxy_config).read_text() == render(final, config).haproxy


def test_runtime_added_node_serves_and_removed_node_stops(served_lab: NetworkLab,
                                                           plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    new = served_lab.add_node()
    try:
        nodes = lab_nodes(served_lab)
        assert dp.apply(lab_state(config, [web_service()], nodes)).kind == "runtime"
        assert holds_within(lambda: new.name in node_counts(served_lab, f"http://{VIP}/", 8), 5)
        assert dp.apply(lab_state(config, [web_service()], [n for n in nodes if n.name != new.name])).kind == "runtime"
        seen = node_counts(served_lab, f"http://{VIP}/", 12)
        assert new.name not in seen and "error" not in seen, seen
        assert not any(srv == new.name for _, srv in dp.server_health())
    finally:
        served_lab.remove_node(new.name)


def test_failing_health_check_stops_traffic(served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    hc = config.health_check
    backend = "be_default_web_tcp80_v4"
    served_lab.set_health("node2", 10256, healthy=False)
    try:
        t0 = time.monotonic()
        assert holds_within(lambda: dp.server_health()[(backend, "node2")] == "DOWN", 5, 0.02)
        took = time.monotonic() - t0
        limit = (hc.interval_ms * (hc.fall + 1) + 2000) / 1000  # fall intervals + one in flight + check timeout
        print(f"\nnode2 marked DOWN {took:.2f}s after its health check failed (inter {hc.interval_ms}ms fall {hc.fall})")
        assert took <= limit
        seen = node_counts(served_lab, f"http://{VIP}/", 12)
        assert "node2" not in seen and "error" not in seen, seen
    finally:
        served_lab.set_health("node2", 10256, healthy=True)
    assert holds_within(lambda: dp.server_health()[(backend, "node2")] == "UP", 5)


def test_a_node_the_checks_hold_down_stays_down_across_a_reload(served_lab: NetworkLab,
                                                                plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """A new worker assumes every server UP: without the saved state a dead node would get
    requests until its checks failed again (`fall` intervals), once per reload."""
    dp, config = plane
    base = web_service()
    alt = replace(base, ports=(*base.ports, ServicePort("alt", "TCP", 8080, NODE_PORT)))
    served_lab.set_health("node2", 10256, healthy=False)
    try:
        assert holds_within(lambda: dp.server_health()[("be_default_web_tcp80_v4", "node2")] == "DOWN", 10, 0.05)
        reloads = dp.haproxy.show_proc().reloads
        assert dp.apply(lab_state(config, [alt], lab_nodes(served_lab))).kind == "reload"
        assert dp.haproxy.show_proc().reloads == reloads + 1
        health = dp.server_health()  # the new worker, before any of its own checks could have failed
        assert health[("be_default_web_tcp80_v4", "node2")] == "DOWN", health
        assert health[("be_default_web_tcp8080_v4", "node2")] == "DOWN", health  # a new backend too
        assert health[("be_default_web_tcp80_v4", "node1")] == "UP", health
    finally:
        served_lab.set_health("node2", 10256, healthy=True)
    assert holds_within(lambda: dp.server_health()[("be_default_web_tcp80_v4", "node2")] == "UP", 10), \
        "a node restored from the saved state came back when its checks passed"


def test_a_sticky_client_keeps_its_node_across_reloads(served_lab: NetworkLab,
                                                       plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """sessionAffinity ClientIP: the old worker hands its stick table to the new one (the local
    peer), so ten reloads in a row later the client still lands on the node it first got.

    A worker that received no table from a predecessor (the first after a start) waits out HAProxy's
    resync window (5 s) before it can hand one over; the test waits for that, as docs/design.md says."""
    dp, config = plane
    sticky = web_service(session_affinity="ClientIP", affinity_timeout=600)
    alt = replace(sticky, ports=(*sticky.ports, ServicePort("alt", "TCP", 8080, NODE_PORT)))
    nodes = lab_nodes(served_lab)
    assert dp.apply(lab_state(config, [sticky], nodes)).kind == "reload"
    first = served_lab.http_get("client", f"http://{VIP}/")[1]
    assert holds_within(lambda: "resync_timeout=<PAST>" in dp.haproxy.runtime("show peers"), 10, 0.1)
    for i in range(10):
        assert dp.apply(lab_state(config, [alt if i % 2 == 0 else sticky], nodes)).kind == "reload"
        assert holds_within(lambda: "used:1" in dp.haproxy.runtime("show table be_default_web_tcp80_v4"), 3, 0.01), \
            dp.haproxy.runtime("show table be_default_web_tcp80_v4") + dp.haproxy.runtime("show peers")
        assert served_lab.http_get("client", f"http://{VIP}/")[1] == first, f"reload {i + 1}"


def test_one_check_per_node_however_many_services(served_lab: NetworkLab,
                                                  plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """Twenty Services on kube-proxy's port: HAProxy checks each node once, and one failing check
    takes that node out of every Service at once."""
    dp, config = plane
    shared = {ANN_SHARED: "web"}
    services = [web_service(annotations=shared)]
    services += [replace(web_service(port=8000 + i, annotations=shared), name=f"web{i}") for i in range(20)]
    state = lab_state(config, services, lab_nodes(served_lab))
    assert {f.vip for f in state.frontends} == {VIP} and len(state.frontends) == 21
    assert dp.apply(state).kind == "reload"
    rows = [r for r in dp.haproxy.stat_rows() if r["svname"] not in ("FRONTEND", "BACKEND")]
    checked = sorted((r["pxname"], r["svname"]) for r in rows if r.get("check_status"))
    assert checked == [("hc_10256_v4", n.name) for n in served_lab.nodes], checked
    trackers = [r for r in rows if r["pxname"].startswith("be_")]
    assert len(trackers) == 21 * len(served_lab.nodes)
    served_lab.set_health("node2", 10256, healthy=False)
    try:
        assert holds_within(lambda: all(st == "DOWN" for (_, srv), st in dp.server_health().items() if srv == "node2"),
                        5, 0.02), dp.server_health()
        assert all(st == "UP" for (_, srv), st in dp.server_health().items() if srv != "node2")
        seen = node_counts(served_lab, f"http://{VIP}:8007/", 12)
        assert "node2" not in seen and "error" not in seen, seen
    finally:
        served_lab.set_health("node2", 10256, healthy=True)
    assert holds_within(lambda: set(dp.server_health().values()) == {"UP"}, 5)


def test_keepalived_reloads_for_other_vips_never_withdraw_a_held_one(
        served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """Adding and removing another Service's VIP reloads keepalived; the VIP it already holds must
    not leave the interface even for an instant (watched with `ip monitor address`)."""
    dp, config = plane
    nodes = lab_nodes(served_lab)
    other = replace(web_service(vip=VIP2, port=81), name="other")
    monitor = subprocess.Popen(["ip", "netns", "exec", served_lab.host("app1").netns, "ip", "-o", "monitor", "address"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for i in range(10):
            result = dp.apply(lab_state(config, [web_service(), other] if i % 2 == 0 else [web_service()], nodes))
            assert result.keepalived_reloaded, result
            time.sleep(0.5)
        assert holds_within(lambda: VIP2 not in served_lab.exec("app1", ["ip", "-o", "addr"]).stdout, 5)
    finally:
        monitor.terminate()
        events, _ = monitor.communicate(timeout=5)
    assert f" {VIP2}/" in events, "the other VIP never came and went: the test saw no reload effect"
    withdrawn = [line for line in events.splitlines() if line.startswith("Deleted") and f" {VIP}/" in line]
    assert not withdrawn, withdrawn
    assert served_lab.http_get("client", f"http://{VIP}/", timeout=2)[0] == 200


def test_local_policy_only_nodes_with_endpoints(served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    local = Service("default", "local", creation="2", ports=(ServicePort("http", "TCP", 81, LOCAL_NODE_PORT),),
                    ingress_ips=(VIP2,), external_traffic_policy="Local", health_check_node_port=HC_NODE_PORT)
    served_lab.set_health("node1", HC_NODE_PORT, healthy=False)
    served_lab.set_health("node3", HC_NODE_PORT, healthy=False)
    try:
        assert dp.apply(lab_state(config, [web_service(), local], lab_nodes(served_lab))).kind == "reload"
        backend = "be_default_local_tcp81_v4"
        assert holds_within(lambda: dp.server_health().get((backend, "node1")) == "DOWN"
                        and dp.server_health().get((backend, "node3")) == "DOWN", 5)
        seen = node_counts(served_lab, f"http://{VIP2}:81/", 12)
        assert seen == {"node2": 12}, seen
    finally:
        served_lab.set_health("node1", HC_NODE_PORT, healthy=True)
        served_lab.set_health("node3", HC_NODE_PORT, healthy=True)


def test_invalid_config_rejected_and_old_keeps_serving(served_lab: NetworkLab,
                                                        plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    live = Path(config.paths.haproxy_config)
    before = live.read_text()
    worker = dp.haproxy.show_proc().workers
    state = lab_state(config, [web_service(port=8081)], lab_nodes(served_lab))
    good = render(state, config)
    bogus = RenderedConfigs(good.haproxy.replace("balance roundrobin", "balance roundrobin\n    bogus-option 1"),
                            good.keepalived)
    result = dp.apply(state, rendered=bogus)
    assert result.kind == "rejected"
    assert "bogus-option" in result.message
    assert live.read_text() == before
    assert Path(f"{live}.rejected").read_text() == bogus.haproxy
    assert dp.haproxy.show_proc().workers == worker
    assert served_lab.http_get("client", f"http://{VIP}/")[0] == 200
    assert dp.counts["rejected"] == 1
    # The next good state applies normally.
    assert dp.apply(state).kind == "reload"
    assert served_lab.http_get("client", f"http://{VIP}:8081/")[0] == 200


def test_restart_with_haproxy_running_compares_the_file(served_lab: NetworkLab,
                                                        plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = plane
    state = lab_state(config, [web_service()], lab_nodes(served_lab))
    assert dp.apply(state).kind in ("noop", "reload")
    fresh = DataPlane(config, dp.netns_prefix)  # a restarted daemon: no memory of the last state
    fresh.haproxy.proc = dp.haproxy.proc
    assert fresh.apply(state).kind == "noop"
    changed = lab_state(config, [web_service(port=8082)], lab_nodes(served_lab))
    fresh2 = DataPlane(config, dp.netns_prefix)
    assert fresh2.apply(changed).kind == "reload"
    assert served_lab.http_get("client", f"http://{VIP}:8082/")[0] == 200


def test_reloads_with_long_lived_connection_reap_workers(served_lab: NetworkLab,
                                                         plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """200 reloads with one idle connection held open: old workers are bounded by mworker-max-reloads."""
    dp, config = plane
    nodes = lab_nodes(served_lab)
    base = web_service()
    alt = replace(base, ports=(*base.ports, ServicePort("alt", "TCP", 8080, NODE_PORT)))
    holder = served_lab.spawn("client", ["python3", "-c", _HOLD_SNIPPET, VIP, "80", "600"], "long-conn")
    try:
        time.sleep(0.5)
        peak = 0
        peak_rss = 0
        for i in range(200):
            assert dp.apply(lab_state(config, [alt if i % 2 == 0 else base], nodes)).kind == "reload"
            workers = dp.old_workers()
            peak = max(peak, len(workers))
            peak_rss = max(peak_rss, sum(rss for _, rss in workers))
        current = dp.haproxy.worker_rss()
        final_old = dp.old_workers()
        print(f"\n200 reloads with a held connection: old workers now {len(final_old)} "
              f"(peak {peak}), old-worker RSS now {sum(r for _, r in final_old)} kB (peak {peak_rss} kB), "
              f"current worker RSS {current}")
        assert peak <= config.haproxy.max_reloads + 1
        assert len(final_old) <= 1  # only the worker holding the connection
        assert peak_rss < 200 * 1024
    finally:
        served_lab.stop(holder)


_HOLD_SNIPPET = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:  # a request every 5 s keeps the node's keep-alive timer from closing it
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    if not s.recv(4096):
        print("closed by peer", flush=True)
        break
    time.sleep(5)
"""



# A connection that reports, once a second, who answered it or that it was closed.
_REPORTING_HOLD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
    except OSError as exc:
        print("closed", exc, flush=True)
        break
    if not data:
        print("closed by peer", flush=True)
        break
    print("answer", data.rsplit(b"\r\n\r\n", 1)[-1].decode().strip(), flush=True)
    time.sleep(0.3)
"""


def _held_connection(lab: NetworkLab, seconds: int) -> tuple[subprocess.Popen[bytes], Path, str]:
    """A long-lived connection through the VIP, and the node it landed on."""
    name = f"held-{time.monotonic_ns()}"
    proc = lab.spawn("client", ["python3", "-c", _REPORTING_HOLD, VIP, "80", str(seconds)], name)
    log = lab.log_path(name)

    def node() -> str | None:
        answers = [line.split()[1] for line in _lines(log) if line.startswith("answer ")]
        return answers[0] if answers else None

    assert holds_within(lambda: node() is not None, 10), _lines(log)
    return proc, log, node() or ""


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _follow_health(dp: DataPlane, seconds: float) -> None:
    """What the daemon does between passes, for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        dp.sync_health()
        time.sleep(0.1)


def test_a_draining_node_keeps_established_sessions_until_the_drain_timeout(
        served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """kube-proxy's /healthz answers 503 on a node that is going away: no new connections go
    there, and an established one carries on (here until a 3 s drain timeout)."""
    dp, config = plane
    dp.reload(config.model_copy(update={"health_check": config.health_check.model_copy(
        update={"drain_timeout_seconds": 3})}))
    proc, log, node = _held_connection(served_lab, 60)
    backend = "be_default_web_tcp80_v4"
    try:
        served_lab.set_health(node, 10256, healthy=False)  # 503: the node says it drains
        assert holds_within(lambda: dp.server_health()[(backend, node)] == "DOWN", 10, 0.05)
        marked = time.monotonic()
        _follow_health(dp, 2.0)
        assert not any(line.startswith("closed") for line in _lines(log)), _lines(log)
        answered = sum(1 for line in _lines(log) if line == f"answer {node}")
        assert node not in node_counts(served_lab, f"http://{VIP}/", 6)
        _follow_health(dp, max(0.0, 3.0 - (time.monotonic() - marked)) + 1.5)
        assert any(line.startswith("closed") for line in _lines(log)), "the drain timeout must end the session"
        assert answered >= 4, "the session went on while the node drained"
    finally:
        served_lab.set_health(node, 10256, healthy=True)
        served_lab.stop(proc)


def test_a_node_that_stops_answering_has_its_sessions_cut_at_once(
        served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, _config = plane
    proc, log, node = _held_connection(served_lab, 60)
    backend = "be_default_web_tcp80_v4"
    drop = ("add table inet lbt_drop; add chain inet lbt_drop in { type filter hook input priority 0 ; }; "
            "add rule inet lbt_drop in tcp dport 10256 drop")
    try:
        served_lab.exec(node, ["nft", drop])  # its checks now time out: the node looks dead
        assert holds_within(lambda: dp.server_health()[(backend, node)] == "DOWN", 15, 0.05)
        _follow_health(dp, 1.5)
        assert any(line.startswith("closed") for line in _lines(log)), _lines(log)
    finally:
        served_lab.exec(node, ["nft", "delete", "table", "inet", "lbt_drop"], check=False)
        served_lab.stop(proc)
    assert holds_within(lambda: dp.server_health()[(backend, node)] == "UP", 15)


def test_local_servers_are_weighted_by_ready_endpoints_through_the_runtime_api(
        served_lab: NetworkLab, plane: tuple[DataPlane, ApplianceConfig]) -> None:
    """node1 with 3 ready endpoints and node2 with 1 get 3:1 of the requests (per pod, even);
    when the endpoints move, the weights follow without a reload."""
    from lbappliance.core.models import Node
    from lbappliance.core.plan import Snapshot, desired_state
    from lbappliance.testing.planes import POOLS

    dp, config = plane
    from lbappliance.core.config import load_pools

    local = Service("default", "local", creation="2", ports=(ServicePort("http", "TCP", 81, LOCAL_NODE_PORT),),
                    ingress_ips=(VIP2,), external_traffic_policy="Local", health_check_node_port=HC_NODE_PORT,
                    ip_families=("IPv4",))
    nodes: tuple[Node, ...] = lab_nodes(served_lab, ["node1", "node2"])
    pools = load_pools(POOLS, "pools.yaml", config.own_addresses())

    def state(counts: dict[str, int]):  # type: ignore[no-untyped-def]
        snapshot = Snapshot((web_service(), local), nodes, pools, config, {"default/local": {"IPv4": counts}})
        return desired_state(snapshot)[1]

    assert dp.apply(state({"node1": 3, "node2": 1})).kind == "reload"
    backend = "be_default_local_tcp81_v4"
    assert holds_within(lambda: all(dp.server_health().get((backend, n)) == "UP" for n in ("node1", "node2")), 10)
    seen = node_counts(served_lab, f"http://{VIP2}:81/", 400)
    print(f"\nweights 3:1 -> {seen}")
    assert "error" not in seen and 0.65 <= seen.get("node1", 0) / 400 <= 0.85, seen
    reloads = dp.counts["reload"]
    assert dp.apply(state({"node1": 1, "node2": 1})).kind == "runtime"
    assert dp.counts["reload"] == reloads
    seen = node_counts(served_lab, f"http://{VIP2}:81/", 400)
    print(f"weights 1:1 -> {seen}")
    assert "error" not in seen and 0.4 <= seen.get("node1", 0) / 400 <= 0.6, seen
