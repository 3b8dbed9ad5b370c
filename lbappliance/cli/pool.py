"""`lbappliance pool …`: hand edits of pools.yaml that can never leave it invalid."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..core.config import (
    API_VERSION,
    ConfigError,
    PoolFile,
    PoolSpec,
    ServiceAllocationSpec,
    build_pools,
    dump_pool_file,
    parse_pool_file,
    pool_file_from_data,
)
from ..edges.files import atomic_write, locked, read_text
from .common import config_option, fail, load_config, pools_option, pools_path_for
from .output import emit, output_option

COLUMNS = ("name", "addresses", "autoAssign", "avoidBuggyIPs", "priority", "namespaces", "size")


def _read(path: Path) -> tuple[str, PoolFile]:
    if not path.exists():
        return "", pool_file_from_data(_document([]))
    text = read_text(path)
    try:
        return text, parse_pool_file(text, str(path))
    except ConfigError as exc:
        fail(f"cannot edit an invalid file:\n{exc}")


def _document(pools: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AddressPoolList", "pools": pools}


def _row(spec: PoolSpec) -> dict[str, Any]:
    alloc = spec.service_allocation or ServiceAllocationSpec()
    pools = build_pools(pool_file_from_data(_document([spec.model_dump(by_alias=True, mode="json")])))
    return {
        "name": spec.name,
        "addresses": list(spec.addresses),
        "autoAssign": spec.auto_assign,
        "avoidBuggyIPs": spec.avoid_buggy_ips,
        "priority": alloc.priority,
        "namespaces": list(alloc.namespaces),
        "size": pools[0].size(),
    }


@click.group()
def pool() -> None:
    """List and edit address pools (pools.yaml)."""


@pool.command("list")
@config_option
@pools_option
@output_option
def list_pools(config_path: Path, pools_path: Path | None, fmt: str) -> None:
    """List pools."""
    path = pools_path_for(load_config(config_path), pools_path)
    _, spec = _read(path)
    rows = [_row(p) for p in spec.pools]
    emit(rows, fmt, rows, COLUMNS)


@pool.command("show")
@click.argument("name")
@config_option
@pools_option
@output_option
def show_pool(name: str, config_path: Path, pools_path: Path | None, fmt: str) -> None:
    """Show one pool."""
    path = pools_path_for(load_config(config_path), pools_path)
    _, spec = _read(path)
    match = [p for p in spec.pools if p.name == name]
    if not match:
        fail(f"{path}: no pool named {name!r}")
    row = _row(match[0])
    emit(match[0].model_dump(by_alias=True, mode="json") if fmt != "table" else row, fmt, [row], COLUMNS)


def _edit(config_path: Path, pools_path: Path | None, dry_run: bool,
          change: Callable[[list[dict[str, Any]]], None]) -> None:
    """Read, change, validate as a whole, then write atomically under a lock (or show the diff)."""
    config = load_config(config_path)
    path = pools_path_for(config, pools_path)
    with locked(path):
        old_text, spec = _read(path)
        pools = [p.model_dump(by_alias=True, mode="json", exclude_none=True) for p in spec.pools]
        change(pools)
        try:
            new_spec = pool_file_from_data(_document(pools), str(path))
            build_pools(new_spec, str(path), config.own_addresses())
        except ConfigError as exc:
            fail(f"refused, {path} is unchanged:\n{exc}")
        new_text = dump_pool_file(new_spec)
        if dry_run:
            diff = difflib.unified_diff(old_text.splitlines(True), new_text.splitlines(True),
                                        f"{path} (current)", f"{path} (after edit)")
            click.echo("".join(diff).rstrip() or "no change")
            return
        atomic_write(path, new_text)
    click.echo(f"{path}: updated")


def _find(pools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for p in pools:
        if p["name"] == name:
            return p
    fail(f"no pool named {name!r}")


dry_run_option = click.option("--dry-run", is_flag=True, help="Show the diff; write nothing.")


@pool.command("add")
@click.argument("name")
@click.option("--address", "-a", "addresses", multiple=True, required=True,
              help="CIDR or first-last range; repeat for more.")
@click.option("--auto-assign/--no-auto-assign", default=True, show_default=True)
@click.option("--avoid-buggy-ips", is_flag=True, help="Skip .0 and .255 addresses.")
@click.option("--priority", type=int, default=None, help="Lower is tried first.")
@click.option("--namespace", "namespaces", multiple=True, help="Only Services in these namespaces.")
@config_option
@pools_option
@dry_run_option
def add_pool(name: str, addresses: tuple[str, ...], auto_assign: bool, avoid_buggy_ips: bool,
             priority: int | None, namespaces: tuple[str, ...], config_path: Path,
             pools_path: Path | None, dry_run: bool) -> None:
    """Add a pool."""
    def change(pools: list[dict[str, Any]]) -> None:
        if any(p["name"] == name for p in pools):
            fail(f"a pool named {name!r} already exists; use `pool set`")
        entry: dict[str, Any] = {"name": name, "addresses": list(addresses), "autoAssign": auto_assign,
                                 "avoidBuggyIPs": avoid_buggy_ips}
        if priority is not None or namespaces:
            entry["serviceAllocation"] = {"priority": priority, "namespaces": list(namespaces)}
        pools.append(entry)

    _edit(config_path, pools_path, dry_run, change)


@pool.command("remove")
@click.argument("name")
@config_option
@pools_option
@dry_run_option
def remove_pool(name: str, config_path: Path, pools_path: Path | None, dry_run: bool) -> None:
    """Remove a pool. A running daemon refuses the edit while the pool holds live addresses."""
    def change(pools: list[dict[str, Any]]) -> None:
        pools.remove(_find(pools, name))

    _edit(config_path, pools_path, dry_run, change)


@pool.command("set")
@click.argument("name")
@click.option("--add-address", multiple=True, help="Add a CIDR or range.")
@click.option("--remove-address", multiple=True, help="Remove a CIDR or range, exactly as listed.")
@click.option("--auto-assign/--no-auto-assign", default=None)
@click.option("--avoid-buggy-ips/--no-avoid-buggy-ips", default=None)
@click.option("--priority", type=int, default=None)
@click.option("--namespace", "namespaces", multiple=True, help="Replace the namespace list.")
@config_option
@pools_option
@dry_run_option
def set_pool(name: str, add_address: tuple[str, ...], remove_address: tuple[str, ...],
             auto_assign: bool | None, avoid_buggy_ips: bool | None, priority: int | None,
             namespaces: tuple[str, ...], config_path: Path, pools_path: Path | None, dry_run: bool) -> None:
    """Change a pool's fields."""
    def change(pools: list[dict[str, Any]]) -> None:
        entry = _find(pools, name)
        for text in remove_address:
            if text not in entry["addresses"]:
                fail(f"pool {name!r} has no address entry {text!r} (has {entry['addresses']})")
            entry["addresses"].remove(text)
        entry["addresses"].extend(add_address)
        if auto_assign is not None:
            entry["autoAssign"] = auto_assign
        if avoid_buggy_ips is not None:
            entry["avoidBuggyIPs"] = avoid_buggy_ips
        if priority is not None or namespaces:
            alloc = entry.setdefault("serviceAllocation", {})
            if priority is not None:
                alloc["priority"] = priority
            if namespaces:
                alloc["namespaces"] = list(namespaces)

    _edit(config_path, pools_path, dry_run, change)
