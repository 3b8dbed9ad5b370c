"""keepalived as the data plane drives it: start, reload only on a new file, and in external mode
(systemd runs it as root) ask through the path unit instead of signalling it."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write
from .keepalived import Keepalived, KeepalivedError, read_vrrp_states

# External mode: how often to ask systemd again for a keepalived that is still not running.
KEEPALIVED_START_RETRY_SECONDS = 30.0


@dataclass
class VrrpControl:
    """The box's keepalived: `managed` means this daemon runs it as a child."""

    keepalived: Keepalived
    managed: bool
    _asked_at: float = field(default=float("-inf"), repr=False)

    def apply(self, file_new: bool) -> bool:
        """The swapped-in keepalived.conf takes effect; True when keepalived was (re)started or asked to."""
        if not self.managed:
            return self._request_external(file_new)
        if not self.keepalived.running():
            if Path(self.keepalived.config_path).exists():
                self.keepalived.start()
                return True
            return False
        if file_new:
            self.keepalived.reload()
            return True
        return False

    def stop(self) -> None:
        with contextlib.suppress(KeepalivedError, OSError):
            self.keepalived.stop()

    def follow(self, moved: Keepalived) -> None:
        """A reload gave keepalived a new state dir: it keeps running, and its pid files (written
        only at start) and the VRRP states its notify hook recorded (written only on a transition)
        move along; the next keepalived.conf points the hook at the new dir."""
        old, self.keepalived = self.keepalived, moved
        moved.proc = old.proc
        if old.state_dir == moved.state_dir:
            return
        for before, after in [(old.pidfile, moved.pidfile), (old.vrrp_pidfile, moved.vrrp_pidfile),
                              (old.checkers_pidfile, moved.checkers_pidfile)]:
            with contextlib.suppress(FileNotFoundError):
                shutil.move(before, after)
        for name, state in read_vrrp_states(old.state_dir).items():
            atomic_write(Path(moved.state_dir) / f"vrrp-{name}.state", state + "\n")

    def states(self) -> dict[str, str]:
        return read_vrrp_states(self.keepalived.state_dir)

    def _request_external(self, file_new: bool) -> bool:
        """systemd runs keepalived as root; the unprivileged daemon cannot signal it, so it asks
        through the path unit: on every new file, and (rate-limited) while keepalived is down."""
        if not Path(self.keepalived.config_path).exists():
            return False
        now = time.monotonic()
        if not file_new and (self.keepalived.running() or now - self._asked_at < KEEPALIVED_START_RETRY_SECONDS):
            return False
        self.keepalived.request_reload()
        self._asked_at = now
        return True
