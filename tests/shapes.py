"""Named cluster shapes shared by the golden-file tests and the binary validation tests."""

from __future__ import annotations

from lbappliance.core.config import ApplianceConfig, load_pools, parse_config
from lbappliance.core.models import (
    ANN_POOL,
    ANN_PROXY,
    ANN_SHARED,
    ANN_VRRP_INSTANCE,
    LABEL_EXCLUDE,
    Node,
    Pool,
    Service,
    ServicePort,
)

CONFIG_TEXT = """
name: edge-a
vrrp:
  interface: eth0
  priority: 150
  unicastSrcIp: 192.0.2.2
  unicastPeers: [192.0.2.3]
  unicastSrcIp6: "2001:db8:0:1::2"
  unicastPeers6: ["2001:db8:0:1::3"]
"""

POOLS_TEXT = """
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
- name: default
  addresses: [192.0.2.200-192.0.2.250, "2001:db8:0:1::c8-2001:db8:0:1::fa"]
- name: reserved
  addresses: [203.0.113.0/28]
  autoAssign: false
"""


def config() -> ApplianceConfig:
    return parse_config(CONFIG_TEXT, "config.yaml")


def pools() -> tuple[Pool, ...]:
    return load_pools(POOLS_TEXT, "pools.yaml", config().own_addresses())


def tcp(port: int, node_port: int, name: str = "") -> ServicePort:
    return ServicePort(name or f"p{port}", "TCP", port, node_port)


def udp(port: int, node_port: int, name: str = "") -> ServicePort:
    return ServicePort(name or f"u{port}", "UDP", port, node_port)


NODES = (
    Node("node-1", (("InternalIP", "198.51.100.11"), ("InternalIP", "2001:db8:0:2::11"), ("Hostname", "node-1"))),
    Node("node-2", (("InternalIP", "198.51.100.12"), ("ExternalIP", "203.0.113.99"))),
    Node("node-3", (("InternalIP", "198.51.100.13"),), labels={LABEL_EXCLUDE: ""}),
    Node("node-4", (("InternalIP", "198.51.100.14"),), taints=("ToBeDeletedByClusterAutoscaler",)),
    Node("node-5", (("InternalIP", "198.51.100.15"),), deleting=True),
)

SHAPES: dict[str, tuple[tuple[Service, ...], tuple[Node, ...]]] = {
    "single-port": ((Service("default", "web", creation="1", ports=(tcp(80, 30080),)),), NODES),
    "multi-port": ((Service("shop", "front", creation="1", ports=(tcp(80, 30080), tcp(443, 30443))),), NODES),
    "local-policy": ((Service("default", "local", creation="1", ports=(tcp(80, 31080),),
                              external_traffic_policy="Local", health_check_node_port=32100),), NODES),
    # A dual-stack Local Service: kube-proxy answers its healthCheckNodePort on the node's IPv4
    # (primary) address only, so the IPv6 servers are checked there (`addr`).
    "local-dual-stack": ((Service("default", "local2", creation="1", ports=(tcp(80, 31081),),
                                  external_traffic_policy="Local", health_check_node_port=32101,
                                  ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack"),), NODES),
    "source-ranges": ((Service("default", "private", creation="1", ports=(tcp(22, 30022),),
                               source_ranges=("198.51.100.0/24", "192.0.2.7/32")),), NODES),
    "affinity": ((Service("default", "sticky", creation="1", ports=(tcp(80, 30081),),
                          session_affinity="ClientIP", affinity_timeout=600),), NODES),
    "proxy-protocol": ((Service("default", "pp", creation="1", ports=(tcp(25, 30025),),
                                annotations={ANN_PROXY: "v2"}),
                        Service("default", "pp1", creation="2", ports=(tcp(26, 30026),),
                                annotations={ANN_PROXY: "v1"})), NODES),
    "shared-ip": ((Service("dns", "tcp-a", creation="1", ports=(tcp(53, 30053),),
                           annotations={ANN_SHARED: "dns"}),
                   Service("dns", "tcp-b", creation="2", ports=(tcp(853, 30853),),
                           annotations={ANN_SHARED: "dns"})), NODES),
    "ipv6": ((Service("default", "v6", creation="1", ports=(tcp(80, 30086),), ip_families=("IPv6",)),
              Service("default", "dual", creation="2", ports=(tcp(443, 30446),), ip_families=("IPv4", "IPv6"),
                      ip_family_policy="RequireDualStack", annotations={ANN_POOL: "default"})), NODES),
    "no-eligible-nodes": ((Service("default", "lonely", creation="1", ports=(tcp(80, 30087),)),), NODES[2:]),
    "udp-dns": ((Service("dns", "coredns", creation="1", ports=(udp(53, 30053), tcp(53, 30053)),
                         ip_families=("IPv4", "IPv6"), ip_family_policy="RequireDualStack"),
                 Service("default", "syslog", creation="2", ports=(udp(514, 30514),),
                         source_ranges=("198.51.100.0/24", "2001:db8:0:9::/64"), session_affinity="ClientIP"),
                 Service("default", "game", creation="3", ports=(udp(7777, 30777),),
                         external_traffic_policy="Local", health_check_node_port=32177),
                 Service("default", "sctp", creation="4", ports=(ServicePort("s", "SCTP", 9, 30009),))), NODES),
    "active-active": (tuple(Service("default", f"web{i}", creation=str(i), ports=(tcp(80, 30100 + i),),
                                    annotations={ANN_VRRP_INSTANCE: "1"} if i == 0 else {})
                            for i in range(6)), NODES),
    # The limits of the rendered formats (issue 14, item 5): names of 63 + 63 characters (nft's
    # 128-character comments), 70 source ranges (HAProxy's 64 words a line), the highest port.
    "limits": ((Service("a" * 63, "b" * 63, creation="1", ports=(udp(65535, 32767), tcp(65535, 32766)),
                        source_ranges=tuple(f"198.51.100.{i}/32" for i in range(70)),
                        session_affinity="ClientIP", affinity_timeout=86400),), NODES),
}


# ---- BGP announce mode (issue 17): golden files under tests/golden/bgp-*/, frr.conf beside the others.

BGP_CONFIG_TEXT = """
name: edge-a
announce:
  mode: bgp
  bgp:
    asn: 64512
    routerId: 192.0.2.2
    peers:
    - address: 192.0.2.1
      asn: 64500
      password: "s3cr3t-md5"
      bfd: {receiveIntervalMs: 50, transmitIntervalMs: 50, detectMultiplier: 3}
    - address: 192.0.2.254
      asn: 64500
      bfd: {receiveIntervalMs: 50, transmitIntervalMs: 50, detectMultiplier: 3}
    - address: "2001:db8:0:1::1"
      asn: 64501
      bfd: {profile: slow, receiveIntervalMs: 300, transmitIntervalMs: 300}
    pools:
      default: {communities: ["64512:100", "no-export"]}
      reserved: {communities: ["64512:1:2"], localPreference: 50}
"""

BGP_V4_CONFIG_TEXT = """
name: edge-b
announce:
  mode: bgp
  bgp:
    asn: 4200000001
    routerId: 192.0.2.3
    families: [ipv4]
    peers:
    - {address: 192.0.2.1, asn: 64500}
"""


def bgp_config(text: str = BGP_CONFIG_TEXT) -> ApplianceConfig:
    return parse_config(text, "config.yaml")


#: shape -> (services, nodes, config text, announce every VIP?)
BGP_SHAPES: dict[str, tuple[tuple[Service, ...], tuple[Node, ...], str, bool]] = {
    "bgp-dual-stack": ((Service("default", "web", creation="1", ports=(tcp(80, 30080),), ip_families=("IPv4", "IPv6"),
                                ip_family_policy="RequireDualStack"),
                        Service("default", "fixed", creation="2", ports=(tcp(443, 30443),),
                                annotations={ANN_POOL: "reserved"}),
                        Service("dns", "coredns", creation="3", ports=(udp(53, 30053),))), NODES, BGP_CONFIG_TEXT, True),
    "bgp-ipv4-only": ((Service("default", "web", creation="1", ports=(tcp(80, 30080),), ip_families=("IPv4", "IPv6"),
                               ip_family_policy="RequireDualStack"),), NODES, BGP_V4_CONFIG_TEXT, True),
    "bgp-withdrawn": ((Service("default", "web", creation="1", ports=(tcp(80, 30080),)),), NODES, BGP_CONFIG_TEXT,
                      False),
}
