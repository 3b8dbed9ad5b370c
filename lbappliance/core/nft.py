"""UDP forwards -> one nftables ruleset text for `nft -f`. Pure and byte-stable.

HAProxy community edition cannot proxy UDP, so UDP Service ports are forwarded by the kernel:
per (VIP, port) a DNAT to the healthy nodes' `address:nodePort`, the node picked by a hash of the
client address and port (one flow stays on one node; with `sessionAffinity: ClientIP` the client
address alone), and a masquerade of exactly those flows so replies come back through this box.

The appliance owns one table, `inet lbappliance`. The text replaces it in one transaction
(`table` creates it if absent, `delete table` drops the old contents, then it is defined anew),
so a reader never sees a half-applied ruleset and no other table is ever touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence

from .models import FAMILY_VERSION, NFT_FAMILY, Server, UdpForward, address_sort_key, host_port

TABLE_FAMILY = "inet"
TABLE_NAME = "lbappliance"
TABLE = f"{TABLE_FAMILY} {TABLE_NAME}"

# backend name -> names of its servers HAProxy reports UP; a backend absent from the mapping
# (or `healthy=None`) counts all its servers as up (before the first check result is known).
Health = Mapping[str, frozenset[str]]


def healthy_servers(forward: UdpForward, healthy: Health | None) -> tuple[Server, ...]:
    """The forward's servers that may receive new flows, in the backend's (node name) order."""
    servers = forward.backend.servers
    if healthy is None or forward.backend.name not in healthy:
        return servers
    up = healthy[forward.backend.name]
    return tuple(s for s in servers if s.name in up)


def _same_family_ranges(forward: UdpForward) -> tuple[str, ...]:
    version = FAMILY_VERSION[forward.family]
    return tuple(r for r in forward.source_ranges if ipaddress.ip_network(r).version == version)


def _target(server: Server, port: int) -> str:
    return host_port(server.address, port, " . ")


def _match(forward: UdpForward) -> str:
    ip = NFT_FAMILY[forward.family]
    return f"{ip} daddr {forward.vip} udp dport {forward.port}"


NFT_COMMENT_MAX = 128  # nft refuses a longer rule comment, and with it the whole ruleset


def comment_text(service: str, port: int) -> str:
    """`namespace/name port/UDP`, at most 128 characters: a Service's names may take 63 + 63, so a
    longer one keeps its start and ends in a hash of the whole key (still unique per Service)."""
    suffix = f" {port}/UDP"
    if len(service) + len(suffix) <= NFT_COMMENT_MAX:
        return service + suffix
    digest = hashlib.sha256(service.encode()).hexdigest()[:12]
    keep = NFT_COMMENT_MAX - len(suffix) - len(digest) - 1
    return f"{service[:keep]}~{digest}{suffix}"


def _comment(forward: UdpForward) -> str:
    return f'comment "{comment_text(forward.service, forward.port)}"'


def dnat_rule(forward: UdpForward, servers: Sequence[Server]) -> str:
    """`... dnat ip to jhash ip saddr . udp sport mod N map { i : addr . port, ... }`."""
    ip = NFT_FAMILY[forward.family]
    key = f"{ip} saddr" if forward.backend.affinity_timeout else f"{ip} saddr . udp sport"
    port = forward.backend.port
    if len(servers) == 1:
        server = servers[0]
        to = host_port(server.address, port)
        return f"{_match(forward)} dnat {ip} to {to} {_comment(forward)}"
    elements = ", ".join(f"{i} : {_target(s, port)}" for i, s in enumerate(servers))
    return (f"{_match(forward)} dnat {ip} to jhash {key} mod {len(servers)} map {{ {elements} }} "
            f"{_comment(forward)}")


def render_nft(forwards: Sequence[UdpForward], healthy: Health | None = None) -> str:
    """The whole `inet lbappliance` table; with no forwards, just its removal."""
    lines = ["# Rendered by lbappliance: UDP Services forwarded by nftables; do not edit by hand.",
             f"table {TABLE}", f"delete table {TABLE}"]
    if not forwards:
        return "\n".join(lines) + "\n"
    ordered = sorted(forwards, key=lambda u: (address_sort_key(u.vip), u.port, u.name))
    lines.append(f"table {TABLE} {{")
    for family, ip, kind in (("IPv4", "ip", "ipv4_addr"), ("IPv6", "ip6", "ipv6_addr")):
        vips = sorted({u.vip for u in ordered if u.family == family}, key=address_sort_key)
        if vips:
            lines += [f"\tset udp_vips{ip[2:] or '4'} {{", f"\t\ttype {kind}",
                      f"\t\telements = {{ {', '.join(vips)} }}", "\t}"]
    filters = []
    for forward in ordered:
        if not forward.source_ranges:
            continue
        ranges = _same_family_ranges(forward)
        ip = NFT_FAMILY[forward.family]
        allowed = f" {ip} saddr != {{ {', '.join(ranges)} }}" if ranges else ""
        filters.append(f"\t\t{_match(forward)}{allowed} drop {_comment(forward)}")
    if filters:
        lines += ["\tchain filter_prerouting {",
                  "\t\ttype filter hook prerouting priority mangle; policy accept;", *filters, "\t}"]
    lines += ["\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;"]
    for forward in ordered:
        servers = healthy_servers(forward, healthy)
        if servers:
            lines.append(f"\t\t{dnat_rule(forward, servers)}")
        else:
            lines.append(f"\t\t# {forward.name}: no healthy node; not forwarded")
    lines += ["\t}", "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
    for family, ip in (("IPv4", "ip"), ("IPv6", "ip6")):
        if any(u.family == family for u in ordered):
            lines.append(f"\t\tct status dnat meta l4proto udp ct original {ip} daddr @udp_vips{ip[2:] or '4'} "
                         "masquerade")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def map_members(forwards: Sequence[UdpForward], healthy: Health | None = None) -> dict[str, tuple[str, ...]]:
    """forward name -> node names in its DNAT map (what the ruleset forwards new flows to)."""
    return {u.name: tuple(s.name for s in healthy_servers(u, healthy)) for u in forwards}
