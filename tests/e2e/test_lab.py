"""`lbappliance lab up|failover|down` as a newcomer runs it: real processes, real traffic."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _lab(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbappliance", "lab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_lab_up_failover_down_leaves_nothing(control_plane_bin: Path, lab_available: None, tmp_path: Path) -> None:
    workdir = tmp_path / "lab"
    env = {**os.environ, "LBAPPLIANCE_LAB_DIR": str(workdir), "LBAPPLIANCE_CONTROLPLANE_BIN": str(control_plane_bin)}
    try:
        up = _lab("up", "--nodes", "2", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        rows = [line.split() for line in up.stdout.splitlines() if line.startswith("default/")]
        names = {r[0] for r in rows}
        assert names == {"default/web", "default/local", "default/dns-tcp", "default/dot"}, up.stdout
        for row in rows:
            assert row[-3:-1] == ["200", "from"] and re.fullmatch(r"node\d", row[-1]), row
            assert row[3] in ("app1", "app2"), f"no VRRP holder shown: {row}"
        state = (workdir / "lab.json").read_text()
        pids = [int(p) for p in re.findall(r'"(?:pid|apiserver_pid|etcd_pid)": (\d+)', state)]
        assert len(pids) == 4

        failover = _lab("failover", env=env)
        assert failover.returncode == 0, failover.stdout + failover.stderr
        moved = re.search(r"moved (app\d) -> (app\d); outage ([0-9.]+)s", failover.stdout)
        assert moved and moved[1] != moved[2], failover.stdout
        print(f"lab failover outage: {moved[3]} s")
        assert float(moved[3]) < 1.0
        pids += [int(p) for p in re.findall(r'"pid": (\d+)', (workdir / "lab.json").read_text())]
    finally:
        down = _lab("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    again = _lab("down", env=env)
    assert again.returncode == 0, "lab down must be safe to run twice"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in namespaces.split() if n.startswith("lab-")], namespaces
    assert not workdir.exists()
    for pid in set(pids):
        assert not Path(f"/proc/{pid}").exists() or b"lbappliance" not in Path(f"/proc/{pid}/cmdline").read_bytes()
