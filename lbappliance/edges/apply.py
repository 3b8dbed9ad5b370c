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
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lbappliance.core.changes import Change, classify
from lbappliance.core.config import ApplianceConfig
from lbappliance.core.health import is_monitor_name
from lbappliance.core.models import DesiredState, UdpForward
from lbappliance.core.nft import Health, map_members, render_nft
from lbappliance.core.render import RenderedConfigs, render, server_defaults, services_on_lines

from .files import atomic_write
from .haproxy import HAProxy, HaproxyError
from .keepalived import Keepalived, KeepalivedError, read_vrrp_states
from .nft import Nftables, NftError
from .validate import Verdict, check_haproxy, check_keepalived, cited_lines

log = logging.getLogger(__name__)
# External mode: how often to ask systemd again for a keepalived that is still not running.
KEEPALIVED_START_RETRY_SECONDS = 30.0

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
    _pending: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _udp: tuple[UdpForward, ...] = field(default=(), repr=False)
    _udp_health: Health | None = field(default=None, repr=False)
    _nft_text: str | None = field(default=None, repr=False)
    _keepalived_asked_at: float = field(default=float("-inf"), repr=False)
    # A reload moved HAProxy's paths: the next apply starts a master on the new ones, which takes
    # over this one's sockets; masters handed over finish their connections and are reaped here.
    _moved_from: HAProxy | None = field(default=None, repr=False)
    _retired: list[HAProxy] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.haproxy, self.keepalived, self.nft = self._handles(self.config)

    def _handles(self, config: ApplianceConfig) -> tuple[HAProxy, Keepalived, Nftables]:
        paths = config.paths
        Path(paths.state_dir).mkdir(parents=True, exist_ok=True)
        prefix = list(self.netns_prefix or [])
        return (HAProxy(paths.haproxy_config, paths.master_socket, paths.runtime_socket,
                        paths.haproxy_pidfile, paths.haproxy_binary, prefix, f"{paths.state_dir}/haproxy.log"),
                Keepalived(paths.keepalived_config, paths.state_dir, paths.keepalived_pidfile,
                           paths.keepalived_binary, prefix, f"{paths.state_dir}/keepalived.log"),
                Nftables(paths.state_dir, paths.nft_binary, prefix))

    def reload(self, config: ApplianceConfig) -> None:
        """Follow a new config: the handles on its paths, binaries and sockets, and the processes
        with them. Fields that need a restart were refused before (`core/reloading.py`).

        HAProxy on new paths is handed over to a new master at the next apply (it needs the new
        file). keepalived keeps running: its pid files move to the new state dir (it writes them
        only at start), and so do the VRRP states the notify hook recorded (they change only on a
        transition); the next apply's keepalived.conf points the hook at the new dir.
        """
        old_haproxy, old_keepalived = self.haproxy, self.keepalived
        self.config = config
        self.haproxy, self.keepalived, self.nft = self._handles(config)
        self.haproxy.proc = None
        if (old_haproxy.argv(), old_haproxy.pidfile) != (self.haproxy.argv(), self.haproxy.pidfile):
            if self.managed and old_haproxy.running():
                self._moved_from = old_haproxy
        else:
            self.haproxy.proc = old_haproxy.proc
        self.keepalived.proc = old_keepalived.proc
        if old_keepalived.state_dir != self.keepalived.state_dir:
            move_keepalived_state(old_keepalived, self.keepalived)

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
        if not self.managed:
            return
        with contextlib.suppress(KeepalivedError, OSError):
            self.keepalived.stop()
        with contextlib.suppress(HaproxyError, OSError):
            self.haproxy.stop()
        for retired in self._retired:
            with contextlib.suppress(HaproxyError, OSError):
                retired.stop()
        self._retired.clear()
        if self._nft_text is not None and self._udp:
            with contextlib.suppress(NftError, OSError):
                self.nft.remove()  # HAProxy is gone too: this box forwards nothing any more
            self._nft_text = None

    # ---- the pass

    def apply(self, state: DesiredState, rendered: RenderedConfigs | None = None) -> ApplyResult:
        """Make the data plane serve `state`; never reloads on a config that failed validation."""
        start = time.monotonic()
        rendered = rendered or render(state, self.config)
        paths = self.config.paths
        hap_new = _differs(paths.haproxy_config, rendered.haproxy)
        ka_new = _differs(paths.keepalived_config, rendered.keepalived)
        refusal = self._validate(rendered, hap_new, ka_new)
        # One `show stat` and one ruleset text per apply: checked now, loaded after HAProxy.
        nft_text = render_nft(state.udp, self._read_udp_health(state.udp))
        rejected = refusal[0] if refusal else self._validate_nft(state.udp, nft_text)
        if rejected is not None:
            self.counts["rejected"] += 1
            return ApplyResult("rejected", message=rejected, seconds=time.monotonic() - start,
                               refused_services=refusal[1] if refusal else frozenset())
        change = self._classify(state, hap_new)
        try:
            kind, message = self._apply_haproxy(change, hap_new)
            ka_reloaded = self._apply_keepalived(ka_new)
            self._udp = state.udp
            self._load_nft(nft_text)
        except (HaproxyError, KeepalivedError, NftError, OSError) as exc:
            self.counts["failed"] += 1
            log.error("apply failed: %s", exc)
            return ApplyResult("failed", change, message=str(exc), seconds=time.monotonic() - start)
        self._last = state
        self.counts[kind] += 1
        if ka_reloaded:
            self.counts["keepalived_reload"] += 1
        return ApplyResult(kind, change, ka_reloaded, message, time.monotonic() - start,
                           tuple(sorted(self._pending)))

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

    def _validate(self, rendered: RenderedConfigs, hap_new: bool,
                  ka_new: bool) -> tuple[str, frozenset[str]] | None:
        """Write and check candidates; a rejected one is kept as `<file>.rejected`. None when all
        pass, else the complaint and the Services it points at (see `services_on_lines`)."""
        paths = self.config.paths
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

    def _validate_nft(self, forwards: tuple[UdpForward, ...], text: str) -> str | None:
        """`nft -c` on the UDP ruleset (inside the box's namespace: the check talks to its kernel)."""
        if not forwards:
            return None
        verdict = self.nft.check(text)
        if verdict.ok:
            return None
        log.error("rejected nftables ruleset: %s", verdict.output)
        return f"{self.nft.ruleset_path}: {verdict.output}"

    # ---- UDP forwards (nftables) and their health

    def sync_health(self) -> bool:
        """Bring the UDP forwarding maps in line with HAProxy's latest health-check results.

        The daemon calls this between passes, about once per health-check interval. Cheap: with
        no UDP forwards it does nothing; otherwise one `show stat` on the runtime socket, and
        `nft -f` only when the set of UP nodes of some forward changed. Returns True when the
        ruleset was reloaded. Never raises: a refused ruleset is logged and counted
        (`counts["nft_failed"]`), and the previous one stays live.
        """
        if not self._udp and self._nft_text is None:
            return False
        try:
            return self._sync_nft()
        except (NftError, OSError) as exc:
            self.counts["nft_failed"] += 1
            log.error("UDP forwarding update failed; the previous ruleset stays live: %s", exc)
            return False

    def _read_udp_health(self, forwards: tuple[UdpForward, ...]) -> Health | None:
        """backend -> UP servers, for the check-only backends of `forwards`.

        A backend HAProxy does not report yet (a reload in flight) is left out, which counts all
        its nodes as up, as HAProxy itself does before the first check; when the runtime API does
        not answer, the last known health stands.
        """
        if not forwards:
            return {}
        try:
            states = self.haproxy.server_states()
        except (HaproxyError, OSError):
            return self._udp_health
        wanted = {u.backend.name for u in forwards}
        known = {backend for backend, _ in states} & wanted
        health = {backend: frozenset(server for (b, server), st in states.items() if b == backend and st == "UP")
                  for backend in known}
        self._udp_health = health
        return health

    def _sync_nft(self) -> bool:
        return self._load_nft(render_nft(self._udp, self._read_udp_health(self._udp)))

    def _load_nft(self, text: str) -> bool:
        """Load the ruleset `text` unless it is what runs; True when it was loaded."""
        if text == self._nft_text:
            return False
        if not self._udp and not self.nft.available():
            self._nft_text = text  # nothing to forward and no nft here: nothing to clean up either
            return False
        self.nft.load(text)
        self._nft_text = text
        self.counts["nft_load"] += 1
        return True

    def udp_map(self) -> dict[str, tuple[str, ...]]:
        """forward name -> node names new flows go to, as last loaded into nftables."""
        return map_members(self._udp, self._udp_health)

    def _apply_haproxy(self, change: Change, file_new: bool) -> tuple[ApplyKind, str]:
        live = self.config.paths.haproxy_config
        self._reap_retired()
        if self._moved_from is not None:
            old, self._moved_from = self._moved_from, None
            if old.running():
                self._swap(live)
                self.haproxy.start(take_over=old)
                self._retired.append(old)
                self._pending.clear()  # the new master starts from the file
                return "reload", "handed over to a master on the new paths"
        if change.kind == "runtime" and self.haproxy.running():
            self._swap(live)  # the file matches what the runtime ops produce, so a restart agrees
            try:
                self._runtime(change)
                return "runtime", f"{change.runtime_ops} runtime operation(s)"
            except HaproxyError as exc:
                log.warning("runtime update failed (%s); reloading instead", exc)
                change = Change("reload", reasons=(f"runtime update failed: {exc}",))
        self._retry_pending()
        if change.kind == "noop" and not file_new:
            return "noop", ""
        if file_new:
            self._swap(live)
        if not self.haproxy.running():
            if not self.managed:
                raise HaproxyError("haproxy is not running (external mode); cannot reload")
            self.haproxy.start()
            return "reload", "started haproxy"
        result = self.haproxy.reload()
        self._pending.clear()  # a reload starts from the file: servers awaiting deletion are gone
        if not result.ok:
            raise HaproxyError(result.message)
        return "reload", f"reloaded in {result.seconds:.3f}s"

    def _runtime(self, change: Change) -> None:
        """Adds first, then address changes, then removals, so a backend never empties in passing."""
        extra = self._dynamic_server_defaults()
        for op in change.adds:
            if (op.backend, op.name) in self._pending:
                address, _, port = op.target.rpartition(":")
                self.haproxy.readd_server(op.backend, op.name, address.strip("[]"), int(port))
                self._pending.discard((op.backend, op.name))
            else:
                self._add_server(op.backend, op.name, op.target, f"{op.options} {extra}")
        for move in change.readdresses:
            self.haproxy.set_address(move.backend, move.name, move.address, move.port)
        for rm in change.removes:
            self._pending.add((rm.backend, rm.name))
        self._retry_pending()

    def _add_server(self, backend: str, name: str, target: str, options: str) -> None:
        try:
            self.haproxy.add_server(backend, name, target, options)
        except HaproxyError as exc:
            if "already exists" not in str(exc).lower():
                raise
            # A monitor server parked in maintenance by an earlier removal (see remove_server).
            address, _, port = target.rpartition(":")
            self.haproxy.readd_server(backend, name, address.strip("[]"), int(port))

    def _retry_pending(self) -> None:
        """Delete servers left in maintenance by an earlier pass once their connections are gone.

        A node's monitor server waits for the node's Service servers: putting it in maintenance
        would put its trackers there too, and cut the sessions they are still draining.
        """
        if not self._pending or not self.haproxy.running():
            return
        for backend, name in sorted(self._pending):
            if is_monitor_name(backend) and any(n == name and not is_monitor_name(b) for b, n in self._pending):
                continue
            if self.haproxy.remove_server(backend, name):
                self._pending.discard((backend, name))

    def _dynamic_server_defaults(self) -> str:
        return server_defaults(self.config.health_check)

    def _apply_keepalived(self, file_new: bool) -> bool:
        live = self.config.paths.keepalived_config
        if file_new:
            self._swap(live)
        if not self.managed:
            return self._request_external_keepalived(file_new)
        if not self.keepalived.running():
            if self.managed and Path(live).exists():
                self.keepalived.start()
                return True
            return False
        if file_new:
            self.keepalived.reload()
            return True
        return False

    def _request_external_keepalived(self, file_new: bool) -> bool:
        """systemd runs keepalived as root; the unprivileged daemon cannot signal it, so it asks
        through the path unit: on every new file, and (rate-limited) while keepalived is down."""
        if not Path(self.config.paths.keepalived_config).exists():
            return False
        now = time.monotonic()
        if not file_new and (self.keepalived.running()
                             or now - self._keepalived_asked_at < KEEPALIVED_START_RETRY_SECONDS):
            return False
        self.keepalived.request_reload()
        self._keepalived_asked_at = now
        return True

    @staticmethod
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

    def _reap_retired(self) -> None:
        """Masters handed over exit once their last connection is done; collect them."""
        self._retired = [h for h in self._retired if h.proc is not None and h.proc.poll() is None]

    # ---- views

    def vrrp_states(self) -> dict[str, str]:
        return read_vrrp_states(self.config.paths.state_dir)

    def server_health(self) -> dict[tuple[str, str], str]:
        return self.haproxy.server_states()

    def old_workers(self) -> list[tuple[int, int]]:
        return self.haproxy.old_workers()

    @property
    def pending_deletes(self) -> frozenset[tuple[str, str]]:
        return frozenset(self._pending)


def move_keepalived_state(old: Keepalived, new: Keepalived) -> None:
    """A running keepalived's pid files and recorded VRRP states, into the new state dir."""
    for before, after in [(old.pidfile, new.pidfile), (old.vrrp_pidfile, new.vrrp_pidfile),
                          (old.checkers_pidfile, new.checkers_pidfile)]:
        with contextlib.suppress(FileNotFoundError):
            shutil.move(before, after)
    for name, state in read_vrrp_states(old.state_dir).items():
        atomic_write(Path(new.state_dir) / f"vrrp-{name}.state", state + "\n")


def _differs(path: str, text: str) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") != text
    except FileNotFoundError:
        return True


def _valid(path: str, check: Callable[[Path, str], Verdict], binary: str) -> bool:
    return Path(path).exists() and check(Path(path), binary).ok
