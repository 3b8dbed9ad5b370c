"""What `check` refuses in config.yaml (issue 14, item 10), the real keepalived refuses too.

The rendered keepalived.conf of a valid config passes `keepalived -t`; the same file edited the
way a refused config would have rendered it (a unicast source without peers, a peer of the other
family) does not. So the refusals in core/config.py are keepalived's, found before it runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from lbappliance.core.config import ConfigError, parse_config
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render_keepalived
from lbappliance.edges.validate import check_keepalived

from ..shapes import CONFIG_TEXT, NODES, SHAPES, config, pools


@pytest.fixture(scope="module")
def keepalived_conf() -> str:
    if shutil.which("keepalived") is None and not Path("/usr/sbin/keepalived").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("keepalived must be installed in CI")
        pytest.skip("keepalived is not installed")
    _, state = desired_state(Snapshot(SHAPES["udp-dns"][0], NODES, pools(), config()))
    return render_keepalived(state, config())


def verdict(tmp_path: Path, text: str) -> bool:
    path = tmp_path / "keepalived.conf"
    path.write_text(text)
    return check_keepalived(path).ok


@pytest.mark.integration
def test_the_valid_config_passes_keepalived(tmp_path: Path, keepalived_conf: str) -> None:
    assert verdict(tmp_path, keepalived_conf)


@pytest.mark.integration
def test_a_unicast_source_without_peers_is_refused_by_both(tmp_path: Path, keepalived_conf: str) -> None:
    without_peers = re.sub(r"\n    unicast_peer \{\n[^}]*\}", "", keepalived_conf)
    assert "unicast_peer" not in without_peers and "unicast_src_ip" in without_peers
    assert not verdict(tmp_path, without_peers)
    with pytest.raises(ConfigError, match="unicastSrcIp without unicastPeers"):
        parse_config(CONFIG_TEXT.replace("  unicastPeers: [192.0.2.3]\n", ""))


@pytest.mark.integration
def test_a_peer_of_the_other_family_is_refused_by_both(tmp_path: Path, keepalived_conf: str) -> None:
    mixed = keepalived_conf.replace("        192.0.2.3\n", "        2001:db8:0:1::3\n")
    assert mixed != keepalived_conf
    assert not verdict(tmp_path, mixed)
    with pytest.raises(ConfigError, match=r"vrrp\.unicastPeers: .*not an IPv4 address"):
        parse_config(CONFIG_TEXT.replace("[192.0.2.3]", '["2001:db8:0:1::3"]'))
