"""`lbappliance enroll`, the I/O: apply deploy/rbac.yaml as the admin, create the appliance's identity,
write its kubeconfig, and prove what it may do with SelfSubjectAccessReview as that identity.

Two identities:
* a client certificate (default): the key is made here with `openssl` and never leaves this box;
  the cluster's `kubernetes.io/kube-apiserver-client` signer signs a CSR for CN=lbappliance, which
  the admin's credentials approve. Nothing secret is stored in the cluster.
* a ServiceAccount token (`--service-account`): for clusters whose controller-manager does not sign
  that signer (some managed clusters). A bound token from the TokenRequest API, bound to the same
  roles; it is a bearer secret made by the API server, and deleting the ServiceAccount revokes it.

Both expire (a year by default); running enroll again renews, and `doctor` warns 30 days ahead.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ..core import yamlsafe
from ..core.config import ApplianceConfig
from ..core.doctor import Permission, forbidden_permissions, permission_check, required_permissions
from .files import atomic_write, read_text

FIELD_MANAGER = "lbappliance-enroll"
USER = "lbappliance"  # the subject deploy/rbac.yaml binds (CN of the certificate)
DAEMON_USER = "lbappliance"  # the system user the daemon runs as (systemd/lbappliance.sysusers)
SIGNER = "kubernetes.io/kube-apiserver-client"
SERVICE_ACCOUNT = "lbappliance"
PACKAGED_RBAC = Path(__file__).resolve().parent.parent / "testing" / "labdata" / "rbac.yaml"  # deploy/rbac.yaml


class EnrollError(RuntimeError):
    """A step that failed, said in one line with what to do."""


@dataclass
class Enrollment:
    """What enroll did or, with dry_run, would do: one line per action, in order."""

    dry_run: bool
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(("would " if self.dry_run else "") + line)


def default_rbac() -> Path:
    """deploy/rbac.yaml as shipped in the package (tests/e2e/test_lab.py keeps the copy identical);
    never a file found by walking up the directory tree, which could be anyone's."""
    return PACKAGED_RBAC


def admin_client(kubeconfig: str | None, context: str | None = None) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return client.ApiClient(configuration)


def manifest(path: Path) -> list[dict[str, Any]]:
    text = read_text(path, yamlsafe.CONFIG_LIMITS.max_bytes)
    return [d for d in yamlsafe.load_all(text, str(path), yamlsafe.CONFIG_LIMITS) if isinstance(d, dict)]


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def apply_objects(api: client.ApiClient, docs: list[dict[str, Any]], plan: Enrollment) -> None:
    """Server-side apply each object as the admin (idempotent; a second run changes nothing)."""
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(api)
    for doc in docs:
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        kwargs: dict[str, Any] = {}
        if resource.namespaced:
            kwargs["namespace"] = doc["metadata"].get("namespace", "default")
        name = doc["metadata"]["name"]
        where = f" in {kwargs['namespace']}" if "namespace" in kwargs else ""
        present = _exists(lambda resource=resource, name=name, kwargs=kwargs: resource.get(name=name, **kwargs))
        plan.say(f"{'apply (exists)' if present else 'create'} {doc['kind']} {name}{where}")
        if not plan.dry_run:
            resource.server_side_apply(body=doc, field_manager=FIELD_MANAGER, force_conflicts=True, **kwargs)


def service_account_objects(namespace: str) -> list[dict[str, Any]]:
    """The ServiceAccount and bindings of the same roles deploy/rbac.yaml gives the user `lbappliance`."""
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]
    labels = {"app.kubernetes.io/name": "lbappliance"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "lbappliance-serviceaccount", "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lbappliance"},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "lbappliance-leader-election-serviceaccount", "namespace": namespace,
                      "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "lbappliance-leader-election"},
         "subjects": subject},
    ]


# ---- the client certificate -----------------------------------------------------------------


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        raise EnrollError("openssl is not installed (apt-get install openssl), or use --service-account")
    proc = subprocess.run([binary, *args], input=stdin, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise EnrollError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc.stdout


def new_key_and_csr(directory: Path) -> tuple[bytes, bytes]:
    """An EC P-256 key and a CSR for CN=lbappliance, made on this box (the key is never sent)."""
    with tempfile.TemporaryDirectory(prefix=".enroll-", dir=directory) as tmp:
        key_path = Path(tmp) / "key.pem"
        os.close(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key_path))
        csr = _openssl("req", "-new", "-key", str(key_path), "-subj", f"/CN={USER}")
        return key_path.read_bytes(), csr


def csr_name(identity: str, csr: bytes) -> str:
    """Named after the box and the request, so a rerun with the same request finds its own CSR."""
    return f"lbappliance-{identity}-{hashlib.sha256(csr).hexdigest()[:10]}"[:253]


def request_certificate(api: client.ApiClient, name: str, csr: bytes, seconds: int, plan: Enrollment,
                        timeout: float = 60.0) -> bytes:
    """Create the CSR, approve it as the admin, wait for the signer; returns the certificate PEM."""
    certs = client.CertificatesV1Api(api)
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "lbappliance"}},
            "spec": {"request": base64.b64encode(csr).decode(), "signerName": SIGNER,
                     "expirationSeconds": seconds, "usages": ["digital signature", "client auth"]}}
    plan.say(f"create CertificateSigningRequest {name} (signer {SIGNER}, CN={USER}, {seconds // 86400} days) "
             "and approve it")
    if plan.dry_run:
        return b""
    try:
        certs.create_certificate_signing_request(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    current = certs.read_certificate_signing_request(name)
    conditions = current.status.conditions or [] if current.status else []
    if not any(c.type == "Approved" for c in conditions):
        current.status = current.status or client.V1CertificateSigningRequestStatus()
        current.status.conditions = [*conditions, client.V1CertificateSigningRequestCondition(
            type="Approved", status="True", reason="LbapplianceEnroll",
            message="approved by `lbappliance enroll` with the admin's credentials")]
        certs.replace_certificate_signing_request_approval(name, current)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = certs.read_certificate_signing_request(name).status
        if status and status.certificate:
            return base64.b64decode(status.certificate)
        if status and any(c.type in ("Denied", "Failed") for c in status.conditions or []):
            raise EnrollError(f"CertificateSigningRequest {name} was denied or failed: {status.conditions}")
        time.sleep(0.5)
    raise EnrollError(f"CertificateSigningRequest {name} was approved but not signed in {timeout:.0f} s: the "
                      f"cluster's controller-manager does not sign {SIGNER}; use --service-account")


def request_token(api: client.ApiClient, namespace: str, seconds: int, plan: Enrollment) -> str:
    plan.say(f"request a token for ServiceAccount {namespace}/{SERVICE_ACCOUNT} ({seconds // 86400} days)")
    if plan.dry_run:
        return ""
    answer = client.CoreV1Api(api).create_namespaced_service_account_token(
        SERVICE_ACCOUNT, namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                     "spec": {"expirationSeconds": seconds}})
    return str(answer.status.token)


# ---- the kubeconfig ----------------------------------------------------------------------------


def cluster_of(api: client.ApiClient) -> tuple[str, bytes | None, bool]:
    """(server, CA PEM or None, insecure) of the admin's connection, for the appliance's kubeconfig."""
    configuration = api.configuration
    ca = Path(configuration.ssl_ca_cert).read_bytes() if configuration.ssl_ca_cert else None
    return str(configuration.host), ca, not configuration.verify_ssl


def kubeconfig_text(server: str, ca: bytes | None, insecure: bool, user: dict[str, str]) -> str:
    cluster: dict[str, Any] = {"server": server}
    if ca:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "lbappliance",
           "clusters": [{"name": "cluster", "cluster": cluster}],
           "users": [{"name": USER, "user": user}],
           "contexts": [{"name": "lbappliance", "context": {"cluster": "cluster", "user": USER}}]}
    return yaml.safe_dump(doc, sort_keys=False)


def write_kubeconfig(path: Path, text: str, plan: Enrollment, owner: str = DAEMON_USER) -> None:
    """Mode 0600, owned by the daemon's user when that user exists (root otherwise), atomically."""
    try:
        entry: pwd.struct_passwd | None = pwd.getpwnam(owner)
    except KeyError:
        entry = None
    plan.say(f"write {path} (mode 0600, owner {entry.pw_name if entry else 'unchanged: no user ' + owner})")
    if plan.dry_run:
        return
    atomic_write(path, text, mode=0o600)
    if entry is not None and os.geteuid() == 0:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def seconds_left(kubeconfig: Path) -> tuple[float | None, str]:
    """How long the credential in a kubeconfig this command wrote stays valid (None: unknown)."""
    try:
        doc = yaml.safe_load(read_text(kubeconfig, 1 << 20))
        user = doc["users"][0]["user"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None, "credential"
    if "token" in user:
        with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
            payload = str(user["token"]).split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return float(claims["exp"]) - time.time(), "token"
        return None, "token"
    if "client-certificate-data" in user and shutil.which("openssl"):
        with contextlib.suppress(EnrollError, ValueError, KeyError):
            pem = base64.b64decode(user["client-certificate-data"])
            end = _openssl("x509", "-noout", "-enddate", stdin=pem).decode().strip().split("=", 1)[1]
            when = time.mktime(time.strptime(end, "%b %d %H:%M:%S %Y %Z")) - time.timezone
            return when - time.time(), "client certificate"
    return None, "credential"


# ---- proof ---------------------------------------------------------------------------------------


def access_answers(api: client.ApiClient, permissions: list[Permission]) -> dict[Permission, bool]:
    """SelfSubjectAccessReview for each question, asked as the identity of `api`."""
    authz = client.AuthorizationV1Api(api)
    answers = {}
    for permission in permissions:
        review = authz.create_self_subject_access_review(
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
             "spec": {"resourceAttributes": permission.attributes()}})
        answers[permission] = bool(review.status.allowed)
    return answers


def verify(kubeconfig: Path, appliance: ApplianceConfig) -> tuple[bool, str]:
    """Ask, as the new identity, every question of core/doctor; (passed, the check's line)."""
    api = admin_client(str(kubeconfig))
    try:
        questions = [*required_permissions(appliance), *forbidden_permissions(appliance)]
        check = permission_check(access_answers(api, questions), appliance)
    finally:
        api.close()
    line = f"{check.detail}" + (f" (fix: {check.fix})" if check.fix else "")
    return check.verdict.value == "ok", line


@contextlib.contextmanager
def closing(api: client.ApiClient) -> Iterator[client.ApiClient]:
    try:
        yield api
    finally:
        api.close()
