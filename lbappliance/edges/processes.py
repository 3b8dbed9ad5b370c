"""Starting the daemons we manage: detached, logged to a file, and awaited until they are ready."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable


def spawn_logged(argv: list[str], log_path: str | None) -> subprocess.Popen[bytes]:
    """Own session (no terminal signals), stdin closed, stdout and stderr appended to `log_path`."""
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
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


def stop_child(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Signal a child we started; SIGKILL its whole group if it lingers or leaves helpers behind."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers or VRRP children that outlived the parent
