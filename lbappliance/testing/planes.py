"""DataPlanes (HAProxy + keepalived + nft, no daemon, no cluster) on the network lab's appliance hosts.

What the integration tests and `bench/dataplane.py` share: a lab appliance's config, the desired
state for some Services and the lab's nodes, a DataPlane running inside an appliance namespace,
a pair of them with the VIP on app1, and the outage a failover causes as the client sees it.
"""

from __future__ import annotations

import ipaddress
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbappliance.core.config import PEERS_PORT, ApplianceConfig, load_pools, parse_config
from lbappliance.core.models import DesiredState, Node, Service, ServicePort
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.edges.apply import DataPlane

from .appliances import pools_yaml
from .netlab import VIP_POOL_V4, NetworkLab
from .prober import Probe, ProbeResult, probe_in, target
from .wait import holds_within

VIP = "192.0.2.200"
VIP2 = "192.0.2.201"
NODE_PORT = 30080
#: The lab's IPv4 VIPs only; DUAL_POOLS has the IPv6 ones as well.
POOLS = f"""
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
- name: lab
  addresses: [{VIP_POOL_V4}]
"""
DUAL_POOLS = pools_yaml()

#: Each appliance host's own addresses (netlab's numbering) and its peer.
OWN = {"app1": ("192.0.2.2", "2001:db8:0:1::2"), "app2": ("192.0.2.3", "2001:db8:0:1::3")}
PEER = {"app1": "app2", "app2": "app1"}

ECHO_VIP, DNS_VIP, V6_VIP = "192.0.2.210", "192.0.2.211", "2001:db8:0:1::d2"
ECHO_NODE_PORT, DNS_NODE_PORT = 30007, 30053

#: Active-active: both boxes high (150) on their home instance, 100 on the other, preemption on.
ACTIVE_ACTIVE_VRRP = {
    "app1": "  homeInstances: [0]\n  backupPriority: 100\n  nopreempt: false\n  preemptDelay: 1",
    "app2": "  homeInstances: [1]\n  backupPriority: 100\n  nopreempt: false\n  preemptDelay: 1",
}


def plane_config(workdir: Path, box: str, *, priority: int, dual: bool = False, check_ms: int = 200,
                 advert: float = 0.1, extra: str = "", extra_vrrp: str = "",
                 hard_stop_after: str | None = None, shared_tables: bool = False) -> ApplianceConfig:
    """A lab appliance: unicast VRRP to its peer (IPv6 too when `dual`), files and sockets under its
    own dir. `extra_vrrp` lines (indented two spaces) go into the vrrp block, `extra` at the top level.
    `shared_tables`: the box is named after itself and shares stick tables with its peer (`peers`)."""
    base = workdir / box
    base.mkdir(parents=True, exist_ok=True)
    (src, src6), (peer, peer6) = OWN[box], OWN[PEER[box]]
    if dual:
        extra_vrrp = f'  unicastSrcIp6: "{src6}"\n  unicastPeers6: ["{peer6}"]\n{extra_vrrp}'
    peers = " []"
    if shared_tables:
        peers = "".join(f'\n    - {{name: {b}, address: "{OWN[b][0]}:{PEERS_PORT}"}}' for b in sorted(OWN))
    return parse_config(f"""
name: {box if shared_tables else "lab"}
processMode: managed
vrrp:
  interface: eth0
  priority: {priority}
  advertInterval: {advert}
  unicastSrcIp: {src}
  unicastPeers: [{peer}]
{extra_vrrp}
healthCheck: {{intervalMilliseconds: {check_ms}, fall: 2, rise: 2}}
haproxy:
  statsAddress: null
  maxconn: 4000
  hardStopAfter: {hard_stop_after or ("10s" if dual else "60s")}
  peers:{peers}
paths:
  haproxyConfig: {base}/haproxy.cfg
  keepalivedConfig: {base}/keepalived.conf
  stateDir: {base}/run
{extra}
""")


def pair_configs(workdir: Path, extra_vrrp: tuple[str, str] = ("", ""), **kw: object
                 ) -> tuple[ApplianceConfig, ApplianceConfig]:
    """app1 (priority 150, normally MASTER) and app2 (100)."""
    one = plane_config(workdir, "app1", priority=150, extra_vrrp=extra_vrrp[0], **kw)  # type: ignore[arg-type]
    two = plane_config(workdir, "app2", priority=100, extra_vrrp=extra_vrrp[1], **kw)  # type: ignore[arg-type]
    return one, two


def active_active_configs(workdir: Path) -> dict[str, ApplianceConfig]:
    """Both boxes dual-stack at priority 150, each at home on its own VRRP instance."""
    return {box: plane_config(workdir, box, priority=150, dual=True, extra_vrrp=ACTIVE_ACTIVE_VRRP[box])
            for box in ("app1", "app2")}


def lab_nodes(lab: NetworkLab, names: Sequence[str] | None = None, *, dual: bool = False) -> tuple[Node, ...]:
    """The lab's node hosts as Nodes (their IPv6 InternalIPs too when `dual`)."""
    hosts = [h for h in lab.nodes if names is None or h.name in names]
    return tuple(Node(h.name, (("InternalIP", h.ipv4), *((("InternalIP", h.ipv6),) if dual else ())))
                 for h in hosts)


def web_service(vip: str = VIP, port: int = 80, node_port: int = NODE_PORT, **kw: object) -> Service:
    return Service("default", "web", creation="1", ports=(ServicePort("http", "TCP", port, node_port),),
                   ingress_ips=(vip,), **kw)  # type: ignore[arg-type]


def udp_services(v6: bool = False) -> list[Service]:
    """A UDP echo Service (dual-stack when `v6`) and a DNS-shaped one with TCP and UDP on port 53."""
    echo = Service("default", "echo", creation="1", ports=(ServicePort("echo", "UDP", 7, ECHO_NODE_PORT),),
                   ingress_ips=(ECHO_VIP, V6_VIP) if v6 else (ECHO_VIP,),
                   ip_families=("IPv4", "IPv6") if v6 else (), ip_family_policy="RequireDualStack" if v6 else
                   "SingleStack")
    dns = Service("kube-system", "dns", creation="2", ingress_ips=(DNS_VIP,),
                  ports=(ServicePort("dns", "UDP", 53, DNS_NODE_PORT),
                         ServicePort("dns-tcp", "TCP", 53, DNS_NODE_PORT)))
    return [echo, dns]


def many_services(n: int = 20, node_port: int = NODE_PORT) -> list[Service]:
    """`n` one-port Services on 192.0.2.200, .201, ..."""
    return [Service("default", f"web{i:02d}", creation=f"{i:02d}", ingress_ips=(f"192.0.2.{200 + i}",),
                    ports=(ServicePort("http", "TCP", 80, node_port),)) for i in range(n)]


def lab_state(config: ApplianceConfig, services: Sequence[Service], nodes: Sequence[Node],
              pools: str = POOLS) -> DesiredState:
    """The desired state the planner makes of these Services and nodes with the lab's pools."""
    loaded = load_pools(pools, "pools.yaml", config.own_addresses())
    return desired_state(Snapshot(tuple(services), tuple(nodes), loaded, config))[1]


def dual_nodes(lab: NetworkLab) -> tuple[Node, ...]:
    return lab_nodes(lab, dual=True)


def dual_state(config: ApplianceConfig, services: Sequence[Service], nodes: Sequence[Node]) -> DesiredState:
    """`lab_state` with the lab's IPv4 and IPv6 VIP pools."""
    return lab_state(config, services, nodes, DUAL_POOLS)


def dataplane(lab: NetworkLab, config: ApplianceConfig, box: str) -> DataPlane:
    """A DataPlane whose processes and nft run inside appliance host `box`."""
    return DataPlane(config, ["ip", "netns", "exec", lab.host(box).netns])


def vrrp_state(dp: DataPlane) -> str:
    """The state of the box's only VRRP instance (the lab serves IPv4 VIPs only)."""
    return next(iter(dp.vrrp_states().values()), "")


def held_vips(lab: NetworkLab, box: str) -> set[str]:
    """Lab VIPs (VIP_POOL_V4) configured on the box's interface right now: what the client's ARP reaches."""
    first, last = (ipaddress.ip_address(a) for a in VIP_POOL_V4.split("-"))
    return {a for a in lab.addresses(box) if ":" not in a and first <= ipaddress.ip_address(a) <= last}


def node_counts(lab: NetworkLab, url: str, n: int) -> dict[str, int]:
    """Which node answered each of `n` requests from the client; failures under "error"."""
    parts = urllib.parse.urlsplit(url)
    return probe_in(lab.client.netns, [target(parts.hostname or "", parts.port or 80)], n,
                    connect_timeout=2.0, read_timeout=2.0).counts()


def failover_probe(lab: NetworkLab, seconds: float, interval: float = 0.005, port: int = 80) -> Probe:
    """A prober on VIP from the client. Connect timeout 50 ms, read 100 ms (a lab request takes
    1-2 ms): a request in flight on the box that gives the VIP up is lost, and the time the probe
    waits for its answer must not pass for outage. With a 200 ms read timeout one such request
    alone made a planned failover read 0.206 s in about one run of four."""
    return Probe(lab.client.netns, [target(VIP, port)], seconds, interval=interval, connect_timeout=0.05,
                 read_timeout=0.1)


def measure(lab: NetworkLab, action: Callable[[], object], settle: float = 2.0) -> ProbeResult:
    """Run the prober around `action`; the outage is the largest gap between successes."""
    with failover_probe(lab, 1.0 + settle + 1.0) as probe:
        time.sleep(1.0)
        action()
    return probe.result


@dataclass
class Pair:
    """app1 and app2 DataPlanes from the same cluster state."""

    lab: NetworkLab
    planes: dict[str, DataPlane]

    def state(self, box: str) -> str:
        return vrrp_state(self.planes[box])

    def master(self) -> str:
        return next(b for b in self.planes if self.state(b) == "MASTER")

    def other(self, box: str) -> str:
        return PEER[box]

    def hard_kill(self, box: str) -> None:
        """SIGKILL keepalived (parent and VRRP child) and every HAProxy process of the box."""
        dp = self.planes[box]
        dp.keepalived.kill()
        dp.haproxy.stop(sig=9, timeout=5)

    def stop(self) -> None:
        for dp in self.planes.values():
            dp.stop()


def start_pair(lab: NetworkLab, workdir: Path, service: Service | None = None, **config_kw: object) -> Pair:
    """Both appliances from the same cluster state (`service`, else `web_service()`); app1 (higher
    priority) starts first and takes the VIP. On failure whatever started is stopped again."""
    pair = Pair(lab, {})
    try:
        for box, config in zip(("app1", "app2"), pair_configs(workdir, **config_kw), strict=True):  # type: ignore[arg-type]
            dp = dataplane(lab, config, box)
            pair.planes[box] = dp
            dp.start()
            result = dp.apply(lab_state(config, [service or web_service()], lab_nodes(lab)))
            assert result.kind == "reload", result
            if box == "app1":
                assert holds_within(lambda dp=dp: vrrp_state(dp) == "MASTER", 10), dp.vrrp_states()
        assert holds_within(lambda: pair.state("app2") == "BACKUP", 10), pair.planes["app2"].vrrp_states()
        assert holds_within(lambda: lab.http_get("client", f"http://{VIP}/", timeout=1)[0] == 200, 10)
    except BaseException:
        pair.stop()
        raise
    return pair
