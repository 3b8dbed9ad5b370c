"""`lbappliance lab up|status|failover|down` as a newcomer runs it: real processes, real traffic."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lbappliance.testing.appliances import EXAMPLES, RBAC_MANIFEST
from lbappliance.testing.lab import STATE

REPO = Path(__file__).resolve().parents[2]


def _lab(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbappliance", "lab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_the_wheel_ships_the_repositorys_lab_manifests() -> None:
    """The lab reads its copies (package data, so it runs from a wheel): they must be the repo's files."""
    assert RBAC_MANIFEST.read_bytes() == (REPO / "deploy" / "rbac.yaml").read_bytes(), (
        f"copy deploy/rbac.yaml to {RBAC_MANIFEST.relative_to(REPO)}")
    ours = {p.name: p.read_bytes() for p in EXAMPLES.glob("*.yaml")}
    theirs = {p.name: p.read_bytes() for p in (REPO / "examples").glob("*.yaml")}
    assert ours == theirs, f"copy examples/*.yaml to {EXAMPLES.relative_to(REPO)}/ (and remove stale copies)"


def _recorded_pids(state: dict[str, object]) -> list[int]:
    return [int(p) for p in re.findall(r'"pid": (\d+)', json.dumps(state))]


@pytest.mark.e2e
def test_lab_up_failover_down_leaves_nothing(control_plane_bin: Path, lab_available: None) -> None:
    env = {**os.environ, "LBAPPLIANCE_CONTROLPLANE_BIN": str(control_plane_bin)}
    workdir: Path | None = None
    pids: list[int] = []
    try:
        up = _lab("up", "--nodes", "2", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        rows = [line.split() for line in up.stdout.splitlines() if line.startswith("default/")]
        names = {r[0] for r in rows}
        assert names == {"default/web", "default/local", "default/dns-tcp", "default/dot"}, up.stdout
        for row in rows:
            assert row[-3:-1] == ["200", "from"] and re.fullmatch(r"pod\d+@node\d", row[-1]), row
            assert row[3] in ("app1", "app2"), f"no VRRP holder shown: {row}"
        # The lab's directory is private and new, recorded in a state file only root may write.
        state = json.loads(STATE.read_text())
        workdir = Path(state["workdir"])
        assert stat.S_IMODE(workdir.stat().st_mode) == 0o700 and workdir.stat().st_uid == os.geteuid()
        assert workdir.parent == Path(tempfile.gettempdir()) and workdir.name != "lbappliance-lab"
        assert stat.S_IMODE(STATE.stat().st_mode) & 0o022 == 0 and STATE.stat().st_uid == os.geteuid()
        assert f"--config {workdir}/app1.yaml" in up.stdout
        pids = _recorded_pids(state)
        assert len(pids) == 4
        shown = _lab("status", env=env)
        assert shown.returncode == 0 and str(workdir) in shown.stdout, shown.stdout + shown.stderr
        assert shown.stdout.count(" yes") == 4 and " NO" not in shown.stdout, shown.stdout

        failover = _lab("failover", env=env)
        assert failover.returncode == 0, failover.stdout + failover.stderr
        moved = re.search(r"moved (app\d) -> (app\d); outage ([0-9.]+)s", failover.stdout)
        assert moved and moved[1] != moved[2], failover.stdout
        print(f"lab failover outage: {moved[3]} s")
        assert float(moved[3]) < 1.0
        pids += _recorded_pids(json.loads(STATE.read_text()))
    finally:
        down = _lab("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    again = _lab("down", env=env)
    assert again.returncode == 0, "lab down must be safe to run twice"
    assert _lab("status", env=env).returncode != 0, "no lab is up: status says so"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in namespaces.split() if n.startswith("lab-")], namespaces
    assert workdir is not None and not workdir.exists()
    assert not STATE.exists()
    for pid in set(pids):
        assert not Path(f"/proc/{pid}").exists() or b"lbappliance" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_state_file_others_could_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`down` must never remove a directory named by a file someone else could have planted or edited."""
    from lbappliance.testing import lab

    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    state = tmp_path / "state" / "lab.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"workdir": str(victim), "daemons": []}))
    monkeypatch.setattr(lab, "STATE", state)
    state.chmod(0o666)
    with pytest.raises(lab.LabFailure, match="refusing state file"):
        lab.workdir()
    state.chmod(0o600)
    assert lab.workdir() == victim
    victim.chmod(0o755)
    with pytest.raises(lab.LabFailure, match="refusing lab directory"):
        lab.workdir()
    link = tmp_path / "link"
    link.symlink_to(victim)
    state.write_text(json.dumps({"workdir": str(link), "daemons": []}))
    with pytest.raises(lab.LabFailure, match="refusing lab directory"):
        lab.workdir()
