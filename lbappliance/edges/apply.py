"""Apply a DesiredState to HAProxy and keepalived: validate first, change as little as possible.

One `DataPlane.apply` per reconcile pass: render, write candidates beside the live files,
validate them with the real binaries, and only then swap and act. Server membership and
addresses go through the runtime API (no reload); everything else through a seamless
master-worker reload; keepalived through SIGHUP and only when its file changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lbappliance.core.changes import Change, classify
from lbappliance.core.config import ApplianceConfig
from lbappliance.core.health import DrainState, is_monitor_name, sessions_to_cut, trackers
from lbappliance.core.models import DesiredState, Pool
from lbappliance.core.render import RenderedConfigs, render, server_defaults, services_on_lines

from .files import atomic_write
from .frr import BgpControl, FrrError
from .haproxy import HAProxy, HaproxyError
from .keepalived import Keepalived, KeepalivedError
from .nft import Nftables, NftError
from .runtime import ServerChanges
from .udp import UdpForwarding
from .validate import Verdict, check_haproxy, check_keepalived, cited_lines
from .vrrp import VrrpControl

log = logging.getLogger(__name__)

ApplyKind = Literal["noop", "runtime", "reload", "rejected", "failed"]


@dataclass(frozen=True)
class ApplyResult:
    kind: ApplyKind
    change: Change | None = None
    keepalived_reloaded: bool = False
    message: str = ""
    seconds: float = 0.0
    pending_deletes: tuple[tuple[str, str], ...] = ()
    # Rejected: the Services HAProxy's complaint points at, when it points at nothing else.
    refused_services: frozenset[str] = frozenset()


@dataclass
class DataPlane:
    """The daemon's handle on HAProxy and keepalived.

    `netns_prefix` (for example `["ip", "netns", "exec", "lbt-app1"]`) runs managed processes
    inside a namespace; validation always runs in the caller's namespace (it binds nothing).
    """

    config: ApplianceConfig
    netns_prefix: list[str] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    _last: DesiredState | None = field(default=None, repr=False)
    _servers: ServerChanges = field(default_factory=ServerChanges, repr=False)
    _trackers: Mapping[tuple[str, str], tuple[tuple[str, str], ...]] = field(default_factory=dict, repr=False)
    _drain: DrainState = field(default_factory=DrainState, repr=False)
    # A reload moved HAProxy's paths: the next apply starts a master on the new ones, which takes
    # over this one's sockets; masters handed over finish their connections and are reaped here.
    _moved_from: HAProxy | None = field(default=None, repr=False)
    _retired: list[HAProxy] = field(default_factory=list, repr=False)
    # announce.mode bgp: the pools (their communities / local-pref), set by the daemon before each pass.
    pools: tuple[Pool, ...] = ()

    def __post_init__(self) -> None:
        self.haproxy, keepalived, nft = self._handles(self.config)
        self.vrrp = VrrpControl(keepalived, self.managed)
        self.bgp = self._bgp_control(self.config)  # None in VRRP mode: keepalived carries the VIPs
        self.udp = UdpForwarding(nft, lambda: self.haproxy.server_states(), self.counts)

    def _bgp_control(self, config: ApplianceConfig) -> BgpControl | None:
        """announce.mode bgp: FRR announces the VIPs this box serves (edges/frr.py); no keepalived."""
        bgp = config.announce.bgp if config.announce.mode == "bgp" else None
        if bgp is None:
            return None
        control = BgpControl.for_config(config.name, bgp, self.netns_prefix, config.paths.state_dir, self.pools,
                                        manage_vips=config.process_mode == "managed")
        old = getattr(self, "bgp", None)
        if old is not None:
            control.announcer.last, control._state = old.announcer.last, old._state
        return control

    def _handles(self, config: ApplianceConfig) -> tuple[HAProxy, Keepalived, Nftables]:
        paths = config.paths
        Path(paths.state_dir).mkdir(parents=True, exist_ok=True)
        prefix = list(self.netns_prefix or [])
        return (HAProxy(paths.haproxy_config, paths.master_socket, paths.runtime_socket,
                        paths.haproxy_pidfile, paths.haproxy_binary, prefix, f"{paths.state_dir}/haproxy.log",
                        paths.haproxy_server_state),
                Keepalived(paths.keepalived_config, paths.state_dir, paths.keepalived_pidfile,
                           paths.keepalived_binary, prefix, f"{paths.state_dir}/keepalived.log"),
                Nftables(paths.state_dir, paths.nft_binary, prefix))

    def reload(self, config: ApplianceConfig) -> None:
        """Follow a new config: the handles on its paths, binaries and sockets, and the processes
        with them. Fields that need a restart were refused before (`core/reloading.py`).

        HAProxy on new paths is handed over to a new master at the next apply (it needs the new
        file); keepalived keeps running (`VrrpControl.follow`).
        """
        old_haproxy = self.haproxy
        self.config = config
        self.haproxy, keepalived, self.udp.nft = self._handles(config)
        self.haproxy.proc = None
        if (old_haproxy.argv(), old_haproxy.pidfile) != (self.haproxy.argv(), self.haproxy.pidfile):
            if self.managed and old_haproxy.running():
                self._moved_from = old_haproxy
        else:
            self.haproxy.proc = old_haproxy.proc
        self.vrrp.follow(keepalived)
        self.bgp = self._bgp_control(config)

    @property
    def keepalived(self) -> Keepalived:
        return self.vrrp.keepalived

    @property
    def managed(self) -> bool:
        return self.config.process_mode == "managed"

    # ---- lifecycle

    def start(self) -> None:
        """Managed mode: start both daemons from the live files if they validate, else on first apply."""
        if not self.managed:
            return
        paths = self.config.paths
        if not self.haproxy.running() and _valid(paths.haproxy_config, check_haproxy, paths.haproxy_binary):
            self.haproxy.start()
        if not self.keepalived.running() and _valid(paths.keepalived_config, check_keepalived,
                                                    paths.keepalived_binary):
            self.keepalived.start()

    def stop(self) -> None:
        """Managed mode: stop keepalived first (the peer takes the VIPs), then HAProxy."""
        if self.bgp is not None:  # withdraw, wait for the routers, drain; then HAProxy may stop
            with contextlib.suppress(FrrError, HaproxyError, OSError):
                self.bgp.stop(self.haproxy)
        if not self.managed:
            return
        self.vrrp.stop()
        with contextlib.suppress(HaproxyError, OSError):
            self.haproxy.stop()
        for retired in self._retired:
            with contextlib.suppress(HaproxyError, OSError):
                retired.stop()
        self._retired.clear()
        with contextlib.suppress(NftError, OSError):
            self.udp.remove()

    # ---- the pass

    def apply(self, state: DesiredState, rendered: RenderedConfigs | None = None) -> ApplyResult:
        """Make the data plane serve `state`; never reloads on a config that failed validation."""
        start = time.monotonic()
        rendered = rendered or render(state, self.config)
        paths = self.config.paths
        hap_new = _differs(paths.haproxy_config, rendered.haproxy)
        ka_new = self.bgp is None and _differs(paths.keepalived_config, rendered.keepalived)
        refusal = check_candidates(self.config, rendered, hap_new, ka_new)
        # One `show stat` and one ruleset text per apply: checked now, loaded after HAProxy.
        nft_text = self.udp.ruleset(state.udp)
        rejected = refusal[0] if refusal else self.udp.check(state.udp, nft_text)
        if rejected is not None:
            self.counts["rejected"] += 1
            return ApplyResult("rejected", message=rejected, seconds=time.monotonic() - start,
                               refused_services=refusal[1] if refusal else frozenset())
        change = self._classify(state, hap_new)
        self._servers.drain_timeout = self.config.health_check.drain_timeout_seconds
        try:
            if self.bgp is not None:
                self.bgp.announcer.pools = self.pools
                self.bgp.hold(state)
            kind, message = self._apply_haproxy(change, hap_new)
            if ka_new:
                _swap(paths.keepalived_config)
            ka_reloaded = self.vrrp.apply(ka_new) if self.bgp is None else False
            self.udp.load(state.udp, nft_text)
            if self.bgp is not None:
                self.bgp.apply(state, self.haproxy)
        except (HaproxyError, KeepalivedError, NftError, FrrError, OSError) as exc:
            self.counts["failed"] += 1
            log.error("apply failed: %s", exc)
            return ApplyResult("failed", change, message=str(exc), seconds=time.monotonic() - start)
        self._last = state
        self._trackers = trackers(state)
        self.counts[kind] += 1
        if ka_reloaded:
            self.counts["keepalived_reload"] += 1
        return ApplyResult(kind, change, ka_reloaded, message, time.monotonic() - start,
                           tuple(sorted(self._servers.pending)))

    def _classify(self, state: DesiredState, hap_file_differs: bool) -> Change:
        """Against the last applied state; after a daemon restart (no state), the file on disk decides."""
        if self._last is None:
            running = self.haproxy.running()
            if running and not hap_file_differs:
                return Change("noop", reasons=("running config matches the file on disk",))
            return Change("reload", keepalived_changed=True, reasons=("no previous state in this daemon",))
        change = classify(self._last, state)
        if change.kind == "noop" and hap_file_differs:
            return Change("reload", keepalived_changed=change.keepalived_changed,
                          reasons=("file on disk differs from the rendered config",))
        return change

    def sync_health(self) -> bool:
        """Between passes, from one `show stat`: the UDP forwarding maps follow HAProxy's health
        checks (`UdpForwarding.sync`), and the sessions of nodes that died, or whose drain timed
        out, are cut (`core/health.sessions_to_cut`). True when the UDP ruleset was reloaded."""
        if self.bgp is not None:  # HAProxy died, or a Service's last healthy server here: withdraw
            with contextlib.suppress(FrrError, OSError):
                self.bgp.tick(self.haproxy)
        try:
            checks = self.haproxy.server_checks()
        except (HaproxyError, OSError):
            return self.udp.sync()  # the last known health stands
        reloaded = self.udp.sync({key: status for key, (status, _check) in checks.items()})
        checking = {key: value for key, value in checks.items() if value[1] or is_monitor_name(key[0])}
        cuts, self._drain = sessions_to_cut(checking, self._trackers, self._drain, time.monotonic(),
                                            self.config.health_check.drain_timeout_seconds)
        for backend, server in cuts:
            log.info("%s/%s: its node stopped answering (or its drain timed out); ending its sessions",
                     backend, server)
            with contextlib.suppress(HaproxyError, OSError):
                self.haproxy.shutdown_sessions(backend, server)
        return reloaded

    def udp_map(self) -> dict[str, tuple[str, ...]]:
        return self.udp.members()

    def _apply_haproxy(self, change: Change, file_new: bool) -> tuple[ApplyKind, str]:
        live = self.config.paths.haproxy_config
        self._reap_retired()
        if self._moved_from is not None:
            old, self._moved_from = self._moved_from, None
            if old.running():
                _swap(live)
                self.haproxy.start(take_over=old)
                self._retired.append(old)
                self._servers.pending.clear()  # the new master starts from the file
                return "reload", "handed over to a master on the new paths"
        if change.kind == "runtime" and self.haproxy.running():
            _swap(live)  # the file matches what the runtime ops produce, so a restart agrees
            try:
                self._servers.apply(self.haproxy, change, server_defaults(self.config.health_check))
                return "runtime", f"{change.runtime_ops} runtime operation(s)"
            except HaproxyError as exc:
                log.warning("runtime update failed (%s); reloading instead", exc)
                change = Change("reload", reasons=(f"runtime update failed: {exc}",))
        self._servers.retry(self.haproxy)
        if change.kind == "noop" and not file_new:
            return "noop", ""
        if file_new:
            _swap(live)
        if not self.haproxy.running():
            if not self.managed:
                raise HaproxyError("haproxy is not running (external mode); cannot reload")
            self.haproxy.start()
            return "reload", "started haproxy"
        result = self.haproxy.reload()
        self._servers.pending.clear()  # a reload starts from the file: servers awaiting deletion are gone
        if not result.ok:
            raise HaproxyError(result.message)
        return "reload", f"reloaded in {result.seconds:.3f}s"

    def _reap_retired(self) -> None:
        """Masters handed over exit once their last connection is done; collect them."""
        self._retired = [h for h in self._retired if h.proc is not None and h.proc.poll() is None]

    # ---- views

    def vrrp_states(self) -> dict[str, str]:
        return self.vrrp.states()

    def server_health(self) -> dict[tuple[str, str], str]:
        return self.haproxy.server_states()

    def old_workers(self) -> list[tuple[int, int]]:
        return self.haproxy.old_workers()

    @property
    def pending_deletes(self) -> frozenset[tuple[str, str]]:
        return frozenset(self._servers.pending)


def check_candidates(config: ApplianceConfig, rendered: RenderedConfigs, hap_new: bool,
                     ka_new: bool) -> tuple[str, frozenset[str]] | None:
    """Write and check candidates beside the live files; a rejected one is kept as `<file>.rejected`.
    None when all pass, else the complaint and the Services it points at (see `services_on_lines`)."""
    paths = config.paths
    checks = [(hap_new, paths.haproxy_config, rendered.haproxy, check_haproxy, paths.haproxy_binary),
              (ka_new, paths.keepalived_config, rendered.keepalived, check_keepalived, paths.keepalived_binary)]
    for needed, live, text, check, binary in checks:
        if not needed:
            continue
        candidate = Path(f"{live}.candidate")
        atomic_write(candidate, text)
        verdict: Verdict = check(candidate, binary)
        if not verdict.ok:
            output = verdict.output
            os.replace(candidate, f"{live}.rejected")
            log.error("rejected %s: %s", live, output)
            blamed = frozenset[str]()
            if live == paths.haproxy_config:
                blamed = services_on_lines(text, cited_lines(output, candidate)) or frozenset()
            return f"{live}: {output}", blamed
    return None


def _swap(live: str) -> None:
    """The validated candidate replaces the live file in one rename."""
    candidate = f"{live}.candidate"
    if Path(candidate).exists():
        os.replace(candidate, live)
        dir_fd = os.open(Path(live).parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _differs(path: str, text: str) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") != text
    except FileNotFoundError:
        return True


def _valid(path: str, check: Callable[[Path, str], Verdict], binary: str) -> bool:
    return Path(path).exists() and check(Path(path), binary).ok
