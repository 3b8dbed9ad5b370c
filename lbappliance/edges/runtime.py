"""Server membership through HAProxy's runtime API: adds, address moves and drained removals.

A removed server is drained and put in maintenance, and deleted on a later apply once its
connections are gone; until then it is "pending". A reload starts from the file, so it clears them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lbappliance.core.changes import Change
from lbappliance.core.health import is_monitor_name

from .haproxy import HAProxy, HaproxyError


@dataclass
class ServerChanges:
    """The servers awaiting deletion, and the runtime operations that add, move and drain.

    A removed server's sessions go on until they end, or `drain_timeout` seconds after its removal.
    """

    pending: set[tuple[str, str]] = field(default_factory=set)
    drain_timeout: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _since: dict[tuple[str, str], float] = field(default_factory=dict)

    def apply(self, haproxy: HAProxy, change: Change, extra_options: str) -> None:
        """Adds first, then address changes, then removals, so a backend never empties in passing."""
        for op in change.adds:
            if (op.backend, op.name) in self.pending:
                address, _, port = op.target.rpartition(":")
                haproxy.readd_server(op.backend, op.name, address.strip("[]"), int(port))
                self.pending.discard((op.backend, op.name))
            else:
                _add_server(haproxy, op.backend, op.name, op.target, f"{op.options} {extra_options}")
        for move in change.readdresses:
            haproxy.set_address(move.backend, move.name, move.address, move.port)
        for reweight in change.reweights:
            haproxy.set_weight(reweight.backend, reweight.name, reweight.weight)
        for rm in change.removes:
            self.pending.add((rm.backend, rm.name))
            self._since.setdefault((rm.backend, rm.name), self.clock())
        self.retry(haproxy)

    def retry(self, haproxy: HAProxy) -> None:
        """Delete servers left in maintenance by an earlier pass once their connections are gone.

        A node's monitor server waits for the node's Service servers: putting it in maintenance
        would put its trackers there too, and cut the sessions they are still draining.
        """
        self._since = {k: v for k, v in self._since.items() if k in self.pending}
        if not self.pending or not haproxy.running():
            return
        now = self.clock()
        for backend, name in sorted(self.pending):
            if is_monitor_name(backend) and any(n == name and not is_monitor_name(b) for b, n in self.pending):
                continue
            if now - self._since.get((backend, name), now) >= self.drain_timeout:
                haproxy.shutdown_sessions(backend, name)
            if haproxy.remove_server(backend, name):
                self.pending.discard((backend, name))


def _add_server(haproxy: HAProxy, backend: str, name: str, target: str, options: str) -> None:
    try:
        haproxy.add_server(backend, name, target, options)
    except HaproxyError as exc:
        if "already exists" not in str(exc).lower():
            raise
        # A monitor server parked in maintenance by an earlier removal (see remove_server).
        address, _, port = target.rpartition(":")
        haproxy.readd_server(backend, name, address.strip("[]"), int(port))
