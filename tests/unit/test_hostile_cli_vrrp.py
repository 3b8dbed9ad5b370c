"""What the daemon's user can make root keepalived do (issue 14, item 3), without processes.

The rendered scripts run as the daemon's user in external mode, and root loads only a
keepalived.conf that its admission check finds made of what the template renders; the notify
hook writes through no link; the reader tolerates whatever else lies in the state dir. The real
keepalived run is tests/integration/test_hostile_keepalived.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from lbappliance.core.config import parse_config
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import notify_script, render_keepalived
from lbappliance.edges.keepalived import KeepalivedConfigRefused, admit, admit_config, read_vrrp_states

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def rendered(mode: str = "external") -> str:
    config = parse_config(f"processMode: {mode}\nvrrp: {{unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3], "
                          "unicastSrcIp6: '2001:db8::2', unicastPeers6: ['2001:db8::3']}\n")
    _, state = desired_state(Snapshot((), (), (), config))
    return render_keepalived(state, config)


def test_external_mode_scripts_run_as_the_daemons_user() -> None:
    text = rendered("external")
    assert "    script_user lbappliance\n" in text and "root" not in text


def test_every_rendered_config_is_admitted() -> None:
    admit_config(rendered("external"))
    for path in sorted(GOLDEN.glob("*/keepalived.conf")):  # managed mode: the daemon and its scripts are root
        admit_config(path.read_text(), "root")


NOTIFY_LINE = next(line for line in rendered().splitlines() if line.strip().startswith("notify "))


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda t: t.replace("script_user lbappliance", "script_user root"), "script_user must be 'lbappliance'"),
    (lambda t: t.replace("script_user lbappliance", "script_user lbappliance root"), "script_user must be"),
    (lambda t: t.replace(NOTIFY_LINE, NOTIFY_LINE + " root"), "not the rendered form"),
    (lambda t: t.replace(NOTIFY_LINE, '    notify "/bin/sh -c \'cp /bin/sh /tmp/x; chmod u+s /tmp/x\'"'),
     "notify: its path is not"),
    (lambda t: t.replace("os.O_NOFOLLOW|", ""), "not exactly the rendered notify command"),
    (lambda t: t.replace("kill -0 $pid", "kill -0 $pid; id"), "not exactly the rendered check command"),
    (lambda t: t.replace("    nopreempt\n", '    notify_master "/usr/bin/id"\n', 1), "'notify_master'"),
    (lambda t: t.replace("    vrrp_version 3\n", '    vrrp_version 3\n    startup_script "/usr/bin/id"\n'),
     "a character the template never renders"),
    (lambda t: t.replace("    vrrp_version 3\n", "    vrrp_version 3\n    startup_script_timeout 3\n"),
     "'startup_script_timeout' is not one"),
    (lambda t: "include /tmp/evil.conf\n" + t, "'include'"),
    (lambda t: "$EVIL=notify_master /usr/bin/id\n" + t, "a character"),
    (lambda t: "@edge-a vrrp_version 3\n" + t, "a character"),
    (lambda t: t.replace("    nopreempt\n", "    nopreempt { notify_master x }\n", 1), "braces only at the end"),
    (lambda t: t.replace(" scope link", " scope link label x", 1), "address option 'label'"),
    (lambda t: t.replace("    track_script {\n        chk_haproxy\n", "    track_script {\n        chk_haproxy x\n", 1),
     "one script name per line"),
    (lambda t: t.rstrip().rstrip("}"), "unclosed block"),
], ids=["script-user-root", "script-group", "notify-as-root", "notify-other", "notify-edited", "check-edited",
        "notify-master", "startup-script", "unknown-keyword", "include", "definition", "conditional", "inline-braces",
        "address-option", "track-script", "unclosed"])
def test_admission_refuses_what_the_template_never_renders(edit: object, reason: str) -> None:
    text = rendered()
    hostile = edit(text)  # type: ignore[operator]
    assert hostile != text
    with pytest.raises(KeepalivedConfigRefused) as caught:
        admit_config(hostile)
    assert reason in str(caught.value)


def test_admit_copies_checked_bytes_and_keeps_the_last_copy_on_refusal(tmp_path: Path) -> None:
    source, target = tmp_path / "keepalived.conf", tmp_path / "admitted" / "keepalived.conf"
    target.parent.mkdir(mode=0o700)
    source.write_text(rendered())
    admit(str(source), str(target))
    assert target.read_bytes() == source.read_bytes() and target.stat().st_mode & 0o777 == 0o600
    good = target.read_bytes()
    for hostile in (b"\xff" + source.read_bytes(), source.read_bytes().replace(b"router_id", b"router_id\x1b[2J")):
        source.write_bytes(hostile)
        with pytest.raises(KeepalivedConfigRefused):
            admit(str(source), str(target))
        assert target.read_bytes() == good
    # A link planted at the source name is not followed (root would read any file through it).
    source.unlink()
    source.symlink_to("/etc/shadow" if Path("/etc/shadow").exists() else "/etc/passwd")
    with pytest.raises(OSError):
        admit(str(source), str(target))
    assert target.read_bytes() == good
    assert sorted(p.name for p in target.parent.iterdir()) == ["keepalived.conf"]


def _notify_argv(state_dir: Path) -> list[str]:
    """The notify command as keepalived runs it: its own `\\"` unescaped, then split like argv."""
    config = parse_config(f"processMode: external\npaths: {{stateDir: {state_dir}}}\n")
    return shlex.split(notify_script(config).replace('\\"', '"'))


def test_notify_hook_writes_through_no_link(tmp_path: Path) -> None:
    state = tmp_path / "run"
    state.mkdir(mode=0o750)
    victim = tmp_path / "victim"
    victim.write_text("someone else's file\n")
    for name in ("vrrp-VI_4_0.state.tmp", "vrrp-VI_4_0.state"):
        (state / name).symlink_to(victim)
    done = subprocess.run([*_notify_argv(state), "INSTANCE", "VI_4_0", "MASTER", "150"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "someone else's file\n"
    assert not (state / "vrrp-VI_4_0.state").is_symlink()
    assert read_vrrp_states(str(state)) == {"VI_4_0": "MASTER"}
    assert sorted(p.name for p in state.iterdir()) == ["vrrp-VI_4_0.state"]


@pytest.mark.parametrize("setup", ["link", "writable", "foreign"])
def test_notify_hook_refuses_a_state_dir_others_could_plant_in(tmp_path: Path, setup: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o750)
    state = tmp_path / "run"
    if setup == "link":
        state.symlink_to(real)
    else:
        state.mkdir(mode=0o777 if setup == "writable" else 0o750)
        state.chmod(0o777 if setup == "writable" else 0o750)
        if setup == "foreign":
            if os.geteuid() != 0:
                pytest.skip("needs root to hand the directory to another user")
            os.chown(state, 64124, 64124)
    done = subprocess.run([*_notify_argv(state), "INSTANCE", "VI_4_0", "MASTER", "150"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "lbappliance vrrp notify: refused" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(real.iterdir()) == [] and (setup == "link" or list(state.iterdir()) == [])


@pytest.mark.parametrize("args", [("INSTANCE", "../../etc/x", "MASTER", "1"), ("INSTANCE", "VI", "PWNED", "1"),
                                  ("GROUP", "VI", "MASTER", "1")])
def test_notify_hook_refuses_arguments_it_never_gets_from_keepalived(tmp_path: Path, args: tuple[str, ...]) -> None:
    state = tmp_path / "run"
    state.mkdir(mode=0o750)
    done = subprocess.run([*_notify_argv(state), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "refused arguments" in done.stderr
    assert list(state.iterdir()) == []


def test_reader_tolerates_links_fifos_and_garbage(tmp_path: Path) -> None:
    (tmp_path / "vrrp-A.state").write_text("MASTER\n")
    (tmp_path / "vrrp-B.state").symlink_to("/etc/hostname")
    os.mkfifo(tmp_path / "vrrp-C.state")
    (tmp_path / "vrrp-D.state").write_text("<script>\n")
    (tmp_path / "vrrp-E.state").mkdir()
    (tmp_path / "vrrp-F.state.tmp").write_text("BACKUP\n")
    assert read_vrrp_states(str(tmp_path)) == {"A": "MASTER"}
