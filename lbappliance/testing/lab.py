"""`lbappliance lab up|status|failover|down`: the whole system on one machine.

A real kube-apiserver + etcd, a network lab of namespaces (two appliance hosts, a client,
N nodes that run real kube-proxy with a pod each, see `kubenodes`), both daemons with the
least-privilege identity, and the examples applied. It builds on the test harnesses of this
package, and what it reads besides (deploy/rbac.yaml and examples/*.yaml) ships with them as
package data, so it runs from an installed wheel too (with a control plane built earlier, see
`controlplane.find_binaries`).

It runs as root, so nothing lives at a predictable path in the shared temporary folder: each
`up` makes a private work directory (mkdtemp, mode 0700), and records it, with the PIDs it
started, in a state file under /run (root's alone). `status`, `failover` and `down` trust only
a state file and a work directory owned by us that nobody else may write.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbappliance.edges.processes import alive, start_time, stop_pid

from .appliances import Appliance, example_manifests, start_daemons
from .kubenodes import KubeNodes
from .netlab import STATE_ROOT
from .prober import Probe, target
from .wait import wait_for

if TYPE_CHECKING:
    from .netlab import NetworkLab

PREFIX = "lab"
STATE = STATE_ROOT / "lab.json"
Echo = Callable[[str], None]


class LabFailure(RuntimeError):
    """A step failed; the message says which and where its log is."""


def _preflight() -> None:
    from .netlab import lab_unavailable_reason

    reason = lab_unavailable_reason()
    if reason:
        raise LabFailure(reason)
    for binary in ("haproxy", "keepalived"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            raise LabFailure(f"{binary} is not installed (run `make setup` or scripts/setup.sh)")
    if importlib.util.find_spec("cryptography") is None:  # the control plane's throwaway PKI
        raise LabFailure("the lab needs the test extra: pip install 'lbappliance[test]'")


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


def _vip_holder(apps: list[Appliance], vip: str, exclude: str | None = None) -> str:
    """The appliance whose status says it is VRRP master for the instance carrying `vip`."""
    for app in apps:
        if app.name == exclude:
            continue
        for service in (app.status() or {}).get("services", []):
            if service.get("owner", {}).get(vip) == "MASTER":
                return app.name
    return "-"


def _record(pid: int) -> dict[str, int | None]:
    """A PID with its start time, so `down` never signals a process that merely reuses the PID."""
    return {"pid": pid, "started": start_time(pid)}


def up(nodes: int, echo: Echo) -> tuple[list[dict[str, Any]], Path]:
    """Start everything and apply the examples; the Services' rows and the lab's work directory."""
    from kubernetes import client, config

    from .controlplane import ControlPlane, find_binaries
    from .netlab import NetworkLab

    _preflight()
    if STATE.exists():
        echo("a previous lab exists; taking it down first")
        down(echo)
    workdir = Path(tempfile.mkdtemp(prefix="lbappliance-lab-"))  # mode 0700, a new name each run
    state: dict[str, Any] = {"workdir": str(workdir), "prefix": PREFIX, "daemons": []}
    _save(state)
    echo(f"lab directory {workdir}")
    echo("1/6 kube-apiserver, etcd and kube-proxy binaries (cached build; the first one takes 10-20 min)")
    try:
        bin_dir = _with_progress(echo, "build", find_binaries)
    except Exception as exc:
        raise LabFailure(str(exc)) from exc
    echo("2/6 starting the control plane")
    cp = ControlPlane(bin_dir, workdir / "controlplane", die_with_parent=False)
    try:
        cp.start()
    except Exception as exc:
        raise LabFailure(f"control plane failed to start: {exc} (log: {cp.apiserver_log})") from exc
    assert cp.apiserver_pid is not None and cp.etcd_pid is not None
    state["controlplane"] = {"apiserver": _record(cp.apiserver_pid), "etcd": _record(cp.etcd_pid),
                             "admin_kubeconfig": str(cp.admin_kubeconfig)}
    _save(state)
    echo(f"  apiserver {cp.url} ready in {cp.ready_seconds:.1f}s")
    echo(f"3/6 network lab: 2 appliances, 1 client, {nodes} nodes (real kube-proxy and a pod each)")
    lab = NetworkLab(prefix=PREFIX, nodes=nodes, workdir=workdir / "net")
    lab.up()
    state["hosts"] = {name: {"netns": h.netns, "ipv4": h.ipv4, "ipv6": h.ipv6} for name, h in lab.hosts.items()}
    _save(state)
    admin = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
    core = client.CoreV1Api(admin)
    manifests = example_manifests()
    try:
        kube = KubeNodes(lab, cp, admin).start()
        kube.default_pods()
    except Exception as exc:
        raise LabFailure(f"lab nodes did not start: {exc} (logs: {lab.workdir / 'logs'})") from exc
    echo("4/6 appliances (daemons with the least-privilege identity from deploy/rbac.yaml)")
    try:
        apps = list(start_daemons(admin, lab, workdir, cp.appliance_kubeconfig, kube_nodes=kube,
                                  field_manager="lbappliance-lab"))
    except TimeoutError as exc:
        raise LabFailure(f"appliances did not start: {exc}") from exc
    for app in apps:
        assert app.proc is not None
        state["daemons"].append({"name": app.name, **_record(app.proc.pid), "config": str(app.config_path),
                                 "log": str(app.log_path)})
    _save(state)
    echo("5/6 applying examples/*.yaml")
    for doc in manifests:
        core.create_namespaced_service("default", doc)
    # Their EndpointSlices, once: the lab's endpoints controller lives in this process, which ends here.
    kube.sync()
    kube.stop_controller()
    echo("6/6 requests from the client host through each VIP")
    return _service_rows(core, manifests, apps, lab), workdir


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
            answer = lab.answer("client", ips[0], port["port"], 15, interval=0.3)
            try:  # status.json is rewritten each pass; give the boxes a moment to report VRRP
                holder = wait_for(lambda vip=ips[0]: _vip_holder(apps, vip).strip("-"), 10, interval=0.2)
            except TimeoutError:
                holder = "-"
            rows.append({"service": f"default/{name}", "vip": ips[0], "ports": f"{port['port']}/TCP",
                         "holder": holder, "answer": f"200 from {answer}"})  # "<pod>@<node>"
    return rows


def _private(path: Path, kind: str) -> os.stat_result:
    """lstat of a path only we may have written: ours, no symlink, no write for group or others."""
    info = path.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022 or stat.S_ISLNK(info.st_mode):
        raise LabFailure(f"refusing {kind} {path}: not ours alone (owner {info.st_uid}, "
                         f"mode {stat.filemode(info.st_mode)})")
    return info


def _save(state: dict[str, Any]) -> None:
    """Replace the state file atomically; it and its directory are root's (or ours) alone."""
    STATE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _private(STATE.parent, "state directory")
    fd, tmp = tempfile.mkstemp(dir=STATE.parent, prefix=".lab-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, STATE)


def _load() -> dict[str, Any]:
    """The recorded lab, after checking that nobody else could have written it or its work directory."""
    try:
        _private(STATE.parent, "state directory")
        _private(STATE, "state file")
        state: dict[str, Any] = json.loads(STATE.read_text())
    except (OSError, ValueError) as exc:
        raise LabFailure(f"no lab is up ({STATE}: {exc}); run `lbappliance lab up`") from None
    workdir = Path(state.get("workdir", ""))
    try:
        info = _private(workdir, "lab directory")
    except OSError as exc:
        raise LabFailure(f"the lab directory is gone ({exc}); run `lbappliance lab down`") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077:
        raise LabFailure(f"refusing lab directory {workdir}: not a private directory")
    return state


def workdir() -> Path:
    """The running lab's work directory (its configs, logs, kubeconfigs)."""
    return Path(_load()["workdir"])


def hosts() -> dict[str, dict[str, str]]:
    """The running lab's hosts: name -> netns and addresses."""
    return dict(_load()["hosts"])


def _apps(state: dict[str, Any]) -> list[Appliance]:
    import yaml

    apps = []
    for d in state["daemons"]:
        config = yaml.safe_load(Path(d["config"]).read_text())
        app = Appliance(d["name"], state["hosts"][d["name"]]["netns"], Path(d["config"]), config, Path(d["log"]))
        apps.append(app)
    return apps


def _running(record: dict[str, Any]) -> bool:
    return alive(record["pid"]) and start_time(record["pid"]) == record.get("started")


def status() -> dict[str, Any]:
    """Where the lab is and whether its processes run: for `lbappliance lab status`."""
    state = _load()
    cp = state.get("controlplane") or {}
    return {
        "workdir": state["workdir"],
        "admin_kubeconfig": cp.get("admin_kubeconfig", "-"),
        "processes": [{"name": name, "pid": record["pid"], "running": _running(record)}
                      for name, record in [*((k, cp[k]) for k in ("apiserver", "etcd") if k in cp),
                                           *((d["name"], d) for d in state.get("daemons", []))]],
        "configs": {d["name"]: d["config"] for d in state.get("daemons", [])},
    }


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
    with Probe(state["hosts"]["client"]["netns"], [target(vip, int(port))], duration, interval=0.02,
               connect_timeout=0.25, read_timeout=0.25) as probe:
        time.sleep(1.5)
        echo(f"stopping appliance {active} (its daemon, HAProxy and keepalived)")
        stop_pid(victim["pid"], signal.SIGTERM, 15, started=victim.get("started"))
    seen = probe.result
    result: dict[str, Any] = {"from": active, "outage_s": seen.max_gap, "ok": seen.ok, "failed": seen.failed,
                              "answered_by": seen.answered_by}
    try:  # the stopped box's status file is stale: ask the others, once they have noticed
        result["to"] = wait_for(lambda: _vip_holder(apps, vip, exclude=active).strip("-"), 10, interval=0.2)
    except TimeoutError:
        result["to"] = "-"
    echo(f"{vip} moved {active} -> {result['to']}; outage {seen.max_gap:.3f}s; "
         f"{seen.ok} ok / {seen.failed} failed requests; answered by {seen.answered_by}")
    app = next(a for a in apps if a.name == active)
    app.start()
    assert app.proc is not None
    victim.update(_record(app.proc.pid))
    _save(state)
    echo(f"{active} restarted; it rejoins as backup (nopreempt), so the VIP stays on {result['to']}")
    return result


def down(echo: Echo) -> None:
    """Remove everything the lab made; safe to run twice and after a crash."""
    from .netlab import cleanup_stale

    state: dict[str, Any] = {}
    try:
        state = _load()
    except LabFailure as exc:
        if STATE.exists():
            echo(f"{exc}: its processes and directory are left alone")
    for daemon in state.get("daemons", []):
        stop_pid(daemon["pid"], signal.SIGTERM, 15, started=daemon.get("started"))
    cp = state.get("controlplane") or {}
    for key in ("apiserver", "etcd"):
        if cp.get(key):
            stop_pid(cp[key]["pid"], signal.SIGTERM, 10, started=cp[key].get("started"))
    _reap_namespace_processes(_lab_namespaces())
    removed = cleanup_stale(PREFIX)
    where = state.get("workdir")
    if where:
        shutil.rmtree(where, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        STATE.unlink()
    echo(f"lab down: removed {len(removed)} namespaces" + (f" and {where}" if where else ""))


def _lab_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def _reap_namespace_processes(namespaces: list[str]) -> None:
    """haproxy/keepalived left in our own lab namespaces by a crashed daemon are ours to end;
    the lab's recorded helpers are left to its own cleanup."""
    recorded = set()
    with contextlib.suppress(OSError):
        for line in (STATE_ROOT / PREFIX / "pids").read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                recorded.add(int(json.loads(line)["pid"]))
    for ns in namespaces:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                if pid.isdigit() and int(pid) not in recorded:
                    stop_pid(int(pid), signal.SIGKILL, 5)
