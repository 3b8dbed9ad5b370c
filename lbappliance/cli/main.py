"""`lbappliance` command line."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml

from ..core.config import ApplianceConfig, ConfigError, load_pools
from ..core.kube import items_of, parse_objects
from ..core.models import Node, Pool, Service
from ..core.plan import Snapshot, desired_state
from ..core.render import render as render_configs
from ..edges.files import atomic_write, read_text
from ..edges.validate import check_haproxy, check_keepalived
from .common import config_option, fail, load_config, pools_option, pools_path_for
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


def _load_pools(config: ApplianceConfig, path: Path) -> tuple[Pool, ...]:
    if not path.exists():
        fail(f"{path}: file not found (create one with `lbappliance pool add`)")
    try:
        return load_pools(read_text(path), str(path), config.own_addresses())
    except ConfigError as exc:
        fail(str(exc))


def _load_objects(path: Path | None, kind: str) -> list[Any]:
    if path is None:
        return []
    try:
        documents = list(yaml.safe_load_all(read_text(path)))
    except (OSError, yaml.YAMLError) as exc:
        fail(f"{path}: cannot read: {exc}")
    objects = [o for doc in documents for o in items_of(doc)]
    parsed, errors = parse_objects(objects, kind)
    if errors:
        fail(f"{path}: " + f"\n{path}: ".join(errors))
    return parsed


def _problems_text(problems: Any) -> str:
    return "\n".join(f"{p.service}: {p.reason.value}: {p.message}" for p in problems)


@cli.command()
@click.option("--services", "services_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="`kubectl get svc -A -o yaml` output.")
@click.option("--nodes", "nodes_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="`kubectl get nodes -o yaml` output.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--strict", is_flag=True, help="Exit 2 when any Service has a problem.")
@config_option
@pools_option
def render(services_path: Path, nodes_path: Path, out_dir: Path, strict: bool, config_path: Path,
           pools_path: Path | None) -> None:
    """Render haproxy.cfg and keepalived.conf offline from saved cluster objects."""
    config = load_config(config_path)
    pools = _load_pools(config, pools_path_for(config, pools_path))
    services: list[Service] = _load_objects(services_path, "Service")
    nodes: list[Node] = _load_objects(nodes_path, "Node")
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools, config))
    rendered = render_configs(state, config)
    atomic_write(out_dir / "haproxy.cfg", rendered.haproxy)
    atomic_write(out_dir / "keepalived.conf", rendered.keepalived)
    for key, vips in sorted(state.served.items()):
        click.echo(f"{key}: {', '.join(vips)}")
    if state.problems:
        click.echo(_problems_text(state.problems), err=True)
    click.echo(f"wrote {out_dir / 'haproxy.cfg'} and {out_dir / 'keepalived.conf'}")
    if strict and state.problems:
        raise SystemExit(2)


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
    pools = _load_pools(config, path)
    click.echo(f"{config_path if config_path.exists() else 'config (defaults)'}: ok")
    click.echo(f"{path}: ok ({len(pools)} pools)")
    services: list[Service] = _load_objects(services_path, "Service")
    nodes: list[Node] = _load_objects(nodes_path, "Node")
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools, config))
    rendered = render_configs(state, config)
    failed = False
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
        document = json.loads(read_text(path))
    except (OSError, ValueError) as exc:
        fail(f"{path}: no status yet ({exc}); is `lbappliance run` running?")
    if fmt != "table":
        emit(document, fmt)
        return
    vrrp = ", ".join(f"{k}={v}" for k, v in sorted(document.get("vrrp", {}).items())) or "unknown"
    click.echo(f"appliance {document['identity']}  leader: {'yes' if document['leader'] else 'no'}  vrrp: {vrrp}")
    rows = [{"service": s["service"], "vips": s["vips"], "ports": s["ports"],
             "this box": [("holds" if st == "MASTER" else st.lower()) for st in s.get("owner", {}).values()],
             "backends": [f"{t} {h}" for t, h in sorted(s["backends"].items())]} for s in document["services"]]
    click.echo(table(rows, ("service", "vips", "ports", "this box", "backends")))
    for problem in document.get("problems", []):
        click.echo(f"problem: {problem['service']}: {problem['reason']}: {problem['message']}")
    last = document.get("lastApply") or {}
    if last.get("kind") in ("rejected", "failed"):
        click.echo(f"data plane: the last change was {last['kind']}; the services above are the config still "
                   f"serving: {last.get('message', '')}")
