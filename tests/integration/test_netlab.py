"""The network lab itself: topology, isolation from the host, node services, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbappliance.edges.processes import alive, start_time
from lbappliance.testing import netlab
from lbappliance.testing.netlab import LabBusyError, NetworkLab, cleanup_stale
from lbappliance.testing.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NODEPORTS = [30080, 30081]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _host_links() -> set[str]:
    """Link names in the test process's (the host's) namespace."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def _with_prefix(prefix: str) -> set[str]:
    return {ns for ns in _netns() if ns.startswith(f"{prefix}-")}


# --------------------------------------------------------------------------- lifecycle


def test_namespaces_exist_while_up_and_host_namespace_untouched(lab_available: None, tmp_path: Path) -> None:
    links_before = _host_links()
    with NetworkLab(prefix="lbnla", nodes=2, workdir=tmp_path) as lab:
        expected = {f"lbnla-{n}" for n in ("sw", "app1", "app2", "client", "node1", "node2")}
        assert _with_prefix("lbnla") == expected
        assert {h.netns for h in lab.hosts.values()} == expected - {"lbnla-sw"}
        assert [h.name for h in lab.appliances] == ["app1", "app2"]
        assert lab.client.ipv4 == "192.0.2.100"
        assert [(h.ipv4, h.ipv6) for h in lab.nodes] == [
            ("192.0.2.11", "2001:db8:0:1::b"),
            ("192.0.2.12", "2001:db8:0:1::c"),
        ]
        assert _host_links() == links_before, "the lab must not create links in the host namespace"
        # Appliances may bind VIPs they do not hold yet; other hosts keep the defaults.
        res = lab.exec("app1", ["sysctl", "-n", "net.ipv4.ip_nonlocal_bind", "net.ipv6.ip_nonlocal_bind"])
        assert res.stdout.split() == ["1", "1"]
        assert lab.exec("client", ["sysctl", "-n", "net.ipv4.ip_nonlocal_bind"]).stdout.strip() == "0"
        # Each host has exactly lo + eth0 with both addresses.
        addrs = lab.exec("node1", ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert "192.0.2.11/24" in addrs
        assert "2001:db8:0:1::b/64" in addrs
        assert "tentative" not in addrs
    assert _with_prefix("lbnla") == set()
    assert _host_links() == links_before
    assert not (netlab.STATE_ROOT / "lbnla").exists()


def test_teardown_when_body_raises(lab_available: None, tmp_path: Path) -> None:
    lab = NetworkLab(prefix="lbnlb", nodes=1, workdir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), lab:
        proc = lab.spawn("node1", ["sleep", "300"], log_name="sleeper")
        assert _with_prefix("lbnlb")
        raise RuntimeError("boom")
    assert _with_prefix("lbnlb") == set()
    assert proc.poll() is not None
    lab.down()  # a second teardown is a no-op
    assert not lab.hosts


def test_busy_prefix_is_refused(lab: NetworkLab) -> None:
    with pytest.raises(LabBusyError):
        cleanup_stale(lab.prefix)
    with pytest.raises(LabBusyError), NetworkLab(prefix=lab.prefix, nodes=1):
        pass
    # The failed attempt must not have torn anything of the live lab down.
    assert {h.netns for h in lab.hosts.values()} | {lab.switch_netns} <= _netns()
    assert lab.pidfile.exists()


# --------------------------------------------------------------------------- node services


def test_client_reaches_each_node_responder_ipv4(lab: NetworkLab) -> None:
    lab.serve_nodeports(NODEPORTS)
    for node in lab.nodes:
        for port in NODEPORTS:
            assert lab.http_get("client", f"http://{node.ipv4}:{port}/any/path") == (200, f"{node.name}\n")


def test_client_reaches_each_node_responder_ipv6(lab: NetworkLab) -> None:
    lab.serve_nodeports(NODEPORTS)
    for node in lab.nodes:
        assert lab.http_get("client", f"http://[{node.ipv6}]:{NODEPORTS[0]}/") == (200, f"{node.name}\n")
    # Reached on-link by neighbour discovery, not through some route.
    neigh = lab.exec("client", ["ip", "-6", "neigh", "show", lab.nodes[0].ipv6, "dev", "eth0"]).stdout
    assert "lladdr" in neigh, neigh
    if shutil.which("ping"):  # iputils-ping is optional; HTTP above already proved reachability
        lab.exec("client", ["ping", "-6", "-c", "1", "-W", "2", lab.nodes[-1].ipv6])


def test_adding_nodeports_restarts_responder_with_union(lab: NetworkLab) -> None:
    lab.serve_nodeports([30080])
    lab.serve_nodeports([30099], nodes=["node2"])
    node2, node1 = lab.hosts["node2"], lab.hosts["node1"]
    assert lab.http_get("client", f"http://{node2.ipv4}:30099/") == (200, "node2\n")
    assert lab.http_get("client", f"http://{node2.ipv4}:30080/") == (200, "node2\n")
    assert lab.http_get("client", f"http://{node1.ipv4}:30099/", timeout=2)[0] == 0
    lab.stop_nodeports(["node2"])
    assert lab.http_get("client", f"http://{node2.ipv4}:30080/", timeout=2)[0] == 0
    lab.serve_nodeports([30080])  # restarts only node2's responder
    assert lab.http_get("client", f"http://{node2.ipv4}:30080/") == (200, "node2\n")


def test_health_switch_flips_200_503_200(lab: NetworkLab) -> None:
    lab.serve_health_ports([32001])
    node, other = lab.nodes[0], lab.nodes[1]
    url = f"http://{node.ipv4}:32001/healthz"
    status, body = lab.http_get("client", url)
    assert status == 200
    assert json.loads(body)["node"] == node.name
    try:
        lab.set_health(node, 32001, False)
        assert lab.http_get("client", url)[0] == 503
        assert lab.http_get("client", f"http://[{node.ipv6}]:32001/healthz")[0] == 503
        # Only that node and that port changed.
        assert lab.http_get("client", f"http://{node.ipv4}:10256/healthz")[0] == 200
        assert lab.http_get("client", f"http://{other.ipv4}:32001/healthz")[0] == 200
        assert lab.http_get("client", f"http://{node.ipv4}:32001/other")[0] == 404
    finally:
        lab.set_health(node, 32001, True)
    assert lab.http_get("client", url)[0] == 200


@pytest.mark.parametrize("silent", [False, True], ids=["eth0-down", "silent-detach"])
def test_link_down_and_up(lab: NetworkLab, silent: bool) -> None:
    lab.serve_nodeports([30080])
    node = lab.nodes[-1]
    try:
        lab.link_down(node, silent=silent)
        assert lab.http_get("client", f"http://{node.ipv4}:30080/", timeout=1)[0] == 0
        eth0 = lab.exec(node, ["ip", "-o", "link", "show", "eth0"]).stdout
        # Silent: the host keeps carrier and notices nothing, like a frozen peer.
        assert ("LOWER_UP" in eth0) is silent
    finally:
        lab.link_up(node)
    assert lab.http_get("client", f"http://{node.ipv4}:30080/", timeout=3) == (200, f"{node.name}\n")
    # IPv6 addresses survive the down/up (keep_addr_on_down).
    assert lab.http_get("client", f"http://[{node.ipv6}]:30080/", timeout=3) == (200, f"{node.name}\n")


def test_add_and_remove_node(lab: NetworkLab) -> None:
    lab.serve_nodeports([30080])
    lab.serve_health_ports()
    new = lab.add_node()
    try:
        assert new.name == f"node{len(lab.nodes)}"
        assert lab.http_get("client", f"http://{new.ipv4}:30080/") == (200, f"{new.name}\n")
        assert lab.http_get("client", f"http://{new.ipv4}:10256/healthz")[0] == 200
    finally:
        lab.remove_node(new.name)
    assert new.netns not in _netns()
    assert new.name not in lab.hosts


# --------------------------------------------------------------------------- stale cleanup


def test_stale_namespaces_are_removed_on_enter(lab_available: None, tmp_path: Path) -> None:
    stale = ["lbnlc-sw", "lbnlc-node1", "lbnlc-node7"]
    unrelated = "lbnlcx-sw"  # a longer prefix: must survive
    for ns in [*stale, unrelated]:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with NetworkLab(prefix="lbnlc", nodes=1, workdir=tmp_path):
            assert "lbnlc-node7" not in _netns()
            assert unrelated in _netns()
        assert _with_prefix("lbnlc") == set()
        subprocess.run(["ip", "netns", "add", "lbnlc-app1"], check=True)
        assert cleanup_stale("lbnlc") == ["lbnlc-app1"]
        assert unrelated in _netns()
    finally:
        for ns in [*stale, unrelated, "lbnlc-app1"]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_crashed_lab_is_cleaned_by_cli(lab_available: None, tmp_path: Path) -> None:
    """A lab killed with SIGKILL leaves namespaces and helpers; ``--down`` removes both."""
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from lbappliance.testing.netlab import NetworkLab
        lab = NetworkLab(prefix="lbnld", nodes=1, workdir=Path(sys.argv[1]))
        lab.up()
        lab.serve_health_ports()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        records = [json.loads(line) for line in (netlab.STATE_ROOT / "lbnld" / "pids").read_text().splitlines()]
        helper = records[0]["pid"]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert alive(helper)
        assert "lbnld-node1" in _netns()

        res = subprocess.run(
            [sys.executable, "-m", "lbappliance.testing.netlab", "--down", "--prefix", "lbnld"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert _with_prefix("lbnld") == set()
        assert not alive(helper)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cleanup_stale("lbnld")


def test_cleanup_never_kills_a_process_that_does_not_match(lab_available: None) -> None:
    """Pid reuse safety: a recorded pid now running something else is left alone."""
    state = netlab.STATE_ROOT / "lbnle"
    state.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        starttime = start_time(sleeper.pid)
        records = [
            # Right pid and start time, but a different program than recorded.
            {"pid": sleeper.pid, "starttime": starttime, "netns": "lbnle-node1", "argv": ["haproxy", "-f", "x"]},
            # Right pid and program, wrong start time (the pid was reused).
            {"pid": sleeper.pid, "starttime": (starttime or 0) + 1, "netns": "lbnle-node1", "argv": ["sleep", "300"]},
            # Ourselves, with a made-up argv.
            {"pid": os.getpid(), "starttime": 1, "netns": "lbnle-node1", "argv": ["sleep", "1"]},
        ]
        (state / "pids").write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
        cleanup_stale("lbnle")
        assert sleeper.poll() is None
        assert not state.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------- what the e2e tier relies on


def test_vip_on_appliance_is_reached_by_arp_and_nd(lab: NetworkLab, tmp_path: Path) -> None:
    """A VIP from the pools, added to an appliance's eth0, is on-link for the client (ARP/ND).

    HAProxy binds it and spreads requests over the nodes' responders: the e2e data path in small.
    """
    lab.serve_nodeports([30080])
    app = lab.appliances[0]
    vip4, vip6 = "192.0.2.200", "2001:db8:0:1::c8"
    servers = "\n".join(
        f"    server {n.name} {n.ipv4}:30080\n    server {n.name}v6 [{n.ipv6}]:30080" for n in lab.nodes
    )
    cfg = tmp_path / "vip.cfg"
    cfg.write_text(
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n"
        f"frontend vip\n    bind {vip4}:80\n    bind [{vip6}]:80\n    default_backend nodes\n"
        f"backend nodes\n    balance roundrobin\n{servers}\n"
    )
    # ip_nonlocal_bind: haproxy starts before the address arrives, as it will before keepalived adds it.
    proc = lab.spawn(app, ["haproxy", "-db", "-f", str(cfg)], log_name="vip-haproxy")
    try:
        lab.exec(app, ["ip", "addr", "add", f"{vip4}/32", "dev", "eth0"])
        lab.exec(app, ["ip", "addr", "add", f"{vip6}/128", "dev", "eth0", "nodad"])
        # haproxy binds a moment after it is spawned; sample only once it answers on both families.
        for url in (f"http://{vip4}/", f"http://[{vip6}]/"):
            wait_for(lambda url=url: lab.http_get("client", url)[0] == 200, timeout=10, what=f"haproxy on {url}")
        seen4 = {lab.http_get("client", f"http://{vip4}/")[1] for _ in range(6)}
        seen6 = {lab.http_get("client", f"http://[{vip6}]/")[1] for _ in range(6)}
        assert seen4 == seen6 == {f"{n.name}\n" for n in lab.nodes}
    finally:
        lab.stop(proc)
        lab.exec(app, ["ip", "addr", "del", f"{vip4}/32", "dev", "eth0"], check=False)
        lab.exec(app, ["ip", "addr", "del", f"{vip6}/128", "dev", "eth0"], check=False)
