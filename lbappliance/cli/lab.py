"""`lbappliance lab …`: run the whole system on one machine (root, Linux network namespaces)."""

from __future__ import annotations

import os
import shutil

import click

from .common import fail
from .output import table


@click.group()
def lab() -> None:
    """A local lab: real control plane, two appliances, a client and nodes in network namespaces."""


@lab.command()
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--bgp", is_flag=True,
              help="The BGP shape instead: an FRR ToR and --boxes appliances announcing one VIP (ECMP, BFD), "
                   "in the foreground until Ctrl-C.")
@click.option("--boxes", default=3, show_default=True, type=click.IntRange(1, 8), help="With --bgp.")
def up(nodes: int, bgp: bool, boxes: int) -> None:
    """Start everything, apply examples/*.yaml, and show each Service answering through its VIP."""
    if bgp:
        from ..testing.bgplab import main as bgp_lab

        raise SystemExit(bgp_lab(["--boxes", str(boxes), "--nodes", str(nodes)]))
    from ..testing.lab import LabFailure
    from ..testing.lab import up as lab_up

    try:
        rows, workdir = lab_up(nodes, click.echo)
    except LabFailure as exc:
        fail(f"lab up: {exc}")
    click.echo()
    click.echo(table(rows, ("service", "vip", "ports", "holder", "answer")))
    kubeconfig = workdir / "controlplane" / "admin.kubeconfig"
    sample = next((r for r in rows if r["ports"] == "80/TCP"), rows[0])
    url = f"http://{sample['vip']}:{sample['ports'].split('/')[0]}/"
    click.echo(f"""
The lab stays up (in {workdir}). Try:
  lbappliance lab exec client -- python3 -c "import urllib.request as u; print(u.urlopen('{url}').read())"
  lbappliance status --config {workdir}/app1.yaml
  lbappliance lab status
  lbappliance lab failover
  lbappliance lab down""")
    if shutil.which("kubectl"):
        click.echo(f"  KUBECONFIG={kubeconfig} kubectl get svc -A")
    else:
        click.echo(f"  (admin kubeconfig for kubectl or the Python client: {kubeconfig})")


@lab.command()
def status() -> None:
    """Where the running lab lives (its private directory) and whether its processes run."""
    from ..testing.lab import LabFailure
    from ..testing.lab import status as lab_status

    try:
        info = lab_status()
    except LabFailure as exc:
        fail(f"lab status: {exc}")
    click.echo(f"{'lab directory':<18}{info['workdir']}")
    click.echo(f"{'admin kubeconfig':<18}{info['admin_kubeconfig']}")
    for name, config in info["configs"].items():
        click.echo(f"{name + ' config':<18}{config}")
    click.echo()
    click.echo(table([{**p, "running": "yes" if p["running"] else "NO"} for p in info["processes"]],
                     ("name", "pid", "running")))


@lab.command()
def failover() -> None:
    """Stop the appliance that holds the VIP; show the VIP moving and the measured outage."""
    from ..testing.lab import LabFailure
    from ..testing.lab import failover as lab_failover

    try:
        lab_failover(click.echo)
    except LabFailure as exc:
        fail(f"lab failover: {exc}")


@lab.command()
def down() -> None:
    """Remove namespaces, processes and files; safe to run twice and after a crash."""
    from ..testing.lab import down as lab_down

    lab_down(click.echo)


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def exec_(host: str, argv: tuple[str, ...]) -> None:
    """Run a command on a lab host (app1, app2, client, node1…)."""
    from ..testing.lab import LabFailure
    from ..testing.lab import hosts as lab_hosts

    try:
        hosts = lab_hosts()
    except LabFailure as exc:
        fail(str(exc))
    if host not in hosts:
        fail(f"no lab host {host!r}; hosts: {', '.join(sorted(hosts))}")
    os.execvp("ip", ["ip", "netns", "exec", hosts[host]["netns"], *argv])
