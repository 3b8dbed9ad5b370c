"""The pure core imports nothing that does I/O; the layering in docs/design.md is enforced, not hoped for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "lbappliance" / "core"
ALLOWED = {
    "__future__", "collections", "contextlib", "dataclasses", "enum", "functools", "gc", "hashlib",
    "ipaddress", "json", "re", "shlex", "typing",
    "yaml", "pydantic", "jinja2",  # parse text, validate values, render text: no I/O of their own here
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in CORE.glob("*.py")))
def test_core_module_imports_no_io(module: str) -> None:
    outside = imported_modules(CORE / module) - ALLOWED
    assert not outside, f"lbappliance/core/{module} imports {sorted(outside)}; I/O belongs in lbappliance/edges"


def test_core_does_not_import_edges_or_daemon() -> None:
    for path in CORE.glob("*.py"):
        text = path.read_text()
        assert "from ..edges" not in text and "from lbappliance.edges" not in text, path.name
        assert "daemon" not in imported_modules(path), path.name


def test_edges_never_import_the_daemon_or_the_cli() -> None:
    """Arrows run one way: cli -> daemon -> edges -> core."""
    edges = CORE.parent / "edges"
    for path in edges.glob("*.py"):
        text = path.read_text()
        for upper in ("daemon", "cli", "testing"):
            assert f"from ..{upper}" not in text and f"from lbappliance.{upper}" not in text, (path.name, upper)
