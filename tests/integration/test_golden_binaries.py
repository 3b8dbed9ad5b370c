"""Every golden config is accepted by the real haproxy and keepalived binaries."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lbappliance.edges.validate import check_haproxy, check_keepalived

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SHAPES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def _require(binary: str) -> None:
    if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} must be installed in CI (.ci/run installs it)")
        pytest.skip(f"{binary} is not installed on this machine (apt-get install {binary})")


@pytest.mark.integration
@pytest.mark.parametrize("shape", SHAPES)
def test_golden_haproxy_config_passes_haproxy_c(shape: str) -> None:
    _require("haproxy")
    verdict = check_haproxy(GOLDEN / shape / "haproxy.cfg")
    assert verdict.ok, verdict.output


@pytest.mark.integration
@pytest.mark.parametrize("shape", SHAPES)
def test_golden_keepalived_config_passes_keepalived_t(shape: str) -> None:
    _require("keepalived")
    verdict = check_keepalived(GOLDEN / shape / "keepalived.conf")
    assert verdict.ok, verdict.output


@pytest.mark.integration
def test_validators_reject_broken_configs(tmp_path: Path) -> None:
    _require("haproxy")
    _require("keepalived")
    bad_haproxy = tmp_path / "haproxy.cfg"
    bad_haproxy.write_text("frontend x\n    bind 192.0.2.1:80\n    default_backend missing\n")
    assert not check_haproxy(bad_haproxy).ok
    bad_keepalived = tmp_path / "keepalived.conf"
    bad_keepalived.write_text("vrrp_instance X {\n    interface eth0\n    virtual_router_id 300\n}\n")
    assert not check_keepalived(bad_keepalived).ok
