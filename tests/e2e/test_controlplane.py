"""The real control plane behaves the way the appliance relies on.

These pin down the Kubernetes semantics the daemon depends on (NodePort
allocation, services/status validation, the cleanup finalizer, 410 Gone after
compaction, and the least-privilege RBAC in deploy/rbac.yaml) against a real
kube-apiserver + etcd, not a fake.

Addresses: only documentation ranges in Service specs/statuses; all traffic is
to loopback.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lbappliance.testing.wait import wait_for

pytestmark = pytest.mark.e2e

CLEANUP_FINALIZER = "service.kubernetes.io/load-balancer-cleanup"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
LEASE_NS = "lbappliance-system"
LEASE_NAME = "lbappliance-leader"
WARM_START_LIMIT_S = 10.0


def lb_service(name: str, *, finalizers: list[str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
            ],
            **spec,
        },
    }
    if finalizers:
        body["metadata"]["finalizers"] = finalizers
    return body


def status_of(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def expect_status(code: int, fn: Callable[[], Any]) -> ApiException:
    with pytest.raises(ApiException) as info:
        fn()
    assert info.value.status == code, f"expected HTTP {code}, got {info.value.status}: {info.value.body}"
    return info.value


# --------------------------------------------------------------------------- API semantics


def test_loadbalancer_service_gets_node_ports(admin_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    svc = core.create_namespaced_service(namespace, lb_service("web"))
    ports = {p.name: p.node_port for p in svc.spec.ports}
    assert set(ports) == {"http", "https"}
    for name, node_port in ports.items():
        assert node_port is not None and 30000 <= node_port <= 32767, (name, node_port)
    assert ports["http"] != ports["https"]
    assert svc.spec.cluster_ip and svc.spec.cluster_ip.startswith("10.96.")
    assert svc.spec.external_traffic_policy == "Cluster"
    assert svc.spec.health_check_node_port in (None, 0)

    # externalTrafficPolicy: Local also gets a healthCheckNodePort (used by the HAProxy checks).
    local = core.create_namespaced_service(namespace, lb_service("local", externalTrafficPolicy="Local"))
    assert 30000 <= local.spec.health_check_node_port <= 32767
    assert local.spec.health_check_node_port not in {p.node_port for p in local.spec.ports}


def test_status_patch_with_ip_mode_proxy_is_accepted(admin_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_service(namespace, lb_service("status-ok"))
    patch = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "Proxy"}]}}}
    out = core.patch_namespaced_service_status("status-ok", namespace, patch, _content_type=MERGE)
    ingress = out.status.load_balancer.ingress
    assert [(i.ip, i.ip_mode) for i in ingress] == [("192.0.2.10", "Proxy")]
    again = core.read_namespaced_service("status-ok", namespace)
    assert [(i.ip, i.ip_mode) for i in again.status.load_balancer.ingress] == [("192.0.2.10", "Proxy")]

    # A plain spec update through the main resource does not touch status.
    core.patch_namespaced_service("status-ok", namespace, {"metadata": {"labels": {"x": "y"}}}, _content_type=MERGE)
    assert core.read_namespaced_service("status-ok", namespace).status.load_balancer.ingress[0].ip == "192.0.2.10"


@pytest.mark.parametrize(
    "ingress",
    [
        pytest.param([{"ipMode": "Proxy"}], id="ipMode-without-ip"),
        pytest.param([{"ip": "192.0.2.11", "ipMode": "Bogus"}], id="ipMode-bogus"),
        pytest.param([{"ip": "not-an-ip", "ipMode": "Proxy"}], id="ip-invalid"),
    ],
)
def test_invalid_status_patch_is_rejected(admin_api: Any, namespace: str, ingress: list[dict[str, str]]) -> None:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_service(namespace, lb_service("status-bad"))
    patch = {"status": {"loadBalancer": {"ingress": ingress}}}
    exc = expect_status(
        422, lambda: core.patch_namespaced_service_status("status-bad", namespace, patch, _content_type=MERGE)
    )
    assert "ingress" in (exc.body or "")
    assert not core.read_namespaced_service("status-bad", namespace).status.load_balancer.ingress


def test_cleanup_finalizer_blocks_deletion_until_removed(admin_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_service(namespace, lb_service("fin", finalizers=[CLEANUP_FINALIZER]))
    core.delete_namespaced_service("fin", namespace)

    svc = core.read_namespaced_service("fin", namespace)
    assert svc.metadata.deletion_timestamp is not None
    assert svc.metadata.finalizers == [CLEANUP_FINALIZER]
    time.sleep(1.0)  # nothing else may remove it
    assert core.read_namespaced_service("fin", namespace).metadata.deletion_timestamp is not None

    # Removing the finalizer (what the daemon does after withdrawing the VIP) completes the delete.
    core.patch_namespaced_service(
        "fin",
        namespace,
        [
            {"op": "test", "path": "/metadata/finalizers/0", "value": CLEANUP_FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ],
        _content_type=JSON_PATCH,
    )

    def gone() -> bool:
        try:
            core.read_namespaced_service("fin", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=10, what="service to disappear after finalizer removal")


# --------------------------------------------------------------------------- RBAC


def test_appliance_identity_is_least_privilege(
    control_plane: Any, admin_api: Any, appliance_api: Any, apply_rbac: Callable[[], Any], namespace: str
) -> None:
    admin_core = client.CoreV1Api(admin_api)
    admin_rbac = client.RbacAuthorizationV1Api(admin_api)
    core = client.CoreV1Api(appliance_api)
    coord = client.CoordinationV1Api(appliance_api)
    events_v1 = client.EventsV1Api(appliance_api)

    # Start from "not applied" even if another test applied it earlier in the session.
    for fn, args in (
        (admin_rbac.delete_cluster_role_binding, ("lbappliance",)),
        (admin_rbac.delete_namespaced_role_binding, ("lbappliance-leader-election", LEASE_NS)),
    ):
        try:
            fn(*args)
        except ApiException as exc:
            if exc.status != 404:
                raise

    svc = admin_core.create_namespaced_service(namespace, lb_service("rbac"))

    def denied_listing() -> bool:
        try:
            core.list_service_for_all_namespaces()
        except ApiException as exc:
            return exc.status == 403
        return False

    wait_for(denied_listing, timeout=10, what="appliance to be denied before RBAC is applied")
    expect_status(403, lambda: core.list_node())
    expect_status(
        403,
        lambda: core.patch_namespaced_service_status(
            "rbac",
            namespace,
            {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}}},
            _content_type=MERGE,
        ),
    )

    apply_rbac()

    wait_for(lambda: core.list_service_for_all_namespaces() is not None, timeout=10, what="RBAC to take effect",
             ignore=(ApiException,))

    # list + watch services
    names = {s.metadata.name for s in core.list_namespaced_service(namespace).items}
    assert "rbac" in names
    resp = core.list_service_for_all_namespaces(watch=True, timeout_seconds=1, _preload_content=False)
    try:
        assert resp.status == 200
    finally:
        _discard(resp)

    # services/status and the finalizer on services
    out = core.patch_namespaced_service_status(
        "rbac",
        namespace,
        {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.20", "ipMode": "Proxy"}]}}},
        _content_type=MERGE,
    )
    assert out.status.load_balancer.ingress[0].ip == "192.0.2.20"
    out = core.patch_namespaced_service(
        "rbac", namespace, {"metadata": {"finalizers": [CLEANUP_FINALIZER]}}, _content_type=MERGE
    )
    assert out.metadata.finalizers == [CLEANUP_FINALIZER]

    # nodes, and the EndpointSlices that weigh Local Services' servers
    core.list_node()
    client.DiscoveryV1Api(core.api_client).list_endpoint_slice_for_all_namespaces()

    # events, both APIs
    involved = {
        "apiVersion": "v1",
        "kind": "Service",
        "namespace": namespace,
        "name": "rbac",
        "uid": svc.metadata.uid,
    }
    core.create_namespaced_event(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "rbac-"},
            "involvedObject": involved,
            "reason": "IPAllocated",
            "message": "Assigned IP 192.0.2.20",
            "type": "Normal",
            "source": {"component": "lbappliance"},
        },
    )
    # The events.k8s.io API is not granted: the daemon writes core/v1 Events only (issue 14, item 15).
    expect_status(
        403,
        lambda: events_v1.create_namespaced_event(
            namespace,
            {
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {"generateName": "rbac-"},
                "eventTime": datetime.datetime.now(datetime.UTC).replace(microsecond=1),
                "regarding": involved,
                "reason": "IPAllocated",
                "note": "Assigned IP 192.0.2.20",
                "type": "Normal",
                "action": "Allocate",
                "reportingController": "lbappliance.io/controller",
                "reportingInstance": "lbappliance-a",
            },
        ),
    )

    # the leader lease: create, get, update (read + replace, as LeaderElector does; no patch)
    lease_body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE_NAME, "namespace": LEASE_NS},
        "spec": {"holderIdentity": "lbappliance-a", "leaseDurationSeconds": 15},
    }
    try:
        coord.create_namespaced_lease(LEASE_NS, lease_body)
    except ApiException as exc:
        if exc.status != 409:  # already there from an earlier test in the session
            raise
    lease = coord.read_namespaced_lease(LEASE_NAME, LEASE_NS)
    lease.spec.holder_identity = "lbappliance-b"
    lease = coord.replace_namespaced_lease(LEASE_NAME, LEASE_NS, lease)
    assert lease.spec.holder_identity == "lbappliance-b"
    expect_status(
        403,
        lambda: coord.patch_namespaced_lease(
            LEASE_NAME, LEASE_NS, {"spec": {"holderIdentity": "lbappliance-a"}}, _content_type=MERGE
        ),
    )

    # ... and nothing more: no verbs the code never uses
    expect_status(403, lambda: core.read_namespaced_service("rbac", namespace))
    expect_status(403, lambda: core.read_namespaced_service_status("rbac", namespace))
    expect_status(403, lambda: core.replace_namespaced_service("rbac", namespace, out))
    expect_status(403, lambda: core.read_node("any"))
    expect_status(403, lambda: core.list_namespaced_secret(namespace))
    expect_status(403, lambda: core.list_secret_for_all_namespaces())
    expect_status(403, lambda: core.read_namespaced_secret("anything", namespace))
    expect_status(403, lambda: core.delete_namespaced_service("rbac", namespace))
    expect_status(403, lambda: core.create_namespaced_service(namespace, lb_service("nope")))
    expect_status(403, lambda: core.list_namespaced_pod(namespace))
    expect_status(403, lambda: core.patch_node("any", {"metadata": {"labels": {"x": "y"}}}, _content_type=MERGE))
    expect_status(403, lambda: coord.list_namespaced_lease(LEASE_NS))
    expect_status(403, lambda: coord.delete_namespaced_lease(LEASE_NAME, LEASE_NS))
    expect_status(
        403,
        lambda: coord.create_namespaced_lease("default", {**lease_body, "metadata": {"name": LEASE_NAME}}),
    )
    expect_status(403, lambda: coord.read_namespaced_lease("someone-elses-lease", LEASE_NS))

    # leave the service deletable for the admin
    admin_core.patch_namespaced_service(
        "rbac", namespace, [{"op": "remove", "path": "/metadata/finalizers"}], _content_type=JSON_PATCH
    )


# --------------------------------------------------------------------------- watch + compaction


def _watch_first_event(api_client: Any, namespace: str, resource_version: str) -> tuple[int, dict[str, Any] | None]:
    """Open a Service watch from ``resource_version``; (HTTP status, first event or None).

    An expired resourceVersion shows up either as HTTP 410 (watch cache) or as
    an ERROR event carrying a Status with code 410 (etcd); callers accept both.
    """
    core = client.CoreV1Api(api_client)
    try:
        resp = core.list_namespaced_service(
            namespace,
            watch=True,
            resource_version=resource_version,
            timeout_seconds=3,
            allow_watch_bookmarks=False,
            _preload_content=False,
            _request_timeout=10,
        )
    except ApiException as exc:
        return exc.status, (json.loads(exc.body) if exc.body else None)
    try:
        buf = b""
        for chunk in resp.stream(4096):
            buf += chunk
            if b"\n" in buf:
                line = buf.split(b"\n", 1)[0]
                return resp.status, json.loads(line)
        return resp.status, (json.loads(buf) if buf.strip() else None)
    finally:
        _discard(resp)


def _discard(resp: Any) -> None:
    """Close a streamed response. (release_conn() on an unread watch stream would hand a
    dirty connection back to the pool and break the next request on it.)"""
    resp.close()
    resp.release_conn()


def _is_gone(status: int, event: dict[str, Any] | None) -> bool:
    if status == 410:
        return True
    return bool(event and event.get("type") == "ERROR" and event.get("object", {}).get("code") == 410)


def test_watch_from_compacted_resource_version_is_gone(control_plane: Any, admin_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    created = core.create_namespaced_service(namespace, lb_service("watched"))
    old_rv = created.metadata.resource_version
    for i in range(5):
        core.patch_namespaced_service(
            "watched", namespace, {"metadata": {"annotations": {"n": str(i)}}}, _content_type=MERGE
        )

    # Before compaction the old RV is still a valid place to resume from.
    status, event = _watch_first_event(admin_api, namespace, old_rv)
    assert status == 200 and event and event["type"] == "MODIFIED", (status, event)

    rev = control_plane.etcd_compact()
    assert rev > int(old_rv)

    # Measured on v1.34.4: right after compaction the apiserver's watch cache still
    # serves the compacted RV from memory (watch -> MODIFIED, even an Exact list).
    # After an API outage (restart) the cache re-lists at the current revision, and
    # resuming from the compacted RV answers 410: for a watch as HTTP 200 + an ERROR
    # event {code: 410, reason: Expired, "too old resource version"}, for an Exact
    # list as HTTP 410. The daemon must re-list on either form.
    control_plane.stop_apiserver()
    restart_s = control_plane.start_apiserver()
    print(f"\napiserver restart to ready: {restart_s:.2f}s")

    status, event = _watch_first_event(admin_api, namespace, old_rv)
    assert _is_gone(status, event), (status, event)

    # etcd itself refuses the compacted revision too (an exact list bypasses the cache).
    exc = expect_status(
        410,
        lambda: core.list_namespaced_service(namespace, resource_version=old_rv, resource_version_match="Exact"),
    )
    assert "compacted" in (exc.body or "") or "too old" in (exc.body or ""), exc.body

    # Recovery: list, then watch from the list's RV works.
    listed = core.list_namespaced_service(namespace)
    status, _ = _watch_first_event(admin_api, namespace, listed.metadata.resource_version)
    assert status == 200


# --------------------------------------------------------------------------- start-up time


def test_warm_start_to_ready_within_limit(control_plane_bin: Any) -> None:
    from lbappliance.testing.controlplane import ControlPlane

    with ControlPlane(control_plane_bin) as cp:
        seconds = cp.ready_seconds
        status, body = cp.request("GET", "/version")
        assert status == 200
        version = json.loads(body)
    print(f"\nwarm start to ready: {seconds:.2f}s, /version gitVersion={version['gitVersion']}")
    assert version["gitVersion"].startswith("v1.34."), version
    assert seconds is not None and seconds <= WARM_START_LIMIT_S, f"warm start took {seconds:.2f}s"
