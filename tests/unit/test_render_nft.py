"""Offline `lbappliance render` is complete: it writes the nftables ruleset the daemon would load for
UDP Services too, and lists every port it serves and how."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lbappliance.cli.main import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "offline"


def _render(out: Path) -> str:
    result = CliRunner().invoke(cli, ["render", "--services", str(EXAMPLES / "services.yaml"),
                                      "--nodes", str(EXAMPLES / "nodes.yaml"), "--config", str(EXAMPLES / "config.yaml"),
                                      "--pools", str(EXAMPLES / "pools.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_render_writes_the_nft_ruleset_and_lists_ports_and_how(tmp_path: Path) -> None:
    output = _render(tmp_path)
    ruleset = (tmp_path / "nftables.nft").read_text()
    assert "192.0.2.210" in ruleset and "dnat" in ruleset  # the UDP port of default/dns
    assert "192.0.2.200" not in ruleset  # a TCP-only Service is HAProxy's
    rows = [line.split() for line in output.splitlines()]
    assert any(r[:5] == ["default/dns", "192.0.2.210", "53/UDP", "nftables", "dnat"] for r in rows)
    assert any(r[:4] == ["default/dns", "192.0.2.210", "53/TCP", "haproxy"] for r in rows)
    assert any(r[:4] == ["default/web", "192.0.2.200", "80/TCP", "haproxy"] for r in rows)
    assert f"{tmp_path / 'nftables.nft'}" in output.splitlines()[-1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables")
def test_the_rendered_ruleset_passes_nft_check(tmp_path: Path) -> None:
    _render(tmp_path)
    result = subprocess.run(["nft", "-c", "-f", str(tmp_path / "nftables.nft")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
