"""The one-box config documented in docs/migrate.md is accepted: `lbappliance check` (with the real
haproxy -c and keepalived -t when installed) and it renders every VIP on one VRRP instance."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from lbappliance.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "offline"


def documented_config() -> str:
    text = (ROOT / "docs" / "migrate.md").read_text()
    section = text[text.index("## 5. One box"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_documented_one_box_config_passes_check(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(documented_config())
    assert "unicastPeers" not in config.read_text()
    args = ["--config", str(config), "--pools", str(EXAMPLES / "pools.yaml"),
            "--services", str(EXAMPLES / "services.yaml"), "--nodes", str(EXAMPLES / "nodes.yaml")]
    result = CliRunner().invoke(cli, ["check", *args])
    assert result.exit_code == 0, result.output
    assert "keepalived.conf: ok" in result.output or "keepalived.conf: skipped" in result.output
    rendered = CliRunner().invoke(cli, ["render", *args[:4], "--services", str(EXAMPLES / "services.yaml"),
                                        "--nodes", str(EXAMPLES / "nodes.yaml"), "--out", str(tmp_path / "out")])
    assert rendered.exit_code == 0, rendered.output
    keepalived = (tmp_path / "out" / "keepalived.conf").read_text()
    assert keepalived.count("vrrp_instance ") == 1 and "unicast_peer" not in keepalived
