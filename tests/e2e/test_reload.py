"""SIGHUP with real processes: a changed state dir, metrics address and health-check interval are
followed by every subsystem while traffic flows; a change that needs a restart is refused whole."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbappliance.edges.haproxy import HaproxyError, ProcTable, parse_show_proc, socket_command
from lbappliance.edges.processes import alive
from lbappliance.testing.appliances import Appliance
from lbappliance.testing.prober import Probe, target
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(control_plane: Any, admin_api: Any, lab_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    from lbappliance.testing.appliances import running_daemons
    from lbappliance.testing.kubenodes import real_nodes
    from lbappliance.testing.netlab import open_lab

    workdir = tmp_path_factory.mktemp("reload")
    with open_lab("lbh", 2, workdir / "lab") as lab, real_nodes(lab, control_plane, admin_api, udp=False) as kube, \
            running_daemons(admin_api, lab, workdir, control_plane.appliance_kubeconfig, rbac=RBAC_MANIFEST,
                            field_manager=FIELD_MANAGER, kube_nodes=kube) as apps:
        yield {"lab": lab, "core": client.CoreV1Api(admin_api), "apps": apps, "workdir": workdir}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rewrite(app: Appliance, **changes: Any) -> dict[str, Any]:
    """Write `app`'s config.yaml with `changes` (dotted keys) and SIGHUP the daemon."""
    config = yaml.safe_load(app.config_path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    app.config_path.write_text(yaml.safe_dump(config))
    assert app.proc is not None
    os.kill(app.proc.pid, signal.SIGHUP)
    return config


def _master_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "haproxy.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _show_proc(state_dir: Path) -> ProcTable | None:
    """The master's process table on its socket in `state_dir`, once it answers there."""
    try:
        return parse_show_proc(socket_command(str(state_dir / "haproxy-master.sock"), "show proc;quit"))
    except HaproxyError:
        return None


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def test_sighup_moves_state_dir_metrics_and_check_interval_without_dropping_a_request(env: dict[str, Any]) -> None:
    core, lab, apps = env["core"], env["lab"], env["apps"]
    ns = f"rl-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    core.create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                 "ports": [{"name": "p", "port": 80, "targetPort": 8080, "nodePort": 30190, "protocol": "TCP"}]}})
    vip = wait_for(lambda: [i.ip for i in (core.read_namespaced_service_status("web", ns).status.load_balancer
                                           .ingress or [])], 20, what="the VIP")[0]
    wait_for(lambda: lab.http_get("client", f"http://{vip}:80/")[0] == 200, 15, interval=0.2, what="VIP answers")

    before = {app.name: (app.state_dir, _master_pid(app.state_dir), app.config["metricsAddress"]) for app in apps}
    moved: dict[str, dict[str, Any]] = {}
    with Probe(lab.hosts["client"].netns, [target(vip, 80)], 12, interval=0.02, connect_timeout=1.0,
               read_timeout=1.0) as probe:
        time.sleep(1.0)
        for app in apps:
            new_state = app.state_dir.parent / f"{app.name}-moved"
            moved[app.name] = _rewrite(app, **{"paths.stateDir": str(new_state), "healthCheck.intervalMilliseconds": 700,
                                               "metricsAddress": f"127.0.0.1:{_free_port()}"})
            app.config = moved[app.name]
        for app in apps:
            new_state = app.state_dir
            old_state, old_pid, old_metrics = before[app.name]
            # Everything follows: metrics on the new address (and no longer on the old) ...
            wait_for(lambda app=app: app.metric("lbappliance_reconcile_total") is not None, 15,
                     what=f"{app.name} metrics on the new address")
            assert app.metric("lbappliance_config_stale", {"file": "config"}) == 0.0
            # ... HAProxy under a new master whose sockets and pid file are in the new state dir ...
            table = wait_for(lambda s=new_state: _show_proc(s), 15, what=f"{app.name}'s haproxy master in {new_state}")
            assert table.workers, "the new master has a worker"
            assert _master_pid(new_state) != before[app.name][1]
            assert "inter 700ms" in Path(app.config["paths"]["haproxyConfig"]).read_text()
            assert old_pid is not None
            wait_for(lambda pid=old_pid: not alive(pid), 20, what=f"{app.name}'s old haproxy master gone")
            # ... keepalived still the same process, its pid files and VRRP states moved along ...
            assert (new_state / "keepalived.pid").exists() and list(new_state.glob("vrrp-*.state"))
            # ... and status.json written there by the next passes.
            wait_for(lambda s=new_state: (s / "status.json").exists(), 15, what=f"{app.name} status.json moved")
            assert not _listening(old_metrics), f"metrics still served on the old address {old_metrics}"
            assert old_state != new_state
    result = probe.result
    assert result.failed == 0 and result.ok > 100, f"requests failed across the reload: {result}"


def test_a_change_that_needs_a_restart_is_refused_whole(env: dict[str, Any]) -> None:
    app = env["apps"][0]
    metrics = app.config["metricsAddress"]
    wait_for(lambda: app.metric("lbappliance_config_stale", {"file": "config"}) == 0.0, 15, what="a clean start")
    _rewrite(app, name="renamed", metricsAddress=f"127.0.0.1:{_free_port()}")
    app.config = {**app.config, "metricsAddress": metrics}  # nothing applies: metrics stay where they were
    wait_for(lambda: app.metric("lbappliance_config_stale", {"file": "config"}) == 1.0, 15,
             what="the stale-config metric")
    assert "name changed, which needs a restart" in app.log_tail(200)
