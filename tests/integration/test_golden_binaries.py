"""Every golden config is accepted by the real haproxy and keepalived binaries."""

from __future__ import annotations

import os
import shutil
import tempfile
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
    assert not check_keepalived(tmp_path / "absent.conf").ok  # keepalived -t says "missing" and exits 0



@pytest.mark.integration
def test_unprivileged_keepalived_check_accepts_root_track_script_and_still_rejects_errors() -> None:
    """The hardened daemon (external mode) checks keepalived.conf as a non-root user."""
    _require("keepalived")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run keepalived -t as another user")
    with tempfile.TemporaryDirectory(prefix="lbappliance-ka-") as where:  # readable by nobody
        Path(where).chmod(0o755)
        _check_unprivileged(Path(where), setpriv)


def _check_unprivileged(tmp_path: Path, setpriv: str) -> None:
    as_nobody = tmp_path / "keepalived-as-nobody"
    as_nobody.write_text(f"#!/bin/sh\nexec {setpriv} --reuid=nobody --regid=nogroup --clear-groups "
                         f"{shutil.which('keepalived') or '/usr/sbin/keepalived'} \"$@\"\n")
    as_nobody.chmod(0o755)
    good = tmp_path / "good.conf"
    good.write_text((GOLDEN / "active-active" / "keepalived.conf").read_text())
    good.chmod(0o644)
    raw = check_keepalived(good, str(as_nobody), unprivileged=False)
    assert not raw.ok and "insecure" in raw.output, f"keepalived -t as nobody no longer complains: {raw}"
    verdict = check_keepalived(good, str(as_nobody), unprivileged=True)
    assert verdict.ok, verdict.output
    bad = tmp_path / "bad.conf"
    bad.write_text(good.read_text().replace("advert_int", "advert_intervalx", 1))
    bad.chmod(0o644)
    verdict = check_keepalived(bad, str(as_nobody), unprivileged=True)
    assert not verdict.ok, f"a config with an unknown keyword passed the unprivileged check: {verdict.output}"


def _with_line_after(text: str, anchor: str, inserted: str) -> str:
    """`text` with `inserted` as a new line after the first line starting with `anchor`."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(anchor))
    return "\n".join([*lines[:at + 1], inserted, *lines[at + 1:]]) + "\n"


@pytest.mark.integration
def test_haproxys_own_complaint_is_pinned_on_the_service_whose_section_it_cites(tmp_path: Path) -> None:
    """The real `haproxy -c` output, read as DataPlane reads it: a fault inside one Service's
    section blames that Service only; a fault in a shared section blames none."""
    from lbappliance.core.render import services_on_lines
    from lbappliance.edges.validate import cited_lines

    _require("haproxy")
    golden = (GOLDEN / "shared-ip" / "haproxy.cfg").read_text()
    candidate = tmp_path / "haproxy.cfg.candidate"
    candidate.write_text(_with_line_after(golden, "listen be_dns_tcp-b", "    no-such-keyword 1"))
    verdict = check_haproxy(candidate)
    assert not verdict.ok
    assert services_on_lines(candidate.read_text(), cited_lines(verdict.output, candidate)) == {"dns/tcp-b"}, (
        verdict.output)
    candidate.write_text(_with_line_after(golden, "defaults", "    no-such-keyword 1"))
    verdict = check_haproxy(candidate)
    assert not verdict.ok and cited_lines(verdict.output, candidate), verdict.output
    assert services_on_lines(candidate.read_text(), cited_lines(verdict.output, candidate)) is None
