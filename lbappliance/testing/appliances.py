"""Run the appliance pair against a real control plane in the network lab (e2e tests, lab, benches).

Each daemon runs in the host namespace (it reaches the API server on loopback) and keeps its
HAProxy and keepalived inside its appliance host's namespace via `--netns`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lbappliance.edges.processes import spawn_logged, stop_child

from .controlplane import apply_manifest, free_port
from .netlab import VIP_POOL_V4, VIP_POOL_V6, NetworkLab
from .wait import wait_for

#: Shipped in the wheel (package data) so `lbappliance lab up` runs from an install too; copies of
#: deploy/rbac.yaml and examples/*.yaml, kept identical by tests/e2e/test_lab.py.
LAB_DATA = Path(__file__).resolve().parent / "labdata"
RBAC_MANIFEST = LAB_DATA / "rbac.yaml"
EXAMPLES = LAB_DATA / "examples"


def pools_yaml(ranges: Iterable[str] = (VIP_POOL_V4, VIP_POOL_V6)) -> str:
    return yaml.safe_dump({"apiVersion": "lbappliance.io/v1alpha1", "kind": "AddressPoolList",
                           "pools": [{"name": "default", "addresses": list(ranges)}]}, sort_keys=False)


def appliance_config(lab: NetworkLab, host: str, peer: str, state_dir: Path, kubeconfig: Path,
                     pools_path: Path, priority: int, lease_seconds: float = 4.0,
                     health_ms: int = 500) -> dict[str, Any]:
    me, other = lab.hosts[host], lab.hosts[peer]
    return {
        "apiVersion": "lbappliance.io/v1alpha1",
        "kind": "ApplianceConfig",
        "name": host,
        "cluster": {"kubeconfig": str(kubeconfig)},
        "vrrp": {"interface": "eth0", "priority": priority, "advertInterval": 0.1,
                 "unicastSrcIp": me.ipv4, "unicastPeers": [other.ipv4],
                 "unicastSrcIp6": me.ipv6, "unicastPeers6": [other.ipv6]},
        "healthCheck": {"intervalMilliseconds": health_ms, "fall": 2, "rise": 2},
        "haproxy": {"statsAddress": None, "maxconn": 4000, "hardStopAfter": "10s"},
        "paths": {"pools": str(pools_path), "stateDir": str(state_dir),
                  "haproxyConfig": str(state_dir / "haproxy.cfg"),
                  "keepalivedConfig": str(state_dir / "keepalived.conf")},
        "leaderElection": {"leaseDurationSeconds": lease_seconds, "renewDeadlineSeconds": lease_seconds * 0.75,
                           "retryPeriodSeconds": 0.5},
        "metricsAddress": f"127.0.0.1:{free_port()}",
    }


@dataclass
class Appliance:
    name: str
    netns: str
    config_path: Path
    config: dict[str, Any]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.config["paths"]["stateDir"])

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config['metricsAddress']}/metrics"

    def start(self) -> None:
        """The daemon in the host namespace, its HAProxy and keepalived in the appliance host's."""
        self.proc = spawn_logged([sys.executable, "-m", "lbappliance", "run", "--config", str(self.config_path),
                                  "--identity", self.name, "--netns", self.netns],
                                 str(self.log_path), env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the daemon (SIGTERM: it stops its HAProxy and keepalived; SIGKILL: they stay)."""
        if self.proc is not None:
            stop_child(self.proc, sig, timeout)

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric_name, _, label_text = head.partition("{")
            if metric_name == name and (not want or ",".join(sorted(label_text.rstrip("}").split(","))) == want):
                return float(value)
        return None

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def make_pair(lab: NetworkLab, workdir: Path, kubeconfig: Path, pools: str | None = None,
              lease_seconds: float = 4.0, health_ms: int = 500) -> tuple[Appliance, Appliance]:
    pools_path = workdir / "pools.yaml"
    pools_path.write_text(pools or pools_yaml())
    pair = []
    for host, peer, priority in (("app1", "app2", 150), ("app2", "app1", 100)):
        state_dir = workdir / host
        state_dir.mkdir(parents=True, exist_ok=True)
        config = appliance_config(lab, host, peer, state_dir, kubeconfig, pools_path, priority, lease_seconds,
                                  health_ms)
        config_path = workdir / f"{host}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        pair.append(Appliance(host, lab.hosts[host].netns, config_path, config, workdir / f"{host}.log"))
    return pair[0], pair[1]


def node_objects(lab: NetworkLab) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": h.name, "labels": {"kubernetes.io/hostname": h.name}},
             "status": {"addresses": [{"type": "InternalIP", "address": h.ipv4},
                                      {"type": "InternalIP", "address": h.ipv6},
                                      {"type": "Hostname", "address": h.name}]}}
            for h in lab.nodes]


def example_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def node_ports(manifests: Iterable[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """The nodePorts and healthCheckNodePorts the lab nodes must serve for these Services."""
    ports, health = set(), set()
    for doc in manifests:
        spec = doc.get("spec") or {}
        ports.update(p["nodePort"] for p in spec.get("ports") or [] if p.get("nodePort"))
        if spec.get("healthCheckNodePort"):
            health.add(spec["healthCheckNodePort"])
    return sorted(ports), sorted(health)


#: Per-box VRRP settings for active-active: both boxes high (150) on their home instance and
#: 100 on the other, preemption on (a returning box takes its share back after 1 s).
ACTIVE_ACTIVE_VRRP = {
    "app1": {"priority": 150, "homeInstances": [0], "backupPriority": 100, "nopreempt": False, "preemptDelay": 1},
    "app2": {"priority": 150, "homeInstances": [1], "backupPriority": 100, "nopreempt": False, "preemptDelay": 1},
}


def make_active_active_pair(lab: NetworkLab, workdir: Path, kubeconfig: Path, pools: str | None = None,
                            lease_seconds: float = 4.0, health_ms: int = 500, instances: int = 2
                            ) -> tuple[Appliance, Appliance]:
    """`make_pair` with VIPs spread over `instances` VRRP instances per family, mirrored priorities."""
    pair = make_pair(lab, workdir, kubeconfig, pools, lease_seconds, health_ms)
    for app in pair:
        app.config["vrrp"].update(ACTIVE_ACTIVE_VRRP[app.name], instances=instances)
        app.config_path.write_text(yaml.safe_dump(app.config, sort_keys=False))
    return pair


def start_daemons(admin_api: Any, lab: NetworkLab, workdir: Path, kubeconfig: Path, *,
                  rbac: Path = RBAC_MANIFEST, nodeports: Iterable[int] = (), health_ports: Iterable[int] = (),
                  udp_ports: Iterable[int] = (), active_active: bool = False,
                  field_manager: str = "lbappliance-tests", kube_nodes: Any = None,
                  **pair_kw: Any) -> tuple[Appliance, Appliance]:
    """The one "lab + RBAC + pair + first pass" setup of the e2e tests, the lab and the benches.

    `rbac` applied as admin, the lab's nodes as Node objects, their NodePort, health and UDP
    responders, then both daemons started with `kubeconfig` (the least-privilege identity) and
    awaited through their first pass. With `kube_nodes` (a started `kubenodes.KubeNodes`) the
    nodes are real instead: their Node objects, kube-proxy and pods are already there, and no
    look-alike responder runs (`nodeports`, `health_ports`, `udp_ports` are ignored). If any of
    that fails the daemons are stopped again, and a daemon that never got through its first pass
    raises TimeoutError with both logs' tails.
    """
    from kubernetes import client

    apply_manifest(admin_api, rbac, field_manager=field_manager)
    if kube_nodes is None:
        core = client.CoreV1Api(admin_api)
        for node in node_objects(lab):
            try:
                core.create_node(node)
            except client.ApiException as exc:
                if exc.status != 409:  # already there: a module before this one made the same lab's nodes
                    raise
        if nodeports := sorted(set(nodeports)):
            lab.serve_nodeports(nodeports)
        lab.serve_health_ports(health_ports)
        if udp_ports := sorted(set(udp_ports)):
            lab.serve_udp(udp_ports)
    pair = (make_active_active_pair if active_active else make_pair)(lab, workdir, kubeconfig, **pair_kw)
    try:
        for app in pair:
            app.start()
        try:
            wait_for(lambda: all(a.status() for a in pair), 60, what="both daemons' first pass")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; daemons' logs:\n" + "\n".join(f"--- {a.log_path}\n{a.log_tail()}"
                                                                     for a in pair)) from None
    except BaseException:
        for app in pair:
            app.stop()
        raise
    return pair


@contextlib.contextmanager
def running_daemons(admin_api: Any, lab: NetworkLab, workdir: Path, kubeconfig: Path,
                    **kw: Any) -> Iterator[tuple[Appliance, Appliance]]:
    """`start_daemons`, and both stopped when the block ends however it ends."""
    pair = start_daemons(admin_api, lab, workdir, kubeconfig, **kw)
    try:
        yield pair
    finally:
        for app in pair:
            app.stop()
