"""`lbappliance enroll`: run once by an admin on the appliance, with the admin's own kubeconfig."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import click
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ..core.config import ApplianceConfig
from ..edges import enroll as edge
from .common import config_option, exists, fail, load_config

DEFAULT_KUBECONFIG = "/etc/lbappliance/kubeconfig"


@click.command()
@config_option
@click.option("--admin-kubeconfig", envvar="KUBECONFIG", default=None,
              help="The admin's kubeconfig (default: $KUBECONFIG, then ~/.kube/config).")
@click.option("--context", default=None, help="Context in the admin's kubeconfig.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Where the appliance's kubeconfig goes (default: cluster.kubeconfig, else {DEFAULT_KUBECONFIG}).")
@click.option("--service-account", is_flag=True,
              help="A ServiceAccount token instead of a client certificate (clusters that do not sign "
                   "kubernetes.io/kube-apiserver-client).")
@click.option("--rbac", "rbac_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The RBAC manifest (default: deploy/rbac.yaml, shipped in the package).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True,
              help="Validity of the certificate or token.")
@click.option("--renew", is_flag=True, help="Make a new credential even if the current one verifies.")
@click.option("--dry-run", is_flag=True, help="Print what would be created; change nothing.")
def enroll(config_path: Path, admin_kubeconfig: str | None, context: str | None, out_path: Path | None,
           service_account: bool, rbac_path: Path | None, days: int, renew: bool, dry_run: bool) -> None:
    """Give this appliance its cluster identity: RBAC, credential, kubeconfig, proof.

    Idempotent: RBAC is server-side applied, and a kubeconfig that already verifies and is valid for
    30 more days is kept (use --renew to replace it).
    """
    appliance = load_config(config_path)
    out = out_path or Path(appliance.cluster.kubeconfig or DEFAULT_KUBECONFIG)
    namespace = appliance.leader_election.namespace
    plan = edge.Enrollment(dry_run)
    try:
        api = edge.admin_client(admin_kubeconfig, context)
    except Exception as exc:  # the loader raises ConfigException, OSError, TypeError...
        fail(f"cannot load the admin's kubeconfig ({admin_kubeconfig or '~/.kube/config'}): {str(exc)[:300]}")
    try:
        with edge.closing(api):
            _enroll(api, appliance, out, namespace, plan, service_account, rbac_path or edge.default_rbac(),
                    days * 86400, renew)
    except edge.EnrollError as exc:
        _show(plan)
        fail(str(exc))
    except ApiException as exc:
        _show(plan)
        fail(f"the API server refused: {exc.status} {exc.reason}: {str(exc.body)[:300]}")
    _show(plan)


def _show(plan: edge.Enrollment) -> None:
    for line in plan.lines:
        click.echo(line)


def _enroll(api: ApiClient, appliance: ApplianceConfig, out: Path, namespace: str,
            plan: edge.Enrollment, service_account: bool, rbac: Path, seconds: int, renew: bool) -> None:
    edge.apply_objects(api, edge.manifest(rbac), plan)
    if service_account:
        edge.apply_objects(api, edge.service_account_objects(namespace), plan)
    if exists(out) and not renew:
        left, kind = edge.seconds_left(out)
        passed, line = _verify(out, appliance, attempts=1)
        if passed and left is not None and left > 30 * 86400:
            plan.lines.append(f"keep {out}: its {kind} verifies ({line}) and is valid for {left / 86400:.0f} "
                              "more days (--renew replaces it)")
            return
    server, ca, insecure = edge.cluster_of(api)
    if service_account:
        token = edge.request_token(api, namespace, seconds, plan)
        user = {"token": token}
    else:
        key, csr = (b"", b"") if plan.dry_run else edge.new_key_and_csr(_key_dir(out))
        cert = edge.request_certificate(api, edge.csr_name(appliance.name, csr or b"dry-run"), csr, seconds, plan)
        user = {"client-certificate-data": base64.b64encode(cert).decode(),
                "client-key-data": base64.b64encode(key).decode()}
    edge.write_kubeconfig(out, edge.kubeconfig_text(server, ca, insecure, user), plan)
    if plan.dry_run:
        return
    passed, line = _verify(out, appliance)
    plan.lines.append(f"verified as the new identity: {line}")
    if not passed:
        raise edge.EnrollError(f"{out} was written, but its identity's permissions are wrong: {line}")


def _key_dir(out: Path) -> Path:
    """The key is made next to the kubeconfig (on this box, never in a shared temp dir)."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    return out.parent


def _verify(out: Path, appliance: ApplianceConfig, attempts: int = 10) -> tuple[bool, str]:
    """RBAC reaches the authorizer's cache within a moment of being applied: ask a few times."""
    passed, line = False, ""
    for attempt in range(attempts):
        try:
            passed, line = edge.verify(out, appliance)
        except ApiException as exc:
            passed, line = False, f"the API server refused the review: {exc.status} {exc.reason}"
        except Exception as exc:  # an unreadable kubeconfig, a connection refused
            passed, line = False, f"cannot use {out}: {str(exc)[:200]}"
        if passed:
            break
        if attempt + 1 < attempts:
            time.sleep(0.5)
    return passed, line
