"""`lbappliance` command line."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ..core import yamlsafe
from ..core.kube import items_of, parse_objects
from ..core.nft import render_nft
from ..core.plan import Snapshot, desired_state
from ..core.render import render as render_configs
from ..edges.files import atomic_write, read_bytes
from ..edges.validate import check_haproxy, check_keepalived
from .common import (
    config_option,
    fail,
    load_config,
    load_pool_list,
    pools_option,
    pools_path_for,
    read_input,
)
from .doctor import doctor
from .enroll import enroll
from .lab import lab
from .output import emit, output_option, table
from .pool import pool


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="lbappliance")
def cli(verbose: bool) -> None:
    """External HAProxy + keepalived load balancer for Kubernetes LoadBalancer Services."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(pool)
cli.add_command(lab)
cli.add_command(enroll)
cli.add_command(doctor)


# What reading one object may raise beyond ObjectError: a field of the wrong type or shape.
_OBJECT_FAULTS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def _load_objects(path: Path | None, kind: str) -> tuple[list[Any], list[str]]:
    """Objects of `kind` from `kubectl get -o yaml` output, and one line per object skipped.

    Like the daemon: an object that cannot be read is reported and left out, the rest is used.
    A file that is not bounded YAML at all (not UTF-8, a bomb, too deep) is an error.
    """
    if path is None:
        return [], []
    text = read_input(path, yamlsafe.OBJECT_LIMITS)
    try:
        documents = yamlsafe.load_all(text, str(path), yamlsafe.OBJECT_LIMITS)
    except yamlsafe.YamlInputError as exc:
        fail(str(exc))
    parsed: list[Any] = []
    skipped: list[str] = []
    for index, obj in enumerate(o for doc in documents for o in items_of(doc)):
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, Mapping):
            skipped.append(f"{path}: object {index}: metadata must be a mapping, got {type(meta).__name__}")
            continue
        try:
            one, errors = parse_objects([obj], kind)
        except _OBJECT_FAULTS as exc:
            skipped.append(f"{path}: object {index}: cannot read: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        parsed.extend(one)
        skipped.extend(f"{path}: {e}" for e in errors)
    return parsed, skipped


def _report_skipped(skipped: list[str]) -> None:
    for line in skipped:
        click.echo(f"skipped: {line}", err=True)


def _problems_text(problems: Any) -> str:
    return "\n".join(f"{p.service}: {p.reason.value}: {p.message}" for p in problems)


@cli.command()
@click.option("--services", "services_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="`kubectl get svc -A -o yaml` output.")
@click.option("--nodes", "nodes_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="`kubectl get nodes -o yaml` output.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--strict", is_flag=True, help="Exit 2 when any Service has a problem or any object was skipped.")
@config_option
@pools_option
def render(services_path: Path, nodes_path: Path, out_dir: Path, strict: bool, config_path: Path,
           pools_path: Path | None) -> None:
    """Render haproxy.cfg, keepalived.conf and the nftables ruleset offline from saved cluster objects,
    and list every port served and how (HAProxy for TCP, nftables DNAT for UDP).

    An object that cannot be read is reported (`skipped: ...`) and left out, as the daemon does.
    Offline, every eligible node counts as healthy (the daemon puts only the nodes HAProxy's
    checks report UP into the UDP map).
    """
    config = load_config(config_path)
    pools = load_pool_list(config, pools_path_for(config, pools_path))
    services, skipped_services = _load_objects(services_path, "Service")
    nodes, skipped_nodes = _load_objects(nodes_path, "Node")
    skipped = skipped_services + skipped_nodes
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools, config))
    rendered = render_configs(state, config)
    _report_skipped(skipped)
    files = {"haproxy.cfg": rendered.haproxy, "keepalived.conf": rendered.keepalived,
             "nftables.nft": render_nft(state.udp)}
    try:
        for name, text in files.items():
            atomic_write(out_dir / name, text)
    except OSError as exc:
        fail(f"{out_dir}: cannot write: {exc.strerror or exc}")
    for key, vips in sorted(state.served.items()):
        click.echo(f"{key}: {', '.join(vips)}")
    rows = served_ports(state)
    if rows:
        click.echo(table(rows, ("service", "address", "port", "how", "to")))
    if state.problems:
        click.echo(_problems_text(state.problems), err=True)
    click.echo("wrote " + ", ".join(str(out_dir / name) for name in files))
    if strict and (state.problems or skipped):
        raise SystemExit(2)


def served_ports(state: Any) -> list[dict[str, Any]]:
    """One row per (Service, VIP, port): TCP through HAProxy, UDP through nftables DNAT, to which NodePort."""
    rows = [{"service": f.service, "address": f.vip, "port": f"{f.port}/TCP", "how": "haproxy",
             "to": f"{len(f.backend.servers)} nodes :{f.backend.port}"} for f in state.frontends]
    rows += [{"service": u.service, "address": u.vip, "port": f"{u.port}/UDP", "how": "nftables dnat",
              "to": f"{len(u.backend.servers)} nodes :{u.backend.port}"} for u in state.udp]
    return sorted(rows, key=lambda r: (r["service"], r["address"], r["port"]))


@cli.command()
@config_option
@pools_option
@click.option("--services", "services_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--nodes", "nodes_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check(config_path: Path, pools_path: Path | None, services_path: Path | None,
          nodes_path: Path | None) -> None:
    """Validate config and pools; with the binaries present, validate the rendered configs too."""
    config = load_config(config_path)
    path = pools_path_for(config, pools_path)
    pools = load_pool_list(config, path)
    click.echo(f"{config_path if config_path.exists() else 'config (defaults)'}: ok")
    click.echo(f"{path}: ok ({len(pools)} pools)")
    services, skipped_services = _load_objects(services_path, "Service")
    nodes, skipped_nodes = _load_objects(nodes_path, "Node")
    _report_skipped(skipped_services + skipped_nodes)
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools, config))
    rendered = render_configs(state, config)
    failed = bool(skipped_services or skipped_nodes)
    with tempfile.TemporaryDirectory(prefix="lbappliance-check-") as tmp:
        for name, text, checker, binary in (
            ("haproxy.cfg", rendered.haproxy, check_haproxy, config.paths.haproxy_binary),
            ("keepalived.conf", rendered.keepalived, check_keepalived, config.paths.keepalived_binary),
        ):
            candidate = Path(tmp) / name
            atomic_write(candidate, text)
            verdict = checker(candidate, binary)
            if "not found" in verdict.output and not verdict.ok:
                click.echo(f"{name}: skipped ({verdict.output})")
                continue
            click.echo(f"{name}: {'ok' if verdict.ok else 'REJECTED'}")
            if not verdict.ok:
                click.echo(verdict.output, err=True)
                failed = True
    if failed:
        raise SystemExit(1)


@cli.command()
@config_option
@click.option("--identity", default=None, help="Name in the leader Lease and Events (default: config name).")
@click.option("--netns", default=None, help="Run haproxy/keepalived inside this network namespace (lab, tests).")
def run(config_path: Path, identity: str | None, netns: str | None) -> None:
    """Run the appliance daemon (systemd: Type=notify)."""
    from ..daemon import main as run_daemon
    from ..edges.logs import configure_logging

    config = load_config(config_path)
    configure_logging(config.log_format)
    raise SystemExit(run_daemon(config_path, identity, netns))


@cli.command()
@config_option
@output_option
def status(config_path: Path, fmt: str) -> None:
    """What this box serves: Services, VIPs, ports, backends with health, VRRP state, leader."""
    import json

    config = load_config(config_path)
    path = Path(config.paths.state_dir) / "status.json"
    try:
        raw = read_bytes(path, STATUS_MAX_BYTES)
    except OSError as exc:
        fail(f"{path}: no status yet ({exc.strerror or exc}); is `lbappliance run` running?")
    try:
        document = json.loads(raw)
    except ValueError as exc:  # not UTF-8 or not JSON
        fail(f"{path}: not a status document: {str(exc)[:200]}")
    except RecursionError:
        fail(f"{path}: not a status document (nested too deeply)")
    if config.announce.mode == "bgp" and isinstance(document, dict):
        document["bgp"] = _bgp_status(path.with_name("bgp.json"))
    if fmt != "table":
        emit(document, fmt)
        return
    try:
        lines = _status_lines(document)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        fail(f"{path}: not a status document this version can show ({type(exc).__name__}: {str(exc)[:200]}); "
             "`-o json` prints it as it is")
    click.echo("\n".join(lines))


STATUS_MAX_BYTES = 64 << 20


def _bgp_status(path: Path) -> Any:
    """announce.mode bgp: what edges/frr.BgpControl recorded (per VIP announced or why not, sessions)."""
    import json

    try:
        return json.loads(read_bytes(path, STATUS_MAX_BYTES))
    except (OSError, ValueError, RecursionError) as exc:
        return {"error": f"{path}: {str(exc)[:200]}"}


def _bgp_lines(bgp: Any) -> list[str]:
    if not isinstance(bgp, dict) or "error" in bgp:
        return [f"bgp: unknown ({dict(bgp).get('error', '') if isinstance(bgp, dict) else ''})"]
    sessions = ", ".join(f"{peer}={state}" for peer, state in sorted(dict(bgp.get("sessions") or {}).items()))
    rows = [{"vip": vip, "announced here": "yes"} for vip in list(bgp.get("announced") or [])]
    withdrawn = sorted(dict(bgp.get("withdrawn") or {}).items())
    rows += [{"vip": vip, "announced here": f"no: {why}"} for vip, why in withdrawn]
    return [f"bgp sessions: {sessions or 'none'}", table(rows, ("vip", "announced here"))]


def _status_lines(document: Any) -> list[str]:
    """The table view of status.json; KeyError/TypeError/... when the document has another shape."""
    if not isinstance(document, dict):
        raise TypeError(f"expected an object, got {type(document).__name__}")
    vrrp = ", ".join(f"{k}={v}" for k, v in sorted(dict(document.get("vrrp") or {}).items())) or "unknown"
    lines = [f"appliance {document['identity']}  leader: {'yes' if document['leader'] else 'no'}  vrrp: {vrrp}"]
    rows = [{"service": s["service"], "vips": s["vips"], "ports": s["ports"],
             "this box": [("holds" if st == "MASTER" else str(st).lower())
                          for st in dict(s.get("owner") or {}).values()],
             "backends": [f"{t} {h}" for t, h in sorted(dict(s["backends"]).items())]}
            for s in list(document["services"])]
    lines.append(table(rows, ("service", "vips", "ports", "this box", "backends")))
    for problem in list(document.get("problems") or []):
        lines.append(f"problem: {problem['service']}: {problem['reason']}: {problem['message']}")
    if "bgp" in document:
        lines += _bgp_lines(document["bgp"])
    last = document.get("lastApply") or {}
    if last.get("kind") in ("rejected", "failed"):
        lines.append(f"data plane: the last change was {last['kind']}; the services above are the config still "
                     f"serving: {last.get('message', '')}")
    return lines
