"""Lab nodes that are Kubernetes nodes: real kube-proxy, pods, and a lab endpoints controller.

A real cluster's traffic goes client -> VIP -> HAProxy (or the appliance's nftables for UDP) ->
node NodePort -> kube-proxy -> pod. The look-alike responders of :mod:`netlab` end at the
NodePort; this module puts the rest of the path in the lab, so the e2e tests and
`lbappliance lab up` prove the appliance against the component a deployment depends on.

Per node host of a :class:`~lbappliance.testing.netlab.NetworkLab`:

* a Node object with the InternalIP addresses of the node's families (dual-stack, or a single
  family: the other family's address is then removed from its ``eth0``), created *before*
  kube-proxy starts (started without it, kube-proxy falls back to loopback node IPs for good);
* real ``kube-proxy`` (built by tools/controlplane/build.sh), nftables mode, flags from
  ../shared/notes/kube-proxy-facts.md, identity ``system:kube-proxy`` (the apiserver's bootstrap
  binding to the ClusterRole ``system:node-proxier``), reaching the apiserver through
  :mod:`apirelay`;
* pods: addresses from the documentation ranges on a veth pair inside the node's namespace (the
  kernel here has no dummy interface), node K owning 198.51.100.16(K-1)/28 and 2001:db8:1:K::/64,
  with routes to every other node's pod ranges, as a CNI would set up. Each pod is an HAProxy
  answering ``"<pod>@<node>"`` on :data:`POD_HTTP_PORTS`, the client's address after a PROXY
  header on :data:`POD_PROXY_PORT`, and optionally a UDP echo on :data:`POD_UDP_PORTS`.

There is no kubelet or controller-manager, so :class:`KubeNodes` also writes the EndpointSlices
(label ``kubernetes.io/service-name``, ``nodeName``, ready/serving/terminating) from each
Service's selector to the lab's pods. Lab convention: a pod made with ``labels=None`` (the
default pods of :meth:`KubeNodes.default_pods`) matches every selector, like a DaemonSet that
serves any Service; a Service without a selector gets no slices from it (as in Kubernetes).
A Service's targetPort must be one the pods serve (numbers; names ``http``/``proxy``/``udp``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .netlab import HOST_IFACE, UDP_ECHO_SNIPPET, LabError, LabHost, NetworkLab
from .wait import wait_for

log = logging.getLogger(__name__)

Family = Literal["IPv4", "IPv6"]
DUAL: tuple[Family, ...] = ("IPv4", "IPv6")
V4: tuple[Family, ...] = ("IPv4",)
V6: tuple[Family, ...] = ("IPv6",)

KUBE_PROXY = "kube-proxy"
#: The user the apiserver's bootstrap ClusterRoleBinding `system:node-proxier` names.
KUBE_PROXY_USER = "system:kube-proxy"
KUBE_PROXY_HEALTH_PORT = 10256
POD_HTTP_PORTS = (80, 8080, 8443, 5353, 8853)
POD_PROXY_PORT = 8081
#: Answers "<pod>@<node> <source address>": with Cluster policy kube-proxy masquerades only what it
#: forwards to another node, so the source tells which node's NodePort the request entered.
POD_SOURCE_PORT = 8082
POD_UDP_PORTS = (7, 53, 5353, 8080)
NAMED_PORTS = {"http": 8080, "proxy": POD_PROXY_PORT, "source": POD_SOURCE_PORT, "udp": 8080}
#: kube-proxy's /healthz turns 503 by itself on this taint (cluster-autoscaler's drain mark).
DRAIN_TAINT = "ToBeDeletedByClusterAutoscaler"
LAB_FINALIZER = "lab.lbappliance.io/drain"
MANAGED_BY = "lab.lbappliance.io"
POD_IFACE = "pods"
MAX_KUBE_NODES = 16  # 198.51.100.0/24 split into /28s

_HERE = Path(__file__).resolve().parent

def pod_ranges(node: str) -> tuple[str, str]:
    """Node K's pod ranges: 198.51.100.16(K-1)/28 and 2001:db8:1:K::/64 (documentation ranges)."""
    k = int(node.removeprefix("node"))
    if not 1 <= k <= MAX_KUBE_NODES:
        raise LabError(f"kube nodes are node1..node{MAX_KUBE_NODES}, not {node}")
    return f"198.51.100.{16 * (k - 1)}/28", f"2001:db8:1:{k:x}::/64"


def answer_node(answer: str) -> str:
    """The node of an answer ``"<pod>@<node>"`` (what a pod says)."""
    return answer.rpartition("@")[2]


def answer_pod(answer: str) -> str:
    return answer.partition("@")[0]


def entry_node(answer: str, nodes: Mapping[str, Iterable[str]]) -> str:
    """Which node's NodePort a request entered, from a :data:`POD_SOURCE_PORT` answer: the source
    is that node's address when kube-proxy forwarded (and masqueraded) it, else the pod's own node."""
    ident, _, source = answer.partition(" ")
    return next((name for name, addrs in nodes.items() if source in addrs), answer_node(ident))


def _url(address: str, port: int, path: str = "/") -> str:
    return f"http://[{address}]:{port}{path}" if ":" in address else f"http://{address}:{port}{path}"


@dataclass
class Pod:
    """A lab pod: an address per family of its node, a name, labels (None: matches every selector)."""

    name: str
    node: str
    ipv4: str | None
    ipv6: str | None
    labels: dict[str, str] | None = None
    ready: bool = True
    terminating: bool = False
    udp: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def ident(self) -> str:
        """What the pod answers with: ``"<pod>@<node>"``."""
        return f"{self.name}@{self.node}"

    def address(self, family: str) -> str | None:
        return self.ipv4 if family == "IPv4" else self.ipv6

    def selected_by(self, selector: Mapping[str, str] | None) -> bool:
        if not selector:
            return False
        return self.labels is None or all(self.labels.get(k) == v for k, v in selector.items())


def pod_haproxy_config(pod: Pod) -> str:
    """haproxy.cfg of one pod: fixed answers on the pod's addresses only."""
    addrs = [a for a in (pod.ipv4, pod.ipv6) if a]
    binds = "\n".join(f"    bind {'[' + a + ']' if ':' in a else a}:{p}" for a in addrs for p in POD_HTTP_PORTS)
    source_binds = "\n".join(f"    bind {'[' + a + ']' if ':' in a else a}:{POD_SOURCE_PORT}" for a in addrs)
    proxy_binds = "\n".join(f"    bind {'[' + a + ']' if ':' in a else a}:{POD_PROXY_PORT} accept-proxy"
                            for a in addrs)
    return f"""\
global
    maxconn 4000
    log stderr format raw local0 warning

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend pod
{binds}
    http-request return status 200 content-type text/plain string "{pod.ident}\\n" hdr X-Pod {pod.ident}

frontend pod-source
{source_binds}
    http-request return status 200 content-type text/plain lf-string "{pod.ident} %[src]\\n" hdr X-Pod {pod.ident}

frontend pod-proxy
{proxy_binds}
    http-request return status 200 content-type text/plain lf-string "{pod.ident} %[src]\\n" hdr X-Pod {pod.ident}
"""


def kube_proxy_binary(bin_dir: Path) -> Path:
    path = Path(bin_dir) / KUBE_PROXY
    if not os.access(path, os.X_OK):
        raise LabError(f"{path} missing: run tools/controlplane/build.sh (it builds kube-proxy beside the apiserver)")
    return path


class KubeNodes:
    """The lab's node hosts as Kubernetes nodes (see the module docstring); a context manager.

    ``families`` maps a node name to its families (default: every node dual-stack).
    """

    def __init__(self, lab: NetworkLab, control_plane: Any, admin_api: Any,
                 families: Mapping[str, Sequence[Family]] | None = None, *, sync_interval: float = 0.2) -> None:
        from kubernetes import client

        self.lab = lab
        self.cp = control_plane
        self.core = client.CoreV1Api(admin_api)
        self.discovery = client.DiscoveryV1Api(admin_api)
        self.families: dict[str, tuple[Family, ...]] = {h.name: tuple(families.get(h.name, DUAL)) if families
                                                         else DUAL for h in lab.nodes}
        self.kube_proxy = kube_proxy_binary(control_plane.bin_dir)
        self.workdir = lab.workdir / "kube"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = control_plane.issue_kubeconfig(self.workdir / "kube-proxy.kubeconfig", KUBE_PROXY_USER)
        self.pods: dict[str, Pod] = {}
        self._proxies: dict[str, subprocess.Popen[bytes]] = {}
        self._relays: dict[str, subprocess.Popen[bytes]] = {}
        self._next_pod = 0
        self._written: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sync_interval = sync_interval
        self.sync_errors = 0

    # ---- lifecycle

    def start(self) -> KubeNodes:
        """Node objects, plumbing, relays and kube-proxies on every node; then the endpoints controller."""
        try:
            for h in self.lab.nodes:
                self._plumb(h)
            for h in self.lab.nodes:
                self._routes(h)
            for h in self.lab.nodes:
                self._create_node(h)
                self._start_relay(h)
                self.start_kube_proxy(h.name)
            self.sync()
            self._thread = threading.Thread(target=self._run, name="lab-endpoints", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> KubeNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop_controller(self) -> None:
        """Stop only the endpoints controller (`lbappliance lab up` leaves nodes and pods running)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop(self) -> None:
        """Stop the controller and every process started here (the lab's teardown would too)."""
        self.stop_controller()
        for pod in list(self.pods.values()):
            self._stop_pod_procs(pod)
        for procs in (self._proxies, self._relays):
            for proc in procs.values():
                with contextlib.suppress(Exception):
                    self.lab.stop(proc)
            procs.clear()

    # ---- node plumbing

    def _plumb(self, h: LabHost) -> None:
        fams = self.families[h.name]
        lab = self.lab
        lab.exec(h, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        if "IPv4" not in fams:
            lab.exec(h, ["ip", "addr", "del", f"{h.ipv4}/24", "dev", HOST_IFACE])
        if "IPv6" not in fams:
            lab.exec(h, ["ip", "addr", "del", f"{h.ipv6}/64", "dev", HOST_IFACE])
        lab.exec(h, ["ip", "link", "add", POD_IFACE, "type", "veth", "peer", "name", f"{POD_IFACE}-peer"])
        lab.exec(h, ["ip", "link", "set", POD_IFACE, "up"])
        lab.exec(h, ["ip", "link", "set", f"{POD_IFACE}-peer", "up"])

    def _routes(self, h: LabHost) -> None:
        """Routes from `h` to every other node's pod ranges of a family both have (what a CNI does)."""
        for other in self.lab.nodes:
            if other.name == h.name:
                continue
            v4, v6 = pod_ranges(other.name)
            common = set(self.families[h.name]) & set(self.families[other.name])
            if "IPv4" in common:
                self.lab.exec(h, ["ip", "route", "replace", v4, "via", other.ipv4])
            if "IPv6" in common:
                self.lab.exec(h, ["ip", "-6", "route", "replace", v6, "via", other.ipv6])

    def node_addresses(self, node: str) -> list[str]:
        h = self.lab.host(node)
        return [h.ipv4 if f == "IPv4" else h.ipv6 for f in self.families[node]]

    def node_object(self, node: str) -> dict[str, Any]:
        addrs = [{"type": "InternalIP", "address": a} for a in self.node_addresses(node)]
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                "status": {"addresses": [*addrs, {"type": "Hostname", "address": node}]}}

    def _create_node(self, h: LabHost) -> None:
        from kubernetes import client

        body = self.node_object(h.name)
        try:
            self.core.create_node(body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        # Status through its subresource too: what kube-proxy reads must be there before it starts.
        self.core.patch_node_status(h.name, {"status": body["status"]}, _content_type="application/merge-patch+json")
        got = self.core.read_node(h.name)
        have = {a.address for a in got.status.addresses or [] if a.type == "InternalIP"}
        if have != set(self.node_addresses(h.name)):
            raise LabError(f"Node {h.name} has InternalIPs {sorted(have)}, wanted {self.node_addresses(h.name)}")

    def _start_relay(self, h: LabHost) -> None:
        port = self.cp.secure_port
        argv = [sys.executable, "-I", "-S", "-u", str(_HERE / "apirelay.py"), "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{port}", "--upstream-netns", f"/proc/{os.getpid()}/ns/net"]
        proc = self.lab.spawn(h, argv, log_name=f"{h.name}-apirelay")
        self._relays[h.name] = proc
        log_path = self.lab.log_path(f"{h.name}-apirelay")
        wait_for(lambda: "ready" in log_path.read_text(errors="replace") or proc.poll() is not None, 10,
                 what=f"API relay on {h.name}")
        if proc.poll() is not None:
            raise LabError(f"API relay on {h.name} exited: {log_path.read_text(errors='replace')[-2000:]}")

    # ---- kube-proxy

    def kube_proxy_argv(self, node: str) -> list[str]:
        return [str(self.kube_proxy), f"--hostname-override={node}", "--proxy-mode=nftables",
                f"--kubeconfig={self.kubeconfig}", "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
                f"--healthz-bind-address=0.0.0.0:{KUBE_PROXY_HEALTH_PORT}",
                "--metrics-bind-address=127.0.0.1:10249", "--v=1"]

    def start_kube_proxy(self, node: str, wait: bool = True) -> None:
        h = self.lab.host(node)
        self._proxies[node] = self.lab.spawn(h, self.kube_proxy_argv(node), log_name=f"{node}-kube-proxy")
        if wait:
            self.wait_healthz(node, 200)

    def stop_kube_proxy(self, node: str) -> None:
        """Stop kube-proxy (its nftables rules stay, as on a real node; /healthz stops answering)."""
        proc = self._proxies.pop(node, None)
        if proc is not None:
            self.lab.stop(proc)

    def restart_kube_proxy(self, node: str, wait: bool = True) -> None:
        self.stop_kube_proxy(node)
        self.start_kube_proxy(node, wait=wait)

    def kube_proxy_pid(self, node: str) -> int | None:
        proc = self._proxies.get(node)
        return proc.pid if proc is not None and proc.poll() is None else None

    def healthz(self, node: str, port: int = KUBE_PROXY_HEALTH_PORT, address: str | None = None,
                path: str = "/healthz") -> tuple[int, str]:
        """kube-proxy's answer on the node itself: (status, body); 0 when nothing answers."""
        addr = address or self.node_addresses(node)[0]
        return self.lab.http_get(node, _url(addr, port, path), timeout=2.0)

    def local_endpoints(self, node: str, health_port: int) -> int | None:
        """What kube-proxy's healthCheckNodePort on `node` says: its ready local endpoints (None: no answer)."""
        status, body = self.healthz(node, health_port, path="/")
        try:
            return int(json.loads(body)["localEndpoints"]) if status in (200, 503) else None
        except (ValueError, KeyError, TypeError):
            return None

    def wait_healthz(self, node: str, status: int, timeout: float = 60.0, port: int = KUBE_PROXY_HEALTH_PORT,
                     address: str | None = None) -> None:
        def ok() -> bool:
            proc = self._proxies.get(node)
            if port == KUBE_PROXY_HEALTH_PORT and (proc is None or proc.poll() is not None):
                raise LabError(f"kube-proxy on {node} is not running; log tail:\n{self.log_tail(node)}")
            return self.healthz(node, port, address)[0] == status

        try:
            wait_for(ok, timeout, 0.2, what=f"{node}:{port}/healthz answering {status}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; kube-proxy log tail:\n{self.log_tail(node)}") from None

    def log_tail(self, node: str, chars: int = 3000) -> str:
        try:
            return self.lab.log_path(f"{node}-kube-proxy").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- Node lifecycle (drain as Kubernetes does it)

    def taint(self, node: str, key: str = DRAIN_TAINT) -> None:
        """Add a NoSchedule taint (cluster-autoscaler's drain mark by default)."""
        got = self.core.read_node(node)
        taints = [t.to_dict() for t in got.spec.taints or [] if t.key != key]
        taints.append({"key": key, "value": str(int(time.time())), "effect": "NoSchedule"})
        self.core.patch_node(node, {"spec": {"taints": [{k: v for k, v in t.items() if v is not None}
                                                        for t in taints]}})

    def untaint(self, node: str, key: str = DRAIN_TAINT) -> None:
        got = self.core.read_node(node)
        taints = [{k: v for k, v in t.to_dict().items() if v is not None} for t in got.spec.taints or []
                  if t.key != key]
        self.core.patch_node(node, {"spec": {"taints": taints or None}})

    def delete_node(self, node: str) -> None:
        """Delete the Node with a finalizer held, so the deletion is seen (deletionTimestamp) and
        kube-proxy's /healthz turns 503; a plain delete would leave it at 200 (v1.34.4)."""
        self.core.patch_node(node, {"metadata": {"finalizers": [LAB_FINALIZER]}})
        self.core.delete_node(node)

    def release_node(self, node: str) -> None:
        """Drop the finalizer of a Node being deleted: it is gone then."""
        from kubernetes import client

        with contextlib.suppress(client.ApiException):
            self.core.patch_node(node, {"metadata": {"finalizers": None}})

    def recreate_node(self, node: str) -> None:
        """The Node back after a drain (kube-proxy restarted, as it only reads its Node at start)."""
        self._create_node(self.lab.host(node))
        self.restart_kube_proxy(node)

    # ---- pods

    def _free_index(self, node: str) -> int:
        used = set()
        for p in self.pods.values():
            if p.node == node:
                addr = p.ipv4 or p.ipv6 or ""
                used.add(int(ipaddress.ip_address(addr)) & (0xF if p.ipv4 else 0xFFFF))
        for i in range(1, 15):
            if i not in used:
                return i
        raise LabError(f"no free pod address on {node}")

    def add_pod(self, node: str, name: str | None = None, labels: Mapping[str, str] | None = None,
                udp: bool = False, ready: bool = True) -> Pod:
        """Start a pod on `node` and (at the next sync) make it an endpoint of the Services selecting it."""
        h = self.lab.host(node)
        with self._lock:
            i = self._free_index(node)
            self._next_pod += 1
            name = name or f"pod{self._next_pod}"
            if name in self.pods:
                raise LabError(f"pod {name} exists")
            v4net, v6net = (ipaddress.ip_network(r) for r in pod_ranges(node))
            fams = self.families[node]
            pod = Pod(name, node, str(v4net[i]) if "IPv4" in fams else None,
                      str(v6net[i]) if "IPv6" in fams else None,
                      dict(labels) if labels is not None else None, ready=ready, udp=udp)
        if pod.ipv4:
            self.lab.exec(h, ["ip", "addr", "add", f"{pod.ipv4}/32", "dev", POD_IFACE])
        if pod.ipv6:
            self.lab.exec(h, ["ip", "addr", "add", f"{pod.ipv6}/128", "dev", POD_IFACE, "nodad"])
        cfg = self.workdir / "pods" / f"{name}.cfg"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(pod_haproxy_config(pod))
        pod.procs.append(self.lab.spawn(h, ["haproxy", "-db", "-f", str(cfg)], log_name=f"pod-{name}"))
        if udp:
            specs = [f"{a}:{p}" for a in (pod.ipv4, pod.ipv6) if a for p in POD_UDP_PORTS]
            pod.procs.append(self.lab.spawn(h, [sys.executable, "-I", "-S", "-u", "-c", UDP_ECHO_SNIPPET, pod.ident,
                                                *specs], log_name=f"pod-{name}-udp"))
        addr = pod.ipv4 or pod.ipv6 or ""
        try:
            wait_for(lambda: self.lab.http_get(node, _url(addr, 8080), timeout=1.0)[1].strip() == pod.ident, 10,
                     0.05, what=f"pod {name} answering")
            if udp:
                udp_log = self.lab.log_path(f"pod-{name}-udp")
                wait_for(lambda: "ready" in udp_log.read_text(errors="replace"), 10, 0.05,
                         what=f"pod {name} UDP echo")
        except TimeoutError as exc:
            self._stop_pod_procs(pod)
            tail = self.lab.log_path(f"pod-{name}").read_text(errors="replace")[-1500:]
            raise TimeoutError(f"{exc}; pod log tail:\n{tail}") from None
        with self._lock:
            self.pods[name] = pod
        return pod

    def default_pods(self, per_node: int = 1, udp: bool = True) -> list[Pod]:
        """`per_node` catch-all pods (labels None: every selector matches) on every node."""
        return [self.add_pod(h.name, udp=udp) for h in self.lab.nodes for _ in range(per_node)]

    def _stop_pod_procs(self, pod: Pod) -> None:
        for proc in pod.procs:
            with contextlib.suppress(Exception):
                self.lab.stop(proc)
        pod.procs.clear()

    def remove_pod(self, name: str, sync: bool = True) -> None:
        """The pod stops being an endpoint (synced first), then stops and gives its addresses back."""
        with self._lock:
            pod = self.pods.pop(name)
        if sync:
            self.sync()
        self._stop_pod_procs(pod)
        h = self.lab.host(pod.node)
        if pod.ipv4:
            self.lab.exec(h, ["ip", "addr", "del", f"{pod.ipv4}/32", "dev", POD_IFACE], check=False)
        if pod.ipv6:
            self.lab.exec(h, ["ip", "addr", "del", f"{pod.ipv6}/128", "dev", POD_IFACE], check=False)

    def move_pod(self, name: str, node: str, grace: float = 0.0) -> Pod:
        """Reschedule as Kubernetes does: the replacement runs on `node` and is an endpoint first;
        the old pod then terminates (ready false, still serving) for `grace` seconds, then goes."""
        old = self.pods[name]
        new = self.add_pod(node, labels=old.labels, udp=old.udp)
        self.sync()
        if grace > 0:
            self.set_pod(name, terminating=True)
            time.sleep(grace)
        self.remove_pod(name)
        return new

    def set_pod(self, name: str, *, ready: bool | None = None, terminating: bool | None = None) -> None:
        with self._lock:
            pod = self.pods[name]
            if ready is not None:
                pod.ready = ready
            if terminating is not None:
                pod.terminating = terminating
        self.sync()

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.node == node]

    # ---- the lab endpoints controller

    def _run(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self.sync()
            except Exception as exc:  # the apiserver may be restarted by a test; keep going
                self.sync_errors += 1
                log.debug("endpoints sync failed: %s", exc)

    def desired_slices(self, services: Iterable[Any]) -> dict[tuple[str, str], dict[str, Any]]:
        """(namespace, slice name) -> EndpointSlice body, for every Service with a selector."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        pods = list(self.pods.values())
        for svc in services:
            spec = svc.spec
            if not spec.selector or spec.type == "ExternalName":
                continue
            chosen = [p for p in pods if p.selected_by(spec.selector)]
            ports = [{"name": p.name or "", "protocol": p.protocol or "TCP", "port": _target_port(p)}
                     for p in spec.ports or []]
            for fam in spec.ip_families or ["IPv4"]:
                endpoints = [{"addresses": [p.address(fam)], "nodeName": p.node,
                              "conditions": {"ready": p.ready and not p.terminating, "serving": p.ready,
                                             "terminating": p.terminating},
                              "targetRef": {"kind": "Pod", "name": p.name, "namespace": svc.metadata.namespace}}
                             for p in sorted(chosen, key=lambda p: p.name) if p.address(fam)]
                name = f"{svc.metadata.name}-lab-{fam[-2:].lower()}"
                out[(svc.metadata.namespace, name)] = {
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": svc.metadata.namespace,
                                 "labels": {"kubernetes.io/service-name": svc.metadata.name,
                                            "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                    "addressType": fam, "endpoints": endpoints, "ports": ports}
        return out

    def sync(self) -> None:
        """Make the EndpointSlices match the Services' selectors and the pods now (one pass)."""
        from kubernetes import client

        with self._lock:
            services = self.core.list_service_for_all_namespaces().items
            want = self.desired_slices(services)
            mine = self.discovery.list_endpoint_slice_for_all_namespaces(
                label_selector=f"endpointslice.kubernetes.io/managed-by={MANAGED_BY}").items
            have = {(s.metadata.namespace, s.metadata.name) for s in mine}
            for key, body in want.items():
                if key in have and self._written.get(key) == body:
                    continue
                ns, name = key
                if key in have:
                    self.discovery.patch_namespaced_endpoint_slice(
                        name, ns, {"endpoints": body["endpoints"], "ports": body["ports"]})
                else:
                    try:
                        self.discovery.create_namespaced_endpoint_slice(ns, body)
                    except client.ApiException as exc:
                        if exc.status != 409:
                            raise
                        self.discovery.patch_namespaced_endpoint_slice(
                            name, ns, {"endpoints": body["endpoints"], "ports": body["ports"]})
                self._written[key] = body
            for key in have - set(want):
                with contextlib.suppress(client.ApiException):
                    self.discovery.delete_namespaced_endpoint_slice(key[1], key[0])
                self._written.pop(key, None)


def _target_port(port: Any) -> int:
    """The pod port a Service port reaches: its numeric targetPort, a lab name, or the port itself."""
    target = port.target_port
    if isinstance(target, str) and not target.isdigit():
        if target not in NAMED_PORTS:
            raise LabError(f"lab pods have no port named {target!r}")
        return NAMED_PORTS[target]
    return int(target) if target is not None else int(port.port)


@contextlib.contextmanager
def real_nodes(lab: NetworkLab, control_plane: Any, admin_api: Any,
               families: Mapping[str, Sequence[Family]] | None = None, *, pods_per_node: int = 1,
               udp: bool = True) -> Iterator[KubeNodes]:
    """The lab's nodes as real nodes with `pods_per_node` catch-all pods each (every Service's
    selector matches them); everything stopped when the block ends, however it ends."""
    with KubeNodes(lab, control_plane, admin_api, families) as kube:
        kube.default_pods(pods_per_node, udp=udp)
        yield kube
