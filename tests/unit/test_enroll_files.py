"""enroll's local parts: the kubeconfig it writes (0600, parseable, the CA and credential inside), how
long its credential lasts, a CSR name that a rerun finds again, and a key made here, never shown."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from lbappliance.edges import enroll


def test_kubeconfig_is_0600_and_carries_server_ca_and_user(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "kubeconfig"
    text = enroll.kubeconfig_text("https://192.0.2.1:6443", b"CA PEM", False, {"token": "t"})
    plan = enroll.Enrollment(dry_run=False)
    enroll.write_kubeconfig(path, text, plan, owner="no-such-user-here")
    assert path.stat().st_mode & 0o777 == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc["clusters"][0]["cluster"] == {"server": "https://192.0.2.1:6443",
                                             "certificate-authority-data": base64.b64encode(b"CA PEM").decode()}
    assert doc["users"][0] == {"name": "lbappliance", "user": {"token": "t"}}
    assert "owner unchanged: no user no-such-user-here" in plan.lines[0]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    plan = enroll.Enrollment(dry_run=True)
    enroll.write_kubeconfig(tmp_path / "kubeconfig", "x", plan)
    assert not (tmp_path / "kubeconfig").exists() and plan.lines[0].startswith("would write ")


def test_token_lifetime_is_read_from_its_claims(tmp_path: Path) -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": time.time() + 86400 * 40}).encode()).decode().rstrip("=")
    path = tmp_path / "kubeconfig"
    path.write_text(enroll.kubeconfig_text("https://x", None, False, {"token": f"h.{claims}.s"}))
    left, kind = enroll.seconds_left(path)
    assert kind == "token" and left is not None and 39 * 86400 < left <= 40 * 86400
    path.write_text("not: [a kubeconfig")
    assert enroll.seconds_left(path) == (None, "credential")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_key_and_csr_are_made_here_and_the_name_is_stable(tmp_path: Path) -> None:
    key, csr = enroll.new_key_and_csr(tmp_path)
    assert b"PRIVATE KEY" in key and b"CERTIFICATE REQUEST" in csr and b"PRIVATE" not in csr
    assert list(tmp_path.iterdir()) == []  # the key file was temporary, inside the target directory
    assert enroll.csr_name("edge-a", csr) == enroll.csr_name("edge-a", csr) != enroll.csr_name("edge-b", csr)
    assert enroll.csr_name("edge-a", csr).startswith("lbappliance-edge-a-")


def test_service_account_objects_bind_the_same_roles() -> None:
    objects = enroll.service_account_objects("lbappliance-system")
    roles = {o["roleRef"]["name"] for o in objects if "roleRef" in o}
    assert roles == {"lbappliance", "lbappliance-leader-election"}
    rbac = [d for d in yaml.safe_load_all(enroll.default_rbac().read_text()) if d]
    assert roles <= {d["metadata"]["name"] for d in rbac if d["kind"] in ("ClusterRole", "Role")}
