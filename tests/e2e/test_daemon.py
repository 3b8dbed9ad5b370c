"""The daemon end to end: real kube-apiserver + etcd, two appliances in the network lab,
least-privilege identity from deploy/rbac.yaml, traffic from the client host through the VIP."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbappliance.core.models import FINALIZER
from lbappliance.testing.kubenodes import answer_node
from lbappliance.testing.prober import Probe, target
from lbappliance.testing.wait import wait_for
from tests.e2e.conftest import FIELD_MANAGER, RBAC_MANIFEST

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(control_plane: Any, admin_api: Any, lab_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Lab + real nodes (kube-proxy, a pod each) + RBAC + two running daemons, shared by the tests of this module."""
    from kubernetes import client

    from lbappliance.testing.appliances import running_daemons
    from lbappliance.testing.kubenodes import real_nodes
    from lbappliance.testing.netlab import open_lab

    workdir = tmp_path_factory.mktemp("daemon")
    with open_lab("lbe", 3, workdir / "lab") as lab, real_nodes(lab, control_plane, admin_api) as kube, \
            running_daemons(admin_api, lab, workdir, control_plane.appliance_kubeconfig, rbac=RBAC_MANIFEST,
                            field_manager=FIELD_MANAGER, kube_nodes=kube) as (app1, app2):
        yield {"lab": lab, "core": client.CoreV1Api(admin_api), "apps": (app1, app2), "cp": control_plane,
               "workdir": workdir}


def _service(name: str, node_port: int, port: int = 80, annotations: dict[str, str] | None = None
             ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"type": "LoadBalancer", "selector": {"app": name},
                     "ports": [{"name": "p", "port": port, "targetPort": 8080, "nodePort": node_port,
                                "protocol": "TCP"}]}}


def _ingress(core: Any, ns: str, name: str) -> list[str]:
    svc = core.read_namespaced_service_status(name, ns)
    return [i.ip for i in (svc.status.load_balancer.ingress or [])]


def _wait_ingress(core: Any, ns: str, name: str, timeout: float = 15) -> list[str]:
    return wait_for(lambda: _ingress(core, ns, name), timeout, what=f"status of {ns}/{name}")


def _get(lab: Any, vip: str, port: int, timeout: float = 2.0) -> tuple[int, str]:
    return lab.http_get("client", f"http://{vip}:{port}/", timeout=timeout)  # type: ignore[no-any-return]


def _answered(lab: Any, vip: str, port: int, timeout: float = 10) -> str:
    return lab.answer("client", vip, port, timeout)  # type: ignore[no-any-return]


def _delete_all(core: Any, ns: str, names: list[str], timeout: float = 20) -> None:
    """Delete and wait until gone: the leader drops the finalizer once the VIP is withdrawn."""
    from kubernetes.client.exceptions import ApiException

    for name in names:
        with contextlib.suppress(ApiException):
            core.delete_namespaced_service(name, ns)

    def gone() -> bool:
        left = {s.metadata.name for s in core.list_namespaced_service(ns).items}
        return not (left & set(names))

    wait_for(gone, timeout, what=f"deletion of {names} (finalizer removal)")


@pytest.fixture
def ns(env: dict[str, Any]) -> str:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    env["core"].create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def test_examples_are_served_through_their_vips(env: dict[str, Any], ns: str) -> None:
    from lbappliance.testing.appliances import example_manifests

    core, lab = env["core"], env["lab"]
    for doc in example_manifests():
        core.create_namespaced_service(ns, doc)
    for doc in example_manifests():
        name = doc["metadata"]["name"]
        ips = _wait_ingress(core, ns, name)
        for port in doc["spec"]["ports"]:
            body = _answered(lab, ips[0], port["port"])
            assert answer_node(body) in {n.name for n in lab.nodes}, f"{name}:{port['port']} answered {body!r}"
    shared = {tuple(_ingress(core, ns, n)) for n in ("dns-tcp", "dot")}
    assert len(shared) == 1, f"shared-IP Services got different addresses: {shared}"
    assert _ingress(core, ns, "local") == ["192.0.2.240"]
    svc = core.read_namespaced_service(name="web", namespace=ns)
    assert FINALIZER in (svc.metadata.finalizers or [])
    status = core.read_namespaced_service_status("web", ns).status.load_balancer.ingress[0]
    assert status.ip_mode == "Proxy"
    _delete_all(core, ns, [doc["metadata"]["name"] for doc in example_manifests()])


def test_create_update_delete_lifecycle(env: dict[str, Any], ns: str) -> None:
    core, lab = env["core"], env["lab"]
    core.create_namespaced_service(ns, _service("life", 30090))
    vip = _wait_ingress(core, ns, "life")[0]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("192.0.2.192/26")
    assert _answered(lab, vip, 80)
    # Update the ports: add 8081 -> 30091; the new port is served on the same VIP.
    core.patch_namespaced_service("life", ns, {"spec": {"ports": [
        {"name": "p", "port": 80, "targetPort": 8080, "nodePort": 30090, "protocol": "TCP"},
        {"name": "q", "port": 8081, "targetPort": 8080, "nodePort": 30091, "protocol": "TCP"}]}})
    assert _answered(lab, vip, 8081)
    assert _ingress(core, ns, "life") == [vip]
    # Events follow the status writes (they wait for a pass with nothing left to publish).
    wait_for(lambda: any(e.reason == "IPAllocated" for e in core.list_namespaced_event(
        ns, field_selector="involvedObject.name=life").items), 10, what="IPAllocated event")
    # Nothing left to write, so no Event still waits and none was dropped (both boxes report it).
    for app in env["apps"]:
        assert wait_for(lambda app=app: app.metric("lbappliance_events_pending") == 0.0, 10, what="events sent")
        assert app.metric("lbappliance_events_dropped") == 0.0
    # Delete: finalizer removed by the leader after the VIP is withdrawn, object gone, address reusable.
    core.delete_namespaced_service("life", ns)

    def gone() -> bool:
        try:
            core.read_namespaced_service("life", ns)
        except Exception as exc:
            return getattr(exc, "status", None) == 404
        return False

    wait_for(gone, 15, what="finalizer removal")
    wait_for(lambda: _get(lab, vip, 80, timeout=1)[0] == 0, 10, what="VIP withdrawn")
    wait_for(lambda: any(e.reason == "IPReleased" and vip in e.message for e in core.list_namespaced_event(
        ns, field_selector="involvedObject.name=life").items), 10, what="IPReleased event")
    core.create_namespaced_service(ns, _service("again", 30092, annotations={
        "lbappliance.io/load-balancer-ips": vip}))
    assert _wait_ingress(core, ns, "again") == [vip]
    _delete_all(core, ns, ["again"])


def test_bad_annotation_gets_an_event_and_others_proceed(env: dict[str, Any], ns: str) -> None:
    core = env["core"]
    core.create_namespaced_service(ns, _service("broken", 30093, annotations={
        "lbappliance.io/load-balancer-ips": "not-an-ip"}))
    core.create_namespaced_service(ns, _service("fine", 30094))
    assert _wait_ingress(core, ns, "fine")

    def event() -> Any:
        items = core.list_namespaced_event(ns, field_selector="involvedObject.name=broken").items
        return [e for e in items if e.reason == "InvalidConfiguration"]

    found = wait_for(event, 10, what="InvalidConfiguration event")
    assert "'not-an-ip' is not an IP address" in found[0].message
    assert _ingress(core, ns, "broken") == []
    _delete_all(core, ns, ["broken", "fine"])


def _leader(core: Any) -> str | None:
    from kubernetes import client

    lease = client.CoordinationV1Api(core.api_client).read_namespaced_lease("lbappliance-leader",
                                                                           "lbappliance-system")
    return lease.spec.holder_identity  # type: ignore[no-any-return]


def _prober(lab: Any, vip: str, port: int, duration: float) -> Probe:
    """The prober in the client host for a fixed time: counts failed requests."""
    return Probe(lab.hosts["client"].netns, [target(vip, port)], duration, interval=0.05, connect_timeout=1.0,
                 read_timeout=1.0)


def test_leader_handover_keeps_allocating_and_traffic_flows(env: dict[str, Any], ns: str) -> None:
    core, lab = env["core"], env["lab"]
    app1, app2 = env["apps"]
    leader_name = wait_for(lambda: _leader(core), 10, what="a leader")
    leaders = [a for a in (app1, app2) if a.metric("lbappliance_leader") == 1.0]
    assert [a.name for a in leaders] == [leader_name], "exactly one appliance must consider itself leader"
    core.create_namespaced_service(ns, _service("ha", 30090))
    vip = _wait_ingress(core, ns, "ha")[0]
    _answered(lab, vip, 80)
    leader = leaders[0]
    follower = app2 if leader is app1 else app1
    with _prober(lab, vip, 80, duration=12) as probe:
        leader.stop(signal.SIGKILL)
        wait_for(lambda: _leader(core) == follower.name, 15, what="follower taking the lease")
        core.create_namespaced_service(ns, _service("after", 30091))
        assert _wait_ingress(core, ns, "after", timeout=20)
    seen = probe.result
    assert seen.failed == 0 and seen.ok > 100, f"VIP traffic during handover: {seen.ok} ok, {seen.failed} failed"
    assert follower.metric("lbappliance_leader") == 1.0
    leader.start()  # back as follower for the next tests
    wait_for(lambda: leader.metric("lbappliance_leader") == 0.0, 30, what="restarted daemon up as follower")
    _delete_all(core, ns, ["ha", "after"])


def test_clean_stop_of_the_leader_hands_over_at_once(env: dict[str, Any], ns: str) -> None:
    """SIGTERM releases the Lease: the follower takes it on its next try (every 0.5 s here), not
    after the 4 s lease duration a crashed leader would cost."""
    core = env["core"]
    app1, app2 = env["apps"]
    leader_name = wait_for(lambda: _leader(core), 10, what="a leader")
    leader, follower = (app1, app2) if leader_name == app1.name else (app2, app1)
    wait_for(lambda: follower.metric("lbappliance_leader") == 0.0, 10, what="follower up")
    t0 = time.monotonic()
    leader.stop(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: _leader(core) == follower.name, 10, interval=0.05, what="follower taking the lease")
    handover = time.monotonic() - stopped
    print(f"\nclean leader stop: stop took {stopped - t0:.2f}s, lease handed over {handover:.2f}s after")
    assert handover < 2.0, f"the Lease was not released: handover took {handover:.2f}s (lease duration 4 s)"
    leader.start()  # back as follower for the next tests
    wait_for(lambda: leader.metric("lbappliance_leader") == 0.0, 30, what="restarted daemon up as follower")


def test_api_outage_keeps_traffic_and_converges_after(env: dict[str, Any], ns: str) -> None:
    core, lab, cp = env["core"], env["lab"], env["cp"]
    core.create_namespaced_service(ns, _service("steady", 30090))
    vip = _wait_ingress(core, ns, "steady")[0]
    _answered(lab, vip, 80)
    outage = float(os.environ.get("LBAPPLIANCE_E2E_OUTAGE_SECONDS", "30"))
    with _prober(lab, vip, 80, duration=outage + 4) as probe:
        cp.stop_apiserver()
        time.sleep(outage)
        cp.start_apiserver()
    seen = probe.result
    assert seen.failed == 0 and seen.ok > outage * 10, f"{seen.ok} ok, {seen.failed} failed during API outage"
    core.create_namespaced_service(ns, _service("later", 30091))
    assert _answered(lab, _wait_ingress(core, ns, "later", timeout=30)[0], 80)
    _delete_all(core, ns, ["steady", "later"])


def test_restarting_both_daemons_changes_no_address(env: dict[str, Any], ns: str) -> None:
    core, lab = env["core"], env["lab"]
    names = [f"keep{i}" for i in range(5)]
    for i, name in enumerate(names):
        core.create_namespaced_service(ns, _service(name, 30090 + i))
    before = {n: _wait_ingress(core, ns, n) for n in names}
    for app in env["apps"]:
        app.stop()
    # A Service deleted while both are down must not make others move when they come back.
    core.delete_namespaced_service(names[0], ns)
    for app in env["apps"]:
        app.start()
    wait_for(lambda: _leader(core) in ("app1", "app2") and any(
        a.metric("lbappliance_leader") == 1.0 for a in env["apps"]), 30, what="leader after restart")
    time.sleep(2)
    after = {n: _ingress(core, ns, n) for n in names[1:]}
    assert after == {n: before[n] for n in names[1:]}
    assert _answered(lab, after[names[1]][0], 80)
    _delete_all(core, ns, names[1:])


def test_pool_edit_via_cli_applies_live_and_invalid_edit_changes_nothing(env: dict[str, Any], ns: str) -> None:
    core = env["core"]
    app1, app2 = env["apps"]
    cli = [sys.executable, "-m", "lbappliance", "pool"]
    conf = ["--config", str(app1.config_path)]
    done = subprocess.run([*cli, "add", "extra", "-a", "192.0.2.180-192.0.2.189", *conf],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    core.create_namespaced_service(ns, _service("fresh", 30090, annotations={"lbappliance.io/pool": "extra"}))
    ip = _wait_ingress(core, ns, "fresh")[0]
    assert ipaddress.ip_address("192.0.2.180") <= ipaddress.ip_address(ip) <= ipaddress.ip_address("192.0.2.189")
    pools_path = Path(app1.config["paths"]["pools"])
    before = pools_path.read_bytes()
    refused = subprocess.run([*cli, "add", "clash", "-a", "192.0.2.185/32", *conf],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "overlaps" in refused.stderr
    assert pools_path.read_bytes() == before
    # A hand edit that breaks the file is refused by the running daemons, which keep the old pools.
    pools_path.write_text(before.decode() + "  bogus: 1\n")
    wait_for(lambda: app1.metric("lbappliance_config_stale", {"file": "pools"}) == 1.0, 10, what="stale flag")
    core.create_namespaced_service(ns, _service("still", 30091, annotations={"lbappliance.io/pool": "extra"}))
    assert _wait_ingress(core, ns, "still")
    pools_path.write_bytes(before)
    wait_for(lambda: app1.metric("lbappliance_config_stale", {"file": "pools"}) == 0.0, 10, what="stale cleared")
    # Removing a pool that holds live addresses is refused by the daemon (addresses are never yanked).
    subprocess.run([*cli, "remove", "extra", *conf], capture_output=True, text=True, check=True)
    wait_for(lambda: app1.metric("lbappliance_config_stale", {"file": "pools"}) == 1.0, 10,
             what="removal of a pool in use refused")
    assert _ingress(core, ns, "fresh") == [ip]
    pools_path.write_bytes(before)
    wait_for(lambda: app1.metric("lbappliance_config_stale", {"file": "pools"}) == 0.0, 10, what="pools restored")
    _delete_all(core, ns, ["fresh", "still"])
    wait_for(lambda: app2.metric("lbappliance_config_stale", {"file": "pools"}) == 0.0, 10, what="recovered")
    yaml.safe_load(pools_path.read_text())


def test_status_command_shows_what_this_box_serves(env: dict[str, Any], ns: str) -> None:
    core = env["core"]
    app1, _ = env["apps"]
    core.create_namespaced_service(ns, _service("shown", 30090))
    vip = _wait_ingress(core, ns, "shown")[0]
    def listed() -> dict[str, Any] | None:
        out = subprocess.run([sys.executable, "-m", "lbappliance", "status", "--config", str(app1.config_path),
                              "-o", "json"], capture_output=True, text=True, check=True).stdout
        doc = json.loads(out)
        return next((s for s in doc["services"] if s["service"] == f"{ns}/shown"), None)

    entry = wait_for(listed, 10, what="Service in `lbappliance status`")
    assert entry["vips"] == [vip] and entry["ports"] == ["80/TCP"]
    holders = [a.name for a in env["apps"] if (a.status() or {}).get("services") and any(
        s["service"] == f"{ns}/shown" and s["owner"].get(vip) == "MASTER" for s in a.status()["services"])]
    assert len(holders) == 1, f"exactly one box must report holding {vip}: {holders}"
    assert set(entry["backends"].values()) <= {"UP", "DOWN", "MAINT", "unknown"} and len(entry["backends"]) == 3
    table = subprocess.run([sys.executable, "-m", "lbappliance", "status", "--config", str(app1.config_path)],
                           capture_output=True, text=True, check=True).stdout
    assert table.startswith("appliance app1  leader:") and "VI_v4=" in table
    assert f"{ns}/shown" in table and vip in table
    _delete_all(core, ns, ["shown"])


REFUSED, REFUSED_WHOLE = "refused-by-haproxy", "refused-whole"
# Fault injection around the real binary: `haproxy -c` refuses a candidate serving REFUSED with an
# alert that points into that Service's section (as HAProxy's own alerts do), and one serving
# REFUSED_WHOLE with an alert that points nowhere. Everything else is the real haproxy.
REFUSING_HAPROXY = f"""#!/bin/sh
if [ "$1" = "-c" ]; then
    line=$(grep -n "{REFUSED}" "$3" | head -1 | cut -d: -f1)
    if [ -n "$line" ]; then
        echo "[ALERT]    ($$) : config : parsing [$3:$line] : (injected) {REFUSED} is not allowed"
        exit 1
    fi
    if grep -q "{REFUSED_WHOLE}" "$3"; then
        echo "[ALERT]    ($$) : config : (injected) this whole config is refused"
        exit 1
    fi
fi
exec /usr/sbin/haproxy "$@"
"""


def test_haproxy_refusing_one_service_serves_the_others_and_a_whole_refusal_keeps_the_last_good_config(
        env: dict[str, Any], ns: str, tmp_path: Path) -> None:
    """A third daemon, in the client host, with its own loadBalancerClass and pool, whose HAProxy
    refuses some configs. One Service's refused section: that Service gets an Event, every other
    one is still served and changed. A refusal that names no Service: the running config keeps
    serving, and status.json, `lbappliance status` and the metrics say so. Removing either cause
    recovers."""
    from lbappliance.testing.appliances import Appliance, appliance_config, pools_yaml

    lab, core = env["lab"], env["core"]
    binary = tmp_path / "haproxy"
    binary.write_text(REFUSING_HAPROXY)
    binary.chmod(0o755)
    pools = tmp_path / "pools.yaml"
    pools.write_text(pools_yaml(["203.0.113.8/29"]))
    # The admin identity: deploy/rbac.yaml grants the one Lease the pair holds, and this box
    # needs a Lease of its own to publish.
    config = appliance_config(lab, "client", "app1", tmp_path / "state", env["cp"].admin_kubeconfig,
                              pools, priority=10)
    config["vrrp"].update(routerIds={"ipv4": 63, "ipv6": 64}, unicastPeers=["192.0.2.99"], unicastPeers6=[],
                          unicastSrcIp6=None)
    config["cluster"]["loadBalancerClass"] = "example.com/fault-test"
    config["leaderElection"]["leaseName"] = "lbappliance-fault-test"
    config["paths"]["haproxyBinary"] = str(binary)
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(config))
    box = Appliance("fault", lab.hosts["client"].netns, path, config, tmp_path / "fault.log")
    state = tmp_path / "state"

    def ours(name: str, node_port: int | None) -> dict[str, Any]:
        body = _service(name, node_port or 30000)
        body["spec"]["loadBalancerClass"] = "example.com/fault-test"
        if node_port is None:  # never served: any free NodePort will do
            del body["spec"]["ports"][0]["nodePort"]
        return body

    def served() -> set[str]:
        return {s["service"] for s in (box.status() or {}).get("services", [])}

    def last_apply() -> dict[str, str]:
        return (box.status() or {}).get("lastApply") or {}

    def status_table() -> str:
        return subprocess.run([sys.executable, "-m", "lbappliance", "status", "--config", str(path)],
                              capture_output=True, text=True, check=True).stdout

    # The VIP floats onto the client's eth0 only when its keepalived is master; HAProxy binds it
    # before, as on the appliance hosts (inside the client's namespace, restored after).
    nonlocal_bind = "net.ipv4.ip_nonlocal_bind"
    before = lab.exec("client", ["sysctl", "-n", nonlocal_bind]).stdout.strip()
    lab.exec("client", ["sysctl", "-qw", f"{nonlocal_bind}=1"])
    box.start()
    try:
        core.create_namespaced_service(ns, ours("kept", 30093))
        kept_vip = _wait_ingress(core, ns, "kept")[0]
        assert ipaddress.ip_address(kept_vip) in ipaddress.ip_network("203.0.113.8/29")
        assert answer_node(_answered(lab, kept_vip, 80)).startswith("node")
        # The pair (the default implementation) leaves another class's finalizer and status alone:
        # a settled Service is not written again.
        settled = core.read_namespaced_service("kept", ns)
        time.sleep(2)
        after = core.read_namespaced_service("kept", ns)
        assert after.metadata.resource_version == settled.metadata.resource_version
        assert FINALIZER in after.metadata.finalizers

        # 1. HAProxy refuses one Service's section: the others are served, and still change.
        core.create_namespaced_service(ns, ours(REFUSED, None))
        refused_vip = _wait_ingress(core, ns, REFUSED)[0]  # published: only the data plane refuses it
        problem = wait_for(lambda: next((p for p in (box.status() or {}).get("problems", [])
                                         if p["service"] == f"{ns}/{REFUSED}"), None), 20,
                           what="the refused Service among the problems in status.json")
        assert problem["reason"] == "InvalidConfiguration" and "(injected)" in problem["message"], problem
        assert REFUSED in (state / "haproxy.cfg.rejected").read_text()
        core.create_namespaced_service(ns, ours("third", 30092))
        third_vip = _wait_ingress(core, ns, "third")[0]
        assert answer_node(_answered(lab, third_vip, 80)).startswith("node"), "a change beside the refused Service is served"
        assert answer_node(_answered(lab, kept_vip, 80)).startswith("node")
        assert _get(lab, refused_vip, 80, timeout=1.0)[0] != 200
        assert served() == {f"{ns}/kept", f"{ns}/third"}
        assert last_apply()["kind"] in ("noop", "runtime", "reload"), last_apply()
        assert REFUSED not in (state / "haproxy.cfg").read_text()
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={REFUSED}").items
        assert [e.reason for e in events if "(injected)" in e.message] == ["InvalidConfiguration"], events
        _delete_all(core, ns, [REFUSED])  # its finalizer goes: it is not served, nothing to withdraw

        # 2. A refusal that names no Service: nothing changes, and everything says so.
        core.create_namespaced_service(ns, ours(REFUSED_WHOLE, None))
        _wait_ingress(core, ns, REFUSED_WHOLE)
        last = wait_for(lambda: last_apply().get("kind") == "rejected" and last_apply(), 20,
                        what="a rejected apply in status.json")
        assert "haproxy.cfg" in last["message"] and "(injected)" in last["message"], last
        assert served() == {f"{ns}/kept", f"{ns}/third"}, "status.json must list what still runs"
        assert (box.metric("lbappliance_applies_total", {"kind": "rejected"}) or 0) >= 1
        assert REFUSED_WHOLE in (state / "haproxy.cfg.rejected").read_text()
        assert REFUSED_WHOLE not in (state / "haproxy.cfg").read_text()
        assert answer_node(_answered(lab, kept_vip, 80)).startswith("node"), "the last good config keeps serving"
        table = status_table()
        assert "the last change was rejected" in table and "(injected)" in table, table

        _delete_all(core, ns, [REFUSED_WHOLE])  # its finalizer goes once an apply without it succeeds
        wait_for(lambda: last_apply().get("kind") in ("noop", "runtime", "reload"), 20,
                 what="an accepted apply after the cause is gone")
        assert served() == {f"{ns}/kept", f"{ns}/third"}
        assert "rejected" not in status_table()
        assert answer_node(_answered(lab, kept_vip, 80)).startswith("node")
        _delete_all(core, ns, ["kept", "third"])
    except (AssertionError, TimeoutError):
        print(box.log_tail(80))
        raise
    finally:
        box.stop()
        lab.exec("client", ["sysctl", "-qw", f"{nonlocal_bind}={before}"])


def test_systemd_notify_ready_watchdog_reloading_stopping(env: dict[str, Any], tmp_path: Path) -> None:
    """A third daemon with its own loadBalancerClass (it serves none of the pair's Services)."""
    import socket

    from lbappliance.testing.appliances import appliance_config

    lab = env["lab"]
    # It handles only its own class, and has no pools besides: it serves and publishes nothing.
    pools = tmp_path / "pools.yaml"
    pools.write_text("apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools: []\n")
    config = appliance_config(lab, "client", "app1", tmp_path / "state", env["cp"].appliance_kubeconfig,
                              pools, priority=10)
    config["vrrp"]["routerIds"] = {"ipv4": 61, "ipv6": 62}
    config["vrrp"]["unicastPeers"], config["vrrp"]["unicastPeers6"] = ["192.0.2.99"], []
    config["vrrp"]["unicastSrcIp6"] = None
    config["cluster"]["loadBalancerClass"] = "example.com/notify-test"
    config["leaderElection"]["leaseName"] = "lbappliance-notify-test"
    path = tmp_path / "notify.yaml"
    path.write_text(yaml.safe_dump(config))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    proc = subprocess.Popen([sys.executable, "-m", "lbappliance", "run", "--config", str(path), "--identity", "probe",
                             "--netns", lab.hosts["client"].netns],
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"},
                            stdout=(tmp_path / "probe.log").open("wb"), stderr=subprocess.STDOUT)
    seen: list[str] = []

    def expect(message: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while message not in seen:
            assert time.monotonic() < deadline, (
                f"no {message} within {within}s (got {sorted(set(seen))}):\n"
                + (tmp_path / "probe.log").read_text(errors="replace")[-3000:])
            seen.append(sock.recv(4096).decode())

    try:
        expect("READY=1")
        expect("WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        expect("RELOADING=1")
        seen.clear()
        expect("READY=1")
        proc.send_signal(signal.SIGTERM)
        expect("STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_invalid_config_at_start_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("vrrp: {priority: 999}\n")
    done = subprocess.run([sys.executable, "-m", "lbappliance", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 78 and "vrrp.priority" in done.stderr
    no_pools = tmp_path / "ok.yaml"
    no_pools.write_text(yaml.safe_dump({"paths": {"pools": str(tmp_path / "missing.yaml"),
                                                  "stateDir": str(tmp_path / "state")}}))
    done = subprocess.run([sys.executable, "-m", "lbappliance", "run", "--config", str(no_pools)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 78 and "missing.yaml" in done.stderr
