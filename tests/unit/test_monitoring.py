"""deploy/prometheus-rules.yaml and deploy/grafana-dashboard.json: promtool accepts the rules and the
rule tests pass on synthetic series, every dashboard query is valid PromQL, and every metric they
name is one the daemon exports (its registry here; a live scrape of the daemon and of HAProxy's
exporter in tests/e2e/test_one_box.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from lbappliance.edges.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).resolve().parent / "prometheus-rules-test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:lbappliance|haproxy)_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool missing in CI (Debian's prometheus package; scripts/setup.sh installs it)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def named_metrics() -> set[str]:
    """Every metric name the dashboard and the rules use (label names such as proxy=~"be_.*" excluded)."""
    names: set[str] = set()
    for expr in dashboard_exprs() + rule_exprs():
        names.update(m for m in METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))
    return names


def exported(names: set[str], text: str) -> set[str]:
    """The names of `names` that a scrape text (Prometheus exposition format) does not carry."""
    present = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            present.add(line.split()[2])
        elif line and not line.startswith("#"):
            present.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    missing = set()
    for name in names:
        stems = {name} | {name[: -len(s)] for s in SUFFIXES if name.endswith(s)}
        if not stems & present:
            missing.add(name)
    return missing


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_promtool_rule_tests_pass_on_synthetic_series() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            check=False, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_the_issue_asks_for_exists() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"LbapplianceConfigStale", "LbapplianceNoLeader", "LbapplianceVrrpSplitBrain", "LbapplianceVrrpNoMaster",
            "LbappliancePoolNearlyFull", "LbapplianceServiceNoBackend", "LbapplianceApplyRejected"} <= alerts
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == alerts, f"alerts never shown firing in {RULE_TESTS.name}: {alerts - tested}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query, as a recording rule ($job as Grafana would fill it in)."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 11
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$job", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_daemon_metric_named_is_in_its_registry() -> None:
    names = {n for n in named_metrics() if n.startswith("lbappliance_")}
    assert "lbappliance_vrrp_master" in names and "lbappliance_reconcile_duration_seconds_bucket" in names
    text = generate_latest(Metrics().registry).decode()
    assert exported(names, text) == set()
    assert exported({"lbappliance_no_such_metric"}, text) == {"lbappliance_no_such_metric"}
