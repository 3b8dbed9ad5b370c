"""The CLI, run in-process: pool edits are atomic and refused edits leave the file byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lbappliance.cli.main import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "offline"
CONFIG = "vrrp: {unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3]}\n"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    pools = tmp_path / "pools.yaml"
    result = CliRunner().invoke(cli, ["pool", "add", "default", "-a", "192.0.2.200-192.0.2.250",
                                      "--config", str(config), "--pools", str(pools)])
    assert result.exit_code == 0, result.output
    return config, pools


def run(files: tuple[Path, Path], *args: str):  # type: ignore[no-untyped-def]
    config, pools = files
    return CliRunner().invoke(cli, [*args, "--config", str(config), "--pools", str(pools)])


def test_add_list_show_set_remove(files: tuple[Path, Path]) -> None:
    assert run(files, "pool", "add", "v6", "-a", "2001:db8::/120", "--priority", "5").exit_code == 0
    listing = json.loads(run(files, "pool", "list", "-o", "json").output)
    assert [(p["name"], p["size"], p["priority"]) for p in listing] == [("default", 51, None), ("v6", 256, 5)]
    assert run(files, "pool", "set", "v6", "--no-auto-assign").exit_code == 0
    shown = yaml.safe_load(run(files, "pool", "show", "v6", "-o", "yaml").output)
    assert shown["autoAssign"] is False
    table = run(files, "pool", "list").output
    assert table.splitlines()[0].split()[:3] == ["NAME", "ADDRESSES", "AUTOASSIGN"]
    assert run(files, "pool", "remove", "v6").exit_code == 0
    assert [p["name"] for p in yaml.safe_load(files[1].read_text())["pools"]] == ["default"]


@pytest.mark.parametrize(("args", "message"), [
    (("pool", "add", "dup", "-a", "192.0.2.240/28"), "overlaps"),
    (("pool", "add", "mine", "-a", "192.0.2.0/30"), "contains 192.0.2.2, an address of this appliance"),
    (("pool", "add", "bad", "-a", "192.0.2.0/33"), "invalid CIDR '192.0.2.0/33'"),
    (("pool", "add", "rev", "-a", "198.51.100.9-198.51.100.1"), "is reversed"),
    (("pool", "add", "Upper", "-a", "198.51.100.0/30"), "pool name must be a DNS label"),
    (("pool", "add", "default", "-a", "198.51.100.0/30"), "already exists"),
    (("pool", "set", "default", "--remove-address", "192.0.2.200-192.0.2.250"), "pools[0].addresses: Tuple should have at least 1 item"),
    (("pool", "set", "nope", "--priority", "1"), "no pool named 'nope'"),
    (("pool", "remove", "nope"), "no pool named 'nope'"),
])
def test_refused_edit_leaves_file_byte_identical(files: tuple[Path, Path], args: tuple[str, ...], message: str) -> None:
    before = files[1].read_bytes()
    result = run(files, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert files[1].read_bytes() == before


def test_dry_run_shows_diff_and_writes_nothing(files: tuple[Path, Path]) -> None:
    before = files[1].read_bytes()
    result = run(files, "pool", "add", "extra", "-a", "198.51.100.0/29", "--dry-run")
    assert result.exit_code == 0 and "+- name: extra" in result.output
    assert files[1].read_bytes() == before


def test_no_temp_or_partial_files_left(files: tuple[Path, Path]) -> None:
    run(files, "pool", "add", "extra", "-a", "198.51.100.0/29")
    leftovers = [p.name for p in files[1].parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_editing_an_invalid_file_is_refused_and_file_untouched(files: tuple[Path, Path]) -> None:
    files[1].write_text("apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools: [{name: x}]\n")
    before = files[1].read_bytes()
    result = run(files, "pool", "add", "y", "-a", "198.51.100.0/29")
    assert result.exit_code != 0 and "pools[0].addresses: required field is missing" in result.output
    assert files[1].read_bytes() == before


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("vrrp: {priority: 0}\n")
    result = CliRunner().invoke(cli, ["pool", "list", "--config", str(bad), "--pools", str(tmp_path / "p.yaml")])
    assert result.exit_code == 78 and "vrrp.priority" in result.output


def test_render_offline_examples(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["render", "--services", str(EXAMPLES / "services.yaml"),
                                      "--nodes", str(EXAMPLES / "nodes.yaml"), "--config", str(EXAMPLES / "config.yaml"),
                                      "--pools", str(EXAMPLES / "pools.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "default/web: 192.0.2.200" in result.output
    assert "default/dns: 192.0.2.210" in result.output  # TCP via HAProxy, UDP via nftables
    haproxy = (tmp_path / "haproxy.cfg").read_text()
    assert "bind 192.0.2.210:53" in haproxy and "node-3" not in haproxy
    assert "backend be_default_dns_udp53_v4" in haproxy  # the UDP port's health checks


def test_render_strict_fails_on_problems(tmp_path: Path) -> None:
    services = tmp_path / "svc.yaml"
    services.write_text((EXAMPLES / "services.yaml").read_text().replace("protocol: UDP", "protocol: SCTP"))
    result = CliRunner().invoke(cli, ["render", "--strict", "--services", str(services),
                                      "--nodes", str(EXAMPLES / "nodes.yaml"), "--config", str(EXAMPLES / "config.yaml"),
                                      "--pools", str(EXAMPLES / "pools.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 2


def test_render_skips_unreadable_objects_like_the_daemon(tmp_path: Path) -> None:
    """One unreadable Service is reported and left out; the others are rendered (issue 14 item 11)."""
    services = tmp_path / "svc.yaml"
    services.write_text("kind: Service\nmetadata: {name: BAD_NAME, namespace: default}\nspec: {type: LoadBalancer}\n"
                        "---\n" + (EXAMPLES / "services.yaml").read_text())
    result = CliRunner().invoke(cli, ["render", "--services", str(services), "--nodes", str(EXAMPLES / "nodes.yaml"),
                                      "--config", str(EXAMPLES / "config.yaml"), "--pools",
                                      str(EXAMPLES / "pools.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "skipped: " in result.output
    assert "Service default/BAD_NAME: metadata.name/namespace must be DNS labels" in result.output
    assert "default/web: 192.0.2.200" in result.output and (tmp_path / "out" / "haproxy.cfg").exists()
