"""UDP Services through nftables on real haproxy/keepalived/nft in the network lab.

UDP echo and a DNS-shaped TCP+UDP Service answer through their VIPs; HAProxy's check-only
backends decide which nodes are in the DNAT map; the appliance's table is its own (another
table survives 100 updates untouched); failover keeps new UDP flows answered; IPv6 too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lbappliance.core.config import ApplianceConfig
from lbappliance.core.models import ServicePort
from lbappliance.edges.apply import DataPlane
from lbappliance.testing.netlab import NetworkLab
from lbappliance.testing.planes import (
    DNS_NODE_PORT,
    DNS_VIP,
    ECHO_NODE_PORT,
    ECHO_VIP,
    V6_VIP,
    dataplane,
    dual_nodes,
    dual_state,
    pair_configs,
    udp_services,
)
from lbappliance.testing.prober import Probe, target
from lbappliance.testing.wait import holds_within

pytestmark = pytest.mark.integration

CHECK_MS = 200


def box_configs(workdir: Path) -> tuple[ApplianceConfig, ApplianceConfig]:
    """Dual-stack app1 (150) and app2 (100)."""
    return pair_configs(workdir, dual=True, check_ms=CHECK_MS)


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
        result = dp.apply(dual_state(config, udp_services(), dual_nodes(udp_lab)))
        assert result.kind == "reload", result
        assert holds_within(lambda: set(dp.vrrp_states().values()) == {"MASTER"}, 10), dp.vrrp_states()
        yield dp, config
    finally:
        dp.stop()


def test_udp_echo_and_dns_tcp_udp_answer_through_their_vips(udp_lab: NetworkLab,
                                                           box: tuple[DataPlane, ApplianceConfig]) -> None:
    dp, _ = box
    assert holds_within(lambda: udp_lab.udp_ask("client", ECHO_VIP, 7, 1).get("error") is None, 5)
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

        assert holds_within(gone, 5, interval=CHECK_MS / 1000)
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

    assert holds_within(back, 5, interval=CHECK_MS / 1000)


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
                state = dual_state(config, [extra, services[1]], nodes)  # a UDP port added
            elif i % 4 == 2:
                state = dual_state(config, services, nodes[:2])  # a node leaves (runtime API + nft map)
            else:
                state = dual_state(config, services, nodes)
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
    assert dp.apply(dual_state(config, udp_services(v6=True), dual_nodes(udp_lab))).kind == "reload"
    assert holds_within(lambda: set(dp.vrrp_states().values()) == {"MASTER"}, 10), dp.vrrp_states()
    assert holds_within(lambda: "error" not in udp_lab.udp_ask("client", V6_VIP, 7, 1), 10)
    seen = udp_lab.udp_ask("client", V6_VIP, 7, 20)
    print(f"\nUDP echo via IPv6 VIP {V6_VIP}: {seen}")
    assert set(seen) <= {h.name for h in udp_lab.nodes} and sum(seen.values()) == 20
    assert "dnat ip6 to jhash ip6 saddr . udp sport mod 3" in nft_table(udp_lab, "app1")


def test_failover_keeps_new_udp_flows_answered(udp_lab: NetworkLab, tmp_path: Path) -> None:
    one, two = box_configs(tmp_path)
    planes = {"app1": dataplane(udp_lab, one, "app1"), "app2": dataplane(udp_lab, two, "app2")}
    try:
        for name, dp in planes.items():
            dp.start()
            config = one if name == "app1" else two
            assert dp.apply(dual_state(config, udp_services(), dual_nodes(udp_lab))).kind == "reload"
        assert holds_within(lambda: set(planes["app1"].vrrp_states().values()) == {"MASTER"}
                        and set(planes["app2"].vrrp_states().values()) == {"BACKUP"}, 10)
        assert holds_within(lambda: "error" not in udp_lab.udp_ask("client", ECHO_VIP, 7, 1), 5)
        probe = Probe(udp_lab.client.netns, [target(ECHO_VIP, 7)], 5, proto="udp", interval=0.01,
                      read_timeout=0.1).start()
        time.sleep(1.5)
        # The active box vanishes (its port leaves the switch; it notices nothing, like a dead VM):
        # killing its processes would not do, its kernel would keep forwarding UDP on its own.
        udp_lab.link_down("app1", silent=True)
        try:
            result = probe.finish(timeout=30)
        finally:
            udp_lab.link_up("app1")
        print(f"\nUDP during hard failover: {result}")
        assert set(planes["app2"].vrrp_states().values()) == {"MASTER"}
        assert 0.1 < result.max_gap < 1.5, result
        assert result.since_last_ok < 0.3, result  # new flows answered through the new master at the end
        assert "error" not in udp_lab.udp_ask("client", ECHO_VIP, 7, 10)
        assert "error" not in udp_lab.udp_ask("client", DNS_VIP, 53, 10)
    finally:
        for dp in planes.values():
            dp.stop()
