"""BGP mode end to end: three `lbappliance run` daemons behind the lab's FRR ToR, a real API server,
real kube-proxy nodes. One leader allocates and writes; every box renders the same HAProxy config
and announces the VIP; when the leader stops, another box leads and allocates the next Service."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbappliance.testing.appliances import Appliance
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST

pytestmark = pytest.mark.e2e

BOXES = ("app1", "app2", "app3")


@pytest.fixture(scope="module")
def env(control_plane: Any, admin_api: Any, lab_available: None, frr_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    from lbappliance.testing.bgplab import BGP_POOLS, BgpLab
    from lbappliance.testing.controlplane import apply_manifest, free_port
    from lbappliance.testing.kubenodes import real_nodes

    workdir = tmp_path_factory.mktemp("bgpdaemons")
    lab = BgpLab(prefix="lbge", boxes=len(BOXES), nodes=2, workdir=workdir / "lab")
    apps: list[Appliance] = []
    try:
        lab.up()
        with real_nodes(lab, control_plane, admin_api, udp=False) as kube:
            apply_manifest(admin_api, RBAC_MANIFEST, field_manager=FIELD_MANAGER)
            pools = workdir / "pools.yaml"
            pools.write_text(BGP_POOLS)
            for box in BOXES:
                lab.start_box_frr(box)
                lab.box_config(box, drain_seconds=1.0)
                doc = yaml.safe_load((lab.workdir / box / "config.yaml").read_text())
                doc["cluster"] = {"kubeconfig": str(control_plane.appliance_kubeconfig)}
                doc["paths"]["pools"] = str(pools)
                doc["leaderElection"] = {"leaseDurationSeconds": 4.0, "renewDeadlineSeconds": 3.0,
                                         "retryPeriodSeconds": 0.5}
                doc["metricsAddress"] = f"127.0.0.1:{free_port()}"
                path = workdir / f"{box}.yaml"
                path.write_text(yaml.safe_dump(doc, sort_keys=False))
                apps.append(Appliance(box, lab.host(box).netns, path, doc, workdir / f"{box}.log"))
            for app in apps:
                app.start()
            wait_for(lambda: all(a.status() for a in apps), 60, what="every daemon's first pass")
            yield {"lab": lab, "kube": kube, "apps": apps, "core": client.CoreV1Api(admin_api)}
    finally:
        for app in apps:
            app.stop()
        lab.down()


def _service(core: Any, ns: str, name: str, node_port: int) -> str:
    """A LoadBalancer Service; its VIP once the leader has written it."""
    core.create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": node_port, "protocol": "TCP"}]}})
    ingress = wait_for(lambda: core.read_namespaced_service_status(name, ns).status.load_balancer.ingress, 30,
                       interval=0.2, what=f"{ns}/{name}'s VIP")
    return str(ingress[0].ip)


def _leaders(apps: list[Appliance]) -> list[str]:
    return [a.name for a in apps if a.metric("lbappliance_leader") == 1.0]


def _rendered(app: Appliance) -> str:
    """The box's haproxy.cfg with what must differ per box made neutral: its own paths and its
    name as the local stick-table peer."""
    text = Path(app.config["paths"]["haproxyConfig"]).read_text()
    text = text.replace(str(Path(app.config["paths"]["stateDir"]).parent), "<box>")
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("localpeer "))


def test_one_leader_allocates_and_every_box_serves_the_same_config(env: dict[str, Any]) -> None:
    core, lab, apps = env["core"], env["lab"], env["apps"]
    ns = f"bgp-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    leaders = wait_for(lambda: _leaders(apps) if len(_leaders(apps)) == 1 else None, 30, what="exactly one leader")
    vip = _service(core, ns, "web", 30290)
    assert vip.startswith("203.0.113."), vip  # the routed pool, off every segment
    lab.wait_next_hops(vip, set(BOXES), timeout=30)
    wait_for(lambda: len({_rendered(a) for a in apps}) == 1 and f"bind {vip}:80" in _rendered(apps[0]), 20,
             what="the same haproxy.cfg on every box")
    fields = core.read_namespaced_service_status("web", ns).metadata.managed_fields or []
    writers = {f.manager for f in fields if f.subresource == "status"}
    assert writers == {"lbappliance"}, writers  # one writer, whichever box led
    answers = wait_for(lambda: lab.http_get("client", f"http://{vip}/")[1], 15, interval=0.2, what="the VIP answers")
    assert "@node" in answers, answers  # pod@node: through a box, a NodePort and kube-proxy
    print(f"\nBGP mode: leader {leaders[0]}, {vip} routed by the ToR to {sorted(lab.next_hops(vip))}")
    for app in apps:  # sessions come up on their own: bgp.json and the metric follow within seconds
        wait_for(lambda app=app: app.metric("lbappliance_bgp_sessions_up") == 2.0, 20,
                 what=f"{app.name}: both sessions (IPv4, IPv6) to the ToR counted up")
        assert (app.metric("lbappliance_bgp_routes_announced") or 0) >= 1.0, app.name
        shown = json.loads((Path(app.config["paths"]["stateDir"]) / "bgp.json").read_text())
        assert set(shown["sessions"].values()) == {"Established"} and vip in shown["announced"], shown


def test_when_the_leader_stops_another_box_leads_and_the_stopped_one_is_withdrawn(env: dict[str, Any]) -> None:
    core, lab, apps = env["core"], env["lab"], env["apps"]
    ns = f"bgp-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    first = _service(core, ns, "first", 30291)
    lab.wait_next_hops(first, set(BOXES), timeout=30)
    leader = wait_for(lambda: _leaders(apps)[0] if len(_leaders(apps)) == 1 else None, 30, what="one leader")
    stopped = next(a for a in apps if a.name == leader)
    stopped.stop()  # a clean stop: withdraw, wait for the ToR, drain, stop HAProxy
    try:
        assert lab.next_hops(first) == set(BOXES) - {leader}
        rest = [a for a in apps if a is not stopped]
        successor = wait_for(lambda: _leaders(rest)[0] if len(_leaders(rest)) == 1 else None, 30,
                             what="a new leader among the others")
        second = _service(core, ns, "second", 30292)
        assert second != first
        lab.wait_next_hops(second, set(BOXES) - {leader}, timeout=30)
        assert lab.http_get("client", f"http://{second}/")[0] == 200
        print(f"\nleader {leader} stopped; {successor} leads and allocated {second}")
    finally:
        stopped.start()
    lab.wait_next_hops(first, set(BOXES), timeout=60)
