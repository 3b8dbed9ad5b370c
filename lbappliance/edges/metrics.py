"""Prometheus metrics of one daemon, in its own registry (tests run several daemons)."""

from __future__ import annotations

from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..core.models import Allocation, Pool


class Metrics:
    def __init__(self) -> None:
        self.address: str | None = None
        self._server: WSGIServer | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconcile_seconds = Histogram("lbappliance_reconcile_duration_seconds", "One reconcile pass",
                                           registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.reconciles = Counter("lbappliance_reconcile_total", "Reconcile passes", registry=r)
        self.errors = Counter("lbappliance_reconcile_errors_total", "Passes that raised", registry=r)
        self.problems = Gauge("lbappliance_service_problems", "Services with a problem in the last pass",
                              ["reason"], registry=r)
        self.pool_total = Gauge("lbappliance_addresses_total", "Addresses in a pool", ["pool"], registry=r)
        self.pool_in_use = Gauge("lbappliance_addresses_in_use", "Addresses of a pool in use", ["pool"], registry=r)
        self.applies = Counter("lbappliance_applies_total", "Data plane applies by kind", ["kind"], registry=r)
        self.config_stale = Gauge("lbappliance_config_stale",
                                  "1 when running on the last good config because the newest is invalid",
                                  ["file"], registry=r)
        self.leader = Gauge("lbappliance_leader", "1 when this appliance holds the leader lease", registry=r)
        self.vrrp = Gauge("lbappliance_vrrp_master", "1 when this box is VRRP master for the instance",
                          ["vrrp_instance"], registry=r)  # not `instance`: Prometheus' target label
        self.bgp_sessions_up = Gauge("lbappliance_bgp_sessions_up",
                                     "BGP sessions Established (announce.mode bgp)", registry=r)
        self.bgp_routes_announced = Gauge("lbappliance_bgp_routes_announced",
                                          "VIPs this box announces over BGP (announce.mode bgp)", registry=r)
        self.old_workers = Gauge("lbappliance_haproxy_old_workers", "HAProxy workers left from reloads",
                                 registry=r)
        self.api_requests = Gauge("lbappliance_api_requests", "Kubernetes API requests made so far", registry=r)
        self.events_pending = Gauge("lbappliance_events_pending",
                                    "Events waiting for the leader's status writes to finish", registry=r)
        self.events_dropped = Gauge("lbappliance_events_dropped", "Events dropped because the queue was full",
                                    registry=r)

    def serve(self, address: str) -> None:
        """Serve /metrics on `address`; a new address moves the server (the old one stops)."""
        if address == self.address:
            return
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._server, self.address = server, address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server, self.address = None, None

    def record_pools(self, pools: tuple[Pool, ...], allocation: Allocation) -> None:
        in_use: dict[str, int] = {}
        for name in allocation.pool_of.values():
            in_use[name] = in_use.get(name, 0) + 1
        for pool in pools:
            self.pool_total.labels(pool.name).set(pool.size())
            self.pool_in_use.labels(pool.name).set(in_use.get(pool.name, 0))

    def record_bgp(self, status: Mapping[str, object]) -> None:
        """From edges/frr.BgpControl's last record: sessions Established, VIPs announced."""
        sessions = status.get("sessions")
        announced = status.get("announced")
        self.bgp_sessions_up.set(sum(1 for s in sessions.values() if s == "Established")
                                 if isinstance(sessions, dict) else 0)
        self.bgp_routes_announced.set(len(announced) if isinstance(announced, list) else 0)

    def record_vrrp(self, states: Mapping[str, str]) -> None:
        for instance, state in states.items():
            self.vrrp.labels(instance).set(1 if state == "MASTER" else 0)
