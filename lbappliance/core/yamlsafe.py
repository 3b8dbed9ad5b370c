"""Bounded YAML: what a hostile or fat-fingered file can make the parser do is capped.

PyYAML's `safe_load` refuses arbitrary Python objects but nothing else: an anchor that
contains its own alias builds a self-referencing structure (every later walk of it recurses
until the interpreter gives up), a few lines of nested aliases ("billion laughs") expand to
gigabytes as soon as anything serialises the result, and a deeply nested file exhausts the
recursion limit. Every YAML input of the appliance (config.yaml, pools.yaml, `kubectl -o yaml`
files) goes through `load`/`load_all` here, which refuse each of these with a `YamlInputError`
naming the file, the place and the limit. Pure: the caller reads the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class YamlLimits:
    """Caps for one input. `max_nodes` and `max_depth` count the structure with every alias expanded,
    which is what json.dumps, pydantic or any other walk of the result will meet."""

    max_bytes: int = 1 << 20
    max_depth: int = 64
    max_aliases: int = 256
    max_nodes: int = 200_000


#: config.yaml and pools.yaml: hand-written, small.
CONFIG_LIMITS = YamlLimits()
#: `kubectl get svc,nodes -A -o yaml` of a large cluster: big, never aliased (kubectl writes none).
OBJECT_LIMITS = YamlLimits(max_bytes=128 << 20, max_depth=128, max_aliases=0, max_nodes=20_000_000)


class YamlInputError(ValueError):
    """A YAML input refused before use: not UTF-8, not YAML, or beyond a limit. Names the file."""

    def __init__(self, file: str, problem: str, line: int | None = None, column: int | None = None) -> None:
        self.file, self.problem, self.line, self.column = file, problem, line, column
        where = f"line {line}, column {column}: " if line is not None and column is not None else ""
        super().__init__(f"{file}: {where}{problem}")


def decode(data: bytes | str, file: str, limits: YamlLimits = CONFIG_LIMITS) -> str:
    """Strict UTF-8 (a leading BOM is allowed) within the size limit; the first bad byte is named."""
    if len(data) > limits.max_bytes:
        raise YamlInputError(file, f"larger than {limits.max_bytes} bytes ({len(data)}); refused")
    if isinstance(data, str):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise YamlInputError(file, f"not UTF-8: byte 0x{data[exc.start]:02x} (offset {exc.start})",
                             line, column) from None
    return text.removeprefix("\ufeff")


def load(data: bytes | str, file: str, limits: YamlLimits = CONFIG_LIMITS) -> Any:
    """The one document of `data` (None when empty), or YamlInputError."""
    documents = load_all(data, file, limits)
    if len(documents) > 1:
        raise YamlInputError(file, f"expected one YAML document, found {len(documents)}")
    return documents[0] if documents else None


def load_all(data: bytes | str, file: str, limits: YamlLimits = CONFIG_LIMITS) -> list[Any]:
    """Every document of `data`, or YamlInputError."""
    text = decode(data, file, limits)
    loader = _BoundedLoader(text, file, limits)
    try:
        documents = []
        while loader.check_data():  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            documents.append(loader.get_data())
        return documents
    except YamlInputError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        if mark is None:
            raise YamlInputError(file, f"not valid YAML: {problem}") from None
        raise YamlInputError(file, f"not valid YAML: {problem}", mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise YamlInputError(file, f"not valid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # A scalar the constructor cannot turn into a value: a 5,000-digit integer, 2024-13-45, ...
        raise YamlInputError(file, f"cannot read a value: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts while it composes: depth, aliases, recursion; then the expanded size."""

    def __init__(self, text: str, file: str, limits: YamlLimits) -> None:
        super().__init__(text)
        self._file, self._limits = file, limits
        self._depth = 0
        self._aliases = 0
        self._open: dict[str, int] = {}  # anchors whose node is still being composed
        self._nodes = 0

    def _refuse(self, problem: str, mark: Any) -> YamlInputError:
        if mark is None:
            return YamlInputError(self._file, problem)
        return YamlInputError(self._file, problem, mark.line + 1, mark.column + 1)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self._limits.max_aliases:
                raise self._refuse(f"more than {self._limits.max_aliases} aliases; refused", event.start_mark)
            if event.anchor is not None and self._open.get(event.anchor):
                raise self._refuse(f"recursive anchor &{event.anchor}: it contains an alias of itself",
                                   event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._limits.max_depth:
            raise self._refuse(f"nested deeper than {self._limits.max_depth} levels; refused", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open[anchor] = self._open.get(anchor, 0) + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open[anchor] -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            self._account(node)
        return node

    def _account(self, root: yaml.Node) -> None:
        """Size and depth of the document with aliases expanded, computed over the shared graph
        (each node once), so a bomb is measured without being expanded."""
        size: dict[int, int] = {}
        depth: dict[int, int] = {}
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if key in size:
                continue
            children = _children(node)
            if not done:
                stack.append((node, True))
                stack.extend((c, False) for c in children if id(c) not in size)
                continue
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        self._nodes += size[id(root)]
        if self._nodes > self._limits.max_nodes:
            raise self._refuse(f"expands to more than {self._limits.max_nodes} values (aliases included); refused",
                               root.start_mark)
        if depth[id(root)] > self._limits.max_depth:
            raise self._refuse(f"nested deeper than {self._limits.max_depth} levels once aliases are expanded; "
                               "refused", root.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
