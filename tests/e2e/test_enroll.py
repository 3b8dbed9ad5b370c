"""`lbappliance enroll` against a fresh kube-apiserver: RBAC applied, an identity created, a 0600
kubeconfig written, and SelfSubjectAccessReview (as that identity) shows exactly the daemon's
permissions and no Secrets; a second run changes nothing; --dry-run creates nothing.

The client-certificate path (the default) needs the CSR signer of kube-controller-manager: the test
runs the real one (only its certificatesigningrequest-signing-controller, signing with the test CA)
when tools/controlplane built it, and fails in CI when it did not. The ServiceAccount path needs
only the API server.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from lbappliance.edges.processes import stop_child
from tests.e2e.conftest import RBAC_MANIFEST, skip_or_fail

pytestmark = pytest.mark.e2e
KCM = "kube-controller-manager"


def enroll(cp: Any, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({"name": "edge-e2e", "cluster": {"kubeconfig": str(tmp / "kubeconfig")}}))
    return subprocess.run([sys.executable, "-m", "lbappliance", "enroll", "--config", str(config),
                           "--admin-kubeconfig", str(cp.admin_kubeconfig), "--rbac", str(RBAC_MANIFEST), *args],
                          capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def csr_signer(control_plane: Any, bin_dir: Path, work: Path) -> Iterator[bool]:
    """The real kube-controller-manager's CSR signing controller, signing with the test CA, while the
    block runs; yields False (and starts nothing) when it was not built."""
    binary = Path(os.environ.get("LBAPPLIANCE_KCM", bin_dir / KCM))
    if not os.access(binary, os.X_OK):
        yield False
        return
    from cryptography.hazmat.primitives import serialization

    key = work / "ca.key"
    key.write_bytes(control_plane._pki.ca_key.private_bytes(  # the test CA's key, only for the signer
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key.chmod(0o600)
    log = open(work / "kcm.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(binary), f"--kubeconfig={control_plane.admin_kubeconfig}",
                             "--controllers=certificatesigningrequest-signing-controller",
                             f"--cluster-signing-kube-apiserver-client-cert-file={control_plane.ca_file}",
                             f"--cluster-signing-kube-apiserver-client-key-file={key}",
                             "--leader-elect=false", "--secure-port=0", "--v=1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield True
    finally:
        stop_child(proc, signal.SIGTERM, 10)
        log.close()


@pytest.fixture(scope="module")
def signer(control_plane: Any, control_plane_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with csr_signer(control_plane, control_plane_bin, tmp_path_factory.mktemp("kcm")) as running:
        if not running:
            skip_or_fail(f"{KCM} not built: the client-certificate path of enroll cannot be signed")
        yield


def _api(kubeconfig: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def _denied(call: Any) -> int:
    try:
        call()
    except client.ApiException as exc:
        return int(exc.status)
    return 200


def _identity_checks(kubeconfig: Path) -> None:
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    api = _api(kubeconfig)
    try:
        core = client.CoreV1Api(api)
        core.list_service_for_all_namespaces(limit=1)
        core.list_node(limit=1)
        assert _denied(lambda: core.list_namespaced_secret("lbappliance-system")) == 403
        assert _denied(lambda: core.list_secret_for_all_namespaces()) == 403
        assert _denied(lambda: core.list_namespaced_pod("default")) == 403
    finally:
        api.close()


def test_service_account_enrollment(control_plane: Any, tmp_path: Path) -> None:
    dry = enroll(control_plane, tmp_path, "--service-account", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would create ServiceAccount lbappliance in lbappliance-system" in dry.stdout
    assert "would write" in dry.stdout and not (tmp_path / "kubeconfig").exists()
    core = client.CoreV1Api(_api(control_plane.admin_kubeconfig))
    assert _denied(lambda: core.read_namespaced_service_account("lbappliance", "lbappliance-system")) == 404

    first = enroll(control_plane, tmp_path, "--service-account")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "verified as the new identity" in first.stdout
    user = yaml.safe_load((tmp_path / "kubeconfig").read_text())["users"][0]["user"]
    assert set(user) == {"token"}
    _identity_checks(tmp_path / "kubeconfig")
    before = (tmp_path / "kubeconfig").read_bytes()
    again = enroll(control_plane, tmp_path, "--service-account")
    assert again.returncode == 0, again.stderr
    assert "keep " in again.stdout and (tmp_path / "kubeconfig").read_bytes() == before


def test_certificate_enrollment_and_its_identity_denied_secrets(control_plane: Any, signer: None,
                                                                tmp_path: Path) -> None:
    result = enroll(control_plane, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "create CertificateSigningRequest lbappliance-edge-e2e-" in result.stdout
    user = yaml.safe_load((tmp_path / "kubeconfig").read_text())["users"][0]["user"]
    assert set(user) == {"client-certificate-data", "client-key-data"}
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=base64.b64decode(
        user["client-certificate-data"]), capture_output=True, check=True).stdout.decode()
    assert "CN = lbappliance" in subject or "CN=lbappliance" in subject
    _identity_checks(tmp_path / "kubeconfig")
    # The key never left the box: the CSR the cluster holds carries only the public part.
    certs = client.CertificatesV1Api(_api(control_plane.admin_kubeconfig))
    csr = next(c for c in certs.list_certificate_signing_request().items
               if c.metadata.name.startswith("lbappliance-edge-e2e-"))
    assert b"PRIVATE KEY" not in base64.b64decode(csr.spec.request)
    again = enroll(control_plane, tmp_path)
    assert again.returncode == 0 and "keep " in again.stdout, again.stdout + again.stderr


def test_a_wider_identity_fails_verification(control_plane: Any, admin_api: Any, tmp_path: Path) -> None:
    """Verification is not a rubber stamp: an identity that may read Secrets is refused."""
    assert enroll(control_plane, tmp_path, "--service-account").returncode == 0
    rbac = client.RbacAuthorizationV1Api(admin_api)
    rbac.create_cluster_role({"metadata": {"name": "e2e-secrets"},
                              "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]})
    rbac.create_cluster_role_binding({"metadata": {"name": "e2e-secrets"},
                                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                  "name": "e2e-secrets"},
                                      "subjects": [{"kind": "ServiceAccount", "name": "lbappliance",
                                                    "namespace": "lbappliance-system"}]})
    try:
        result = enroll(control_plane, tmp_path, "--service-account", "--renew")
        assert result.returncode == 1
        assert "more than needed: list secrets" in result.stdout + result.stderr
    finally:
        rbac.delete_cluster_role_binding("e2e-secrets")
        rbac.delete_cluster_role("e2e-secrets")
    assert shutil.which("openssl")
