"""`lbappliance run`: the wiring, and one level-triggered loop around the pass.

Signal handlers and watchers only set flags; the loop does all the work. Every pass recomputes
the whole desired state from the caches and applies the difference (`reconcile.py`), so nothing
depends on having seen a particular event. A SIGHUP fans the new config out to every subsystem
(`Daemon.reload_config`); a change that needs a restart is refused whole.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.config.config_exception import ConfigException

from ..core.config import ApplianceConfig
from ..core.ipam import orphaned_addresses
from ..core.models import Pool, Service
from ..core.reloading import changed_sections, restart_required
from ..edges import systemd
from ..edges.apply import DataPlane
from ..edges.cluster import Cluster, LeaderElector, api_client_from_kubeconfig
from ..edges.configfiles import EXIT_CONFIG, ConfigFileError, read_config, read_pools
from ..edges.logs import configure_logging
from ..edges.metrics import Metrics
from .publish import LeaderWrites
from .reconcile import Reconciler

log = logging.getLogger("lbappliance.daemon")
RESYNC = 5.0  # seconds between full passes when nothing changed
MAX_DEBOUNCE = 2.0  # seconds a pass may wait for a burst of events to settle
# watchdog event types that mean the pools file has new contents (not our own reads of it).
POOLS_CHANGED = frozenset({"modified", "created", "moved", "deleted", "closed"})


class StartupError(Exception):
    """Invalid configuration at start: exit 78 so systemd does not restart-loop."""


@dataclass
class Flags:
    """What signal handlers and watchers ask of the loop."""

    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload_config: bool = False
    reload_pools: bool = False

    def poke(self) -> None:
        self.wake.set()


class PoolsWatch:
    """Sets `flags.reload_pools` when the pools file gets new contents: writes, creates, moves
    onto it. Opens and reads (the daemon's own among them) are not changes."""

    def __init__(self, flags: Flags) -> None:
        self.flags = flags
        self.target: Path | None = None
        self._observer: Any = None

    def follow(self, path: str) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        target = Path(path).resolve()
        if target == self.target:
            return
        self.stop()
        flags = self.flags

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in POOLS_CHANGED:
                    return
                if str(target) in {str(event.src_path), str(getattr(event, "dest_path", "") or "")}:
                    flags.reload_pools = True
                    flags.poke()

        observer = Observer()
        observer.schedule(Handler(), str(target.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer, self.target = observer, target

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer, self.target = None, None


def _connect(config: ApplianceConfig, on_change: Any, identity: str) -> tuple[Cluster, LeaderElector]:
    """The API client, caches and elector for `config`; a kubeconfig that cannot be used raises
    ConfigFileError naming it."""
    try:
        api = api_client_from_kubeconfig(config.cluster.kubeconfig)
    except (ConfigException, OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as exc:
        where = config.cluster.kubeconfig or "in-cluster config"
        raise ConfigFileError(f"{where}: cannot be used to reach the API server: {exc}") from None
    le = config.leader_election
    elector = LeaderElector(api, le.namespace, le.lease_name, identity, le.lease_duration, le.renew_deadline)
    return Cluster(api, on_change, identity), elector


class Daemon:
    """Wiring: the config, the pools, the subsystems; `run` is the loop."""

    def __init__(self, config_path: Path, identity: str | None = None, netns: str | None = None,
                 debounce: float = 0.05) -> None:
        self.config_path = config_path
        try:
            self.config = read_config(config_path)
            self.pools = read_pools(self.config)
        except ConfigFileError as exc:
            raise StartupError(str(exc)) from None
        self.identity = identity or self.config.name or socket.gethostname()
        self.debounce = debounce
        self.flags = Flags()
        self.metrics = Metrics()
        try:
            self.cluster, self.elector = _connect(self.config, self.flags.poke, self.identity)
        except ConfigFileError as exc:
            raise StartupError(str(exc)) from None
        self.dataplane = DataPlane(self.config, ["ip", "netns", "exec", netns] if netns else None)
        self.writes = LeaderWrites(self.cluster.publisher)
        self.reconciler = Reconciler(self.cluster, self.dataplane, self.writes, self.metrics, self.identity)
        self.pools_watch = PoolsWatch(self.flags)
        for name in ("config", "pools"):
            self.metrics.config_stale.labels(name).set(0)
        self.metrics.api_requests.set_function(lambda: self.cluster.requests)  # Events land between passes
        self.metrics.events_pending.set_function(self.writes.events.pending)
        self.metrics.events_dropped.set_function(lambda: self.writes.events.dropped)

    def install_signal_handlers(self) -> None:
        def on_term(_signum: int, _frame: Any) -> None:
            self.flags.stop = True
            self.flags.poke()

        def on_hup(_signum: int, _frame: Any) -> None:
            self.flags.reload_config = True
            self.flags.poke()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def _elect_forever(self) -> None:
        while not self.flags.stop:
            elector = self.elector  # a reload may replace it
            was = elector.is_leader
            now = elector.try_acquire_or_renew()
            self.metrics.leader.set(1 if now else 0)
            if now != was:
                self.flags.poke()
            time.sleep(self.config.leader_election.retry_period * (0.5 if now else 1.0))

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self.metrics.serve(self.config.metrics_address)
        self.pools_watch.follow(self.config.paths.pools)
        self.cluster.start()
        threading.Thread(target=self._elect_forever, name="leader-election", daemon=True).start()
        if not self.cluster.wait_synced(timeout=60):
            log.warning("caches not synced after 60s; serving what is known (API unreachable?)")
        self.dataplane.start()
        watchdog = systemd.watchdog_interval()
        pacer = self.reconciler.pacer
        last_full = 0.0
        while not self.flags.stop:
            # Between passes, follow health checks (UDP maps) at the check interval; a full pass
            # on every change and at least every RESYNC seconds (level-triggered).
            period = pacer.sleep_bound(min(self.config.health_check.interval_ms / 1000, watchdog or RESYNC))
            woke = self.flags.wake.wait(timeout=period)
            self.flags.wake.clear()
            if woke:
                self._debounce()
            if self.flags.stop:
                break
            self._handle_reloads()
            if woke or (pacer.deferred and pacer.due()) or time.monotonic() - last_full >= RESYNC:
                self._pass(self.elector.is_leader)
                last_full = time.monotonic()
            else:
                self.dataplane.sync_health()
            systemd.notify("WATCHDOG=1")
        self._shutdown()
        return 0

    def _pass(self, leader: bool) -> None:
        was_ready = self.reconciler.served_once
        self.dataplane.pools = self.pools  # announce.mode bgp: each pool's communities / local-pref
        verdict = self.reconciler.run_pass(self.config, self.pools, leader)
        level = logging.INFO if verdict.wrote or verdict.released or verdict.refused or verdict.failed or (
            verdict.apply not in (None, "noop")) else logging.DEBUG
        log.log(level, "pass: %s", verdict)
        if self.reconciler.served_once and not was_ready:
            systemd.notify("READY=1")

    def _shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping: releasing leadership; the data plane keeps serving until the peer takes over")
        self.elector.release()
        self.cluster.stop()
        self.writes.close(timeout=1.0)
        self.dataplane.stop()
        self.pools_watch.stop()
        self.metrics.close()

    def _debounce(self) -> None:
        """Let a burst of events settle, but never delay a pass by more than MAX_DEBOUNCE.

        A lone change waits only `debounce`; during a burst (a thousand Services at once) each
        pass then takes in many changes, so both boxes validate and reload far less often and
        leave the CPU to the API server."""
        deadline = time.monotonic() + MAX_DEBOUNCE
        while time.monotonic() < deadline and self.flags.wake.wait(self.debounce):
            self.flags.wake.clear()

    def _handle_reloads(self) -> None:
        if self.flags.reload_config:
            self.flags.reload_config = False
            systemd.notify("RELOADING=1")
            self.reload_config()
            systemd.notify("READY=1")
        if self.flags.reload_pools:
            self.flags.reload_pools = False
            self.reload_pools(self.config)

    # ---- reloads --------------------------------------------------------------------------------

    def reload_config(self) -> bool:
        """Read config.yaml again and fan it out: data plane, elector, cluster access, metrics,
        pools watch, logging; the next pass renders with it. All or nothing: a file that does not
        parse, pools it makes invalid, or a field that needs a restart keep the running config."""
        try:
            config = read_config(self.config_path)
        except ConfigFileError as exc:
            return self._refuse_config(f"config reload refused, keeping the running config:\n{exc}")
        restart = restart_required(self.config, config)
        if restart:
            return self._refuse_config(f"config reload refused: {', '.join(restart)} changed, which needs a "
                                       "restart (systemctl restart lbappliance); keeping the running config")
        pools = self._checked_pools(config)
        if pools is None:
            return self._refuse_config("config reload refused: its pools are not usable (see above)")
        if config.cluster.kubeconfig != self.config.cluster.kubeconfig:
            try:
                cluster, elector = _connect(config, self.flags.poke, self.identity)
            except ConfigFileError as exc:
                return self._refuse_config(f"config reload refused: {exc}")
            self._switch_cluster(cluster, elector)
        old, self.config, self.pools = self.config, config, pools
        le = config.leader_election
        self.elector.reload(le.namespace, le.lease_name, le.lease_duration, le.renew_deadline)
        self.dataplane.reload(config)
        self.metrics.config_stale.labels("config").set(0)
        try:
            self.metrics.serve(config.metrics_address)
        except OSError as exc:
            log.error("metrics stay on %s: cannot listen on %s: %s", self.metrics.address, config.metrics_address, exc)
        self.pools_watch.follow(config.paths.pools)
        if config.log_format != old.log_format:
            configure_logging(config.log_format, logging.getLogger().level)
        log.info("config reloaded from %s (changed: %s)", self.config_path,
                 ", ".join(changed_sections(old, config)) or "nothing")
        self.flags.poke()
        return True

    def _refuse_config(self, message: str) -> bool:
        log.error("%s", message)
        self.metrics.config_stale.labels("config").set(1)
        return False

    def _switch_cluster(self, cluster: Cluster, elector: LeaderElector) -> None:
        """A new kubeconfig: new caches (they list afresh) and writer; the old lease is released."""
        self.elector.release()
        self.cluster.stop()
        self.cluster, self.elector = cluster, elector
        self.writes.writer = cluster.publisher
        self.reconciler.cluster = cluster
        cluster.start()
        if not cluster.wait_synced(timeout=30):
            log.warning("caches on the new kubeconfig not synced after 30s; serving what is known")

    def _checked_pools(self, config: ApplianceConfig) -> tuple[Pool, ...] | None:
        pools = checked_pools(config, self.pools, self.cluster.services().items)
        self.metrics.config_stale.labels("pools").set(0 if pools is not None else 1)
        return pools

    def reload_pools(self, config: ApplianceConfig) -> bool:
        pools = self._checked_pools(config)
        if pools is None:
            return False
        if pools != self.pools:
            log.info("pools reloaded from %s (%d pools)", config.paths.pools, len(pools))
        self.pools = pools
        return True


def checked_pools(config: ApplianceConfig, running: tuple[Pool, ...],
                  services: Iterable[Service]) -> tuple[Pool, ...] | None:
    """The pools `config` names, or None (logged) when unusable or when they would drop
    addresses in use."""
    try:
        pools = read_pools(config)
    except ConfigFileError as exc:
        log.error("pools reload refused, keeping the last good pools:\n%s", exc)
        return None
    orphans = orphaned_addresses(running, pools, services)
    if orphans:
        log.error("pools reload refused: %s would drop addresses in use: %s; release them first "
                  "(delete the Services or move them with lbappliance.io/load-balancer-ips)",
                  config.paths.pools, ", ".join(orphans))
        return None
    return pools


def main(config_path: Path, identity: str | None = None, netns: str | None = None) -> int:
    try:
        daemon = Daemon(config_path, identity, netns)
    except StartupError as exc:
        log.error("invalid configuration, not starting:\n%s", exc)
        return EXIT_CONFIG
    daemon.install_signal_handlers()
    log.info("lbappliance %s starting (pid %d)", daemon.identity, os.getpid())
    return daemon.run()
