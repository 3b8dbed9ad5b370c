"""One output helper for every command: -o table|json|yaml."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import click
import yaml

FORMATS = click.Choice(["table", "json", "yaml"])


def output_option(func: Any) -> Any:
    return click.option("-o", "--output", "fmt", type=FORMATS, default="table", show_default=True,
                        help="Output format.")(func)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    headers = [c.upper() for c in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def emit(data: Any, fmt: str, rows: Sequence[Mapping[str, Any]] | None = None,
         columns: Sequence[str] = ()) -> None:
    """Print `data`; a document too deep to serialise (a hostile status.json) is a clean error."""
    try:
        if fmt == "json":
            text = json.dumps(data, indent=2, sort_keys=False, default=str)
        elif fmt == "yaml":
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()
        else:
            text = table(rows if rows is not None else [data], columns)
    except (RecursionError, ValueError, TypeError, yaml.YAMLError) as exc:
        click.echo(f"error: cannot print this document as {fmt}: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        raise SystemExit(1) from None
    click.echo(text)
