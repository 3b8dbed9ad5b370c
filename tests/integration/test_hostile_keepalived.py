"""Root keepalived and the daemon's user (issue 14, item 3), with the real keepalived.

The daemon's user owns the state dir and writes keepalived.conf; keepalived runs as root. On the
code before the fix keepalived ran the rendered scripts as root (`script_user root`) and the
notify hook wrote `vrrp-*.state.tmp` through whatever that user had planted there. Here, in a
network namespace of our own (documentation addresses on a veth pair inside it, nothing on the
host's network), keepalived runs the config rendered for the shipped units (processMode
external) after root's admission check, with a private /etc/passwd that has the `lbappliance`
user (uid 64123) so the host's users are not touched:

* the check script cannot signal a root-owned "HAProxy" (the instance goes FAULT) and can signal
  one of the daemon's user (MASTER): it runs as that user, not root;
* the state file is written by uid 64123, and the links planted at the temp and final names
  leave their root-owned target untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbappliance.core.config import parse_config
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render_keepalived
from lbappliance.edges.keepalived import Keepalived, admit, read_vrrp_states
from tests.integration.conftest import skip_or_fail

pytestmark = pytest.mark.integration

UID = 64123  # the daemon's user in this test's private /etc/passwd
NETNS = f"lbhk-{os.getpid() % 100000}"


def _need_tools() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (network namespace, keepalived, a private mount namespace)")
    for tool in ("keepalived", "ip", "unshare", "setpriv"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            skip_or_fail(f"{tool} is not installed")


@pytest.fixture
def netns() -> Iterator[str]:
    _need_tools()
    subprocess.run(["ip", "netns", "add", NETNS], check=True, timeout=30)
    try:
        run = ["ip", "netns", "exec", NETNS]
        subprocess.run([*run, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True, timeout=30)
        for link in ("v0", "v1", "lo"):
            subprocess.run([*run, "ip", "link", "set", link, "up"], check=True, timeout=30)
        subprocess.run([*run, "ip", "addr", "add", "192.0.2.50/24", "dev", "v0"], check=True, timeout=30)
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], timeout=30, check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # pytest's tmp dirs are 0700 root; the daemon's user must reach its state dir.
    with tempfile.TemporaryDirectory(prefix="lbappliance-hostile-ka-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


def _private_users(workdir: Path) -> tuple[Path, Path]:
    passwd, group = workdir / "passwd", workdir / "group"
    passwd.write_text(Path("/etc/passwd").read_text()
                      + f"lbappliance:x:{UID}:{UID}:lbappliance:/nonexistent:/usr/sbin/nologin\n")
    group.write_text(Path("/etc/group").read_text() + f"lbappliance:x:{UID}:\n")
    return passwd, group


def _wait_state(state_dir: Path, want: str, timeout: float = 25.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = read_vrrp_states(str(state_dir))
        if states and all(s == want for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"VRRP states {states}, wanted all {want}")
        time.sleep(0.2)


def test_scripts_run_as_the_daemons_user_and_never_follow_planted_links(netns: str, workdir: Path) -> None:
    state = workdir / "run"
    state.mkdir(mode=0o750)
    os.chown(state, UID, UID)
    config = parse_config(
        "apiVersion: lbappliance.io/v1alpha1\nkind: ApplianceConfig\nprocessMode: external\n"
        f"paths: {{stateDir: {state}}}\n"
        "vrrp: {interface: v0, unicastSrcIp: 192.0.2.50, unicastPeers: [192.0.2.51], instances: 1, "
        "advertInterval: 0.2, processPriority: null}\n", "test")
    _, desired = desired_state(Snapshot((), (), (), config))
    rendered = render_keepalived(desired, config)
    assert "script_user lbappliance\n" in rendered and "script_user root" not in rendered
    daemon_written = workdir / "keepalived.conf"
    daemon_written.write_text(rendered)
    admitted = workdir / "admitted" / "keepalived.conf"
    admitted.parent.mkdir(mode=0o700)
    admit(str(daemon_written), str(admitted))

    # What the daemon's user could plant before keepalived's first notify: links at both names.
    victim = workdir / "victim"
    victim.write_text("root's file\n")
    instance = config.vrrp.instance_name("IPv4", 0)
    for name in (f"vrrp-{instance}.state.tmp", f"vrrp-{instance}.state"):
        (state / name).symlink_to(victim)
        os.lchown(state / name, UID, UID)

    # "HAProxy": first a root process, which the daemon's user may not signal.
    root_proc = subprocess.Popen(["sleep", "120"])
    user_proc = subprocess.Popen(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "sleep", "120"])
    pidfile = Path(config.paths.haproxy_pidfile)
    pidfile.write_text(f"{root_proc.pid}\n")
    os.chown(pidfile, UID, UID)

    passwd, group = _private_users(workdir)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount --bind {passwd} /etc/passwd && mount --bind {group} /etc/group && exec "$@"', "sh",
              "ip", "netns", "exec", netns]
    keepalived = Keepalived(str(admitted), str(state), config.paths.keepalived_pidfile,
                            shutil.which("keepalived") or "/usr/sbin/keepalived", prefix, str(workdir / "ka.log"))
    try:
        keepalived.start()
        # The check runs as uid 64123: kill -0 of a root process fails, so the instance is FAULT.
        _wait_state(state, "FAULT")
        pidfile.write_text(f"{user_proc.pid}\n")
        # ... and of the daemon's user's own process succeeds: MASTER (no peer answers).
        states = _wait_state(state, "MASTER")
    finally:
        keepalived.stop()
        for proc in (root_proc, user_proc):
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    log = (workdir / "ka.log").read_text(errors="replace")
    assert list(states) == [instance], log
    written = state / f"vrrp-{instance}.state"
    assert not written.is_symlink() and written.is_file()
    assert written.stat().st_uid == UID, "the notify hook ran as root"
    assert victim.read_text() == "root's file\n"
    assert victim.stat().st_uid == 0
    assert "refused" not in log, log
