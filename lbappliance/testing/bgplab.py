"""The BGP lab: a ToR router running FRR peers with N appliance boxes; the client sits behind it.

Built on :class:`lbappliance.testing.netlab.NetworkLab` (its namespaces, tracked processes,
pidfile, node responders and teardown), in another shape::

    client 198.51.100.100 ── eth1 [ tor ] eth0 ── br0 (sw) ── app1 .2  app2 .3  app3 .4  node1 .11 ...
           2001:db8:0:64::64    .1    192.0.2.1                2001:db8:0:1::/64, the same host numbers

VIPs come from 203.0.113.0/24 and 2001:db8:0:cafe::/64: off every segment, reachable only
through the routes the boxes announce. The ToR runs zebra, bfdd and bgpd with ECMP over the
boxes (``maximum-paths``) and layer-4 hashing (``fib_multipath_hash_policy=1`` set in its own
namespace), and BFD at 50 ms x 3 on every session. Each box runs its own zebra, bfdd and bgpd
(what frr.service runs on a real box), configured by the appliance through vtysh /
frr-reload.py. Documentation ranges only; nothing outside the namespaces changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbappliance.core.config import PEERS_PORT, ApplianceConfig, load_pools, parse_config
from lbappliance.core.models import DesiredState, Node, Service
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.report import BoxFacts, status_document
from lbappliance.daemon.record import write_status
from lbappliance.edges.apply import DataPlane

from .netlab import (
    HOST_IFACE,
    PREFIXLEN_V4,
    PREFIXLEN_V6,
    LabError,
    LabHost,
    NetworkLab,
    _host_number,
    _list_netns,
    _run,
)
from .wait import wait_for

log = logging.getLogger(__name__)

# New connections (one HTTP request each) every `interval` s for `duration` s; prints "ready", then
# JSON: counts and the start times of failed attempts, so a test can see the window in which new
# connections failed. ECMP sends only some flows to a dead box, so the longest gap between
# successes (the VRRP tests' outage) says nothing here; the failure window does.
_WINDOW_PROBE = r"""
import json, socket, sys, time
address, port, duration, interval, timeout = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
request = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n"
print("ready", flush=True)
start = time.monotonic()
fails, ok = [], 0
while time.monotonic() - start < duration:
    t = time.monotonic()
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((address, port))
            s.sendall(request)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        good = data.startswith(b"HTTP/1.1 200")
    except OSError:
        good = False
    if good:
        ok += 1
    else:
        fails.append(round(t - start, 4))
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
print(json.dumps({"ok": ok, "fails": fails, "start": start}), flush=True)
"""


# The lab ToR's resilient ECMP (`BgpLab(resilient=True)`). FRR 8.4's zebra installs BGP multipath
# routes as hash-threshold next-hop groups, which rehash part of every flow when a member leaves.
# This mirror, in the ToR's namespace, follows zebra's IPv4 BGP routes (on every `ip monitor`
# event) into table 100 as `type resilient` groups over the same gateways; traffic from the
# client side (iif eth1) looks there first. Replacing a resilient group keeps the buckets of the
# members that stay, so only a departed box's flows move. What a real ToR's "resilient hashing"
# does in its ASIC.
_RESILIENT_MIRROR = r"""
import json, subprocess, sys
TABLE, BUCKETS = "100", "128"
member_ids, group_ids, applied = {}, {}, {}
next_group = [5000]  # never reused: a freed id may still be referenced while the kernel catches up
def ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        print("ip", *args, "->", done.stderr.strip(), flush=True)
    return done.stdout
def gateways(route):
    found = [route["gateway"]] if route.get("gateway") else []
    found += [n["gateway"] for n in route.get("nexthops", []) if n.get("gateway")]
    if route.get("nhid") and not found:
        for nh in json.loads(ip("-j", "nexthop", "show", "id", str(route["nhid"])) or "[]"):
            for m in nh.get("group", []):
                for g in json.loads(ip("-j", "nexthop", "show", "id", str(m["id"])) or "[]"):
                    if g.get("gateway"):
                        found.append(g["gateway"])
    return sorted(set(found))
def sync():
    wanted = {}
    for route in json.loads(ip("-j", "-4", "route", "show", "proto", "bgp") or "[]"):
        gws = gateways(route)
        if gws:
            wanted[route["dst"]] = gws
    for dst, gws in sorted(wanted.items()):
        for gw in gws:
            if gw not in member_ids:
                member_ids[gw] = 1000 + len(member_ids)
                ip("nexthop", "replace", "id", str(member_ids[gw]), "via", gw, "dev", "eth0")
        if applied.get(dst) == gws:
            continue  # also what our own changes' monitor events find
        applied[dst] = gws
        if dst not in group_ids:
            group_ids[dst] = next_group[0]
            next_group[0] += 1
        gid = group_ids[dst]
        group = "/".join(str(member_ids[g]) for g in gws)
        ip("nexthop", "replace", "id", str(gid), "group", group, "type", "resilient", "buckets", BUCKETS,
           "idle_timer", "1", "unbalanced_timer", "0")
        ip("route", "replace", "table", TABLE, dst, "nhid", str(gid))
    for dst in [d for d in group_ids if d not in wanted]:
        applied.pop(dst, None)
        ip("route", "del", "table", TABLE, dst, check=False)
        ip("nexthop", "del", "id", str(group_ids.pop(dst)), check=False)
ip("rule", "add", "iif", "eth1", "lookup", TABLE, "pref", "100")
sync()
print("ready", flush=True)
monitor = subprocess.Popen(["ip", "monitor", "route", "nexthop"], stdout=subprocess.PIPE, text=True)
for _line in monitor.stdout:
    sync()
"""


@dataclass(frozen=True)
class FailureWindow:
    ok: int
    fails: tuple[float, ...]  # seconds after `start`
    start: float = 0.0  # the prober's time.monotonic() at its start (one clock for every process)

    @property
    def window(self) -> float:
        """Seconds from the first failed new connection to the last (0 when none failed)."""
        return self.fails[-1] - self.fails[0] if self.fails else 0.0


class WindowProbe:
    """`_WINDOW_PROBE` from the client while the caller acts; a context manager."""

    def __init__(self, lab: NetworkLab, vip: str, port: int, seconds: float, interval: float = 0.003,
                 timeout: float = 0.05) -> None:
        self.argv = ["ip", "netns", "exec", lab.client.netns, "python3", "-I", "-S", "-c", _WINDOW_PROBE, vip,
                     str(port), str(seconds), str(interval), str(timeout)]
        self.seconds = seconds
        self.result = FailureWindow(0, ())
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> WindowProbe:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise LabError(f"window probe did not start: {self.proc.communicate()[0]}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=self.seconds + 60)
        data = json.loads(out.strip().splitlines()[-1])
        self.result = FailureWindow(int(data["ok"]), tuple(data["fails"]), float(data["start"]))

ROUTER_ASN = 64500
BOX_ASN = 64512
ROUTER_V4, ROUTER_V6 = "192.0.2.1", "2001:db8:0:1::1"
CLIENT_V4, CLIENT_V6 = "198.51.100.100", "2001:db8:0:64::64"
CLIENT_GW_V4, CLIENT_GW_V6 = "198.51.100.1", "2001:db8:0:64::1"
VIP_POOL_V4 = "203.0.113.10-203.0.113.50"
VIP_POOL_V6 = "2001:db8:0:cafe::a-2001:db8:0:cafe::32"
BGP_POOLS = f"""
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
- name: routed
  addresses: [{VIP_POOL_V4}, "{VIP_POOL_V6}"]
"""
BFD_INTERVAL_MS = 50
BFD_MULTIPLIER = 3
FRR_DAEMONS = ("zebra", "bfdd", "bgpd")  # started in this order: the others register with zebra
FRR_BIN = Path("/usr/lib/frr")
MAX_BOXES = 8
EXTRA_NETNS = ("tor",)  # NetworkLab's stale cleanup knows sw/app/client/node; the lab removes these


def frr_unavailable_reason() -> str | None:
    """Why FRR cannot run here, or None."""
    missing = [d for d in (*FRR_DAEMONS, "frr-reload.py") if not (FRR_BIN / d).exists()]
    if missing or not Path("/usr/bin/vtysh").exists():
        return f"FRR is not installed (missing {missing or ['vtysh']}; apt-get install frr)"
    return None


def box_name(k: int) -> str:
    return f"app{k}"


def box_host_number(name: str) -> int:
    return 1 + int(name.removeprefix("app"))


@dataclass
class FrrDaemons:
    """zebra, bfdd and bgpd of one lab host, with their own sockets, pid files and logs in `directory`."""

    lab: NetworkLab
    host: str
    directory: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def vty(self) -> str:
        return str(self.directory)

    def start(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "empty.conf").write_text("")
        (d / "vtysh.conf").write_text("")  # frr-reload.py's --confdir wants one
        for daemon in FRR_DAEMONS:
            argv = [str(FRR_BIN / daemon), "-f", str(d / "empty.conf"), "--vty_socket", str(d),
                    "-z", str(d / "zserv.api"), "-i", str(d / f"{daemon}.pid"), "-u", "root", "-g", "frrvty",
                    "-P", "0", "--log", f"file:{d / daemon}.log", "--log-level", "informational"]
            if daemon == "bfdd":
                argv += ["--bfdctl", str(d / "bfdd.sock")]
            if daemon == "zebra":
                argv += ["--nl-bufsize", "4194304"]
            self.procs[daemon] = self.lab.spawn(self.host, argv, log_name=f"{self.host}-{daemon}")
            wait_for(lambda daemon=daemon: self._answers(daemon), 10, 0.05, what=f"{daemon} on {self.host}")

    def _answers(self, daemon: str) -> bool:
        proc = self.procs[daemon]
        if proc.poll() is not None:
            raise LabError(f"{daemon} on {self.host} exited {proc.returncode}: "
                           f"{self.lab.log_path(f'{self.host}-{daemon}').read_text(errors='replace')[-1500:]}")
        return self.vtysh("show version", daemon=daemon, check=False).returncode == 0

    def vtysh(self, *commands: str, daemon: str | None = None, check: bool = True,
              timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        argv = ["vtysh", "--vty_socket", self.vty, *(["-d", daemon] if daemon else [])]
        for command in commands:
            argv += ["-c", command]
        return self.lab.exec(self.host, argv, check=check, timeout=timeout)

    def load(self, text: str) -> None:
        """Configure from text (the ToR: `vtysh -f`, as an operator would paste it)."""
        path = self.directory / "frr.conf"
        path.write_text(text)
        res = self.lab.exec(self.host, ["vtysh", "--vty_socket", self.vty, "-f", str(path)], check=False)
        if res.returncode != 0 or "% " in res.stdout + res.stderr:
            raise LabError(f"vtysh -f on {self.host}: {res.stdout}{res.stderr}")

    def json(self, command: str) -> Any:
        out = self.vtysh(f"{command} json").stdout
        return json.loads(out) if out.strip() else {}

    def kill(self, daemons: tuple[str, ...] = FRR_DAEMONS, sig: int = signal.SIGKILL) -> None:
        for daemon in daemons:
            proc = self.procs.pop(daemon, None)
            if proc is not None:
                self.lab.stop(proc, sig, timeout=3.0)

    def stop(self) -> None:
        self.kill(tuple(reversed(FRR_DAEMONS)), signal.SIGTERM)


def router_config(boxes: list[LabHost], *, maximum_paths: int = 16, password: str | None = None) -> str:
    """The ToR's frr.conf: one eBGP session per box (IPv4 and IPv6), BFD, ECMP over them. The same
    shape a real ToR takes (docs/install.md); the lab lists the boxes, a ToR may use `bgp listen range`."""
    lines = ["frr defaults traditional", "hostname tor", "debug bgp neighbor-events", "ip forwarding",
             "ipv6 forwarding", "!",
             "bfd", " profile lb-fast", f"  detect-multiplier {BFD_MULTIPLIER}",
             f"  receive-interval {BFD_INTERVAL_MS}", f"  transmit-interval {BFD_INTERVAL_MS}", " exit", "exit", "!",
             f"router bgp {ROUTER_ASN}", f" bgp router-id {ROUTER_V4}", " no bgp ebgp-requires-policy",
             " no bgp default ipv4-unicast", " timers bgp 3 9"]
    for h in boxes:
        for address in (h.ipv4, h.ipv6):
            lines += [f" neighbor {address} remote-as {BOX_ASN}", f" neighbor {address} bfd",
                      f" neighbor {address} bfd profile lb-fast", f" neighbor {address} timers connect 1"]
            if password:
                lines.append(f" neighbor {address} password {password}")
    for family, attr in (("ipv4", "ipv4"), ("ipv6", "ipv6")):
        lines.append(f" address-family {family} unicast")
        lines.append(f"  maximum-paths {maximum_paths}")
        lines += [f"  neighbor {getattr(h, attr)} activate" for h in boxes]
        lines.append(" exit-address-family")
    lines += ["exit", ""]
    return "\n".join(lines)


class BgpLab(NetworkLab):
    """NetworkLab in the BGP shape: `tor`, `app1..appN` and nodes on the segment, the client behind the ToR."""

    WORKDIR_PREFIX = "lbappliance-bgplab"

    def __init__(self, prefix: str = "lbg", boxes: int = 3, nodes: int = 3, workdir: Path | None = None,
                 password: str | None = None, resilient: bool = False) -> None:
        super().__init__(prefix=prefix, nodes=nodes, workdir=workdir)
        if not 1 <= boxes <= MAX_BOXES:
            raise ValueError(f"boxes must be 1..{MAX_BOXES}, got {boxes}")
        self._boxes = boxes
        self.password = password
        self.resilient = resilient
        self.frr: dict[str, FrrDaemons] = {}

    def _clear_stale(self) -> None:
        for extra in EXTRA_NETNS:  # left by a crashed BgpLab with this prefix
            if f"{self.prefix}-{extra}" in _list_netns():
                _run(["ip", "netns", "del", f"{self.prefix}-{extra}"], check=False)
        super()._clear_stale()

    def _add_hosts(self) -> None:
        """The ToR, the boxes, the nodes and the client behind the ToR."""
        self._add_host(LabHost("tor", f"{self.prefix}-tor", ROUTER_V4, ROUTER_V6, "router"))  # type: ignore[arg-type]
        for k in range(1, self._boxes + 1):
            self._add_box(k)
        for k in range(1, self._initial_nodes + 1):
            n = _host_number(f"node{k}")
            self._add_host(LabHost(f"node{k}", f"{self.prefix}-node{k}", f"192.0.2.{n}",
                                   f"2001:db8:0:1::{n:x}", "node"))
        self._add_client()
        self._router_setup()

    def _add_box(self, k: int) -> LabHost:
        n = box_host_number(box_name(k))
        h = LabHost(box_name(k), f"{self.prefix}-{box_name(k)}", f"192.0.2.{n}", f"2001:db8:0:1::{n:x}", "appliance")
        self._add_host(h)
        # VIPs live on lo: no ARP for them on the segment (arp_ignore 1: answer only for the receiving
        # interface's addresses; arp_announce 2: source ARP from the interface's own address).
        self._sysctl(h.netns, {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2",
                               f"net.ipv4.conf.{HOST_IFACE}.arp_ignore": "1",
                               f"net.ipv4.conf.{HOST_IFACE}.arp_announce": "2"})
        _run(["ip", "-n", h.netns, "route", "add", "default", "via", ROUTER_V4])
        _run(["ip", "-n", h.netns, "-6", "route", "add", "default", "via", ROUTER_V6])
        return h

    def _add_client(self) -> None:
        h = LabHost("client", f"{self.prefix}-client", CLIENT_V4, CLIENT_V6, "client")
        _run(["ip", "netns", "add", h.netns])
        self._created_netns.append(h.netns)
        self.hosts[h.name] = h
        # A load generator's settings: new connections at 10k/s leave every port of the default range
        # in TIME_WAIT within seconds, and the next run's connect() then searches for a free one.
        self._sysctl(h.netns, {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                               "net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"})
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        tor = self.hosts["tor"].netns
        _run(["ip", "-n", tor, "link", "add", "eth1", "type", "veth", "peer", "name", HOST_IFACE, "netns", h.netns])
        _run(["ip", "-n", tor, "addr", "add", f"{CLIENT_GW_V4}/24", "dev", "eth1"])
        _run(["ip", "-n", tor, "addr", "add", f"{CLIENT_GW_V6}/64", "dev", "eth1", "nodad"])
        _run(["ip", "-n", tor, "link", "set", "eth1", "up"])
        _run(["ip", "-n", h.netns, "addr", "add", f"{CLIENT_V4}/24", "dev", HOST_IFACE])
        _run(["ip", "-n", h.netns, "addr", "add", f"{CLIENT_V6}/64", "dev", HOST_IFACE, "nodad"])
        _run(["ip", "-n", h.netns, "link", "set", HOST_IFACE, "up"])
        _run(["ip", "-n", h.netns, "route", "add", "default", "via", CLIENT_GW_V4])
        _run(["ip", "-n", h.netns, "-6", "route", "add", "default", "via", CLIENT_GW_V6])

    def _spare_client_addresses(self) -> list[str]:
        """The client's /24 behind the ToR, but the client and the ToR."""
        return [a for a in (f"198.51.100.{n}" for n in range(2, 255)) if a not in (CLIENT_V4, CLIENT_GW_V4)]

    def _router_setup(self) -> None:
        tor = self.hosts["tor"]
        self._sysctl(tor.netns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                                 # ECMP by the 5-tuple: each new connection hashes on its ports too.
                                 "net.ipv4.fib_multipath_hash_policy": "1",
                                 "net.ipv6.fib_multipath_hash_policy": "1"})
        self.frr["tor"] = FrrDaemons(self, "tor", self.workdir / "tor" / "frr")
        self.frr["tor"].start()
        self.frr["tor"].load(router_config(self.appliances, password=self.password))
        if self.resilient:
            mirror = self.spawn("tor", ["python3", "-I", "-S", "-u", "-c", _RESILIENT_MIRROR], log_name="tor-resilient")
            wait_for(lambda: mirror.poll() is not None or "ready" in self.log_path("tor-resilient").read_text(),
                     10, 0.05, what="the ToR's resilient mirror")
            if mirror.poll() is not None:
                raise LabError(f"resilient mirror exited: {self.log_path('tor-resilient').read_text()[-1500:]}")

    def bucket_shares(self, vip: str) -> dict[str, int]:
        """Resilient mode: how many of the ToR's hash buckets for `vip` each box holds now."""
        out = self.exec("tor", ["ip", "-j", "route", "show", "table", "100", vip]).stdout
        routes = json.loads(out or "[]")
        if not routes or not routes[0].get("nhid"):
            return {}
        members = {}
        for nh in json.loads(self.exec("tor", ["ip", "-j", "nexthop", "show"]).stdout or "[]"):
            if nh.get("gateway"):
                members[nh["id"]] = nh["gateway"]
        by_address = {h.ipv4: h.name for h in self.appliances}
        shares: dict[str, int] = {}
        buckets = self.exec("tor", ["ip", "-j", "nexthop", "bucket", "show", "id", str(routes[0]["nhid"])],
                            check=False).stdout
        for bucket in json.loads(buckets or "[]"):
            box = by_address.get(members.get(bucket.get("bucket", {}).get("nhid"), ""), "?")
            shares[box] = shares.get(box, 0) + 1
        return shares

    def wait_balanced(self, vip: str, boxes: set[str], timeout: float = 15.0) -> None:
        """Resilient mode: a joining box gets buckets only once they are idle; wait for an even spread."""
        if not self.resilient:
            return

        def even() -> bool:
            shares = self.bucket_shares(vip)
            return set(shares) == boxes and max(shares.values()) - min(shares.values()) <= 1

        wait_for(even, timeout, 0.1, what=f"even resilient buckets for {vip} over {sorted(boxes)}")

    @property
    def multipath_kind(self) -> str:
        """How the ToR spreads flows: `resilient` groups (the mirror) or zebra's `hash-threshold`."""
        return "resilient" if self.resilient else "hash-threshold"

    def down(self) -> None:
        self.frr.clear()
        super().down()

    # ---- views

    @property
    def tor(self) -> FrrDaemons:
        return self.frr["tor"]

    def start_box_frr(self, box: str) -> FrrDaemons:
        """The box's own zebra, bfdd and bgpd, unconfigured: the appliance configures them."""
        daemons = FrrDaemons(self, box, self.workdir / box / "frr")
        daemons.start()
        self.frr[box] = daemons
        return daemons

    def next_hops(self, vip: str) -> set[str]:
        """The boxes the ToR's kernel forwards `vip` to now (its ECMP next hops), by name."""
        family = "-6" if ":" in vip else "-4"
        out = self.exec("tor", ["ip", "-j", family, "route", "show", vip]).stdout
        by_address = {a: h.name for h in self.appliances for a in (h.ipv4, h.ipv6)}
        hops: set[str] = set()
        for route in json.loads(out or "[]"):
            gateways = [route.get("gateway")] + [n.get("gateway") for n in route.get("nexthops", [])]
            if route.get("nhid") and not route.get("nexthops"):
                gateways += self._group_gateways(int(route["nhid"]))
            hops |= {by_address[g] for g in gateways if g in by_address}
        return hops

    def _group_gateways(self, nhid: int) -> list[str]:
        out = self.exec("tor", ["ip", "-j", "nexthop", "show", "id", str(nhid)]).stdout
        found: list[str] = []
        for nh in json.loads(out or "[]"):
            if nh.get("gateway"):
                found.append(nh["gateway"])
            for member in nh.get("group", []):
                found += self._group_gateways(int(member["id"]))
        return found

    def wait_next_hops(self, vip: str, boxes: set[str], timeout: float = 15.0) -> float:
        """Seconds until the ToR forwards `vip` to exactly `boxes`."""
        start = time.monotonic()
        wait_for(lambda: self.next_hops(vip) == boxes, timeout, 0.02,
                 what=f"tor next hops for {vip} == {sorted(boxes)} (now {sorted(self.next_hops(vip))})")
        return time.monotonic() - start

    def box_config(self, box: str, *, check_ms: int = 200, drain_seconds: float = 10.0,
                   families: str = "[ipv4, ipv6]", extra: str = "") -> ApplianceConfig:
        """A box in `announce.mode: bgp`: sessions to the ToR over both families with BFD at 50 ms x 3,
        FRR reached in the box's namespace, HAProxy and state under its own dir, stick tables shared
        with every box of the lab (HAProxy `peers` on the segment)."""
        h = self.host(box)
        base = self.workdir / box
        base.mkdir(parents=True, exist_ok=True)
        frr = base / "frr"
        password = f"\n      password: {self.password}" if self.password else ""
        peers = "".join(f"""
    - address: "{address}"
      asn: {ROUTER_ASN}{password}
      bfd: {{receiveIntervalMs: {BFD_INTERVAL_MS}, transmitIntervalMs: {BFD_INTERVAL_MS},
             detectMultiplier: {BFD_MULTIPLIER}}}""" for address in (ROUTER_V4, ROUTER_V6))
        table_peers = "".join(f'\n    - {{name: {a.name}, address: "{a.ipv4}:{PEERS_PORT}"}}'
                              for a in self.appliances)
        text = f"""
name: {box}
processMode: managed
announce:
  mode: bgp
  bgp:
    asn: {BOX_ASN}
    routerId: {h.ipv4}
    families: {families}
    withdrawSettleSeconds: 0.2
    drainSeconds: {drain_seconds}
    configPath: {frr}/frr.conf
    vtySocketDir: {frr}
    peers:{peers}
healthCheck: {{intervalMilliseconds: {check_ms}, fall: 2, rise: 2}}
haproxy:
  statsAddress: null
  maxconn: 4000
  hardStopAfter: 30s
  peers:{table_peers}
paths:
  haproxyConfig: {base}/haproxy.cfg
  keepalivedConfig: {base}/keepalived.conf
  stateDir: {base}/run
{extra}
"""
        (base / "config.yaml").write_text(text)  # for `lbappliance status --config`
        return parse_config(text)

    def session_states(self) -> dict[str, str]:
        """The ToR's view: peer address -> BGP state."""
        data = self.tor.json("show bgp summary")
        states: dict[str, str] = {}
        for family in data.values():
            for peer, info in (family.get("peers") or {}).items():
                states[peer] = info.get("state", "?")
        return states

    def bfd_states(self) -> dict[str, str]:
        with contextlib.suppress(LabError, ValueError):
            return {p["peer"]: p["status"] for p in self.tor.json("show bfd peers")}
        return {}


def bgp_state(config: ApplianceConfig, services: list[Service], nodes: tuple[Node, ...]) -> DesiredState:
    """The desired state for these Services with the BGP lab's routed pools."""
    pools = load_pools(BGP_POOLS, "pools.yaml", config.own_addresses())
    return desired_state(Snapshot(tuple(services), nodes, pools, config))[1]


@dataclass
class BgpBox:
    """One appliance box of the BGP lab: its FRR daemons and a DataPlane in `announce.mode: bgp`,
    ticked between applies like the daemon's loop does (`sync_health` at the check interval), so
    HAProxy's death or a Service's lost backends withdraw within a tick."""

    lab: BgpLab
    name: str
    config: ApplianceConfig
    tick_seconds: float = 0.1
    dp: DataPlane | None = None
    frr: FrrDaemons | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, state: DesiredState) -> None:
        self.frr = self.lab.start_box_frr(self.name)
        self.dp = DataPlane(self.config, ["ip", "netns", "exec", self.lab.host(self.name).netns])
        self.dp.pools = load_pools(BGP_POOLS, "pools.yaml", self.config.own_addresses())
        self.dp.start()
        self.apply(state)
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick_forever, name=f"tick-{self.name}", daemon=True)
        self._thread.start()

    def apply(self, state: DesiredState) -> str:
        assert self.dp is not None
        with self._lock:
            result = self.dp.apply(state)
        if result.kind in ("rejected", "failed"):
            raise LabError(f"{self.name}: apply {result.kind}: {result.message}")
        # status.json as the daemon's record step writes it, for `lbappliance status`.
        with contextlib.suppress(OSError, RuntimeError):
            facts = BoxFacts(self.name, False, self.dp.vrrp_states(), self.dp.server_health(), result.kind,
                             result.message, time.time())
            write_status(Path(self.config.paths.state_dir) / "status.json", status_document(state, facts))
        return result.kind

    def _tick_forever(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            with self._lock, contextlib.suppress(Exception):
                assert self.dp is not None
                self.dp.sync_health()

    def pause(self) -> None:
        """Stop ticking (a dead box's daemon does not tick either)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self) -> None:
        """A clean stop: the data plane withdraws, waits for the ToR, drains, then HAProxy stops."""
        self.pause()
        if self.dp is not None:
            with self._lock:
                self.dp.stop()
        if self.frr is not None:
            self.frr.stop()

    def hard_kill(self) -> None:
        """SIGKILL HAProxy (master and workers) and the box's zebra, bfdd and bgpd in one go, before
        reaping any of them: the box is gone at once, as in a crash."""
        self.pause()
        groups = []  # each was started in its own session: its pid is its process group
        if self.dp is not None and self.dp.haproxy.proc is not None:
            groups.append(self.dp.haproxy.proc.pid)
        if self.frr is not None:
            groups += [p.pid for p in self.frr.procs.values() if p.poll() is None]
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        if self.frr is not None:
            self.frr.kill()
        if self.dp is not None:
            self.dp.haproxy.stop(sig=signal.SIGKILL, timeout=5)

    def status(self) -> dict[str, Any]:
        assert self.dp is not None and self.dp.bgp is not None
        return self.dp.bgp.status()


__all__ = [
    "BGP_POOLS",
    "BOX_ASN",
    "PREFIXLEN_V4",
    "PREFIXLEN_V6",
    "ROUTER_ASN",
    "BgpBox",
    "BgpLab",
    "FailureWindow",
    "FrrDaemons",
    "WindowProbe",
    "bgp_state",
    "frr_unavailable_reason",
    "router_config",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m lbappliance.testing.bgplab`: the BGP lab with N boxes serving one VIP, held until
    Ctrl-C / SIGTERM, then torn down (what `lbappliance lab up --bgp` would run)."""
    import argparse
    import sys

    from lbappliance.core.models import ServicePort

    parser = argparse.ArgumentParser(prog="python -m lbappliance.testing.bgplab")
    parser.add_argument("--prefix", default="lbg")
    parser.add_argument("--boxes", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--resilient", action="store_true", help="resilient next-hop groups at the ToR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    vip, node_port = "203.0.113.10", 30080
    service = Service("default", "web", creation="1", ports=(ServicePort("http", "TCP", 80, node_port),),
                      ingress_ips=(vip,))
    lab = BgpLab(prefix=args.prefix, boxes=args.boxes, nodes=args.nodes, resilient=args.resilient)
    boxes: list[BgpBox] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        lab.up()
        lab.serve_nodeports([node_port])
        lab.serve_health_ports()
        nodes = tuple(Node(h.name, (("InternalIP", h.ipv4),)) for h in lab.nodes)
        for host in lab.appliances:
            config = lab.box_config(host.name)
            box = BgpBox(lab, host.name, config)
            box.start(bgp_state(config, [service], nodes))
            boxes.append(box)
        lab.wait_next_hops(vip, {b.name for b in boxes}, timeout=60)
        print(f"BGP lab up in {lab.workdir}: the ToR routes {vip} to {sorted(lab.next_hops(vip))}\n"
              f"  ip netns exec {lab.client.netns} curl -s http://{vip}/\n"
              f"  ip netns exec {lab.hosts['tor'].netns} ip route show {vip}\n"
              f"  lbappliance status --config {lab.workdir / 'app1' / 'config.yaml'}\n"
              "Ctrl-C to tear it down.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(3600):
                pass
    finally:
        for box in boxes:
            with contextlib.suppress(Exception):
                box.stop()
        lab.down()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
