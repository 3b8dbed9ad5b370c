"""keepalived edge: start (managed mode), SIGHUP reload, stop, and the VRRP state the notify hook records.

Every pid file lives in the appliance's state dir, so two keepalived in different network
namespaces on one host (the lab) never see each other's pid files and refuse to start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .files import read_text
from .processes import spawn_logged, stop_child, wait_ready


class KeepalivedError(RuntimeError):
    """keepalived could not be started or signalled."""


_TRANSITION = re.compile(r"\(([^)]+)\) Entering (MASTER|BACKUP|FAULT) STATE")


@dataclass
class Keepalived:
    """One keepalived (VRRP subsystem only) with its pid files under `state_dir`."""

    config_path: str
    state_dir: str
    pidfile: str
    binary: str = "/usr/sbin/keepalived"
    argv_prefix: Sequence[str] = ()
    log_path: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def vrrp_pidfile(self) -> str:
        return f"{self.state_dir}/keepalived-vrrp.pid"

    @property
    def checkers_pidfile(self) -> str:
        return f"{self.state_dir}/keepalived-checkers.pid"

    def argv(self) -> list[str]:
        """Foreground (-n), VRRP only (-P), log to the console (our log file), not to syslog (-G)."""
        return [*self.argv_prefix, self.binary, "-n", "-P", "-l", "-D", "-G", "-f", self.config_path,
                "-p", self.pidfile, "-r", self.vrrp_pidfile, "-c", self.checkers_pidfile]

    def start(self, timeout: float = 10.0) -> None:
        if self.running():
            raise KeepalivedError(f"keepalived already running as pid {self.main_pid()}")
        for path in (self.pidfile, self.vrrp_pidfile, self.checkers_pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.proc = spawn_logged(self.argv(), self.log_path)
        problem = wait_ready(self.proc, lambda: bool(_read_pid(self.pidfile) and _read_pid(self.vrrp_pidfile)),
                             timeout)
        if problem is not None:
            raise KeepalivedError(f"keepalived {problem} (no pid files); see {self.log_path}")

    def main_pid(self) -> int | None:
        return _read_pid(self.pidfile)

    def vrrp_pid(self) -> int | None:
        return _read_pid(self.vrrp_pidfile)

    def running(self) -> bool:
        pid = self.main_pid()
        return pid is not None and _alive(pid) and not (self.proc is not None and self.proc.poll() is not None)

    def reload(self) -> None:
        """SIGHUP: keepalived re-reads its config; VRRP instances that did not change keep their state."""
        pid = self.main_pid()
        if pid is None or not _alive(pid):
            raise KeepalivedError("keepalived is not running; cannot reload")
        os.kill(pid, signal.SIGHUP)

    @property
    def reload_request_path(self) -> str:
        return f"{self.state_dir}/keepalived.reload"

    def request_reload(self) -> None:
        """External mode: keepalived is root's; ask lbappliance-keepalived-reload.path to
        reload-or-restart it. The file is the whole request; systemd consumes it."""
        fd = os.open(self.reload_request_path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: keepalived sends priority-0 adverts so the peer takes over at once (planned failover)."""
        if self.proc is not None:
            stop_child(self.proc, signal.SIGTERM, timeout)
            return
        pid = self.main_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL parent and VRRP child together: a hard failure, no goodbye advert."""
        for pid in (self.vrrp_pid(), self.main_pid()):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def transitions(self) -> list[tuple[str, str]]:
        """(instance, state) for every `Entering X STATE` line keepalived logged so far."""
        if not self.log_path:
            return []
        try:
            text = read_text(Path(self.log_path))
        except OSError:
            return []
        return _TRANSITION.findall(text)


def read_vrrp_states(state_dir: str) -> dict[str, str]:
    """instance -> MASTER/BACKUP/FAULT/STOP, as the notify hook last wrote it."""
    out: dict[str, str] = {}
    for path in sorted(Path(state_dir).glob("vrrp-*.state")):
        with contextlib.suppress(OSError):
            out[path.name[len("vrrp-"):-len(".state")]] = path.read_text().strip()
    return out


def _read_pid(path: str) -> int | None:
    try:
        return int(read_text(Path(path)).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a root keepalived seen from the unprivileged daemon: it exists
        return True
    return True
