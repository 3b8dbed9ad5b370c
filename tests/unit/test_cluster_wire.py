"""The Kubernetes edge on the wire: raw JSON lists, watches and writes through the real client
(37.x) with its HTTP pool replaced by scripted answers, so no API server is needed."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lbappliance.core.kube import service_from_object
from lbappliance.core.models import Reason, Service
from lbappliance.edges.cluster import Informer, LeaderElector, Publisher

Answer = tuple[int, bytes] | Callable[[], tuple[int, bytes]]


class Body(io.BytesIO):
    """A response body that closes itself at its end, as http.client's does (urllib3's
    stream() reads until the body reports closed)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = len(data)

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            return b""
        data = super().read(size)
        if self.tell() >= self.size:
            self.close()
        return data


class FakePool:
    """Stands in for urllib3's PoolManager: answers requests from a script, records them."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def request(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
                **_: Any) -> urllib3.HTTPResponse:
        self.requests.append((method, url, json.loads(body) if body else None))
        self.headers.append(dict(headers or {}))
        answer = self.answers.pop(0)
        status, data = answer() if callable(answer) else answer
        return urllib3.HTTPResponse(body=Body(data), status=status, preload_content=False,
                                    headers={"Content-Type": "application/json"})


def api_with(pool: FakePool) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = "http://api.invalid"
    api = client.ApiClient(configuration)
    api.rest_client.pool_manager = pool
    return api


def lines(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def svc(name: str, rv: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}, **extra}


def informer(pool: FakePool) -> tuple[Informer, list[int]]:
    api = api_with(pool)
    changes: list[int] = []
    inf = Informer("services", client.CoreV1Api(api).list_service_for_all_namespaces,
                   lambda: changes.append(1))
    return inf, changes


LIST = {"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
        "items": [{"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "3",
                                "creationTimestamp": "2026-01-02T03:04:05Z"},
                   "spec": {"type": "LoadBalancer", "someFieldTheModelLacks": True}}]}


def test_relist_keeps_the_wire_dicts_and_the_list_version() -> None:
    pool = FakePool([(200, json.dumps(LIST).encode())])
    inf, changes = informer(pool)
    assert inf._relist() == "7"
    # Exactly what the API server sent: camelCase, "Z" timestamps, fields unknown to the models.
    assert inf.items() == LIST["items"]
    assert inf.synced.is_set() and changes == [1] and inf.relists == 1


def test_relist_error_is_an_api_exception() -> None:
    inf, _ = informer(FakePool([(503, b'{"kind":"Status","code":503}')]))
    with pytest.raises(ApiException) as info:
        inf._relist()
    assert info.value.status == 503
    assert not inf.synced.is_set()


def test_watch_applies_events_and_keeps_the_bookmark_version() -> None:
    stream = lines(
        {"type": "ADDED", "object": svc("b", "8")},
        {"type": "MODIFIED", "object": svc("a", "9", status={"loadBalancer": {}})},
        {"type": "DELETED", "object": svc("b", "10")},
        {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "12"}}},
    )
    pool = FakePool([(200, json.dumps(LIST).encode()), (200, stream)])
    inf, changes = informer(pool)
    version = inf._watch_from(inf._relist())
    assert version == "12"
    assert inf.items() == [svc("a", "9", status={"loadBalancer": {}})]
    assert len(changes) == 1 + 3  # the list, then every event but the bookmark
    query = parse_qs(urlsplit(pool.requests[1][1]).query)
    assert query["watch"] == ["true"] and query["resourceVersion"] == ["7"]
    assert query["allowWatchBookmarks"] == ["true"] and query["timeoutSeconds"] == ["240"]


def test_watch_error_410_event_asks_for_a_relist() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 7 (20)"}}
    inf, _ = informer(FakePool([(200, lines({"type": "ADDED", "object": svc("b", "8")}, gone))]))
    assert inf._watch_from("7") is None
    assert list(inf.cache) == ["ns/b"]


def test_watch_other_error_event_is_an_api_exception() -> None:
    err = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError", "message": "boom"}}
    inf, _ = informer(FakePool([(200, lines(err))]))
    with pytest.raises(ApiException) as info:
        inf._watch_from("7")
    assert info.value.status == 500 and "boom" in str(info.value.reason)


def test_watch_http_410_is_an_api_exception_410() -> None:
    inf, _ = informer(FakePool([(410, b'{"kind":"Status","code":410,"reason":"Expired"}')]))
    with pytest.raises(ApiException) as info:
        inf._watch_from("7")
    assert info.value.status == 410


def test_run_relists_after_a_410_event_and_stops() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
    relisted = dict(LIST, metadata={"resourceVersion": "20"})
    inf: Informer

    def last_watch() -> tuple[int, bytes]:
        inf.stop()
        return 200, lines({"type": "ADDED", "object": svc("c", "21")})

    pool = FakePool([(200, json.dumps(LIST).encode()), (200, lines(gone)),
                     (200, json.dumps(relisted).encode()), last_watch])
    inf, _ = informer(pool)
    runner = threading.Thread(target=inf._run)
    runner.start()
    runner.join(10)
    assert not runner.is_alive()
    assert inf.relists == 2 and inf.requests == 4
    assert parse_qs(urlsplit(pool.requests[3][1]).query)["resourceVersion"] == ["20"]


def test_patch_returns_the_answer_as_a_wire_dict() -> None:
    answer = svc("a", "11", metadata={"name": "a", "namespace": "ns", "resourceVersion": "11",
                                      "finalizers": ["lbappliance.io/cleanup"]})
    pool = FakePool([(200, json.dumps(answer).encode())])
    pub = Publisher(api_with(pool), "app1")
    body = {"metadata": {"finalizers": ["lbappliance.io/cleanup"], "resourceVersion": "10"}}
    assert pub._patch("ns", "a", body) == answer
    method, url, sent = pool.requests[0]
    assert (method, sent) == ("PATCH", body) and url.endswith("/api/v1/namespaces/ns/services/a")


@pytest.mark.parametrize("status", [404, 409, 500])
def test_patch_errors_are_none(status: int) -> None:
    pub = Publisher(api_with(FakePool([(status, b'{"kind":"Status"}')])), "app1")
    assert pub._patch("ns", "a", {"status": {}}, status=True) is None


def test_event_body_is_the_model_event_in_wire_format() -> None:
    pool = FakePool([(201, b'{"kind":"Event"}')])
    api = api_with(pool)
    Publisher(api, "app1").event(Service("ns", "a", uid="u-1", resource_version="5"),
                                 Reason.ALLOCATED, "x" * 2000, warning=True)
    method, url, sent = pool.requests[0]
    assert method == "POST" and url.endswith("/api/v1/namespaces/ns/events")
    # What the model-built body serialized to, before this was a plain dict.
    model = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="a.", namespace="ns"),
        involved_object=client.V1ObjectReference(kind="Service", api_version="v1", name="a", namespace="ns",
                                                 uid="u-1", resource_version="5"),
        reason=Reason.ALLOCATED.value, message="x" * 1024, type="Warning",
        source=client.V1EventSource(component="lbappliance", host="app1"),
        count=1, reporting_component="lbappliance", reporting_instance="app1",
    )
    timestamps = {k: sent.pop(k) for k in ("firstTimestamp", "lastTimestamp")}
    assert sent == api.sanitize_for_serialization(model)
    assert timestamps["firstTimestamp"] == timestamps["lastTimestamp"]
    # RFC 3339 in UTC, as the API server writes them.
    assert timestamps["firstTimestamp"].endswith("Z")
    sent_at = dt.datetime.fromisoformat(timestamps["firstTimestamp"])
    assert sent_at.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - sent_at).total_seconds()) < 60


def test_writes_carry_the_clients_credentials_refreshed_and_its_user_agent() -> None:
    """Writes skip the generated API methods, not the client's auth: a token that the client
    refreshes (in-cluster, exec plugins) is asked for on every write."""
    pool = FakePool([(200, b'{"kind":"Service"}'), (201, b'{"kind":"Event"}')])
    api = api_with(pool)
    tokens = iter(["first", "second"])
    api.configuration.api_key["authorization"] = "expired"
    api.configuration.api_key_prefix["authorization"] = "Bearer"
    api.configuration.refresh_api_key_hook = lambda c: c.api_key.update(authorization=next(tokens))
    pub = Publisher(api, "app1")
    pub._patch("ns", "a", {"status": {}}, status=True)
    pub.event(Service("ns", "a"), Reason.ALLOCATED, "hello")
    assert [h["authorization"] for h in pool.headers] == ["Bearer first", "Bearer second"]
    assert pool.headers[0]["Content-Type"] == "application/merge-patch+json"
    assert pool.headers[1]["Content-Type"] == "application/json"
    assert all(h["User-Agent"] == api.user_agent and h["Accept"] == "application/json" for h in pool.headers)
    assert pub.requests == 2


def test_event_without_uid_omits_it_and_failures_are_swallowed() -> None:
    pool = FakePool([(403, b'{"kind":"Status","code":403}')])
    Publisher(api_with(pool), "app1").event(Service("ns", "a"), Reason.RELEASED, "bye")
    assert pool.requests[0][2]["involvedObject"] == {"kind": "Service", "apiVersion": "v1", "name": "a",
                                                     "namespace": "ns"}


def test_release_sends_a_renew_time_the_api_server_parses() -> None:
    """MicroTime wants six fractional digits; a bare 1970-01-01T00:00:00+00:00 was a 400."""
    lease = {"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
             "metadata": {"name": "lb", "namespace": "kube-system", "resourceVersion": "3"},
             "spec": {"holderIdentity": "app1", "leaseDurationSeconds": 4,
                      "renewTime": "2026-01-02T03:04:05.123456Z"}}
    pool = FakePool([(200, json.dumps(lease).encode()), (200, json.dumps(lease).encode())])
    elector = LeaderElector(api_with(pool), "kube-system", "lb", "app1", lease_duration=4, renew_deadline=3)
    elector._leader_until = float("inf")
    elector.release()
    method, _, sent = pool.requests[1]
    assert method == "PUT" and sent["spec"]["leaseDurationSeconds"] == 1
    assert re.fullmatch(r"1970-01-01T00:00:00\.\d{6}(Z|\+00:00)", sent["spec"]["renewTime"]), sent["spec"]
    assert not elector.is_leader


FIN = "service.kubernetes.io/load-balancer-cleanup"


def _served(rv: str, finalizers: list[str], ips: list[str]) -> dict[str, Any]:
    return svc("a", rv, metadata={"name": "a", "namespace": "ns", "resourceVersion": rv, "finalizers": finalizers},
               status={"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "Proxy"} for ip in ips]}})


def test_publish_writes_finalizer_and_status_in_one_compare_and_swap() -> None:
    after = _served("11", ["other.io/x", FIN], ["192.0.2.10"])
    pool = FakePool([(200, json.dumps(after).encode())])
    written: list[Any] = []
    pub = Publisher(api_with(pool), "app1", written.append)
    new = svc("a", "10", metadata={"name": "a", "namespace": "ns", "resourceVersion": "10",
                                   "finalizers": ["other.io/x"]})
    assert pub.publish(service_from_object(new), ("192.0.2.10",)) == service_from_object(after)
    assert written == [after]  # the answer goes to the cache; the raw dict stays in the edge
    [(method, url, sent)] = pool.requests
    assert method == "PATCH" and url.endswith("/api/v1/namespaces/ns/services/a/status")
    assert sent == {"metadata": {"finalizers": ["other.io/x", FIN], "resourceVersion": "10"},
                    "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "Proxy"}]}}}


def test_publish_with_the_finalizer_in_place_writes_only_the_status() -> None:
    pool = FakePool([(200, json.dumps(_served("12", [FIN], ["192.0.2.11"])).encode())])
    pub = Publisher(api_with(pool), "app1")
    pub.publish(service_from_object(_served("11", [FIN], ["192.0.2.10"])), ("192.0.2.11",))
    [(_, url, sent)] = pool.requests
    assert url.endswith("/status") and sent == {"status": {"loadBalancer": {"ingress": [
        {"ip": "192.0.2.11", "ipMode": "Proxy"}]}}}


def test_publish_falls_back_to_finalizer_first_when_status_drops_metadata() -> None:
    """An API server that ignores metadata on /status: the finalizer follows at once, and later
    Services get it first, in its own write."""
    pool = FakePool([(200, json.dumps(_served("11", [], ["192.0.2.10"])).encode()),
                     (200, json.dumps(_served("12", [FIN], ["192.0.2.10"])).encode()),
                     (200, json.dumps(svc("b", "21", metadata={"name": "b", "namespace": "ns", "resourceVersion": "21",
                                                                "finalizers": [FIN]})).encode()),
                     (200, json.dumps(_served("22", [FIN], ["192.0.2.11"])).encode())])
    pub = Publisher(api_with(pool), "app1")
    first = pub.publish(service_from_object(svc("a", "10")), ("192.0.2.10",))
    assert first is not None and FIN in first.finalizers
    assert not pub.status_takes_finalizers
    pub.publish(service_from_object(svc("b", "20")), ("192.0.2.11",))
    urls = [url.split("/services/")[1] for _, url, _ in pool.requests]
    assert urls == ["a/status", "a", "b", "b/status"]


def test_a_status_that_already_says_proxy_is_not_written_again() -> None:
    pool = FakePool([])
    pub = Publisher(api_with(pool), "app1")
    current = service_from_object(_served("11", [FIN], ["192.0.2.10"]))
    assert pub.publish(current, ("192.0.2.10",)) is current
    assert pool.requests == []


def test_an_ingress_without_ipmode_proxy_is_rewritten() -> None:
    obj = svc("a", "11", metadata={"name": "a", "namespace": "ns", "resourceVersion": "11", "finalizers": [FIN]},
              status={"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"}]}})
    pool = FakePool([(200, json.dumps(_served("12", [FIN], ["192.0.2.10"])).encode())])
    Publisher(api_with(pool), "app1").publish(service_from_object(obj), ("192.0.2.10",))
    [(_, url, sent)] = pool.requests
    assert url.endswith("/status") and sent["status"]["loadBalancer"]["ingress"] == [
        {"ip": "192.0.2.10", "ipMode": "Proxy"}]


def test_a_bare_lease_without_spec_is_taken_not_a_crash_of_the_election_thread() -> None:
    bare = {"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": "lb", "namespace": "kube-system", "resourceVersion": "3"}}
    pool = FakePool([(200, json.dumps(bare).encode()), (200, json.dumps(bare).encode())])
    elector = LeaderElector(api_with(pool), "kube-system", "lb", "app1", lease_duration=4, renew_deadline=3)
    assert elector.try_acquire_or_renew() is True
    method, _, sent = pool.requests[1]
    assert method == "PUT" and sent["spec"]["holderIdentity"] == "app1"


def test_endpoint_counts_are_counted_again_only_when_a_slice_changed() -> None:
    from lbappliance.edges.cluster import Cluster

    cluster = Cluster(api_with(FakePool([])), lambda: None, "app1")
    piece = {"kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": "web-1", "namespace": "ns", "resourceVersion": "1",
                          "labels": {"kubernetes.io/service-name": "web"}},
             "endpoints": [{"addresses": ["198.51.100.9"], "nodeName": "node1", "conditions": {"ready": True}}]}
    cluster._slices.update_local(piece)
    first = cluster.endpoints()
    assert first == {"ns/web": {"IPv4": {"node1": 1}}}
    assert cluster.endpoints() is first  # nothing changed: not counted again
    cluster._slices.update_local({**piece, "metadata": {**piece["metadata"], "resourceVersion": "2"},
                                  "endpoints": piece["endpoints"] * 2})
    assert cluster.endpoints() == {"ns/web": {"IPv4": {"node1": 2}}}


def test_only_servers_the_checks_hold_down_carry_over_a_reload_and_never_in_maintenance() -> None:
    from lbappliance.edges.haproxy import down_servers_only

    dump = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight\n"
            "2 b 1 dead 192.0.2.13 0 0 1 1 1 8 2 0 6 0 0 0 - 30080 - 0 0 - - 0\n"
            "2 b 2 gone 192.0.2.12 0 1 1 1 0 1 0 0 0 0 0 0 - 30080 - 0 0 - - 0\n"
            "2 b 3 up 192.0.2.11 2 0 3 3 9 6 3 4 6 0 0 0 - 30080 - 0 0 - - 0\n")
    assert down_servers_only(dump).splitlines() == [
        "1",
        "2 b 1 dead 192.0.2.13 0 0 1 1 1 8 2 0 6 0 0 0 - 30080 - 0 0 - - 0",
        "2 b 2 gone 192.0.2.12 0 0 1 1 0 1 0 0 0 0 0 0 - 30080 - 0 0 - - 0"]
