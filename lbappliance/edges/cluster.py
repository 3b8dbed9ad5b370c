"""Kubernetes edge: list+watch caches, leader election, and the leader's writes.

Objects are cached as wire-format (camelCase) dicts, exactly what the API server sent, and
leave this module parsed into core models. Each watch resumes from its last resourceVersion, relists on 410 Gone,
and backs off while the API server is unreachable; the cache keeps its last contents
meanwhile, so an API outage never withdraws a VIP.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ..core.kube import (
    ObjectError,
    ParsedObjects,
    Patch,
    Unreadable,
    endpoint_counts,
    finalizer_patch,
    ingress_patch,
    publish_patch,
    service_from_object,
)
from ..core.models import FINALIZER, Family, Reason, Service

log = logging.getLogger(__name__)
COMPONENT = "lbappliance"


def api_client_from_kubeconfig(path: str | None) -> client.ApiClient:
    configuration = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = 32  # watches + parallel writers share the pool
    api = client.ApiClient(configuration)
    # The API server names a write's field manager after the user agent: ours, not the client's
    # generic "OpenAPI-Generator", so `doctor` (and anyone reading managedFields) can tell who wrote.
    api.user_agent = f"{COMPONENT}/{version('lbappliance')}"
    return api


def _read_json(resp: Any) -> Any:
    """The body of a `_preload_content=False` response as plain wire-format dicts.

    Skips the client's model objects (and our sanitize round trip back to dicts), which cost
    most of the CPU on the API path during a burst. Reading to the end hands the connection
    back to the pool; non-2xx answers were already raised as ApiException by the client.
    """
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def stream_lines(resp: Any) -> Iterator[bytes]:
    """The non-empty newline-separated lines of a streamed (watch) response."""
    pending = b""
    for chunk in resp.stream(amt=None):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))


@dataclass
class Informer:
    """One resource's list+watch loop feeding a dict cache; `on_change` wakes the reconciler."""

    name: str
    list_call: Callable[..., Any]
    on_change: Callable[[], None]
    watch_timeout: int = 240
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    synced: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    relists: int = 0
    generation: int = 0  # bumped on every change to the cache, so readers can skip unchanged work
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _resp: Any = None  # the open watch response, so stop() can interrupt a blocked read

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            # Shut the socket down rather than close the response: a read blocked in another
            # thread (TLS) holds locks that close() would wait on.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.cache.values())

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """The cache's generation and its objects, read together."""
        with self._lock:
            return self.generation, list(self.cache.values())

    def update_local(self, obj: Mapping[str, Any]) -> None:
        """Record our own write so the next pass sees it before the watch event arrives."""
        with self._lock:
            current = self.cache.get(_key(obj))
            if current is None or _rv(obj) >= _rv(current):
                self.cache[_key(obj)] = dict(obj)
                self.generation += 1

    def _relist(self) -> str:
        self.requests += 1
        # Raw JSON: items of a list carry no kind/apiVersion (parse_objects does not need them).
        listing = _read_json(self.list_call(_request_timeout=30, _preload_content=False))
        version = (listing.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise ValueError("list answer without metadata.resourceVersion")
        items = {_key(obj): obj for obj in listing.get("items") or []}
        with self._lock:
            self.cache = items
            self.generation += 1
        self.relists += 1
        self.synced.set()
        self.on_change()
        return str(version)

    def _run(self) -> None:
        backoff = 0.2
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch_from(version)
                backoff = 0.2
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s watch: resourceVersion %s expired (410 Gone); relisting", self.name, version)
                    version = None
                    continue
                log.warning("%s watch: API error %s %s; retrying in %.1fs", self.name, exc.status, exc.reason,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():  # stop() shut the socket down under the read
                    break
                log.warning("%s watch: API unreachable (%s); keeping the last data, retrying in %.1fs",
                            self.name, type(exc).__name__, backoff)
                self._stop.wait(backoff + random.uniform(0, backoff / 4))
                backoff = min(backoff * 2, 10.0)

    def _watch_from(self, version: str) -> str | None:
        """Follow one watch request; the last resourceVersion seen, or None to relist (410 Gone).

        Events are parsed as plain JSON, not through watch.Watch().stream(): its model
        deserialization is wasted on us, and in client 37.0.2 its deserialize=False mode fails
        with KeyError('raw_object') on the ERROR event that carries a 410.
        """
        self.requests += 1
        resp = self.list_call(watch=True, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, _request_timeout=self.watch_timeout + 30,
                              _preload_content=False)
        self._resp = resp
        try:
            if self._stop.is_set():  # stop() ran before the response existed
                return version
            for line in stream_lines(resp):
                event = json.loads(line)
                kind = event.get("type")
                raw = event.get("object") or {}
                if kind == "ERROR":
                    if raw.get("code") == 410:
                        log.info("%s watch: 410 Gone in stream; relisting", self.name)
                        return None
                    raise ApiException(status=raw.get("code"), reason=f"{raw.get('reason')}: {raw.get('message')}")
                version = (raw.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                with self._lock:
                    if kind == "DELETED":
                        self.cache.pop(_key(raw), None)
                    else:
                        self.cache[_key(raw)] = raw
                    self.generation += 1
                self.on_change()
                if self._stop.is_set():
                    break
        finally:
            self._resp = None
            # close() before release_conn(): an unfinished stream must not go back to the pool.
            resp.close()
            resp.release_conn()
        return version


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _microtime(when: dt.datetime) -> dt.datetime:
    """A Lease time the API server accepts: MicroTime needs six fractional digits, and the
    client's isoformat() drops them when the microseconds are zero (400 Bad Request)."""
    return when if when.microsecond else when.replace(microsecond=1)


class LeaderElector:
    """A coordination.k8s.io Lease; only its holder allocates and writes Service objects."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str,
                 lease_duration: float, renew_deadline: float) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self._leader_until = 0.0

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def reload(self, namespace: str, name: str, lease_duration: float, renew_deadline: float) -> None:
        """New lease settings: a different Lease is released first (the peer may take it at once)."""
        if (namespace, name) != (self.namespace, self.name):
            self.release()
        self.namespace, self.name = namespace, name
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """One attempt; on any API failure leadership lapses after renewDeadline on its own."""
        now = _microtime(dt.datetime.now(dt.UTC))
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=5)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("leader election: cannot read lease: %s %s", exc.status, exc.reason)
                return self.is_leader
            return self._create(now)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("leader election: API unreachable (%s)", type(exc).__name__)
            return self.is_leader
        if lease.spec is None:  # a Lease someone created bare: treat it as free
            lease.spec = client.V1LeaseSpec()
        spec = lease.spec
        holder = spec.holder_identity
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or (now - renewed).total_seconds() > (spec.lease_duration_seconds or 15)
        if holder != self.identity and not expired:
            self._step_down()
            return False
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.lease_duration)
        try:
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=5)
        except ApiException as exc:
            log.info("leader election: lost the race for the lease (%s)", exc.status)
            self._step_down()
            return False
        except (urllib3.exceptions.HTTPError, OSError):
            return self.is_leader
        self._became(holder)
        return True

    def _create(self, now: dt.datetime) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(holder_identity=self.identity, acquire_time=now, renew_time=now,
                                    lease_duration_seconds=int(self.lease_duration), lease_transitions=0),
        )
        try:
            self.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=5)
        except ApiException as exc:
            log.info("leader election: cannot create lease (%s)", exc.status)
            return False
        except (urllib3.exceptions.HTTPError, OSError):
            return False
        self._became(None)
        return True

    def _became(self, previous: str | None) -> None:
        if not self.is_leader:
            log.info("leader election: %s is now the leader (was %s)", self.identity, previous)
        self._leader_until = time.monotonic() + self.renew_deadline

    def _step_down(self) -> None:
        if self.is_leader:
            log.warning("leader election: %s lost leadership", self.identity)
        self._leader_until = 0.0

    def release(self) -> None:
        """On clean shutdown hand over at once instead of after the lease duration."""
        if not self.is_leader:
            return
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=3)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.renew_time = _microtime(dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
                lease.spec.lease_duration_seconds = 1
                self.coordination.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=3)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.info("leader election: could not release lease: %s", exc)
        self._leader_until = 0.0


class Publisher:
    """The leader's writes: finalizers, status, Events. Every write is idempotent and best effort.

    What to write is decided in the core (`core/kube.py`); this only sends it. An answer is
    handed to `on_written` (the cache, so the next pass sees our write before its watch event)
    and comes back parsed: the raw objects never leave this module.
    """

    def __init__(self, api: client.ApiClient, identity: str,
                 on_written: Callable[[Mapping[str, Any]], None] = lambda _obj: None) -> None:
        self.api = api
        self.identity = identity
        self.on_written = on_written
        self.requests = 0
        self.status_takes_finalizers = True  # see publish()

    def _send(self, method: str, path: str, body: dict[str, Any], content_type: str, timeout: float) -> Any:
        """One JSON request through the client's connection pool and credentials (token refresh
        included), without its generated API method, which validates every argument and the body
        with pydantic first: about a tenth of the CPU a status write costs here (bench/api_writes.py),
        and a burst of new Services makes two writes each. Non-2xx answers raise ApiException, as
        the method does.
        """
        self.requests += 1
        headers = {**self.api.default_headers, "Accept": "application/json", "Content-Type": content_type}
        self.api.update_params_for_auth(headers, [], ["BearerToken"], path, method, body)
        resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
            method, self.api.configuration.host + path, headers=headers, body=body, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.response.drain_conn()  # to its end, so the connection goes back to the pool
            resp.response.release_conn()
            raise ApiException(status=resp.status, reason=resp.reason)
        return resp.response

    def _patch(self, namespace: str, name: str, body: Patch, status: bool = False) -> dict[str, Any] | None:
        path = f"/api/v1/namespaces/{quote(namespace)}/services/{quote(name)}" + ("/status" if status else "")
        try:
            result: dict[str, Any] = _read_json(self._send("PATCH", path, body, "application/merge-patch+json", 10))
        except ApiException as exc:
            if exc.status == 404:
                return None
            log.warning("Service %s/%s: %s patch failed: %s %s", namespace, name,
                        "status" if status else "metadata", exc.status, exc.reason)
            return None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("Service %s/%s: API unreachable (%s)", namespace, name, type(exc).__name__)
            return None
        return result

    def _write(self, service: Service, patch: Patch | None, status: bool) -> Service | None:
        """Send `patch` (None: nothing to write, the Service stands); the Service as written, or
        None when the write failed (it is retried by a later pass)."""
        if patch is None:
            return service
        answer = self._patch(service.namespace, service.name, patch, status)
        if answer is None:
            return None
        self.on_written(answer)
        try:
            return service_from_object(answer)
        except (ObjectError, AttributeError, TypeError) as exc:
            log.warning("Service %s: unreadable answer to our write: %s", service.key, exc)
            return None

    def set_finalizer(self, service: Service, present: bool) -> Service | None:
        return self._write(service, finalizer_patch(service, present), status=False)

    def set_ingress(self, service: Service, ips: tuple[str, ...]) -> Service | None:
        return self._write(service, ingress_patch(service, ips), status=True)

    def publish(self, service: Service, ips: tuple[str, ...]) -> Service | None:
        """Finalizer and addresses, in one compare-and-swap write when the finalizer is missing
        (`publish_patch`). An API server that drops the metadata part is noticed on its answer:
        the finalizer follows in its own write, and from then on goes first, as a separate write.
        """
        if not self.status_takes_finalizers and FINALIZER not in service.finalizers:
            with_finalizer = self.set_finalizer(service, present=True)
            return None if with_finalizer is None else self.set_ingress(with_finalizer, ips)
        after = self._write(service, publish_patch(service, ips), status=True)
        if after is None or FINALIZER in after.finalizers:
            return after
        log.warning("this API server ignores finalizers written with status; writing them separately")
        self.status_takes_finalizers = False
        return self.set_finalizer(after, present=True)

    def event(self, about: Service | Unreadable, reason: Reason, message: str, warning: bool = False) -> None:
        """Best effort: a failed Event is logged and never breaks the loop. `about` is a Service, or
        an object we could not read (a Node's Event goes to the default namespace, as kubelet's do)."""
        # A wire-format dict, not client models: the same fields, without building models for
        # the request and deserializing the answer (which nobody reads) into more of them.
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        kind = about.kind if isinstance(about, Unreadable) else "Service"
        namespace = about.namespace or "default"
        involved = {"kind": kind, "apiVersion": "v1", "name": about.name, "namespace": about.namespace or None,
                    "uid": about.uid or None, "resourceVersion": about.resource_version or None}
        body = {
            "metadata": {"generateName": f"{about.name}.", "namespace": namespace},
            "involvedObject": {k: v for k, v in involved.items() if v is not None},
            "reason": reason.value, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self.identity},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": COMPONENT, "reportingInstance": self.identity,
        }
        try:
            resp = self._send("POST", f"/api/v1/namespaces/{quote(namespace)}/events", body, "application/json", 5)
            resp.drain_conn()  # read the answer to its end so the connection goes back to the pool
            resp.release_conn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.info("%s %s/%s: event %s not recorded: %s", kind, namespace, about.name, reason.value,
                     getattr(exc, "reason", exc))


@dataclass(frozen=True)
class Parsed:
    """What a cache holds, as the core reads it: the readable objects and one line per unreadable one."""

    items: tuple[Any, ...]
    errors: tuple[Unreadable, ...]


class Cluster:
    """Caches of Services and Nodes plus the writers, behind one small surface for the daemon.

    The caches hold wire-format dicts; what leaves is parsed (`ParsedObjects` re-reads an object
    only when its uid or resourceVersion changed).
    """

    def __init__(self, api: client.ApiClient, on_change: Callable[[], None], identity: str) -> None:
        core = client.CoreV1Api(api)
        self._services = Informer("services", core.list_service_for_all_namespaces, on_change)
        self._nodes = Informer("nodes", core.list_node, on_change)
        # Ready endpoints per node weigh `Local` Services' servers; without them (an older RBAC)
        # every node weighs the same, as before.
        self._slices = Informer("endpointslices", client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
                                on_change)
        self._parsed_services, self._parsed_nodes = ParsedObjects("Service"), ParsedObjects("Node")
        self._counted: tuple[int, dict[str, dict[Family, dict[str, int]]]] = (-1, {})
        self.publisher = Publisher(api, identity, self._services.update_local)

    def services(self) -> Parsed:
        items, errors = self._parsed_services.parse(self._services.items())
        return Parsed(tuple(items), tuple(errors))

    def nodes(self) -> Parsed:
        items, errors = self._parsed_nodes.parse(self._nodes.items())
        return Parsed(tuple(items), tuple(errors))

    def endpoints(self) -> dict[str, dict[Family, dict[str, int]]]:
        """Service key -> family -> node -> ready endpoints (`core/kube.endpoint_counts`), counted
        again only when a slice changed: every pass asks, and a cluster has thousands of slices."""
        if self._counted[0] != self._slices.generation:
            generation, slices = self._slices.snapshot()
            self._counted = (generation, endpoint_counts(slices))
        return self._counted[1]

    def start(self) -> None:
        for informer in (self._services, self._nodes, self._slices):
            informer.start()

    def stop(self) -> None:
        for informer in (self._services, self._nodes, self._slices):
            informer.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in (self._services, self._nodes))

    @property
    def requests(self) -> int:
        return self._services.requests + self._nodes.requests + self._slices.requests + self.publisher.requests
