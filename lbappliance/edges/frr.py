"""FRR as the BGP announce mode drives it: check frr.conf with FRR's own parser, apply it without
restarting bgpd, announce and withdraw VIPs, and hold them on the loopback so HAProxy can bind them.

Which tool for what (Debian's frr 8.4):

* **check**: `vtysh -C -f FILE` parses the file with every daemon's command tree and exits 2 on a
  line it does not know, naming the line. (`bgpd --dryrun` exits 0 on a file that has other
  daemons' commands or errors: it is no check.) It binds nothing, so it runs anywhere.
* **structural changes** (peers, BFD profiles, timers, route-maps): `frr-reload.py --reload`,
  FRR's own tool: it reads `show running-config`, computes the difference to the file and sends
  only that through vtysh, so sessions not touched stay up and it also repairs drift (a hand edit,
  a restarted bgpd). About 1 s: it runs vtysh several times.
* **announce / withdraw** (only `network` lines differ from what was applied): one vtysh call
  with those `network` / `no network` commands, about 0.08 s, since a withdrawal is the hot path
  (HAProxy died, a Service lost its last healthy backend, a clean stop). The file is written too,
  so the next frr-reload.py agrees.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbappliance.core.bgp import AnnounceDecision, BgpSettings, announce_decision, render_frr
from lbappliance.core.models import DesiredState, Pool

from .files import atomic_write
from .validate import Verdict

log = logging.getLogger(__name__)

#: frr-reload.py repairs drift (a bgpd restarted with an empty config, a hand edit) this often.
FULL_RELOAD_EVERY_SECONDS = 60.0


class FrrError(RuntimeError):
    """vtysh or frr-reload.py failed; the message carries their output."""


def _run(argv: Sequence[str], timeout: float = 30.0, input: str | None = None) -> Verdict:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Verdict(False, f"{argv[0]}: {exc}")
    return Verdict(done.returncode == 0, (done.stdout + done.stderr).strip(), done.returncode)


def check_frr(path: Path | str, vtysh: str = "/usr/bin/vtysh") -> Verdict:
    """`vtysh -C -f`: FRR's parser on the whole file (exit 2 and the line on a command it does not know)."""
    verdict = _run([vtysh, "-C", "-f", str(path)], timeout=30)
    return Verdict(verdict.ok and "Unknown command" not in verdict.output, verdict.output, verdict.returncode)


def network_lines(text: str) -> dict[str, set[str]]:
    """The `network` lines of each `address-family` block of a rendered frr.conf."""
    found: dict[str, set[str]] = {}
    family = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("address-family "):
            family = stripped
            found.setdefault(family, set())
        elif stripped == "exit-address-family":
            family = None
        elif family is not None and stripped.startswith("network "):
            found[family].add(stripped)
    return found


def _without_networks(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("network "))


@dataclass
class Frr:
    """One FRR instance reached through vtysh: the box's (frr.service), or a lab namespace's.

    `prefix` (for example `["ip", "netns", "exec", "lbb-app1"]`) runs vtysh and frr-reload.py in
    the namespace where the daemons are; the check runs here (it binds nothing)."""

    bgp: BgpSettings
    prefix: list[str] = field(default_factory=list)
    rundir: str = "/run/lbappliance"

    def _vtysh_argv(self) -> list[str]:
        return [*self.prefix, self.bgp.vtysh_binary, "--vty_socket", self.bgp.vty_socket_dir]

    def vtysh(self, *commands: str, timeout: float = 10.0) -> str:
        argv = self._vtysh_argv()
        for command in commands:
            argv += ["-c", command]
        verdict = _run(argv, timeout)
        if not verdict.ok or ("% " in verdict.output and "Unknown command" in verdict.output):
            raise FrrError(f"vtysh {' ; '.join(commands)}: {verdict.output}")
        return verdict.output

    def show_json(self, command: str) -> Any:
        text = self.vtysh(f"{command} json")
        try:
            return json.loads(text) if text else {}
        except ValueError:
            raise FrrError(f"vtysh {command} json: not JSON: {text[:200]}") from None

    def reload(self, path: str) -> None:
        """frr-reload.py --reload: the difference between the running config and `path`, through vtysh."""
        argv = [*self.prefix, "/usr/bin/python3", self.bgp.frr_reload_binary, "--reload", "--stdout",
                "--log-level", "warning", "--vty_socket", self.bgp.vty_socket_dir,
                "--bindir", str(Path(self.bgp.vtysh_binary).parent), "--confdir", str(Path(path).parent),
                "--rundir", self.rundir, path]
        verdict = _run(argv, timeout=60)
        if not verdict.ok:
            raise FrrError(f"frr-reload.py {path}: {verdict.output[-2000:]}")

    def configure(self, router_lines: Sequence[str]) -> None:
        """Commands inside `router bgp ASN`, in one vtysh call (one configure session)."""
        self.vtysh("configure terminal", f"router bgp {self.bgp.asn}", *router_lines)

    def running(self) -> bool:
        return _run([*self._vtysh_argv(), "-d", "bgpd", "-c", "show version"], 5).ok

    def sessions(self) -> dict[str, str]:
        """Peer address -> BGP state (Established, Active, Connect, ...), over every address family."""
        data = self.show_json("show bgp summary")
        states: dict[str, str] = {}
        for family in data.values() if isinstance(data, dict) else ():
            for peer, info in (family.get("peers") or {}).items() if isinstance(family, dict) else ():
                states[peer] = str(info.get("state", "unknown"))
        return states

    def advertised(self, peer: str) -> set[str]:
        """Prefixes bgpd has sent to `peer` and not withdrawn (its Adj-RIB-Out) in the peer's families."""
        found: set[str] = set()
        for afi in ("ipv4", "ipv6"):
            try:
                data = self.show_json(f"show bgp {afi} unicast neighbors {peer} advertised-routes")
            except FrrError:
                continue
            found |= set((data.get("advertisedRoutes") or {}) if isinstance(data, dict) else ())
        return found


@dataclass(frozen=True)
class AnnounceResult:
    kind: str  # noop | announce (vtysh network lines) | reload (frr-reload.py) | rejected | failed
    decision: AnnounceDecision
    message: str = ""
    seconds: float = 0.0


@dataclass
class BgpAnnouncer:
    """The BGP side of the data plane, beside VrrpControl: announce exactly the VIPs this box can serve.

    `sync` is level-triggered like the pass: the decision comes from the desired state, whether
    HAProxy runs and its servers' states; frr.conf is rendered from it, checked, and applied
    (vtysh for announce/withdraw, frr-reload.py for the rest)."""

    name: str
    bgp: BgpSettings
    frr: Frr
    pools: Sequence[Pool] = ()
    _applied: str | None = field(default=None, repr=False)
    _full_at: float = field(default=float("-inf"), repr=False)
    last: AnnounceDecision = field(default_factory=lambda: AnnounceDecision((), {}))

    @property
    def path(self) -> str:
        return self.bgp.config_path

    def sync(self, state: DesiredState, haproxy_up: bool,
             server_states: Mapping[tuple[str, str], str]) -> AnnounceResult:
        return self.announce(announce_decision(state, haproxy_up, server_states))

    def announce(self, decision: AnnounceDecision) -> AnnounceResult:
        start = time.monotonic()
        text = render_frr(self.name, self.bgp, decision.announced, self.pools)
        due = time.monotonic() - self._full_at > FULL_RELOAD_EVERY_SECONDS
        if text == self._applied and not due:
            self.last = decision
            return AnnounceResult("noop", decision)
        candidate = f"{self.path}.candidate"
        atomic_write(Path(candidate), text, 0o640)
        verdict = check_frr(candidate, self.bgp.vtysh_binary)
        if not verdict.ok:
            os.replace(candidate, f"{self.path}.rejected")
            log.error("rejected %s: %s", self.path, verdict.output)
            return AnnounceResult("rejected", decision, verdict.output, time.monotonic() - start)
        previous = self._applied
        try:
            if previous is not None and not due and _without_networks(previous) == _without_networks(text):
                self.frr.configure(_network_commands(previous, text))
                os.replace(candidate, self.path)
                kind = "announce"
            else:
                os.replace(candidate, self.path)
                self.frr.reload(self.path)
                self._full_at = time.monotonic()
                kind = "reload"
        except (FrrError, OSError) as exc:
            self._applied = None  # unknown now: the next sync reloads in full
            log.error("applying %s failed: %s", self.path, exc)
            return AnnounceResult("failed", decision, str(exc), time.monotonic() - start)
        self._applied = text
        self.last = decision
        return AnnounceResult(kind, decision, seconds=time.monotonic() - start)

    def withdraw_all(self, timeout: float = 10.0) -> bool:
        """Withdraw every VIP and wait until no peer's Adj-RIB-Out holds one any more, then
        `withdrawSettleSeconds` for the routers to reprogram: a clean stop's first step, before
        HAProxy stops. True when the withdrawal was seen through."""
        result = self.announce(AnnounceDecision((), {vip: "stopping" for vip in self.last.announced}))
        if result.kind in ("rejected", "failed"):
            return False
        deadline = time.monotonic() + timeout
        peers = [p.address for p in self.bgp.peers]
        while time.monotonic() < deadline:
            try:
                left = {peer: self.frr.advertised(peer) for peer in peers}
            except FrrError:
                left = {"?": {"unknown"}}
            if not any(left.values()):
                time.sleep(self.bgp.withdraw_settle_seconds)
                return True
            time.sleep(0.05)
        log.warning("routes still advertised after %.1fs: %s", timeout, left)
        return False

    def status(self) -> dict[str, Any]:
        """Per VIP: announced or why not; per peer: the session state (for `status` and metrics)."""
        try:
            sessions = self.frr.sessions()
        except FrrError as exc:
            sessions = {"error": str(exc)[:200]}
        return {"announced": list(self.last.announced), "withdrawn": dict(self.last.withdrawn), "sessions": sessions}


def _network_commands(before: str, after: str) -> list[str]:
    """`address-family` / `network` / `no network` commands that turn `before`'s network lines into `after`'s."""
    old, new = network_lines(before), network_lines(after)
    commands: list[str] = []
    for family in sorted(set(old) | set(new)):
        gone = sorted(old.get(family, set()) - new.get(family, set()))
        added = sorted(new.get(family, set()) - old.get(family, set()))
        if gone or added:
            commands += [family, *(f"no {line}" for line in gone), *added, "exit-address-family"]
    return commands


@dataclass
class LoopbackVips:
    """VIPs held on `lo` so HAProxy can bind them and the kernel takes their packets as local,
    while the box answers no ARP / ND for them on the shared segment: an address on `lo` is not
    on the segment's interface, IPv6 ND answers only for the receiving interface's addresses, and
    `arp_ignore=1` / `arp_announce=2` (the appliance's sysctls, set by its image) keep IPv4 ARP to
    the interface's own addresses. Every planned VIP stays here while it is withdrawn, so
    connections established before the withdrawal drain."""

    prefix: list[str] = field(default_factory=list)
    device: str = "lo"

    def held(self) -> set[str]:
        verdict = _run([*self.prefix, "ip", "-j", "addr", "show", "dev", self.device])
        if not verdict.ok:
            raise FrrError(f"ip addr show dev {self.device}: {verdict.output}")
        found = set()
        for link in json.loads(verdict.output or "[]"):
            for info in link.get("addr_info", []):
                address = ipaddress.ip_address(info["local"])
                if not address.is_loopback and info.get("prefixlen") == address.max_prefixlen:
                    found.add(str(address))
        return found

    def sync(self, vips: Sequence[str]) -> tuple[set[str], set[str]]:
        """Hold exactly `vips` (host addresses other than loopback's own); returns (added, removed)."""
        want = {str(ipaddress.ip_address(v)) for v in vips}
        have = self.held()
        for vip in sorted(want - have):
            plen = 32 if ":" not in vip else 128
            verdict = _run([*self.prefix, "ip", "addr", "add", f"{vip}/{plen}", "dev", self.device])
            if not verdict.ok and "exists" not in verdict.output:
                raise FrrError(f"ip addr add {vip}: {verdict.output}")
        for vip in sorted(have - want):
            plen = 32 if ":" not in vip else 128
            with contextlib.suppress(FrrError):
                _run([*self.prefix, "ip", "addr", "del", f"{vip}/{plen}", "dev", self.device])
        return want - have, have - want


def frontend_sessions(haproxy: Any) -> int:
    """Connections HAProxy's frontends hold now (`scur` of every FRONTEND row but the stats one)."""
    rows = haproxy.stat_rows("-1 1 -1")
    return sum(int(r.get("scur") or 0) for r in rows if r.get("svname") == "FRONTEND" and r.get("pxname") != "stats")


# How old bgp.json (and the sessions metric) may get between ticks: a session that comes up or
# drops changes nothing the announcer decides, so only this refresh shows it.
STATUS_REFRESH_SECONDS = 2.0


@dataclass
class BgpControl:
    """The data plane's BGP room, beside VrrpControl (chosen by `announce.mode`): VIPs on `lo`,
    the announcer, and the clean stop. `haproxy` arguments are edges.haproxy.HAProxy handles."""

    announcer: BgpAnnouncer
    vips: LoopbackVips
    # Managed mode (lab, tests, containers): the daemon holds each VIP on `lo` itself. External
    # mode (systemd; the daemon has no CAP_NET_ADMIN): the box routes every pool range to `lo`
    # once (`ip route add local 203.0.113.0/24 dev lo`, docs/install.md), which takes the pool's
    # packets as local without an address per VIP.
    manage_vips: bool = True
    last_status: dict[str, Any] = field(default_factory=dict)
    _state: DesiredState | None = field(default=None, repr=False)

    @classmethod
    def for_config(cls, name: str, bgp: BgpSettings, prefix: Sequence[str] | None, state_dir: str,
                   pools: Sequence[Pool] = (), manage_vips: bool = True) -> BgpControl:
        frr = Frr(bgp, list(prefix or []), state_dir)
        return cls(BgpAnnouncer(name, bgp, frr, pools), LoopbackVips(list(prefix or [])), manage_vips)

    def hold(self, state: DesiredState) -> None:
        """Before HAProxy binds: every planned VIP on `lo` (withdrawn ones too, so they drain)."""
        if self.manage_vips:
            self.vips.sync(state.vips)

    def apply(self, state: DesiredState, haproxy: Any) -> AnnounceResult:
        """After HAProxy took `state`: announce what this box can serve now (and record it, with the
        sessions' states, for `lbappliance status`)."""
        self._state = state
        result = self.tick(haproxy)
        self.record()
        return result

    @property
    def status_path(self) -> Path:
        return Path(self.announcer.frr.rundir) / "bgp.json"

    def record(self) -> None:
        """`<stateDir>/bgp.json`: per VIP announced or why not, per peer the session state."""
        self.last_status = {**self.status(), "at": round(time.time(), 3)}
        with contextlib.suppress(OSError):
            atomic_write(self.status_path, json.dumps(self.last_status, sort_keys=True) + "\n")

    def tick(self, haproxy: Any) -> AnnounceResult:
        """Between passes: HAProxy died or a Service lost its last healthy server here -> withdraw."""
        state = self._state or DesiredState((), (), {})
        up = bool(haproxy.running())
        servers: Mapping[tuple[str, str], str] = {}
        if up:
            try:
                servers = haproxy.server_states()
            except (OSError, RuntimeError):
                up = False  # a master without a worker answering serves nothing
        result = self.announcer.sync(state, up, servers)
        stale = time.time() - float(self.last_status.get("at", 0.0)) >= STATUS_REFRESH_SECONDS
        if result.kind not in ("noop",) or stale:  # sessions change on their own (come up, drop)
            self.record()
        return result

    def stop(self, haproxy: Any) -> None:
        """A clean stop: withdraw and wait until the routers have it, then let HAProxy's connections
        finish (at most drainSeconds); the caller stops HAProxy after this returns."""
        bgp = self.announcer.bgp
        seen = self.announcer.withdraw_all(timeout=max(5.0, 3.0 * bgp.hold_time_seconds))
        log.info("withdrew every VIP (%s); draining connections for at most %.0fs",
                 "seen through" if seen else "not confirmed", bgp.drain_seconds)
        deadline = time.monotonic() + bgp.drain_seconds
        while time.monotonic() < deadline:
            try:
                if not haproxy.running() or frontend_sessions(haproxy) == 0:
                    return
            except (OSError, RuntimeError):
                return
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        return self.announcer.status()
