"""Hostile input to the CLI and the YAML it reads (issue 14, items 7, 8, 11, 14, 15).

Every case ends in one clear line and a non-zero exit (78 for config.yaml), never a traceback,
and a refused edit leaves pools.yaml byte-identical. Each test failed on the code before the fix.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from lbappliance.cli.main import cli
from lbappliance.core.config import ConfigError, load_pools, parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "offline"
REPO = Path(__file__).resolve().parents[2]
CONFIG = "vrrp: {unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3]}\n"
POOLS = "apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n- name: default\n  addresses: [192.0.2.200-192.0.2.250]\n"

RECURSIVE = b"apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools: &p [*p]\n"
DEEP = b"apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools: " + b"[" * 5000 + b"]" * 5000 + b"\n"
NOT_UTF8 = b"apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools: []  # caf\xe9\n"


def bomb(levels: int = 6, width: int = 10) -> bytes:
    """'Billion laughs' in YAML: each level lists the previous one `width` times (width**levels values).
    Kept at a million values, so the code before the fix survives it and the test just fails."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("\n".join(lines) + f"\nvrrp: {{unicastPeers: *a{levels}}}\n").encode()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_clean_failure(result: Result, code: int, *needles: str) -> None:
    """A non-zero exit with `code`, the reason in the output, and no traceback (CliRunner keeps it)."""
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{result.output}"
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    config, pools = tmp_path / "config.yaml", tmp_path / "pools.yaml"
    config.write_text(CONFIG)
    pools.write_text(POOLS)
    return config, pools


# ---- item 7: the bounded loader, through the parsers every input goes through ------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("data", "needle"), [
    (RECURSIVE, "recursive anchor &p"),
    (DEEP, "nested deeper than"),
    (bomb(), "expands to more than"),
    (NOT_UTF8, "not UTF-8: byte 0xe9"),
    (b"pools: " + b"9" * 5000 + b"\n", "cannot read a value"),
    (b"a: &x 1\n" + b"".join(b"b%d: *x\n" % i for i in range(300)), "more than 256 aliases"),
], ids=["recursive", "deep", "bomb", "not-utf8", "huge-int", "many-aliases"])
def test_pools_parser_refuses_hostile_yaml_with_the_file_named(data: bytes, needle: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_pools(data, "/etc/lbappliance/pools.yaml")  # type: ignore[arg-type]
    assert needle in str(caught.value) and str(caught.value).startswith("/etc/lbappliance/pools.yaml: ")
    assert time.monotonic() - started < 5


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        parse_config("# " + "x" * (1 << 20) + "\n", "config.yaml")


def test_anchors_within_the_limits_still_work() -> None:
    config = parse_config("vrrp: {unicastPeers: &peers [192.0.2.3], unicastSrcIp: 192.0.2.2}\n", "config.yaml")
    assert config.vrrp.unicast_peers == ("192.0.2.3",)
    pools = load_pools(POOLS.replace("[192.0.2.200-192.0.2.250]", "&r [192.0.2.200-192.0.2.250]")
                       + "- name: second\n  addresses: [198.51.100.0/30]\n  serviceAllocation: {namespaces: &ns [a]}\n")
    assert [p.name for p in pools] == ["default", "second"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("data", "needle"), [
    (RECURSIVE.replace(b"pools", b"vrrp"), "recursive anchor"), (DEEP.replace(b"pools", b"vrrp"), "nested deeper"),
    (bomb(), "expands to more than"), (NOT_UTF8, "not UTF-8")], ids=["recursive", "deep", "bomb", "not-utf8"])
def test_cli_config_yaml_hostile_exits_78(tmp_path: Path, files: tuple[Path, Path], data: bytes, needle: str) -> None:
    config, pools = files
    config.write_bytes(data)
    for args in (("pool", "list"), ("check",), ("pool", "add", "x", "-a", "198.51.100.0/30")):
        assert_clean_failure(invoke(*args, "--config", str(config), "--pools", str(pools)), 78, str(config), needle)
    assert pools.read_text() == POOLS


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("data", "needle"), [
    (RECURSIVE, "recursive anchor"), (DEEP, "nested deeper"),
    (bomb().replace(b"vrrp: {unicastPeers:", b"pools: {x:"), "expands to more than"), (NOT_UTF8, "not UTF-8")],
    ids=["recursive", "deep", "bomb", "not-utf8"])
def test_cli_pools_yaml_hostile_is_one_line_and_untouched(files: tuple[Path, Path], data: bytes, needle: str) -> None:
    config, pools = files
    pools.write_bytes(data)
    for args in (("pool", "list"), ("check",), ("pool", "add", "x", "-a", "198.51.100.0/30"),
                 ("pool", "set", "default", "--priority", "3"),
                 ("render", "--services", str(EXAMPLES / "services.yaml"), "--nodes", str(EXAMPLES / "nodes.yaml"),
                  "--out", str(config.parent / "out"))):
        assert_clean_failure(invoke(*args, "--config", str(config), "--pools", str(pools)), 1, str(pools), needle)
    assert pools.read_bytes() == data


def _config_naming(config: Path, pools: Path) -> None:
    """`paths.pools` in config.yaml (the CLI's --pools option already refuses a directory itself)."""
    config.write_text(CONFIG + f"paths: {{pools: {pools}}}\n")


def test_paths_pools_that_is_a_directory(files: tuple[Path, Path]) -> None:
    config, pools = files
    pools.unlink()
    pools.mkdir()
    _config_naming(config, pools)
    for args in (("pool", "list"), ("check",), ("pool", "add", "x", "-a", "198.51.100.0/30")):
        assert_clean_failure(invoke(*args, "--config", str(config)), 1, str(pools), "is a directory")


@pytest.mark.timeout(30)
def test_paths_pools_that_is_a_fifo_does_not_hang(files: tuple[Path, Path]) -> None:
    config, pools = files
    pools.unlink()
    os.mkfifo(pools)
    _config_naming(config, pools)
    assert_clean_failure(invoke("pool", "list", "--config", str(config)), 1, "not a regular file")


def test_unreadable_pools_and_config(tmp_path: Path, files: tuple[Path, Path]) -> None:
    """Root without capabilities (setpriv) is refused a mode-000 file like any user; no traceback."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the CLI without CAP_DAC_OVERRIDE")
    config, pools = files
    _config_naming(config, pools)
    pools.chmod(0)
    as_capless_root = [setpriv, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "lbappliance"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (("pool", "list"), ("check",), ("pool", "add", "x", "-a", "198.51.100.0/30")):
        done = subprocess.run([*as_capless_root, *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"error: {pools}: cannot read: Permission denied" in done.stderr
    pools.chmod(0o644)
    config.chmod(0)
    done = subprocess.run([*as_capless_root, "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 78 and "Traceback" not in done.stderr, done.stderr
    assert "Permission denied" in done.stderr


@pytest.mark.parametrize("document", [
    [], {"identity": "a"}, {"identity": "a", "leader": True, "services": 5},
    {"identity": "a", "leader": True, "services": [{"service": "x"}]},
    {"identity": "a", "leader": True, "services": [], "vrrp": [1, 2]},
], ids=["list", "no-leader", "services-int", "service-fields", "vrrp-list"])
def test_status_of_the_wrong_shape(tmp_path: Path, document: object) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{stateDir: {tmp_path}}}\n")
    (tmp_path / "status.json").write_text(json.dumps(document))
    assert_clean_failure(invoke("status", "--config", str(config)), 1, "not a status document")
    assert invoke("status", "--config", str(config), "-o", "json").exit_code == 0  # as it is


def test_status_not_json_or_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{stateDir: {tmp_path}}}\n")
    for raw in (b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000):
        (tmp_path / "status.json").write_bytes(raw)
        assert_clean_failure(invoke("status", "--config", str(config)), 1, "not a status document")


def test_status_too_deep_to_print(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"paths: {{stateDir: {tmp_path}}}\n")
    (tmp_path / "status.json").write_text("[" * 900 + "]" * 900)  # json.loads takes it; PyYAML's dumper recurses deeper
    assert_clean_failure(invoke("status", "--config", str(config), "-o", "yaml"), 1, "cannot print this document")


def test_lock_timeout_is_a_clear_error(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from lbappliance.cli import pool as pool_cli
    from lbappliance.edges import files as files_edge

    config, pools = files
    monkeypatch.setattr(pool_cli, "locked", functools.partial(files_edge.locked, timeout=0.3))
    with open(pools.with_name(".pools.yaml.lock"), "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        result = invoke("pool", "add", "x", "-a", "198.51.100.0/30", "--config", str(config), "--pools", str(pools))
    assert_clean_failure(result, 1, "another edit has held", "try again")
    assert pools.read_text() == POOLS


# ---- item 8: names matched whole ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["abc\n", "abc\n\n", "\nabc"])
def test_pool_name_with_a_newline_is_refused(files: tuple[Path, Path], name: str) -> None:
    config, pools = files
    result = invoke("pool", "add", name, "-a", "198.51.100.0/30", "--config", str(config), "--pools", str(pools))
    assert_clean_failure(result, 1, "DNS label")
    assert pools.read_text() == POOLS


# ---- item 11: offline render skips an unreadable object, like the daemon ------------------------


def _services_with_bad_ones(tmp_path: Path) -> Path:
    good = yaml.safe_load((EXAMPLES / "services.yaml").read_text())
    items = good["items"] if isinstance(good, dict) and "items" in good else good
    bad = [{"kind": "Service", "metadata": {"name": "BAD_NAME", "namespace": "default"}, "spec": {"type": "LoadBalancer"}},
           {"kind": "Service", "metadata": ["not", "a", "mapping"], "spec": {"type": "LoadBalancer"}},
           {"kind": "Service", "metadata": {"name": "ports", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "ports": 7}}]
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [*bad, *items]}))
    return path


def test_render_skips_unreadable_objects_and_renders_the_rest(tmp_path: Path) -> None:
    services = _services_with_bad_ones(tmp_path)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text((EXAMPLES / "nodes.yaml").read_text() + "---\nkind: Node\nmetadata: 5\n")
    args = ["render", "--services", str(services), "--nodes", str(nodes), "--config", str(EXAMPLES / "config.yaml"),
            "--pools", str(EXAMPLES / "pools.yaml"), "--out", str(tmp_path / "out")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "skipped: " in result.output and "Service default/BAD_NAME: metadata.name/namespace" in result.output
    assert "metadata must be a mapping, got list" in result.output and "got int" in result.output
    assert "default/web: 192.0.2.200" in result.output
    assert "bind 192.0.2.200:" in (tmp_path / "out" / "haproxy.cfg").read_text()
    assert invoke(*args, "--strict").exit_code == 2


def test_check_reports_skipped_objects_and_fails(tmp_path: Path) -> None:
    result = invoke("check", "--services", str(_services_with_bad_ones(tmp_path)), "--nodes",
                    str(EXAMPLES / "nodes.yaml"), "--config", str(EXAMPLES / "config.yaml"), "--pools",
                    str(EXAMPLES / "pools.yaml"))
    assert_clean_failure(result, 1, "skipped: ", "metadata must be a mapping")


@pytest.mark.timeout(30)
def test_render_object_file_bomb_is_refused(tmp_path: Path) -> None:
    services = tmp_path / "svc.yaml"
    services.write_bytes(b"items: &a [{kind: Service, metadata: {name: a}}]\nextra: *a\n")
    result = invoke("render", "--services", str(services), "--nodes", str(EXAMPLES / "nodes.yaml"), "--config",
                    str(EXAMPLES / "config.yaml"), "--pools", str(EXAMPLES / "pools.yaml"), "--out", str(tmp_path))
    assert_clean_failure(result, 1, f"{services}: ", "more than 0 aliases")


# ---- item 14: edits keep the link, mode, owner, comments; stale temp files go -----------------


COMMENTED = """\
# Address pools of edge-a; owned by the network team (ticket NET-123).
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
# the main range
- name: default
  addresses: ["192.0.2.200-192.0.2.250"]   # do not grow past .250
  autoAssign: true
- name: reserved  # only by annotation
  addresses:
  - 198.51.100.0/28
  autoAssign: false
"""


def test_edit_keeps_comments_order_and_quoting(files: tuple[Path, Path]) -> None:
    config, pools = files
    pools.write_text(COMMENTED)
    common = ("--config", str(config), "--pools", str(pools))
    assert invoke("pool", "add", "extra", "-a", "203.0.113.0/29", "--priority", "5", *common).exit_code == 0
    assert invoke("pool", "set", "reserved", "--add-address", "198.51.100.16/30", *common).exit_code == 0
    assert invoke("pool", "remove", "extra", *common).exit_code == 0
    text = pools.read_text()
    for line in COMMENTED.splitlines():
        if line.strip() and "198.51.100.0/28" not in line:
            assert line in text, f"lost: {line!r}\n{text}"
    assert "  - 198.51.100.16/30" in text and "extra" not in text
    assert [p.name for p in load_pools(text)] == ["default", "reserved"]


def test_edit_through_a_symlink_keeps_the_link_mode_and_owner(files: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = files
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "pools.yaml"
    target.write_text(POOLS)
    target.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(target, 0, 4321)
    link = tmp_path / "pools-link.yaml"
    link.symlink_to(target)
    result = invoke("pool", "add", "x", "-a", "198.51.100.0/30", "--config", str(config), "--pools", str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target
    assert "name: x" in target.read_text()
    st = target.stat()
    assert st.st_mode & 0o7777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 4321)
    assert [p.name for p in real_dir.iterdir()] == ["pools.yaml", ".pools.yaml.lock"] or \
        sorted(p.name for p in real_dir.iterdir()) == [".pools.yaml.lock", "pools.yaml"]


def test_edit_removes_stale_temp_files_of_killed_edits(files: tuple[Path, Path]) -> None:
    config, pools = files
    for suffix in ("abc123", "k1ll3d"):
        (pools.parent / f".pools.yaml.{suffix}.tmp").write_text("half a file")
    other = pools.parent / ".config.yaml.zzz.tmp"
    other.write_text("not ours")
    result = invoke("pool", "add", "x", "-a", "198.51.100.0/30", "--config", str(config), "--pools", str(pools))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in pools.parent.glob(".pools.yaml.*.tmp")) == []
    assert other.exists()


def test_new_pools_file_is_not_world_readable(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    pools = tmp_path / "pools.yaml"
    result = invoke("pool", "add", "x", "-a", "198.51.100.0/30", "--config", str(config), "--pools", str(pools))
    assert result.exit_code == 0, result.output
    assert pools.stat().st_mode & 0o7777 == 0o640


# ---- item 15: RBAC grants exactly the verbs the code uses ---------------------------------------


def test_rbac_grants_exactly_the_verbs_the_code_uses() -> None:
    """What lbappliance/edges/cluster.py calls: list+watch Services, Nodes and EndpointSlices (informers), PATCH a Service
    (finalizer) and its status (addresses), POST core/v1 Events, and read/replace/create the Lease."""
    documents = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d]
    granted: set[tuple[str, str, str, str]] = set()
    for doc in documents:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        names = ",".join(rule.get("resourceNames", [])) or "*"
                        granted.add((group, resource, verb, names))
    assert granted == {
        ("", "services", "list", "*"), ("", "services", "watch", "*"), ("", "services", "patch", "*"),
        ("", "services/status", "patch", "*"),
        ("", "nodes", "list", "*"), ("", "nodes", "watch", "*"),
        ("discovery.k8s.io", "endpointslices", "list", "*"), ("discovery.k8s.io", "endpointslices", "watch", "*"),
        ("", "events", "create", "*"),
        ("coordination.k8s.io", "leases", "create", "*"),
        ("coordination.k8s.io", "leases", "get", "lbappliance-leader"),
        ("coordination.k8s.io", "leases", "update", "lbappliance-leader"),
    }
