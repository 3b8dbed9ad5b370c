"""Hostile input against the running pair: a kubelet that publishes a text-injection address and
a tenant who requests one exist while 20 ordinary Services are created. Every ordinary Service is
served and answered; the hostile objects get a Problem and an Event naming the field, and none of
their text reaches a rendered file."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbappliance.testing.kubenodes import answer_node
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST

pytestmark = pytest.mark.e2e

ORDINARY = 20
FIRST_NODE_PORT = 30200
INJECTED = "203.0.113.66"
HOSTILE_NODE_ADDRESS = f"2001:db8::13%z\n    server X {INJECTED}:80\n#"
HOSTILE_REQUEST = f"2001:db8::5%z\n\nlisten X\n bind 192.0.2.200:80\n server s {INJECTED}:80\n#"


@pytest.fixture(scope="module")
def env(control_plane: Any, admin_api: Any, lab_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kubernetes import client

    from lbappliance.testing.appliances import running_daemons
    from lbappliance.testing.kubenodes import real_nodes
    from lbappliance.testing.netlab import open_lab

    core = client.CoreV1Api(admin_api)
    workdir = tmp_path_factory.mktemp("hostile")
    with open_lab("lbx", 2, workdir / "lab") as lab, real_nodes(lab, control_plane, admin_api, udp=False) as kube, \
            running_daemons(admin_api, lab, workdir, control_plane.appliance_kubeconfig, rbac=RBAC_MANIFEST,
                            field_manager=FIELD_MANAGER, kube_nodes=kube) as apps:
        yield {"lab": lab, "core": core, "apps": apps}
        core.delete_node("evil-node")


def _service(name: str, node_port: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"type": "LoadBalancer", "selector": {"app": name},
                     "ports": [{"name": "p", "port": 80, "targetPort": 8080, "nodePort": node_port, "protocol": "TCP"}]}}


def _events(core: Any, namespace: str, kind: str, name: str) -> list[Any]:
    return [e for e in core.list_namespaced_event(namespace).items
            if e.involved_object.kind == kind and e.involved_object.name == name]


def test_a_hostile_node_and_a_hostile_request_cost_only_themselves(env: dict[str, Any]) -> None:
    core, lab, apps = env["core"], env["lab"], env["apps"]
    ns = f"hx-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    # The API server checks Node addresses only for duplicates: this one is stored as written.
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "evil-node"},
                      "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.250"},
                                               {"type": "InternalIP", "address": HOSTILE_NODE_ADDRESS}]}})
    core.create_namespaced_service(ns, _service("evil", FIRST_NODE_PORT + ORDINARY,
                                                {"lbappliance.io/load-balancer-ips": HOSTILE_REQUEST}))
    for i in range(ORDINARY):
        core.create_namespaced_service(ns, _service(f"web-{i}", FIRST_NODE_PORT + i))

    def addresses() -> dict[str, str] | None:
        found = {s.metadata.name: (s.status.load_balancer.ingress or [None])[0]
                 for s in core.list_namespaced_service(ns).items}
        if any(found.get(f"web-{i}") is None for i in range(ORDINARY)):
            return None
        return {name: ingress.ip for name, ingress in found.items() if ingress is not None}

    vips = wait_for(addresses, 60, interval=0.5, what="all ordinary Services' addresses")
    assert "evil" not in vips, "a request the API server would refuse must never be assigned"
    node_names = {n.name for n in lab.nodes}
    for i in range(ORDINARY):
        body = lab.answer("client", vips[f"web-{i}"], 80, timeout=20)
        assert answer_node(body) in node_names, f"web-{i} answered {body!r}"

    # The hostile objects: a Problem each in status.json, an Event each naming the field.
    def problems() -> dict[str, str] | None:
        status = apps[0].status() or {}
        found = {p["service"]: p["message"] for p in status.get("problems", [])}
        return found if {f"{ns}/evil", "node/evil-node"} <= found.keys() else None

    found = wait_for(problems, 30, what="Problems for the hostile Service and Node")
    assert "lbappliance.io/load-balancer-ips" in found[f"{ns}/evil"]
    assert "status.addresses[1].address" in found["node/evil-node"]
    service_events = wait_for(lambda: _events(core, ns, "Service", "evil"), 30, what="the hostile Service's Event")
    assert any(e.reason == "InvalidConfiguration" and e.type == "Warning" and "lbappliance.io/load-balancer-ips" in e.message
               for e in service_events), [(e.reason, e.message) for e in service_events]
    node_events = wait_for(lambda: _events(core, "default", "Node", "evil-node"), 30, what="the hostile Node's Event")
    assert any(e.reason == "InvalidConfiguration" and "status.addresses[1].address" in e.message
               for e in node_events), [(e.reason, e.message) for e in node_events]
    # None of their text reached a rendered file, on either box.
    for app in apps:
        for key in ("haproxyConfig", "keepalivedConfig"):
            text = Path(app.config["paths"][key]).read_text()
            assert INJECTED not in text and "listen X" not in text and "%z" not in text, (app.name, key)
        assert "198.51.100.250" not in Path(app.config["paths"]["haproxyConfig"]).read_text(), \
            "a Node with one hostile address is refused whole"
