"""UDP Services through nftables on real haproxy/keepalived/nft in the network lab.

UDP echo and a DNS-shaped TCP+UDP Service answer through their VIPs; HAProxy's check-only
backends decide which nodes are in the DNAT map; the appliance's table is its own (another
table survives 100 updates untouched); failover keeps new UDP flows answered; IPv6 too.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from lbappliance.core.config import ApplianceConfig, load_pools
from lbappliance.core.models import DesiredState, Node, Service, ServicePort
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.edges.apply import DataPlane
from lbappliance.testing.appliances import pools_yaml
from lbappliance.testing.netlab import NetworkLab
from tests.integration.test_dataplane import appliance_config, dataplane, wait_for

pytestmark = pytest.mark.integration

ECHO_VIP, DNS_VIP, V6_VIP = "192.0.2.210", "192.0.2.211", "2001:db8:0:1::d2"
ECHO_NODE_PORT, DNS_NODE_PORT = 30007, 30053
CHECK_MS = 200


def lab_state(config: ApplianceConfig, services: Sequence[Service], nodes: Sequence[Node]) -> DesiredState:
    """Like test_dataplane.lab_state, with the lab's IPv4 and IPv6 VIP pools."""
    pools = load_pools(pools_yaml(), "pools.yaml", config.own_addresses())
    return desired_state(Snapshot(tuple(services), tuple(nodes), pools, config))[1]


def box_config(workdir: Path, box: str, *, priority: int, src: str, peer: str, src6: str, peer6: str,
               extra_vrrp: str = "", check_ms: int = CHECK_MS) -> ApplianceConfig:
    """A dual-stack lab appliance: `appliance_config` with IPv6 VRRP peers as well."""
    vrrp6 = f'  unicastSrcIp6: "{src6}"\n  unicastPeers6: ["{peer6}"]\n{extra_vrrp}'
    return appliance_config(workdir, box, priority=priority, src=src, peer=peer, check_ms=check_ms,
                            extra_vrrp=vrrp6, hard_stop_after="10s")


def box_configs(workdir: Path, extra1: str = "", extra2: str = "", **kw: object
                ) -> tuple[ApplianceConfig, ApplianceConfig]:
    one = box_config(workdir, "app1", priority=150, src="192.0.2.2", peer="192.0.2.3",
                     src6="2001:db8:0:1::2", peer6="2001:db8:0:1::3", extra_vrrp=extra1, **kw)  # type: ignore[arg-type]
    two = box_config(workdir, "app2", priority=100, src="192.0.2.3", peer="192.0.2.2",
                     src6="2001:db8:0:1::3", peer6="2001:db8:0:1::2", extra_vrrp=extra2, **kw)  # type: ignore[arg-type]
    return one, two


def dual_nodes(lab: NetworkLab) -> tuple[Node, ...]:
    return tuple(Node(h.name, (("InternalIP", h.ipv4), ("InternalIP", h.ipv6))) for h in lab.nodes)


def udp_services(v6: bool = False) -> list[Service]:
    echo = Service("default", "echo", creation="1", ports=(ServicePort("echo", "UDP", 7, ECHO_NODE_PORT),),
                   ingress_ips=(ECHO_VIP, V6_VIP) if v6 else (ECHO_VIP,),
                   ip_families=("IPv4", "IPv6") if v6 else (), ip_family_policy="RequireDualStack" if v6 else
                   "SingleStack")
    dns = Service("kube-system", "dns", creation="2", ingress_ips=(DNS_VIP,),
                  ports=(ServicePort("dns", "UDP", 53, DNS_NODE_PORT), ServicePort("dns-tcp", "TCP", 53, DNS_NODE_PORT)))
    return [echo, dns]


def nft_table(lab: NetworkLab, box: str, table: str = "inet lbappliance") -> str:
    return lab.exec(box, ["nft", "list", "table", *table.split()], check=False).stdout


@pytest.fixture(scope="module")
def udp_lab(lab: NetworkLab) -> NetworkLab:
    lab.serve_nodeports([DNS_NODE_PORT])
    lab.serve_health_ports()
    lab.serve_udp([ECHO_NODE_PORT, DNS_NODE_PORT])
    return lab


@pytest.fixture
def box(udp_lab: NetworkLab, tmp_path: Path) -> Iterator[tuple[DataPlane, ApplianceConfig]]:
    """app1 alone: MASTER of every instance, serving the UDP Services."""
    config, _ = box_configs(tmp_path)
    dp = dataplane(udp_lab, config, "app1")
    try:
        dp.start()
        result = dp.apply(lab_state(config, udp_services(), dual_nodes(udp_lab)))
        assert result.kind == "reload", result
        assert wait_for(lambda: set(dp.vrrp_states().values()) == {"MASTER"}, 10), dp.vrrp_states()
        yield dp, config
    finally:
        dp.stop()


def test_udp_echo_and_dns_tcp_udp_answer_through_their_vips(udp_lab: NetworkLab,
                                                           box: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, _ = box
    assert wait_for(lambda: udp_lab.udp_ask("client", ECHO_VIP, 7, 1).get("error") is None, 5)
    echo = udp_lab.udp_ask("client", ECHO_VIP, 7, 30)
    dns_udp = udp_lab.udp_ask("client", DNS_VIP, 53, 30)
    status, body = udp_lab.http_get("client", f"http://{DNS_VIP}:53/")
    print(f"\nUDP echo via VIP: {echo}; DNS/UDP via VIP: {dns_udp}; DNS/TCP via VIP: {status} {body.strip()}")
    nodes = {h.name for h in udp_lab.nodes}
    assert set(echo) <= nodes and sum(echo.values()) == 30 and len(echo) >= 2, echo
    assert set(dns_udp) <= nodes and sum(dns_udp.values()) == 30, dns_udp
    assert status == 200 and body.strip() in nodes
    table = nft_table(udp_lab, "app1")
    assert "dnat ip to jhash ip saddr . udp sport mod 3" in table, table
    assert dp.udp_map() == {"udp_default_echo_udp7_v4": ("node1", "node2", "node3"),
                            "udp_kube-system_dns_udp53_v4": ("node1", "node2", "node3")}


def test_node_failing_its_health_check_leaves_the_udp_map(udp_lab: NetworkLab,
                                                         box: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = box
    node2 = udp_lab.host("node2")
    udp_lab.set_health("node2", 10256, healthy=False)
    try:
        t0 = time.monotonic()

        def gone() -> bool:
            dp.sync_health()  # what the daemon does about once per check interval
            return "node2" not in dp.udp_map()["udp_default_echo_udp7_v4"]

        assert wait_for(gone, 5, interval=CHECK_MS / 1000)
        took = time.monotonic() - t0
        hc = config.health_check
        print(f"\nnode2 left the UDP map {took:.2f}s after its /healthz failed "
              f"(inter {hc.interval_ms}ms fall {hc.fall}, sync every {CHECK_MS}ms)")
        assert took <= (hc.interval_ms * (hc.fall + 1) + CHECK_MS + 2000) / 1000
        assert node2.ipv4 not in nft_table(udp_lab, "app1")
        seen = udp_lab.udp_ask("client", ECHO_VIP, 7, 30)
        assert "node2" not in seen and "error" not in seen, seen
        assert not dp.sync_health()  # nothing changed: no nft run
    finally:
        udp_lab.set_health("node2", 10256, healthy=True)

    def back() -> bool:
        dp.sync_health()
        return "node2" in dp.udp_map()["udp_default_echo_udp7_v4"]

    assert wait_for(back, 5, interval=CHECK_MS / 1000)


def test_our_table_only_other_tables_untouched_after_100_updates(udp_lab: NetworkLab,
                                                                 box: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = box
    other = """table inet othertest {
	set blocked {
		type ipv4_addr
		elements = { 203.0.113.7 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @blocked counter drop
	}
}
"""
    udp_lab.exec("app1", ["nft", "-f", "-"], input=other)
    before = nft_table(udp_lab, "app1", "inet othertest")
    nodes = dual_nodes(udp_lab)
    services = udp_services()
    extra = replace(services[0], ports=(*services[0].ports, ServicePort("echo2", "UDP", 17, ECHO_NODE_PORT)))
    loads_before = dp.counts["nft_load"]
    try:
        for i in range(100):
            if i % 4 == 0:
                state = lab_state(config, [extra, services[1]], nodes)  # a UDP port added
            elif i % 4 == 2:
                state = lab_state(config, services, nodes[:2])  # a node leaves (runtime API + nft map)
            else:
                state = lab_state(config, services, nodes)
            result = dp.apply(state)
            assert result.kind in ("reload", "runtime", "noop"), result
        after = nft_table(udp_lab, "app1", "inet othertest")
        tables = udp_lab.exec("app1", ["nft", "list", "tables"]).stdout.split("\n")
        print(f"\n100 updates: {dp.counts['nft_load'] - loads_before} nft transactions; tables now {tables}")
        assert after == before
        assert sorted(t for t in tables if t) == ["table inet lbappliance", "table inet othertest"]
        assert dp.counts["nft_load"] - loads_before >= 50
        assert "error" not in udp_lab.udp_ask("client", ECHO_VIP, 7, 10)
    finally:
        udp_lab.exec("app1", ["nft", "delete", "table", "inet", "othertest"], check=False)


def test_ipv6_udp_vip_answers(udp_lab: NetworkLab, box: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, config = box
    assert dp.apply(lab_state(config, udp_services(v6=True), dual_nodes(udp_lab))).kind == "reload"
    assert wait_for(lambda: set(dp.vrrp_states().values()) == {"MASTER"}, 10), dp.vrrp_states()
    assert wait_for(lambda: "error" not in udp_lab.udp_ask("client", V6_VIP, 7, 1), 10)
    seen = udp_lab.udp_ask("client", V6_VIP, 7, 20)
    print(f"\nUDP echo via IPv6 VIP {V6_VIP}: {seen}")
    assert set(seen) <= {h.name for h in udp_lab.nodes} and sum(seen.values()) == 20
    assert "dnat ip6 to jhash ip6 saddr . udp sport mod 3" in nft_table(udp_lab, "app1")


UDP_PROBE = r"""
import json, socket, sys, time
addr, port, duration, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ok = fail = 0
last_ok = None
max_gap = 0.0
nodes = {}
end = time.monotonic() + duration
print("ready", flush=True)
while time.monotonic() < end:
    t = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        try:
            s.sendto(b"p", (addr, port))
            data, _ = s.recvfrom(512)
            good = data.endswith(b" p")
        except OSError:
            good = False
    now = time.monotonic()
    if good:
        ok += 1
        node = data.split()[0].decode()
        nodes[node] = nodes.get(node, 0) + 1
        if last_ok is not None:
            max_gap = max(max_gap, now - last_ok)
        last_ok = now
    else:
        fail += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
print(json.dumps({"ok": ok, "fail": fail, "max_gap": max_gap, "nodes": nodes, "last_ok": end - (last_ok or 0)}))
"""


def test_failover_keeps_new_udp_flows_answered(udp_lab: NetworkLab, tmp_path: Path) -> None:
    one, two = box_configs(tmp_path)
    planes = {"app1": dataplane(udp_lab, one, "app1"), "app2": dataplane(udp_lab, two, "app2")}
    try:
        for name, dp in planes.items():
            dp.start()
            config = one if name == "app1" else two
            assert dp.apply(lab_state(config, udp_services(), dual_nodes(udp_lab))).kind == "reload"
        assert wait_for(lambda: set(planes["app1"].vrrp_states().values()) == {"MASTER"}
                        and set(planes["app2"].vrrp_states().values()) == {"BACKUP"}, 10)
        assert wait_for(lambda: "error" not in udp_lab.udp_ask("client", ECHO_VIP, 7, 1), 5)
        probe = subprocess.Popen(["ip", "netns", "exec", udp_lab.client.netns, "python3", "-I", "-S", "-c", UDP_PROBE,
                                  ECHO_VIP, "7", "5", "0.01"], stdout=subprocess.PIPE, text=True)
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        # The active box vanishes (its port leaves the switch; it notices nothing, like a dead VM):
        # killing its processes would not do, its kernel would keep forwarding UDP on its own.
        udp_lab.link_down("app1", silent=True)
        try:
            out, _ = probe.communicate(timeout=30)
        finally:
            udp_lab.link_up("app1")
        result = json.loads(out.strip().splitlines()[-1])
        print(f"\nUDP during hard failover: {result}")
        assert set(planes["app2"].vrrp_states().values()) == {"MASTER"}
        assert 0.1 < result["max_gap"] < 1.5, result
        assert result["last_ok"] < 0.3, result  # new flows answered through the new master at the end
        assert "error" not in udp_lab.udp_ask("client", ECHO_VIP, 7, 10)
        assert "error" not in udp_lab.udp_ask("client", DNS_VIP, 53, 10)
    finally:
        for dp in planes.values():
            dp.stop()
