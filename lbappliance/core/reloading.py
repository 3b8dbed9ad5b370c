"""Which config.yaml changes a SIGHUP can apply, and which need a restart (docs/design.md lists them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ApplianceConfig

# Always: the identity names the lease holder and every Event's source; the process mode decides
# who owns haproxy and keepalived; keepalived reads its config path and binary only at start.
# announce.mode: keepalived or FRR carries the VIPs; switching who does needs a clean start.
RESTART_FIELDS = ("name", "processMode", "paths.keepalivedConfig", "paths.keepalivedBinary", "announce.mode")
# External mode: systemd's units hold these in their command lines, so the daemon cannot move them.
EXTERNAL_RESTART_FIELDS = ("paths.stateDir", "paths.haproxyConfig", "paths.haproxyBinary")


def _field(dumped: Mapping[str, Any], dotted: str) -> Any:
    data: Any = dumped
    for part in dotted.split("."):
        data = data[part]
    return data


def restart_required(old: ApplianceConfig, new: ApplianceConfig) -> tuple[str, ...]:
    """The fields that differ between `old` and `new` and cannot change while running."""
    fields = RESTART_FIELDS + (EXTERNAL_RESTART_FIELDS if old.process_mode == "external" else ())
    before, after = old.model_dump(by_alias=True), new.model_dump(by_alias=True)
    return tuple(f for f in fields if _field(before, f) != _field(after, f))


def changed_sections(old: ApplianceConfig, new: ApplianceConfig) -> tuple[str, ...]:
    """Top-level config.yaml keys that differ, for the reload's log line."""
    before, after = old.model_dump(by_alias=True), new.model_dump(by_alias=True)
    return tuple(sorted(k for k in after if before.get(k) != after[k]))
