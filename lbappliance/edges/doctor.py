"""`lbappliance doctor`, the I/O: ask the API server (as the appliance's own identity), probe the nodes
and the VRRP peer from this box, read sysctls and binaries; core/doctor turns the facts into checks.

Probes that must leave from the appliance's network namespace (the lab, tests) run in a child
`ip netns exec NS python -m lbappliance.edges.doctor` that prints JSON; otherwise in-process.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..core import doctor as core
from ..core.config import ApplianceConfig
from ..core.kube import ObjectError, is_handled, node_from_object, node_is_eligible, service_from_object
from ..core.models import Pool, Service
from .cluster import api_client_from_kubeconfig
from .enroll import access_answers, seconds_left

SYSCTLS = ("net.ipv4.ip_nonlocal_bind", "net.ipv6.ip_nonlocal_bind", "net.ipv4.ip_forward",
           "net.ipv6.conf.all.forwarding")
KUBE_PROXY_HEALTH_PORT = 10256


# ---- probes (also run as a child in a network namespace) ---------------------------------------


def _http_ok(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url} answered {r.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered {exc.code}"
    except OSError as exc:
        return False, f"{url}: {getattr(exc, 'reason', None) or exc}"


def _tcp_ok(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port} accepts connections"
    except OSError as exc:
        return False, f"{host}:{port}: {exc.strerror or exc}"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def _ping(address: str, timeout: float) -> bool:
    """One ICMP echo (a datagram ICMP socket, else a raw one as root): is the VRRP peer there?"""
    v6 = ":" in address
    family, proto, kind = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else
                           (socket.AF_INET, socket.IPPROTO_ICMP, 8))
    for sock_type in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            sock = socket.socket(family, sock_type, proto)
        except OSError:
            continue
        with sock:
            header = struct.pack("!BBHHH", kind, 0, 0, os.getpid() & 0xFFFF, 1)
            payload = b"lbappliance-doctor"
            packet = struct.pack("!BBHHH", kind, 0, 0 if v6 else _checksum(header + payload),
                                 os.getpid() & 0xFFFF, 1) + payload
            sock.settimeout(timeout)
            try:
                sock.sendto(packet, (address, 0))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    data = sock.recv(2048)
                    reply = data[20:] if sock_type == socket.SOCK_RAW and not v6 else data
                    if reply and reply[0] == (129 if v6 else 0):
                        return True
            except OSError:
                return False
    return False


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def probe(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run every probe of `job` from here: kube-proxy health, NodePorts, peers, sysctls."""
    timeout = float(job.get("timeout", 2.0))
    return {
        "health": {node: _http_ok(f"http://{_host(a)}:{KUBE_PROXY_HEALTH_PORT}/healthz", timeout)
                   for node, a in job["nodes"].items()},
        "nodeport": ({node: _tcp_ok(a, int(job["nodePort"]), timeout) for node, a in job["nodes"].items()}
                     if job.get("nodePort") else {}),
        "peers": {peer: _ping(peer, timeout) for peer in job["peers"]},
        "tablePeers": {name: _tcp_ok(host, int(port), timeout) for name, (host, port) in job["tablePeers"].items()},
        "sysctls": {name: _sysctl(name) for name in SYSCTLS},
    }


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def run_probes(job: Mapping[str, Any], netns: str | None) -> dict[str, Any]:
    if netns is None:
        return probe(job)
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "lbappliance.edges.doctor"],
                          input=json.dumps(job), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"probes in network namespace {netns} failed: {proc.stderr.strip()[:300]}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


# ---- the API server ------------------------------------------------------------------------------


def _items(call: Any) -> list[Any]:
    """The items of a typed list call made with _preload_content=False, as wire-format dicts."""
    response = call(_preload_content=False)
    try:
        return list(json.loads(response.data).get("items") or [])
    finally:
        response.release_conn()


def _group_served(api: client.ApiClient, group: str) -> bool:
    return any(g.name == group for g in client.ApisApi(api).get_api_versions().groups or [])


def _skew(api: client.ApiClient) -> float | None:
    """This box's clock minus the API server's (its Date header, 1 s resolution), mid-request."""
    before = time.time()
    _, _, headers = client.VersionApi(api).get_code_with_http_info()
    after = time.time()
    date = (headers or {}).get("Date")
    if not date:
        return None
    server = email.utils.parsedate_to_datetime(date).timestamp()
    local = (before + after) / 2
    # The header truncates to the second: compare against the middle of that second.
    return local - (server + 0.5)


def _parse(objects: list[Any], convert: Any) -> list[tuple[Any, Any]]:
    out = []
    for obj in objects:
        try:
            out.append((convert(obj), obj))
        except (ObjectError, AttributeError, TypeError, ValueError):
            continue  # unreadable: the daemon names it in an Event; the doctor checks the rest
    return out


def _node_address(node: Any, config: ApplianceConfig) -> str | None:
    for kind in config.cluster.node_address_types:
        for address_kind, address in node.addresses:
            if address_kind == kind and ":" not in address:
                return str(address)
    for kind in config.cluster.node_address_types:
        for address_kind, address in node.addresses:
            if address_kind == kind:
                return str(address)
    return None


def diagnose(config: ApplianceConfig, pools: tuple[Pool, ...], netns: str | None = None,
             admin_kubeconfig: str | None = None) -> core.Report:
    """Every check of `lbappliance doctor`, in table order."""
    report = core.Report()
    host = config.cluster.kubeconfig or "in-cluster"
    try:
        api = api_client_from_kubeconfig(config.cluster.kubeconfig)
    except Exception as exc:  # the loader raises several types for a bad file
        report.add(core.failed("kubeconfig", f"{host}: {str(exc)[:200]}", "run `lbappliance enroll`"))
        return _this_box(report, config, netns, nodes=None, node_port=None)
    try:
        skew = _skew(api)
    except Exception as exc:
        report.add(core.failed("API server", f"{api.configuration.host}: {str(exc)[:200]}",
                               "check cluster.kubeconfig's server and the network path to it"))
        api.close()
        return _this_box(report, config, netns, nodes=None, node_port=None)
    try:
        report.add(core.ok("API server", f"{api.configuration.host} answers"))
        report.add(core.clock_check(skew, config, api.configuration.host))
        left, kind = seconds_left(Path(config.cluster.kubeconfig)) if config.cluster.kubeconfig else (None, "")
        report.add(core.credential_check(left, kind))
        questions = [*core.required_permissions(config), *core.forbidden_permissions(config)]
        report.add(core.permission_check(access_answers(api, questions), config))
        core_api = client.CoreV1Api(api)
        raw_services = _items(core_api.list_service_for_all_namespaces)
        raw_nodes = _items(core_api.list_node)
        services = _parse(raw_services, service_from_object)
        nodes = _parse(raw_nodes, node_from_object)
        svclb, service_cidrs = None, []
        if admin_kubeconfig:
            svclb, service_cidrs = _admin_facts(admin_kubeconfig)
        report.add(*core.foreign_controller_checks(
            [(s, core.status_managers(obj)) for s, obj in services], config,
            _group_served(api, "metallb.io"), [n.name for n, obj in nodes if core.k3s_servicelb_enabled(obj)], svclb))
        handled: list[Service] = [s for s, _ in services if is_handled(s, config.cluster.load_balancer_class)]
        networks = [("Pod CIDR of " + n.name, str(c)) for n, obj in nodes
                    for c in (obj.get("spec") or {}).get("podCIDRs") or []] + [("Service CIDR", c)
                                                                              for c in service_cidrs]
        cluster_ips = [str(ip) for s, obj in services for ip in (obj.get("spec") or {}).get("clusterIPs") or []
                       if ip != "None"]
        report.add(*core.pool_overlap_checks(pools, {n.name: [a for _, a in n.addresses if ":" in a or "." in a]
                                                     for n, _ in nodes}, networks, cluster_ips, config))
        report.add(*core.out_of_pool_checks(handled, pools, config))
        report.add(core.adoption_check(handled, config), core.sharing_check(handled))
        eligible = {n.name: a for n, _ in nodes if node_is_eligible(n) and (a := _node_address(n, config))}
        node_port = next((p.node_port for s in handled for p in s.ports if p.node_port and p.protocol == "TCP"),
                         None)
        udp = any(p.protocol == "UDP" for s in handled for p in s.ports)
        return _this_box(report, config, netns, nodes=eligible, node_port=node_port, udp=udp)
    except ApiException as exc:  # a read the identity may not make (the permission line says which)
        report.add(core.failed("API reads", f"refused: {exc.status} {exc.reason}",
                               "apply deploy/rbac.yaml (`lbappliance enroll`)"))
        return _this_box(report, config, netns, nodes=None, node_port=None)
    finally:
        api.close()


def _admin_facts(kubeconfig: str) -> tuple[list[str], list[str]]:
    """What only an admin may read: k3s svclb pods and the ServiceCIDR objects."""
    from .enroll import admin_client

    api = admin_client(kubeconfig)
    try:
        pods = _items(client.CoreV1Api(api).list_pod_for_all_namespaces)
        svclb = [f"{p['metadata'].get('namespace')}/{p['metadata'].get('name')}" for p in pods
                 if str(p["metadata"].get("name", "")).startswith("svclb-")
                 or "svccontroller.k3s.cattle.io/svcname" in (p["metadata"].get("labels") or {})
                 or _metallb_pod(p)]
        cidrs: list[str] = []
        with contextlib.suppress(ApiException, AttributeError):  # ServiceCIDR is GA in 1.33
            for item in _items(client.NetworkingV1Api(api).list_service_cidr):
                cidrs.extend(str(c) for c in (item.get("spec") or {}).get("cidrs") or [])
        return svclb, cidrs
    finally:
        api.close()


def _metallb_pod(pod: Mapping[str, Any]) -> bool:
    """MetalLB's controller or speaker, by the labels its manifests and Helm chart set."""
    labels = pod["metadata"].get("labels") or {}
    return labels.get("app") == "metallb" or labels.get("app.kubernetes.io/name") == "metallb"


def _this_box(report: core.Report, config: ApplianceConfig, netns: str | None, *,
              nodes: dict[str, str] | None, node_port: int | None, udp: bool = False) -> core.Report:
    """Probes from this box; node checks only when the API server said which nodes there are."""
    peers = [*config.vrrp.unicast_peers, *config.vrrp.unicast_peers6]
    job = {"nodes": nodes or {}, "nodePort": node_port, "peers": peers, "timeout": 2.0,
           "tablePeers": core.table_peers_to_probe(config)}
    try:
        facts = run_probes(job, netns)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        report.add(core.failed("probes", str(exc)[:300], "run doctor as root on the appliance"))
        return report
    if nodes is not None:
        report.add(*core.node_checks({k: (bool(v[0]), str(v[1])) for k, v in facts["health"].items()}, node_port,
                                     {k: (bool(v[0]), str(v[1])) for k, v in facts["nodeport"].items()}))
    report.add(*core.vrrp_checks(config, facts["peers"]))
    report.add(*core.table_peer_checks(config, {k: (bool(v[0]), str(v[1])) for k, v in facts["tablePeers"].items()}))
    binaries = {config.paths.haproxy_binary: os.access(config.paths.haproxy_binary, os.X_OK),
                config.paths.keepalived_binary: os.access(config.paths.keepalived_binary, os.X_OK),
                config.paths.nft_binary: os.access(config.paths.nft_binary, os.X_OK)}
    report.add(*core.host_checks(facts["sysctls"], binaries, udp))
    return report


if __name__ == "__main__":  # the child of run_probes, inside a network namespace
    print(json.dumps(probe(json.loads(sys.stdin.read()))))
