"""A network lab of Linux network namespaces for integration and e2e tests.

The lab is a small copy of the setting the appliance lives in: two appliance
hosts, a client and a few Kubernetes node hosts, all on one L2 segment, so a
VIP floated by keepalived is reached by the client through plain ARP/ND.  The
segment is a bridge inside its own "switch" namespace; every host is a
namespace with an ``eth0`` veth whose peer sits on that bridge.  Nothing is
created in, or changed about, the host's own network namespace.

Addressing (documentation ranges only)::

    IPv4 192.0.2.0/24        app1 .2  app2 .3  client .100  nodeK .(10+K)
    IPv6 2001:db8:0:1::/64   the same host numbers, as the interface id's value
                             (app1 ::2, node1 ::b, client ::64), matching
                             VIP_POOL_V4 .200-.250 <-> VIP_POOL_V6 ::c8-::fa

Without a control plane (the integration tier, most benchmarks), nodes run a real ``haproxy``
as a NodePort responder (so benchmarks measure the appliance, not Python) and a small
``/healthz`` server (:mod:`lbappliance.testing.healthserver`) whose answers flip by touching
files: a look-alike of kube-proxy. With one (the e2e tier, ``lbappliance lab``), the nodes are
real instead: :mod:`lbappliance.testing.kubenodes` runs kube-proxy and pods on them.

Every process the lab starts is recorded (pid, start time, argv) in
``/run/lbappliance-lab/<prefix>/pids`` so a later lab, or
``python -m lbappliance.testing.netlab --down --prefix P``, can clean up
after a crashed run without killing anything it did not start.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from types import TracebackType
from typing import IO, Any, Literal

from lbappliance.edges.processes import command_line, kill_group, process_group, start_time, stop_child, stop_pid
from lbappliance.testing.healthserver import KUBE_PROXY_HEALTH_PORT, down_marker
from lbappliance.testing.prober import probe_in, target
from lbappliance.testing.wait import wait_for

log = logging.getLogger(__name__)

__all__ = [
    "HOST_IFACE",
    "KUBE_PROXY_HEALTH_PORT",
    "PREFIXLEN_V4",
    "PREFIXLEN_V6",
    "STATE_ROOT",
    "SUBNET_V4",
    "SUBNET_V6",
    "VIP_POOL_V4",
    "VIP_POOL_V6",
    "LabBusyError",
    "LabError",
    "LabHost",
    "NetworkLab",
    "Role",
    "cleanup_stale",
    "lab_unavailable_reason",
    "main",
    "open_lab",
]

Role = Literal["appliance", "client", "node"]

SUBNET_V4 = "192.0.2.0/24"
SUBNET_V6 = "2001:db8:0:1::/64"
PREFIXLEN_V4 = 24
PREFIXLEN_V6 = 64
#: VIPs live on the hosts' own subnet so the client reaches them by ARP/ND, no routing.
VIP_POOL_V4 = "192.0.2.200-192.0.2.250"
VIP_POOL_V6 = "2001:db8:0:1::c8-2001:db8:0:1::fa"

HOST_IFACE = "eth0"
BRIDGE = "br0"
SWITCH = "sw"
MAX_NODES = 80  # node numbers .11-.90 stay clear of the client (.100) and the VIPs (.200+)

#: Where pidfiles and locks live; /run is tmpfs, so a reboot clears it together with the namespaces.
STATE_ROOT = Path(os.environ.get("LBAPPLIANCE_LAB_STATE_DIR", "/run/lbappliance-lab"))

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_STOP_GRACE = 3.0

_HTTP_GET_SNIPPET = r"""
import json, sys, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=timeout) as r:
        out = [r.status, r.read().decode("utf-8", "replace")]
except urllib.error.HTTPError as e:
    out = [e.code, e.read().decode("utf-8", "replace")]
except Exception as e:
    out = [0, "%s: %s" % (type(e).__name__, e)]
print(json.dumps(out))
"""

_WAIT_LISTEN_SNIPPET = r"""
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
pending = [int(p) for p in sys.argv[2:]]
while pending and time.monotonic() < deadline:
    for p in list(pending):
        try:
            socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
            pending.remove(p)
        except OSError:
            pass
    if pending:
        time.sleep(0.02)
print(" ".join(map(str, pending)))
sys.exit(1 if pending else 0)
"""


# A UDP echo responder: every datagram is answered with "<name> <payload>", so a client sees which
# node (or pod) a flow reached. Each argument after the name is a port (one dual-stack socket on
# `::`) or an `address:port` (`[v6]:port` for IPv6) to bind just that address.
UDP_ECHO_SNIPPET = r"""
import selectors, socket, sys
name = sys.argv[1].encode()
sel = selectors.DefaultSelector()
for spec in sys.argv[2:]:
    addr, _, port = spec.rpartition(":")
    if addr:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr.strip("[]") or "::", int(port)))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        while True:
            try:
                data, peer = key.fileobj.recvfrom(2048)
            except BlockingIOError:
                break
            key.fileobj.sendto(name + b" " + data, peer)
"""

class LabError(RuntimeError):
    """A lab operation failed; the message carries the command and its output."""


class LabBusyError(LabError):
    """Another live lab holds this prefix; cleaning up would break it."""


@dataclass(frozen=True)
class LabHost:
    """One host of the lab: a namespace with ``eth0`` on the shared segment."""

    name: str
    netns: str
    ipv4: str
    ipv6: str
    role: Role


@dataclass
class _Tracked:
    proc: subprocess.Popen[bytes]
    host: str
    argv: list[str]
    starttime: int
    log_path: Path


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> CompletedProcess[str]:
    """Run a command, raising LabError with its output (CalledProcessError hides stderr)."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise LabError(
            f"command failed ({res.returncode}): {' '.join(argv)}\nstdout: {res.stdout.strip()}\n"
            f"stderr: {res.stderr.strip()}"
        )
    return res


def _host_number(name: str) -> int:
    if name == "app1":
        return 2
    if name == "app2":
        return 3
    if name == "client":
        return 100
    m = re.fullmatch(r"node(\d+)", name)
    if m:
        return 10 + int(m.group(1))
    raise ValueError(f"unknown lab host name {name!r}")


def _make_host(prefix: str, name: str, role: Role) -> LabHost:
    num = _host_number(name)
    return LabHost(
        name=name,
        netns=f"{prefix}-{name}",
        ipv4=f"192.0.2.{num}",
        ipv6=f"2001:db8:0:1::{num:x}",
        role=role,
    )


def _lab_netns_re(prefix: str) -> re.Pattern[str]:
    """Exactly the namespace names a lab with ``prefix`` creates (so 'lbt' never matches 'lbt2-…')."""
    return re.compile(rf"^{re.escape(prefix)}-(?:{SWITCH}|app\d+|client|node\d+)$")


def _list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _cmdline_matches(actual: list[str], netns: str, argv: list[str]) -> bool:
    """Does a live process still look like the one recorded?

    Right after spawn the process is still ``ip netns exec NS argv…``; after the exec it is
    ``argv…``; haproxy in master-worker mode re-execs itself with extra arguments on reload,
    so the program name alone also counts (the start time already pins the process).
    """
    if not actual or not argv:
        return False
    if actual in (argv, ["ip", "netns", "exec", netns, *argv]):
        return True
    return os.path.basename(actual[0]) == os.path.basename(argv[0])


def _package_env() -> dict[str, str]:
    """Environment for spawned Python helpers: make this package importable whatever the cwd."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    return env


def _state_dir(prefix: str) -> Path:
    return STATE_ROOT / prefix


def _lock_path(prefix: str) -> Path:
    return STATE_ROOT / f"{prefix}.lock"


def _acquire_lock(prefix: str) -> IO[str]:
    """Take the per-prefix lock so two labs (or a lab and ``--down``) never fight over namespaces.

    The lock file is unlinked on release, so after locking we check that the path still names the
    file we locked; if a releaser unlinked it meanwhile, we retry on the new file.
    """
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    path = _lock_path(prefix)
    while True:
        fh = path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise LabBusyError(f"lab prefix {prefix!r} is in use by pid {holder}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _release_lock(fh: IO[str] | None) -> None:
    """Unlink, then unlock: a waiter that grabbed the old inode notices and retries."""
    if fh is None:
        return
    with contextlib.suppress(OSError):
        if os.stat(fh.name).st_ino == os.fstat(fh.fileno()).st_ino:
            os.unlink(fh.name)
    with contextlib.suppress(OSError):
        fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


# --------------------------------------------------------------------------- stale cleanup


def _cleanup_stale_locked(prefix: str) -> list[str]:
    """Kill recorded processes that are still the same process, delete the prefix's namespaces."""
    state = _state_dir(prefix)
    pidfile = state / "pids"
    if pidfile.exists():
        for line in pidfile.read_text().splitlines():
            try:
                rec = json.loads(line)
                pid, starttime, netns, argv = rec["pid"], rec["starttime"], rec["netns"], rec["argv"]
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed pidfile line: %r", line)
                continue
            cmdline = command_line(pid)
            if cmdline is None or start_time(pid) != starttime:
                continue  # gone, or the pid now belongs to someone else
            if not _cmdline_matches(cmdline, netns, argv):
                log.warning("pid %d no longer runs %s (now %s); leaving it alone", pid, argv, cmdline)
                continue
            log.info("stopping stale lab process %d: %s", pid, " ".join(cmdline))
            stop_pid(pid, signal.SIGTERM, _STOP_GRACE)
            if process_group(pid) in (None, pid):
                kill_group(pid)
    pattern = _lab_netns_re(prefix)
    removed: list[str] = []
    for ns in _list_netns():
        if not pattern.match(ns):
            continue
        strays = _netns_pids(ns)
        if strays:
            # Not recorded by us: report, do not kill (the namespace object lives on until they exit).
            log.warning("stale namespace %s still has unrecorded processes %s", ns, strays)
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    shutil.rmtree(state, ignore_errors=True)
    return removed


def cleanup_stale(prefix: str = "lbt") -> list[str]:
    """Remove what a crashed lab with ``prefix`` left behind; returns the namespaces deleted.

    Raises LabBusyError when a live lab holds the prefix.
    """
    _check_prefix(prefix)
    fh = _acquire_lock(prefix)
    try:
        return _cleanup_stale_locked(prefix)
    finally:
        _release_lock(fh)


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")


def lab_unavailable_reason() -> str | None:
    """Why a lab cannot be built here (not root, no ``ip netns``), or None when it can."""
    if os.geteuid() != 0:
        return "network lab needs root (creates network namespaces)"
    if shutil.which("ip") is None:
        return "network lab needs iproute2 ('ip' not found)"
    probe = f"lbprobe{os.getpid()}"
    res = _run(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return f"'ip netns add' is not supported here: {res.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def open_lab(prefix: str, nodes: int, workdir: Path) -> NetworkLab:
    """A NetworkLab that is up, with ``prefix``, or with a private one (``prefix`` + our pid) when
    another suite on this machine holds it: take another rather than wait or break it."""
    try:
        return NetworkLab(prefix=prefix, nodes=nodes, workdir=workdir).__enter__()
    except LabBusyError:
        return NetworkLab(prefix=f"{prefix}{os.getpid() % 100000}", nodes=nodes, workdir=workdir).__enter__()


# --------------------------------------------------------------------------- the lab


class NetworkLab:
    """Namespaces, links and helper processes for one lab; a context manager.

    Usage::

        with NetworkLab(prefix="lbt", nodes=3) as lab:
            lab.serve_nodeports([30080])
            status, body = lab.http_get("client", f"http://{lab.nodes[0].ipv4}:30080/")
    """

    WORKDIR_PREFIX = "lbappliance-lab"  # of the private directory made for each run

    def __init__(self, prefix: str = "lbt", nodes: int = 3, workdir: Path | None = None) -> None:
        _check_prefix(prefix)
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, got {nodes}")
        self.prefix = prefix
        self._initial_nodes = nodes
        self._workdir_arg = workdir
        self._own_workdir = False
        self.workdir: Path = workdir if workdir is not None else Path()
        self.hosts: dict[str, LabHost] = {}
        self._tracked: list[_Tracked] = []
        self._responders: dict[str, subprocess.Popen[bytes]] = {}
        self._healthservers: dict[str, subprocess.Popen[bytes]] = {}
        self._nodeports: dict[str, set[int]] = {}
        self._health_ports: dict[str, set[int]] = {}
        self._udp_ports: dict[str, set[int]] = {}
        self._udp_echos: dict[str, subprocess.Popen[bytes]] = {}
        self._created_netns: list[str] = []
        self._lock: IO[str] | None = None
        self._up = False

    # ---- context manager

    def __enter__(self) -> NetworkLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # ---- views

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-{SWITCH}"

    @property
    def state_dir(self) -> Path:
        return _state_dir(self.prefix)

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "pids"

    @property
    def appliances(self) -> list[LabHost]:
        return [h for h in self.hosts.values() if h.role == "appliance"]

    @property
    def client(self) -> LabHost:
        return self.hosts["client"]

    def _spare_client_addresses(self) -> list[str]:
        """IPv4 addresses the client may add: the segment's .101-.199, clear of hosts and VIPs."""
        return [f"192.0.2.{n}" for n in range(101, 200)]

    def client_addresses(self, count: int) -> list[str]:
        """`count` more IPv4 addresses on the client, on its own subnet (so replies come back on-link):
        as many clients, for what keys on the source address (sessionAffinity ClientIP)."""
        spare = self._spare_client_addresses()
        if count > len(spare):
            raise ValueError(f"the client's subnet has {len(spare)} spare addresses, not {count}")
        have = set(self.exec("client", ["ip", "-4", "-o", "addr", "show", "dev", HOST_IFACE]).stdout.split())
        for address in spare[:count]:
            if f"{address}/{PREFIXLEN_V4}" not in have:
                _run(["ip", "-n", self.client.netns, "addr", "add", f"{address}/{PREFIXLEN_V4}", "dev", HOST_IFACE])
        return spare[:count]

    @property
    def nodes(self) -> list[LabHost]:
        nodes = [h for h in self.hosts.values() if h.role == "node"]
        return sorted(nodes, key=lambda h: _host_number(h.name))

    def host(self, host: str | LabHost) -> LabHost:
        """Resolve a host name (``"node1"``) or LabHost to the LabHost."""
        if isinstance(host, LabHost):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise LabError(f"no lab host {host!r}; have {sorted(self.hosts)}") from None

    def _netns(self, host: str | LabHost) -> str:
        if host == SWITCH:
            return self.switch_netns
        return self.host(host).netns

    # ---- lifecycle

    def up(self) -> None:
        """Build the lab after clearing whatever a crashed lab with this prefix left."""
        if self._up:
            return
        self._lock = _acquire_lock(self.prefix)
        try:
            self._clear_stale()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text("")
            if self._workdir_arg is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.WORKDIR_PREFIX}-{self.prefix}-"))
                self._own_workdir = True
            else:
                self.workdir = self._workdir_arg
                self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "logs").mkdir(exist_ok=True)
            self._up = True
            self._build_switch()
            self._add_hosts()
        except BaseException:
            self.down()
            raise

    def _clear_stale(self) -> None:
        """What a crashed lab with this prefix left (namespaces, processes); under the lock."""
        removed = _cleanup_stale_locked(self.prefix)
        if removed:
            log.warning("removed stale lab namespaces: %s", removed)

    def _add_hosts(self) -> None:
        """The lab's hosts on the switch: two appliances, a client and the nodes."""
        for name, role in (("app1", "appliance"), ("app2", "appliance"), ("client", "client")):
            self._add_host(_make_host(self.prefix, name, role))  # type: ignore[arg-type]
        for k in range(1, self._initial_nodes + 1):
            self._add_host(_make_host(self.prefix, f"node{k}", "node"))

    def down(self) -> None:
        """Stop every process, delete every namespace, remove the state dir; safe to call twice."""
        if self._lock is None and not self._up:
            return
        errors: list[str] = []
        for t in reversed(list(self._tracked)):
            try:
                self._stop_tracked(t, signal.SIGTERM, _STOP_GRACE)
            except Exception as e:  # keep tearing down whatever happens
                errors.append(f"stop {t.argv}: {e}")
        self._tracked.clear()
        self._responders.clear()
        self._healthservers.clear()
        self._udp_echos.clear()
        pattern = _lab_netns_re(self.prefix)
        try:
            present = set(_list_netns())
        except LabError as e:
            errors.append(str(e))
            present = set(self._created_netns)
        for ns in sorted(set(self._created_netns) | {n for n in present if pattern.match(n)}):
            if ns not in present:
                continue
            self._reap_strays(ns)
            res = _run(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0:
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self._created_netns.clear()
        self.hosts.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._own_workdir and not os.environ.get("LBAPPLIANCE_LAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        _release_lock(self._lock)
        self._lock = None
        self._up = False
        if errors:
            log.warning("lab teardown had errors: %s", "; ".join(errors))

    def _reap_strays(self, netns: str) -> None:
        """Stop processes left in a namespace this lab created (daemons started through ``exec``).

        They can only have been started through this lab; left alone they would keep the
        namespace and its links alive after ``ip netns del``.
        """
        for pid in _netns_pids(netns):
            log.warning("stopping process %d left in %s: %s", pid, netns, " ".join(command_line(pid) or []))
            stop_pid(pid, signal.SIGTERM, _STOP_GRACE)

    def _build_switch(self) -> None:
        sw = self.switch_netns
        _run(["ip", "netns", "add", sw])
        self._created_netns.append(sw)
        # The switch only bridges; it needs no addresses of its own.
        self._sysctl(sw, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
        _run(["ip", "-n", sw, "link", "set", "lo", "up"])
        # STP off: ports forward at once. Snooping off: MLD-less hosts would otherwise lose ND/VRRPv3
        # multicast once the bridge learned a group from someone else.
        _run(
            ["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge",
             "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"]
        )  # fmt: skip
        _run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])

    def _sysctl(self, netns: str, values: dict[str, str]) -> None:
        _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def _add_host(self, h: LabHost) -> None:
        sw = self.switch_netns
        _run(["ip", "netns", "add", h.netns])
        self._created_netns.append(h.netns)
        self.hosts[h.name] = h
        values = {
            # No DAD: addresses (and the link-local VRRPv3 needs) are usable at once, VIPs too.
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            # Keep IPv6 addresses across link_down/link_up (the kernel flushes them otherwise).
            "net.ipv6.conf.all.keep_addr_on_down": "1",
            "net.ipv6.conf.default.keep_addr_on_down": "1",
            "net.ipv6.conf.all.accept_ra": "0",
            "net.ipv6.conf.default.accept_ra": "0",
        }
        if h.role == "appliance":
            values |= {
                "net.ipv4.ip_nonlocal_bind": "1",
                "net.ipv6.ip_nonlocal_bind": "1",
                "net.ipv4.ip_forward": "1",
                # UDP Services are DNATed to the nodes by the appliance's kernel, in both families.
                "net.ipv6.conf.all.forwarding": "1",
            }
        self._sysctl(h.netns, values)
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        port = self._switch_port(h)
        # Created from inside the switch namespace, peer born in the host namespace: never in ours.
        peer = ["peer", "name", HOST_IFACE, "netns", h.netns]
        _run(["ip", "-n", sw, "link", "add", port, "type", "veth", *peer])
        _run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE, "up"])
        _run(["ip", "-n", h.netns, "addr", "add", f"{h.ipv4}/{PREFIXLEN_V4}", "dev", HOST_IFACE])
        _run(["ip", "-n", h.netns, "addr", "add", f"{h.ipv6}/{PREFIXLEN_V6}", "dev", HOST_IFACE, "nodad"])
        _run(["ip", "-n", h.netns, "link", "set", HOST_IFACE, "up"])

    @staticmethod
    def _switch_port(h: LabHost) -> str:
        return f"v{h.name}"  # <= 15 chars: "vnode80"

    def add_node(self) -> LabHost:
        """Add one more node host; it serves the same NodePorts/health ports as the others."""
        self._require_up()
        nums = [int(h.name[4:]) for h in self.nodes]
        k = max(nums, default=0) + 1
        if k > MAX_NODES:
            raise LabError(f"at most {MAX_NODES} nodes")
        h = _make_host(self.prefix, f"node{k}", "node")
        self._add_host(h)
        nodeports = set().union(*self._nodeports.values()) if self._nodeports else set()
        health = set().union(*self._health_ports.values()) if self._health_ports else set()
        if nodeports:
            self.serve_nodeports(sorted(nodeports), nodes=[h.name])
        if health:
            self.serve_health_ports(sorted(health), nodes=[h.name])
        udp = set().union(*self._udp_ports.values()) if self._udp_ports else set()
        if udp:
            self.serve_udp(sorted(udp), nodes=[h.name])
        return h

    def remove_node(self, name: str) -> None:
        """Delete a node host with its processes (the node 'disappears' from the segment)."""
        self._require_up()
        h = self.host(name)
        if h.role != "node":
            raise LabError(f"{name} is not a node")
        for t in [t for t in self._tracked if t.host == name]:
            self._stop_tracked(t, signal.SIGTERM, _STOP_GRACE)
        self._responders.pop(name, None)
        self._healthservers.pop(name, None)
        self._udp_echos.pop(name, None)
        self._udp_ports.pop(name, None)
        self._nodeports.pop(name, None)
        self._health_ports.pop(name, None)
        self._reap_strays(h.netns)
        _run(["ip", "netns", "del", h.netns])
        self._created_netns.remove(h.netns)
        del self.hosts[name]

    def _require_up(self) -> None:
        if not self._up:
            raise LabError("lab is not up")

    # ---- processes

    def exec(
        self,
        host: str | LabHost,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> CompletedProcess[str]:
        """Run a command to completion inside a host's namespace (``host="sw"`` for the switch)."""
        self._require_up()
        full = ["ip", "netns", "exec", self._netns(host), *argv]
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and res.returncode != 0:
            raise LabError(
                f"in {self._netns(host)}: {' '.join(argv)} failed ({res.returncode})\n"
                f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
            )
        return res

    def spawn(
        self,
        host: str | LabHost,
        argv: Sequence[str],
        log_name: str,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in a host's namespace, tracked and recorded in the pidfile.

        Output goes to ``<workdir>/logs/<log_name>.log``; the process gets its own session so its
        whole group can be killed on teardown and terminal signals do not reach it.
        """
        self._require_up()
        netns = self._netns(host)
        host_name = SWITCH if host == SWITCH else self.host(host).name
        argv = list(argv)
        log_path = self.log_path(log_name)
        with log_path.open("ab") as logf:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        starttime = start_time(proc.pid) or 0
        self._tracked.append(_Tracked(proc, host_name, argv, starttime, log_path))
        self._write_pidfile()
        return proc

    def log_path(self, log_name: str) -> Path:
        """Where ``spawn(..., log_name)`` writes (handy for failure messages)."""
        return self.workdir / "logs" / f"{log_name}.log"

    def stop(
        self,
        proc_or_pid: subprocess.Popen[bytes] | int,
        sig: int = signal.SIGTERM,
        timeout: float = _STOP_GRACE,
    ) -> int | None:
        """Send ``sig``, wait ``timeout``, then SIGKILL; returns the exit code when it is ours."""
        pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
        for t in self._tracked:
            if t.proc.pid == pid:
                return self._stop_tracked(t, sig, timeout)
        stop_pid(pid, sig, timeout)
        if isinstance(proc_or_pid, subprocess.Popen):
            return proc_or_pid.wait(timeout=timeout)
        return None

    def _stop_tracked(self, t: _Tracked, sig: int, timeout: float) -> int | None:
        stop_child(t.proc, sig, timeout)
        if t in self._tracked:
            self._tracked.remove(t)
            self._write_pidfile()
        return t.proc.poll()

    def _write_pidfile(self) -> None:
        """Rewrite the pidfile atomically: one JSON record per live tracked process."""
        if not self.state_dir.exists():
            return
        lines = [
            json.dumps({"pid": t.proc.pid, "starttime": t.starttime, "netns": self._netns(t.host), "argv": t.argv})
            for t in self._tracked
            if t.host == SWITCH or t.host in self.hosts
        ]
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.replace(self.pidfile)

    # ---- links

    def link_down(self, host: str | LabHost, *, silent: bool = False) -> None:
        """Cut a host off the segment, for hard-failure tests.

        Default: set the host's ``eth0`` down (the host sees it; keepalived goes to FAULT).
        ``silent=True``: detach its port from the bridge instead, so the host keeps carrier and
        notices nothing, like a frozen peer or a cut beyond the switch.  (Setting the bridge port
        state to disabled does not work: with STP off the kernel puts it back to forwarding.)
        """
        h = self.host(host)
        if silent:
            _run(["ip", "-n", self.switch_netns, "link", "set", "dev", self._switch_port(h), "nomaster"])
        else:
            _run(["ip", "-n", h.netns, "link", "set", HOST_IFACE, "down"])

    def link_up(self, host: str | LabHost) -> None:
        """Undo :meth:`link_down` (either kind)."""
        h = self.host(host)
        _run(["ip", "-n", h.netns, "link", "set", HOST_IFACE, "up"])
        _run(["ip", "-n", self.switch_netns, "link", "set", self._switch_port(h), "master", BRIDGE, "up"])

    # ---- node services

    def _target_nodes(self, nodes: Iterable[str | LabHost] | None) -> list[LabHost]:
        hs = self.nodes if nodes is None else [self.host(n) for n in nodes]
        for h in hs:
            if h.role != "node":
                raise LabError(f"{h.name} is not a node")
        return hs

    def serve_nodeports(self, ports: Iterable[int], nodes: Iterable[str | LabHost] | None = None) -> None:
        """Answer every HTTP request on these ports with ``"<nodename>\\n"`` (adds to earlier ports).

        A real haproxy per node, so benchmarks through the appliance measure HAProxy, not a
        Python responder.  It restarts (with the union of all ports so far) only when a port is
        new, so calling this again with known ports is cheap and causes no gap.
        """
        self._require_up()
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise LabError("serve_nodeports needs the haproxy binary")
        ports = set(ports)
        for h in self._target_nodes(nodes):
            current = self._nodeports.setdefault(h.name, set())
            running = self._responders.get(h.name)
            if ports <= current and running is not None and running.poll() is None:
                continue  # already serving all of them: no restart, no gap
            current.update(ports)
            all_ports = sorted(current)
            cfg = self.workdir / h.name / "responder.cfg"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(_responder_config(h.name, all_ports))
            _run([haproxy, "-c", "-q", "-f", str(cfg)])
            old = self._responders.pop(h.name, None)
            if old is not None:
                self.stop(old)
            proc = self.spawn(h, [haproxy, "-db", "-f", str(cfg)], log_name=f"{h.name}-responder")
            self._responders[h.name] = proc
            self._wait_listening(h, all_ports, proc, f"{h.name}-responder")

    def responder_pids(self) -> list[int]:
        """The nodes' NodePort responders (for benchmarks that pin them to CPUs)."""
        return [proc.pid for proc in self._responders.values() if proc.poll() is None]

    def stop_nodeports(self, nodes: Iterable[str | LabHost] | None = None) -> None:
        """Stop the responders (the node's NodePorts then refuse connections) and forget their ports."""
        self._require_up()
        for h in self._target_nodes(nodes):
            proc = self._responders.pop(h.name, None)
            if proc is not None:
                self.stop(proc)
            self._nodeports.pop(h.name, None)

    def serve_health_ports(self, ports: Iterable[int] = (), nodes: Iterable[str | LabHost] | None = None) -> None:
        """Serve ``/healthz`` on 10256 plus these ports (adds to earlier ones), 200 unless switched off."""
        self._require_up()
        ports = set(ports)
        for h in self._target_nodes(nodes):
            current = self._health_ports.setdefault(h.name, {KUBE_PROXY_HEALTH_PORT})
            running = self._healthservers.get(h.name)
            if ports <= current and running is not None and running.poll() is None:
                continue  # already serving all of them
            current.update(ports)
            all_ports = sorted(current)
            self.health_state_dir(h).mkdir(parents=True, exist_ok=True)
            old = self._healthservers.pop(h.name, None)
            if old is not None:
                self.stop(old)
            argv = [
                sys.executable, "-m", "lbappliance.testing.healthserver",
                "--state-dir", str(self.health_state_dir(h)),
                "--ports", ",".join(map(str, all_ports)),
                "--name", h.name,
            ]  # fmt: skip
            proc = self.spawn(h, argv, log_name=f"{h.name}-health", env=_package_env())
            self._healthservers[h.name] = proc
            self._wait_listening(h, all_ports, proc, f"{h.name}-health")

    def health_state_dir(self, node: str | LabHost) -> Path:
        return self.workdir / self.host(node).name / "health"

    def set_health(self, node: str | LabHost, port: int, healthy: bool) -> None:
        """Flip one node's ``/healthz`` answer on one port (200 healthy, 503 not); takes effect at once."""
        marker = down_marker(self.health_state_dir(node), port)
        if healthy:
            marker.unlink(missing_ok=True)
        else:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

    def _wait_listening(
        self,
        host: LabHost,
        ports: Sequence[int],
        proc: subprocess.Popen[bytes],
        log_name: str,
        timeout: float = 10.0,
    ) -> None:
        res = self.exec(
            host,
            [sys.executable, "-I", "-S", "-c", _WAIT_LISTEN_SNIPPET, str(timeout), *map(str, ports)],
            check=False,
            timeout=timeout + 10,
        )
        if res.returncode != 0 or proc.poll() is not None:
            tail = self.log_path(log_name).read_text(errors="replace")[-2000:]
            raise LabError(
                f"{log_name} in {host.netns} not listening on {res.stdout.strip() or ports} "
                f"(exit={proc.poll()}); log tail:\n{tail}"
            )

    def serve_udp(self, ports: Iterable[int], nodes: Iterable[str | LabHost] | None = None) -> None:
        """Answer every UDP datagram on these ports with ``"<nodename> <payload>"`` (adds to earlier ports)."""
        self._require_up()
        ports = set(ports)
        for h in self._target_nodes(nodes):
            current = self._udp_ports.setdefault(h.name, set())
            running = self._udp_echos.get(h.name)
            if ports <= current and running is not None and running.poll() is None:
                continue
            current.update(ports)
            old = self._udp_echos.pop(h.name, None)
            if old is not None:
                self.stop(old)
            argv = [sys.executable, "-I", "-S", "-u", "-c", UDP_ECHO_SNIPPET, h.name, *map(str, sorted(current))]
            proc = self.spawn(h, argv, log_name=f"{h.name}-udp")
            self._udp_echos[h.name] = proc
            deadline = time.monotonic() + 10
            while "ready" not in self.log_path(f"{h.name}-udp").read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"UDP echo on {h.name} did not start: "
                                   f"{self.log_path(f'{h.name}-udp').read_text(errors='replace')[-2000:]}")
                time.sleep(0.02)

    def stop_udp(self, nodes: Iterable[str | LabHost] | None = None) -> None:
        """Stop the UDP echo responders (their ports then answer ICMP port unreachable)."""
        self._require_up()
        for h in self._target_nodes(nodes):
            proc = self._udp_echos.pop(h.name, None)
            if proc is not None:
                self.stop(proc)
            self._udp_ports.pop(h.name, None)

    def udp_ask(self, from_host: str | LabHost, address: str, port: int, n: int = 10,
                timeout: float = 1.0) -> dict[str, int]:
        """``n`` UDP requests from a fresh socket each (a new flow each); node name -> answers,
        ``"error"`` for requests without an answer."""
        return probe_in(self.host(from_host).netns, [target(address, port)], n, proto="udp",
                        read_timeout=timeout).counts()

    def addresses(self, host: str | LabHost, dev: str = HOST_IFACE) -> set[str]:
        """Addresses configured on a host's interface right now (VIPs a box holds, its own too)."""
        out = self.exec(host, ["ip", "-o", "addr", "show", "dev", dev]).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3}

    # ---- probes

    def http_get(self, from_host: str | LabHost, url: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``url`` from inside a host; ``(status, body)``, status 0 with the error when no answer."""
        res = self.exec(
            from_host,
            [sys.executable, "-I", "-S", "-c", _HTTP_GET_SNIPPET, url, str(timeout)],
            check=False,
            timeout=timeout + 10,
        )
        try:
            status, body = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0, f"probe failed ({res.returncode}): {res.stderr.strip()}"
        return int(status), str(body)

    def answer(self, from_host: str | LabHost, address: str, port: int = 80, timeout: float = 10.0,
               interval: float = 0.2) -> str:
        """The body of the first 200 answer to ``GET http://address:port/`` from inside a host,
        waiting up to ``timeout`` s for one (a VIP that is still being set up, for example)."""
        url = f"http://[{address}]:{port}/" if ":" in address else f"http://{address}:{port}/"

        def ok() -> str | None:
            status, body = self.http_get(from_host, url, timeout=2.0)
            return body.strip() if status == 200 else None

        return wait_for(ok, timeout, interval, what=f"{url} answering in {self.host(from_host).netns}")

    def describe(self) -> list[dict[str, Any]]:
        """The hosts as plain dicts (for ``--up`` output and debugging)."""
        return [
            {"name": h.name, "netns": h.netns, "ipv4": h.ipv4, "ipv6": h.ipv6, "role": h.role}
            for h in self.hosts.values()
        ]


def _responder_config(name: str, ports: Sequence[int]) -> str:
    """haproxy.cfg for a node's NodePort responder: one frontend, dual-stack binds, fixed answer."""
    binds = "\n".join(f"    bind :::{p} v4v6" for p in ports)
    # `string` is a literal body; HAProxy's parser turns "\n" inside double quotes into a newline.
    return f"""\
global
    maxconn 5000
    log stderr format raw local0 warning

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend nodeports
{binds}
    http-request return status 200 content-type text/plain string "{name}\\n" hdr X-Node {name}
"""


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _signals_to_exit() -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """``--down`` cleans up a prefix; ``--up`` builds a lab and holds it until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m lbappliance.testing.netlab")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--down", action="store_true", help="remove namespaces/processes left by a lab")
    mode.add_argument("--up", action="store_true", help="build a lab and keep it until interrupted")
    parser.add_argument("--prefix", default="lbt")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--nodeports", default="", help="comma list of NodePorts to serve with --up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.down:
        try:
            removed = cleanup_stale(args.prefix)
        except LabBusyError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
        return 0
    with _signals_to_exit(), NetworkLab(prefix=args.prefix, nodes=args.nodes) as lab:
        ports = [int(p) for p in args.nodeports.split(",") if p.strip()]
        if ports:
            lab.serve_nodeports(ports)
        lab.serve_health_ports()
        info = {"prefix": lab.prefix, "workdir": str(lab.workdir), "hosts": lab.describe()}
        print(json.dumps(info, indent=2))
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
