"""Loading config and pools for commands; errors become clean exits, never tracebacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from ..core import yamlsafe
from ..core.config import ApplianceConfig
from ..core.models import Pool
from ..edges.configfiles import EXIT_CONFIG, ConfigFileError, read_config, read_pools
from ..edges.files import read_bytes

DEFAULT_CONFIG = "/etc/lbappliance/config.yaml"


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        # readable=False: an unreadable config.yaml is load_config's to refuse, with exit 78 (not click's 2).
        "--config", "config_path", type=click.Path(dir_okay=False, readable=False, path_type=Path),
        default=lambda: os.environ.get("LBAPPLIANCE_CONFIG", DEFAULT_CONFIG), show_default=DEFAULT_CONFIG,
        help="Appliance config.yaml (defaults apply when the file does not exist).",
    )(func)


def pools_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--pools", "pools_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="pools.yaml (default: paths.pools from the config).",
    )(func)


def read_input(path: Path, limits: yamlsafe.YamlLimits = yamlsafe.CONFIG_LIMITS, code: int = 1) -> str:
    """A regular file's UTF-8 text within `limits.max_bytes`, or a one-line error and exit `code`
    (a directory, FIFO, unreadable or oversized file, or a byte that is not UTF-8)."""
    try:
        return yamlsafe.decode(read_bytes(path, limits.max_bytes), str(path), limits)
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror or exc}", code)
    except yamlsafe.YamlInputError as exc:
        fail(str(exc), code)


def exists(path: Path, code: int = 1) -> bool:
    """Path.exists() that turns a permission error on the way into a clean exit."""
    try:
        return path.exists()
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror or exc}", code)


def load_config(path: Path, required: bool = False) -> ApplianceConfig:
    """config.yaml as the daemon reads it (`edges/configfiles`); every default when it does not exist."""
    if required and not exists(path, EXIT_CONFIG):
        fail(f"{path}: file not found")
    try:
        return read_config(path)
    except ConfigFileError as exc:
        fail(str(exc), EXIT_CONFIG)


def load_pool_list(config: ApplianceConfig, path: Path) -> tuple[Pool, ...]:
    """pools.yaml as the daemon reads it."""
    if not exists(path):
        fail(f"{path}: file not found (create one with `lbappliance pool add`)")
    try:
        return read_pools(config, path)
    except ConfigFileError as exc:
        fail(str(exc))


def pools_path_for(config: ApplianceConfig, given: Path | None) -> Path:
    return given if given is not None else Path(config.paths.pools)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)
