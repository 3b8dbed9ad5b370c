"""Processes we start: spawning them detached and logged, awaiting them, telling whether they live, stopping them.

One place for liveness and stopping, used by the HAProxy and keepalived edges and by the test
harnesses (control plane, network lab, appliance daemons, `lbappliance lab`): each stops only what
it started, by PID, and a PID is trusted only while it still names the process that was started
(its start time in /proc pins it across PID reuse).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def spawn_logged(argv: list[str], log_path: str | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Own session (no terminal signals), stdin closed, stdout and stderr appended to `log_path`."""
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    finally:
        log.close()


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float,
               errors: tuple[type[Exception], ...] = ()) -> str | None:
    """None once `ready()` holds; else why not (the process exited, or the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} at start"
        with contextlib.suppress(*errors):
            if ready():
                return None
        time.sleep(0.05)
    return f"not ready within {timeout}s"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie; another user's process counts (it exists).

    /proc tells zombies apart, but a sandbox may hide entries there: under systemd's
    ProtectProc=invisible the daemon cannot see HAProxy (it holds CAP_NET_BIND_SERVICE, so it is
    not dumpable) nor root's keepalived. Signal 0 still answers for those, and they are not our
    children, so they cannot be our zombies.
    """
    fields = _stat_fields(pid)
    if fields is not None:
        return fields[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists: another user's
    return True


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the PID it names one process across PID reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None else None


def command_line(pid: int) -> list[str] | None:
    """argv of a live process; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def signal_and_wait(pid: int, sig: int, timeout: float, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """Send `sig`, wait up to `timeout` for the process to go; True when it did.

    With `popen` (our child) it is reaped as it goes; otherwise a zombie counts as gone.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)

    def gone() -> bool:
        return popen.poll() is not None if popen is not None else not alive(pid)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return True
        time.sleep(0.02)
    return gone()


def kill_group(pgid: int) -> None:
    """SIGKILL what remains of a process group we created with start_new_session.

    Linux does not reuse a PID while it is still some group's id, so this only hits our children
    (HAProxy workers or keepalived's VRRP child outliving their parent, for example).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0, started: int | None = None) -> bool:
    """Stop one process by PID: `sig`, then SIGKILL if it lingers past `timeout`.

    With `started` (its start time when we started it) a PID that now names another process is left
    alone. False when there was nothing of ours to stop.
    """
    if not alive(pid) or (started is not None and start_time(pid) != started):
        return False
    if not signal_and_wait(pid, sig, timeout):
        signal_and_wait(pid, signal.SIGKILL, timeout)
    return True


def stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Signal a child we started in its own session; SIGKILL its whole group if it lingers or leaves
    helpers behind. Returns its exit status."""
    if proc.poll() is None and not signal_and_wait(proc.pid, sig, timeout, popen=proc):
        kill_group(proc.pid)
        signal_and_wait(proc.pid, signal.SIGKILL, timeout, popen=proc)
    kill_group(proc.pid)  # workers or VRRP children that outlived the parent
    return proc.poll()
