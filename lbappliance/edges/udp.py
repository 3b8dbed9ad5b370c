"""UDP forwarding (HAProxy cannot proxy UDP): the nftables ruleset and the node health it follows.

Node health comes from HAProxy's checks of the check-only backends of the UDP forwards; the
ruleset is replaced as one `nft -f` transaction only when its text changes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lbappliance.core.models import UdpForward
from lbappliance.core.nft import Health, map_members, render_nft

from .haproxy import HaproxyError
from .nft import Nftables, NftError

log = logging.getLogger(__name__)
ServerStates = Callable[[], dict[tuple[str, str], str]]


@dataclass
class UdpForwarding:
    """The box's UDP forwards as last loaded, and the health they were loaded with."""

    nft: Nftables
    server_states: ServerStates  # HAProxy's (backend, server) -> UP/DOWN/...
    counts: Counter[str] = field(default_factory=Counter)
    forwards: tuple[UdpForward, ...] = ()
    _health: Health | None = field(default=None, repr=False)
    _loaded: str | None = field(default=None, repr=False)

    def ruleset(self, forwards: tuple[UdpForward, ...], states: Mapping[tuple[str, str], str] | None = None) -> str:
        """The ruleset text for `forwards` with HAProxy's health of now (`states`, else one `show stat`)."""
        return render_nft(forwards, self._read_health(forwards, states))

    def check(self, forwards: tuple[UdpForward, ...], text: str) -> str | None:
        """`nft -c` on `text` (inside the box's namespace: the check talks to its kernel); None if ok."""
        if not forwards:
            return None
        verdict = self.nft.check(text)
        if verdict.ok:
            return None
        log.error("rejected nftables ruleset: %s", verdict.output)
        return f"{self.nft.ruleset_path}: {verdict.output}"

    def load(self, forwards: tuple[UdpForward, ...], text: str) -> bool:
        """Make `text` (the ruleset of `forwards`) live unless it already is; True when loaded."""
        self.forwards = forwards
        if text == self._loaded:
            return False
        if not forwards and not self.nft.available():
            self._loaded = text  # nothing to forward and no nft here: nothing to clean up either
            return False
        self.nft.load(text)
        self._loaded = text
        self.counts["nft_load"] += 1
        return True

    def sync(self, states: Mapping[tuple[str, str], str] | None = None) -> bool:
        """Follow HAProxy's latest health-check results, between passes (about once per check
        interval). Cheap: nothing without UDP forwards, else one `show stat` and `nft -f` only when
        the set of UP nodes of some forward changed. Never raises: a refused ruleset is logged and
        counted (`nft_failed`), and the previous one stays live."""
        if not self.forwards and self._loaded is None:
            return False
        try:
            return self.load(self.forwards, self.ruleset(self.forwards, states))
        except (NftError, OSError) as exc:
            self.counts["nft_failed"] += 1
            log.error("UDP forwarding update failed; the previous ruleset stays live: %s", exc)
            return False

    def members(self) -> dict[str, tuple[str, ...]]:
        """forward name -> node names new flows go to, as last loaded into nftables."""
        return map_members(self.forwards, self._health)

    def remove(self) -> None:
        """Drop our table: HAProxy is gone too, so this box forwards nothing any more."""
        if self._loaded is not None and self.forwards:
            self.nft.remove()
        self._loaded = None

    def _read_health(self, forwards: tuple[UdpForward, ...],
                     states: Mapping[tuple[str, str], str] | None = None) -> Health | None:
        """backend -> UP servers, for the check-only backends of `forwards`.

        A backend HAProxy does not report yet (a reload in flight) is left out, which counts all
        its nodes as up, as HAProxy itself does before the first check; when the runtime API does
        not answer, the last known health stands.
        """
        if not forwards:
            return {}
        if states is None:
            try:
                states = self.server_states()
            except (HaproxyError, OSError):
                return self._health
        wanted = {u.backend.name for u in forwards}
        known = {backend for backend, _ in states} & wanted
        health = {backend: frozenset(server for (b, server), st in states.items() if b == backend and st == "UP")
                  for backend in known}
        self._health = health
        return health
