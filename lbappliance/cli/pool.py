"""`lbappliance pool …`: hand edits of pools.yaml that can never leave it invalid."""

from __future__ import annotations

import difflib
import io
import re
from collections.abc import Callable, MutableSequence
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from ..core import metallb, yamlsafe
from ..core.config import (
    API_VERSION,
    ConfigError,
    PoolFile,
    PoolSpec,
    ServiceAllocationSpec,
    build_pools,
    parse_pool_file,
    pool_file_from_data,
)
from ..edges.files import LockTimeoutError, locked, remove_stale_temp_files, replace_file
from .common import config_option, exists, fail, load_config, pools_option, pools_path_for, read_input
from .output import emit, output_option

COLUMNS = ("name", "addresses", "autoAssign", "avoidBuggyIPs", "priority", "namespaces", "size")
# A pool name, matched whole: `re.match(...$)` would also take a trailing newline.
POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _read(path: Path) -> tuple[str, PoolFile]:
    if not exists(path):
        return "", pool_file_from_data(_document([]))
    text = read_input(path)
    try:
        return text, parse_pool_file(text, str(path))
    except ConfigError as exc:
        fail(f"cannot edit an invalid file:\n{exc}")


def _round_trip() -> YAML:
    """ruamel.yaml in round-trip mode, laid out like the files PyYAML used to write."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=2, offset=0)
    rt.width = 4096
    return rt


def _load_document(text: str) -> CommentedMap:
    """The file as a comment-keeping tree (`text` already passed the bounded, validating read)."""
    document = _round_trip().load(text) if text.strip() else None
    if document is None:
        document = CommentedMap(_document([]))
    if document.get("pools") is None:
        document["pools"] = CommentedSeq()
    pools = document["pools"]
    if isinstance(pools, CommentedSeq) and not pools:
        pools.fa.set_block_style()  # `pools: []` grows as a block list, not one long flow line
    return document


def _dump_document(document: CommentedMap) -> str:
    out = io.StringIO()
    _round_trip().dump(document, out)
    return out.getvalue()


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
          change: Callable[[MutableSequence[Any]], None]) -> None:
    """Read, change, validate as a whole, then write atomically under a lock (or show the diff).

    The edit goes into the file as it is: comments, order and quoting stay (ruamel.yaml round
    trip), a symlinked pools.yaml keeps its link (the target is rewritten) and the file keeps its
    mode, owner and group. Temp files of killed edits are removed under the lock.
    """
    config = load_config(config_path)
    path = pools_path_for(config, pools_path)
    try:
        with locked(path):
            old_text, _ = _read(path)
            document = _load_document(old_text)
            change(document["pools"])
            new_text = _dump_document(document)
            try:
                build_pools(parse_pool_file(new_text, str(path)), str(path), config.own_addresses())
            except ConfigError as exc:
                fail(f"refused, {path} is unchanged:\n{exc}")
            if dry_run:
                diff = difflib.unified_diff(old_text.splitlines(True), new_text.splitlines(True),
                                            f"{path} (current)", f"{path} (after edit)")
                click.echo("".join(diff).rstrip() or "no change")
                return
            for leftover in remove_stale_temp_files(path):
                click.echo(f"removed {leftover}, left by an interrupted edit", err=True)
            replace_file(path, new_text)
    except LockTimeoutError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{path}: cannot edit: {exc.strerror or exc}")
    click.echo(f"{path}: updated")


def _index(pools: MutableSequence[Any], name: str) -> int:
    for i, p in enumerate(pools):
        if p.get("name") == name:
            return i
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
    if not POOL_NAME.fullmatch(name):
        fail(f"pool name must be a DNS label (lowercase letters, digits, '-'; at most 63), got {name!r}")

    def change(pools: MutableSequence[Any]) -> None:
        if any(p.get("name") == name for p in pools):
            fail(f"a pool named {name!r} already exists; use `pool set`")
        entry: dict[str, Any] = {"name": name, "addresses": list(addresses), "autoAssign": auto_assign,
                                 "avoidBuggyIPs": avoid_buggy_ips}
        alloc: dict[str, Any] = {}
        if priority is not None:
            alloc["priority"] = priority
        if namespaces:
            alloc["namespaces"] = list(namespaces)
        if alloc:
            entry["serviceAllocation"] = alloc
        pools.append(entry)

    _edit(config_path, pools_path, dry_run, change)


@pool.command("remove")
@click.argument("name")
@config_option
@pools_option
@dry_run_option
def remove_pool(name: str, config_path: Path, pools_path: Path | None, dry_run: bool) -> None:
    """Remove a pool. A running daemon refuses the edit while the pool holds live addresses."""
    def change(pools: MutableSequence[Any]) -> None:
        del pools[_index(pools, name)]  # del, not remove(): ruamel moves the comments along

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
    def change(pools: MutableSequence[Any]) -> None:
        entry = pools[_index(pools, name)]
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
            if entry.get("serviceAllocation") is None:
                entry["serviceAllocation"] = {}
            alloc = entry["serviceAllocation"]
            if priority is not None:
                alloc["priority"] = priority
            if namespaces:
                alloc["namespaces"] = list(namespaces)

    _edit(config_path, pools_path, dry_run, change)


@pool.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_option
@pools_option
@dry_run_option
def import_pools(source: Path, config_path: Path, pools_path: Path | None, dry_run: bool) -> None:
    """Import MetalLB IPAddressPools (`kubectl get ipaddresspools -A -o yaml > FILE`).

    Each pool replaces the pool of its name or is appended; every field that has a counterpart is
    carried over, and a field without one refuses the whole import, naming it. Written like
    `pool add`: validated as a whole, under the same lock, atomically (`--dry-run` shows the diff).
    """
    text = read_input(source, yamlsafe.OBJECT_LIMITS)
    try:
        documents = yamlsafe.load_all(text, str(source), yamlsafe.OBJECT_LIMITS)
    except yamlsafe.YamlInputError as exc:
        fail(str(exc))
    result = metallb.ImportResult((), ())
    for document in documents:
        if document is None:
            continue
        one = metallb.import_pools(document)
        result = metallb.ImportResult(result.pools + one.pools, result.refusals + one.refusals)
    if result.refusals:
        fail(f"{source}: refused, nothing written; no counterpart in pools.yaml for:\n"
             + "\n".join(f"  {line}" for line in result.refusals))
    if not result.pools:
        fail(f"{source}: no IPAddressPool in the file")

    def change(pools: MutableSequence[Any]) -> None:
        merged = metallb.merge_pools(list(pools), result.pools)
        for i, entry in enumerate(merged):
            if i < len(pools):
                if pools[i] != entry:  # an unchanged pool keeps its comments and layout
                    pools[i] = entry
            else:
                pools.append(entry)

    _edit(config_path, pools_path, dry_run, change)
