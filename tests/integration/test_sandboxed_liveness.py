"""The daemon tells the data plane alive from inside its systemd sandbox.

lbappliance.service has `ProtectProc=invisible`: its /proc shows only processes its user may
ptrace. HAProxy runs as the same user but holds CAP_NET_BIND_SERVICE (haproxy.service's
AmbientCapabilities=), which makes it non-dumpable, and keepalived is root's: both are missing
from the daemon's /proc. A liveness check that reads only /proc called HAProxy "not running"
in the booted image and the daemon never applied a config (the image's slow tier caught it).

Here the sandbox is rebuilt from the kernel features systemd uses: a private mount namespace
with /proc mounted `hidepid=invisible`, entered by a forked child that then drops to the
daemon's uid. A real HAProxy runs as that uid with the ambient capability, as the drop-in
starts it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbappliance.edges.haproxy import HAProxy
from lbappliance.edges.processes import alive, stop_child
from lbappliance.testing.controlplane import free_port

from .conftest import skip_or_fail

DAEMON_UID = 64321  # stands in for the lbappliance user; any uid other than root's will do
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "lbappliance.service"
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


@pytest.fixture(scope="module")
def sandbox_available() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root: mount namespaces and a process of another uid")
    for tool in ("haproxy", "setpriv"):
        if shutil.which(tool) is None:
            skip_or_fail(f"needs {tool}")


def seen_from_sandbox(check: Callable[[], bool]) -> tuple[bool, bool]:
    """Run `check` as DAEMON_UID under a hidepid=invisible /proc; (its answer, whether it ran)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if (libc.unshare(CLONE_NEWNS) == 0
                    and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0
                    and libc.mount(b"proc", b"/proc", b"proc", 0, b"hidepid=invisible") == 0):
                os.setgroups([])
                os.setresgid(DAEMON_UID, DAEMON_UID, DAEMON_UID)
                os.setresuid(DAEMON_UID, DAEMON_UID, DAEMON_UID)
                os.write(write_end, b"1" if check() else b"0")
                code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.close(read_end)
    _, status = os.waitpid(child, 0)
    return answer == b"1", os.WEXITSTATUS(status) == 0


def hidden_in_sandbox(pid: int) -> bool:
    answer, ran = seen_from_sandbox(lambda: not Path(f"/proc/{pid}").exists())
    assert ran, "could not enter the sandbox (unshare/mount/setresuid)"
    return answer


@pytest.fixture
def haproxy_as_daemon_user(sandbox_available: None) -> Iterator[HAProxy]:
    """A real HAProxy master as DAEMON_UID with CAP_NET_BIND_SERVICE ambient, like haproxy.service."""
    state = Path(tempfile.mkdtemp(prefix="lbt-sandbox-"))
    os.chown(state, DAEMON_UID, DAEMON_UID)
    state.chmod(0o755)
    config = state / "haproxy.cfg"
    config.write_text(
        "global\n    master-worker\n    maxconn 100\n"
        f"    pidfile {state}/haproxy.pid\n"
        f"    stats socket {state}/haproxy.sock mode 600 level admin\n"
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n"
        f"frontend fe\n    bind 127.0.0.1:{free_port()}\n"
    )
    haproxy = HAProxy(
        str(config), f"{state}/haproxy-master.sock", f"{state}/haproxy.sock", f"{state}/haproxy.pid",
        argv_prefix=["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups",
                     "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"],
        log_path=str(state / "haproxy.log"),
    )
    haproxy.start()
    try:
        yield haproxy
    finally:
        haproxy.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_the_daemon_unit_hides_other_processes() -> None:
    """What the tests below rebuild is what the unit asks for."""
    assert "\nProtectProc=invisible\n" in UNIT.read_text()


def test_haproxy_with_its_capability_is_running_as_seen_by_the_daemon(haproxy_as_daemon_user: HAProxy) -> None:
    haproxy = external_view(haproxy_as_daemon_user)
    pid = haproxy.master_pid()
    assert pid is not None
    assert hidden_in_sandbox(pid), "the sandbox should hide a capability-holding process"
    running, ran = seen_from_sandbox(haproxy.running)
    assert ran and running


def test_a_stopped_haproxy_is_not_running_as_seen_by_the_daemon(haproxy_as_daemon_user: HAProxy) -> None:
    haproxy = external_view(haproxy_as_daemon_user)
    pid = haproxy.master_pid()
    assert pid is not None
    haproxy_as_daemon_user.stop()
    running, ran = seen_from_sandbox(haproxy.running)
    assert ran and not running


def test_roots_process_is_alive_as_seen_by_the_daemon(sandbox_available: None) -> None:
    """keepalived is root's: the daemon may neither see it in /proc nor signal it, yet it exists."""
    root_process = subprocess.Popen(["sleep", "60"])
    try:
        assert hidden_in_sandbox(root_process.pid)
        answer, ran = seen_from_sandbox(lambda: alive(root_process.pid))
        assert ran and answer
    finally:
        stop_child(root_process, signal.SIGKILL, 5.0)
    answer, ran = seen_from_sandbox(lambda: alive(root_process.pid))
    assert ran and not answer


def external_view(haproxy: HAProxy) -> HAProxy:
    """The daemon in external mode knows HAProxy by its files only, not as its child."""
    return HAProxy(haproxy.config_path, haproxy.master_socket, haproxy.runtime_socket, haproxy.pidfile)
