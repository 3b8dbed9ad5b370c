"""Fixtures for e2e tests against a real kube-apiserver + etcd.

The control plane is built from the Kubernetes Go modules by
``tools/controlplane/build.sh`` (cached outside the repo; the first build takes
10-20+ minutes) or taken from ``$LBAPPLIANCE_CONTROLPLANE_BIN``. If it can be
neither built nor found the tests are skipped -- except when ``CI=true``,
where that is a failure. Running the control plane needs no root.

Set ``LBAPPLIANCE_KEEP_CONTROLPLANE=1`` to keep the work directory (certs,
kubeconfigs, logs); it is also kept when any test in the session failed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RBAC_MANIFEST = REPO_ROOT / "deploy" / "rbac.yaml"
FIELD_MANAGER = "lbappliance-e2e"


def skip_or_fail(reason: str) -> None:
    """Skip locally, fail in CI: the e2e tier must really run there."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane_bin() -> Path:
    from lbappliance.testing.controlplane import ControlPlaneError, find_binaries

    try:
        return find_binaries(REPO_ROOT)
    except ControlPlaneError as exc:
        skip_or_fail(f"real control plane unavailable (kube-apiserver/etcd could not be built or found): {exc}")


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, control_plane_bin: Path) -> Iterator[Any]:
    """A running ``lbappliance.testing.controlplane.ControlPlane`` for the whole session."""
    from lbappliance.testing.controlplane import ControlPlane

    pytest.importorskip("cryptography", reason="the control plane's PKI needs the `cryptography` test extra")
    cp = ControlPlane(control_plane_bin)
    cp.start()
    try:
        yield cp
    finally:
        if request.session.testsfailed:
            cp.keep = True
        cp.stop()


def _client(kubeconfig: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


# The session control plane's admin client, once a module asked for it: the module teardown below
# wipes what that module left in the shared cluster.
_SESSION_ADMIN: list[Any] = []


@pytest.fixture(scope="session")
def admin_api(control_plane: Any) -> Iterator[Any]:
    """``kubernetes.client.ApiClient`` as cluster admin (O=system:masters)."""
    client = _client(control_plane.admin_kubeconfig)
    _SESSION_ADMIN.append(client)
    yield client
    _SESSION_ADMIN.clear()
    client.close()


@pytest.fixture(autouse=True, scope="module")
def _each_module_leaves_the_shared_cluster_empty() -> Iterator[None]:
    """Nodes, Services, EndpointSlices and leader Leases one module made are gone before the next.

    A Node left behind by another module's lab (its address routes nowhere in this one) is a dead
    server in every backend: each HAProxy reload starts it UP, and a request lands on it."""
    yield
    if _SESSION_ADMIN:
        wipe_cluster(_SESSION_ADMIN[0])


def wipe_cluster(admin_api: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, discovery, coord = client.CoreV1Api(admin_api), client.DiscoveryV1Api(admin_api), client.CoordinationV1Api(admin_api)
    for ns in core.list_namespace().items:
        delete_services(core, ns.metadata.name, keep={"kubernetes"} if ns.metadata.name == "default" else ())
        for eps in discovery.list_namespaced_endpoint_slice(ns.metadata.name).items:
            if eps.metadata.name != "kubernetes":
                with contextlib.suppress(ApiException):
                    discovery.delete_namespaced_endpoint_slice(eps.metadata.name, ns.metadata.name)
        for lease in coord.list_namespaced_lease(ns.metadata.name).items:
            if lease.metadata.name.startswith("lbappliance"):
                with contextlib.suppress(ApiException):
                    coord.delete_namespaced_lease(lease.metadata.name, ns.metadata.name)
    for node in core.list_node().items:
        with contextlib.suppress(ApiException):
            if node.metadata.finalizers:
                core.patch_node(node.metadata.name, {"metadata": {"finalizers": None}},
                                _content_type="application/merge-patch+json")
            core.delete_node(node.metadata.name)


@pytest.fixture(scope="session")
def appliance_api(control_plane: Any) -> Iterator[Any]:
    """``kubernetes.client.ApiClient`` as the daemon's identity (user ``lbappliance``)."""
    client = _client(control_plane.appliance_kubeconfig)
    yield client
    client.close()


@pytest.fixture(scope="session")
def apply_rbac(admin_api: Any) -> Callable[[], list[dict[str, Any]]]:
    """A callable that server-side applies ``deploy/rbac.yaml`` as admin (idempotent)."""
    from lbappliance.testing.controlplane import apply_manifest

    def _apply() -> list[dict[str, Any]]:
        return apply_manifest(admin_api, RBAC_MANIFEST, field_manager=FIELD_MANAGER)

    return _apply


@pytest.fixture
def namespace(admin_api: Any) -> Iterator[str]:
    """A fresh namespace per test. The namespace itself is left behind (it never finishes
    terminating without a controller-manager), but its Services are deleted so the nodePorts
    they were given at random are free again for the tests that ask for fixed ones."""
    from kubernetes import client

    core = client.CoreV1Api(admin_api)
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    delete_services(core, name)


def delete_services(core: Any, namespace: str, keep: Collection[str] = ()) -> None:
    """Delete every Service in `namespace` (but `keep`), dropping finalizers no controller is left to remove."""
    from kubernetes.client.exceptions import ApiException

    for svc in core.list_namespaced_service(namespace).items:
        if svc.metadata.name in keep:
            continue
        with contextlib.suppress(ApiException):
            if svc.metadata.finalizers:
                core.patch_namespaced_service(svc.metadata.name, namespace, {"metadata": {"finalizers": None}},
                                              _content_type="application/merge-patch+json")
            core.delete_namespaced_service(svc.metadata.name, namespace)


@pytest.fixture(scope="session")
def lab_available() -> None:
    """Network namespaces need root: skip locally without them, fail in CI."""
    from lbappliance.testing.netlab import lab_unavailable_reason

    if reason := lab_unavailable_reason():
        skip_or_fail(f"network lab unavailable: {reason}")


@pytest.fixture(scope="session")
def frr_available() -> None:
    """FRR (bgpd, bfdd, zebra, vtysh) for the BGP lab: skip locally without it, fail in CI."""
    from lbappliance.testing.bgplab import frr_unavailable_reason

    if reason := frr_unavailable_reason():
        skip_or_fail(f"FRR unavailable: {reason}")


# A dual-stack Service range: the session control plane's is IPv4-only.
DUAL_SERVICE_CIDRS = "10.96.0.0/16,2001:db8:ffff::/108"


def dual_stack_control_plane(control_plane_bin: Path) -> Iterator[Any]:
    """A control plane of its own with a dual-stack Service range, stopped when the caller is done.

    The PKI's SAN computation keeps a single-stack service CIDR; the flag given last wins."""
    from lbappliance.testing.controlplane import ControlPlane

    pytest.importorskip("cryptography")
    cp = ControlPlane(control_plane_bin, extra_apiserver_args=[f"--service-cluster-ip-range={DUAL_SERVICE_CIDRS}"])
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def dual_cp(control_plane_bin: Path) -> Iterator[Any]:
    """A dual-stack control plane per module (its Nodes and Services are that module's alone)."""
    yield from dual_stack_control_plane(control_plane_bin)
