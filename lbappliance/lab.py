"""`lbappliance lab up|failover|down`: the whole system on one machine.

A real kube-apiserver + etcd, a network lab of namespaces (two appliance hosts, a client,
N nodes), both daemons with the least-privilege identity, and examples/*.yaml applied.
Everything lives in namespaces prefixed `lab-` and in WORKDIR; `down` removes both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .testing.appliances import (
    Appliance,
    example_manifests,
    make_pair,
    node_objects,
    node_ports,
    wait_for,
)

if TYPE_CHECKING:
    from .testing.netlab import NetworkLab

PREFIX = "lab"
WORKDIR = Path(os.environ.get("LBAPPLIANCE_LAB_DIR", "/tmp/lbappliance-lab"))
STATE = WORKDIR / "lab.json"
REPO = Path(__file__).resolve().parents[1]
Echo = Callable[[str], None]


class LabFailure(RuntimeError):
    """A step failed; the message says which and where its log is."""


def _preflight() -> None:
    from .testing.netlab import lab_unavailable_reason

    reason = lab_unavailable_reason()
    if reason:
        raise LabFailure(reason)
    for binary in ("haproxy", "keepalived"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            raise LabFailure(f"{binary} is not installed (run `make setup` or scripts/setup.sh)")


def _with_progress(echo: Echo, what: str, fn: Callable[[], Any]) -> Any:
    """Run a long step, printing elapsed time every 15 s so a cold build does not look hung."""
    done = threading.Event()
    start = time.monotonic()

    def ticker() -> None:
        while not done.wait(15):
            echo(f"  ... {what}: {time.monotonic() - start:.0f}s")

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        done.set()
        echo(f"  {what}: done in {time.monotonic() - start:.1f}s")


def _pid_alive(pid: int, needle: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


def _kill(pid: int, needle: str, timeout: float = 10.0) -> None:
    """End one process we started, by PID, only if it still runs what we started."""
    if not _pid_alive(pid, needle):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, needle):
        time.sleep(0.1)
    if _pid_alive(pid, needle):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _vip_holder(apps: list[Appliance], vip: str, exclude: str | None = None) -> str:
    """The appliance whose status says it is VRRP master for the instance carrying `vip`."""
    for app in apps:
        if app.name == exclude:
            continue
        for service in (app.status() or {}).get("services", []):
            if service.get("owner", {}).get(vip) == "MASTER":
                return app.name
    return "-"


def up(nodes: int, echo: Echo) -> list[dict[str, Any]]:
    from kubernetes import client, config

    from .testing.controlplane import ControlPlane, apply_manifest, ensure_built
    from .testing.netlab import NetworkLab

    _preflight()
    if STATE.exists():
        echo("a previous lab exists; taking it down first")
        down(echo)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    echo("1/6 kube-apiserver + etcd binaries (cached build; the first one takes 10-20 min)")
    bin_dir = _with_progress(echo, "build", lambda: ensure_built(REPO))
    echo("2/6 starting the control plane")
    cp = ControlPlane(bin_dir, WORKDIR / "controlplane", die_with_parent=False)
    state: dict[str, Any] = {"workdir": str(WORKDIR), "prefix": PREFIX, "daemons": []}
    try:
        cp.start()
    except Exception as exc:
        raise LabFailure(f"control plane failed to start: {exc} (log: {cp.apiserver_log})") from exc
    state["controlplane"] = {"apiserver_pid": cp.apiserver_pid, "etcd_pid": cp.etcd_pid,
                             "admin_kubeconfig": str(cp.admin_kubeconfig)}
    _save(state)
    echo(f"  apiserver {cp.url} ready in {cp.ready_seconds:.1f}s")
    echo(f"3/6 network lab: 2 appliances, 1 client, {nodes} nodes")
    lab = NetworkLab(prefix=PREFIX, nodes=nodes, workdir=WORKDIR / "net")
    lab.up()
    state["hosts"] = {name: {"netns": h.netns, "ipv4": h.ipv4, "ipv6": h.ipv6} for name, h in lab.hosts.items()}
    _save(state)
    admin = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
    core = client.CoreV1Api(admin)
    apply_manifest(admin, REPO / "deploy" / "rbac.yaml", field_manager="lbappliance-lab")
    for node in node_objects(lab):
        core.create_node(node)
    manifests = example_manifests()
    ports, health = node_ports(manifests)
    lab.serve_nodeports(ports)
    lab.serve_health_ports(health)
    echo("4/6 appliances (daemons with the least-privilege identity from deploy/rbac.yaml)")
    apps = list(make_pair(lab, WORKDIR, cp.appliance_kubeconfig))
    for app in apps:
        app.start()
        assert app.proc is not None
        state["daemons"].append({"name": app.name, "pid": app.proc.pid, "config": str(app.config_path),
                                 "log": str(app.log_path)})
    _save(state)
    try:
        wait_for(lambda: all(a.status() for a in apps), 60, what="the daemons' first pass")
    except TimeoutError as exc:
        raise LabFailure(f"appliances did not start; logs: {[str(a.log_path) for a in apps]}") from exc
    echo("5/6 applying examples/*.yaml")
    for doc in manifests:
        core.create_namespaced_service("default", doc)
    echo("6/6 requests from the client host through each VIP")
    rows = _service_rows(core, manifests, apps, lab)
    return rows


def _service_rows(core: Any, manifests: list[dict[str, Any]], apps: list[Appliance],
                  lab: NetworkLab) -> list[dict[str, Any]]:
    rows = []
    for doc in manifests:
        name = doc["metadata"]["name"]

        def ingress(name: str = name) -> list[str]:
            svc = core.read_namespaced_service_status(name, "default")
            return [i.ip for i in (svc.status.load_balancer.ingress or [])]

        try:
            ips = wait_for(ingress, 20, what=f"{name} status")
        except TimeoutError:
            rows.append({"service": f"default/{name}", "vip": "-", "ports": "-", "holder": "-",
                         "answer": "no address (see `lbappliance status`)"})
            continue
        for port in doc["spec"]["ports"]:
            url = f"http://{ips[0]}:{port['port']}/"
            answer = wait_for(lambda url=url: _ok(lab, url), 15, interval=0.3, what=url) if ips else ""
            try:  # status.json is rewritten each pass; give the boxes a moment to report VRRP
                holder = wait_for(lambda vip=ips[0]: _vip_holder(apps, vip).strip("-"), 10, interval=0.2)
            except TimeoutError:
                holder = "-"
            rows.append({"service": f"default/{name}", "vip": ips[0], "ports": f"{port['port']}/TCP",
                         "holder": holder, "answer": f"200 from {answer}"})
    return rows


def _ok(lab: NetworkLab, url: str) -> str | None:
    status, body = lab.http_get("client", url, timeout=2.0)
    return body.strip() if status == 200 else None


def _save(state: dict[str, Any]) -> None:
    STATE.write_text(json.dumps(state, indent=1))


def _load() -> dict[str, Any]:
    try:
        return json.loads(STATE.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        raise LabFailure(f"no lab is up ({STATE}: {exc}); run `lbappliance lab up`") from None


def _apps(state: dict[str, Any]) -> list[Appliance]:
    import yaml

    apps = []
    for d in state["daemons"]:
        config = yaml.safe_load(Path(d["config"]).read_text())
        app = Appliance(d["name"], state["hosts"][d["name"]]["netns"], Path(d["config"]), config, Path(d["log"]))
        apps.append(app)
    return apps


def failover(echo: Echo, duration: float = 6.0) -> dict[str, Any]:
    state = _load()
    apps = _apps(state)
    vips = [s["vips"][0] for s in (apps[0].status() or {}).get("services", []) if s.get("vips")]
    if not vips:
        raise LabFailure("no VIP is served yet")
    vip = vips[0]
    port = next(s["ports"][0].split("/")[0] for s in (apps[0].status() or {})["services"] if s["vips"][0] == vip)
    active = _vip_holder(apps, vip)
    victim = next((d for d in state["daemons"] if d["name"] == active), None)
    if victim is None:
        raise LabFailure(f"cannot tell which appliance holds {vip}")
    echo(f"{vip} is held by {active}; probing http://{vip}:{port}/ from the client every 20 ms")
    prober = subprocess.Popen(
        ["ip", "netns", "exec", state["hosts"]["client"]["netns"], sys.executable, "-m",
         "lbappliance.testing.prober", "--url", f"http://{vip}:{port}/", "--duration", str(duration)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(1.5)
    echo(f"stopping appliance {active} (its daemon, HAProxy and keepalived)")
    _kill(victim["pid"], "lbappliance")
    out, _ = prober.communicate(timeout=duration + 30)
    result = json.loads(out.strip().splitlines()[-1])
    result["from"] = active
    try:  # the stopped box's status file is stale: ask the others, once they have noticed
        result["to"] = wait_for(lambda: _vip_holder(apps, vip, exclude=active).strip("-"), 10, interval=0.2)
    except TimeoutError:
        result["to"] = "-"
    echo(f"{vip} moved {active} -> {result['to']}; outage {result['longest_gap_s']:.3f}s; "
         f"{result['ok']} ok / {result['failed']} failed requests; answered by {result['answered_by']}")
    app = next(a for a in apps if a.name == active)
    app.start()
    assert app.proc is not None
    victim["pid"] = app.proc.pid
    _save(state)
    echo(f"{active} restarted; it rejoins as backup (nopreempt), so the VIP stays on {result['to']}")
    return result


def down(echo: Echo) -> None:
    """Remove everything the lab made; safe to run twice and after a crash."""
    from .testing.netlab import cleanup_stale

    state: dict[str, Any] = {}
    with contextlib.suppress(LabFailure):
        state = _load()
    for daemon in state.get("daemons", []):
        _kill(daemon["pid"], "lbappliance")
    cp = state.get("controlplane") or {}
    for key, needle in (("apiserver_pid", "kube-apiserver"), ("etcd_pid", "etcd")):
        if cp.get(key):
            _kill(cp[key], needle)
    _reap_namespace_processes(_lab_namespaces())
    removed = cleanup_stale(PREFIX)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    echo(f"lab down: removed {len(removed)} namespaces and {WORKDIR}")


def _lab_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def _reap_namespace_processes(namespaces: list[str]) -> None:
    """haproxy/keepalived left in our own lab namespaces by a crashed daemon are ours to end;
    the lab's recorded helpers are left to its own cleanup."""
    from .testing.netlab import STATE_ROOT

    recorded = set()
    with contextlib.suppress(OSError):
        for line in (Path(STATE_ROOT) / PREFIX / "pids").read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                recorded.add(int(json.loads(line)["pid"]))
    for ns in namespaces:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                if int(pid) in recorded:
                    continue
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
