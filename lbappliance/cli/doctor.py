"""`lbappliance doctor`: one table of checks on this appliance, each ✓/✗ with a one-line fix."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.doctor import MARKS, exit_code
from .common import config_option, load_config, load_pool_list, pools_option, pools_path_for
from .output import emit, table


@click.command()
@config_option
@pools_option
@click.option("--admin-kubeconfig", default=None,
              help="Also check what only an admin may read (k3s svclb pods, ServiceCIDRs).")
@click.option("--netns", default=None, help="Probe from this network namespace (lab, tests).")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(config_path: Path, pools_path: Path | None, admin_kubeconfig: str | None, netns: str | None,
           fmt: str) -> None:
    """Check this appliance end to end: identity, other controllers, nodes, pools, peer, clock, host.

    Exits 1 when any check fails (✗); notes (!) do not fail.
    """
    from ..edges.doctor import diagnose

    config = load_config(config_path)
    pools = load_pool_list(config, pools_path_for(config, pools_path))
    report = diagnose(config, pools, netns, admin_kubeconfig)
    if fmt == "json":
        emit({"checks": [c.as_dict() for c in report.checks], "ok": exit_code(report.checks) == 0}, "json")
    else:
        click.echo(table(report.rows(), ("", "check", "found", "fix")))
        failures = sum(1 for c in report.checks if c.verdict.value == "fail")
        click.echo(f"\n{failures} failed" if failures else f"\nall {len(report.checks)} checks passed "
                   f"({sum(1 for c in report.checks if c.verdict.value == 'note')} notes, {MARKS['note']})")
    raise SystemExit(exit_code(report.checks))
