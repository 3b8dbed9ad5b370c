"""Loading config and pools for commands; errors become clean exits, never tracebacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from ..core.config import ApplianceConfig, ConfigError, parse_config
from ..edges.files import read_text

DEFAULT_CONFIG = "/etc/lbappliance/config.yaml"
EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus uses it


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default=lambda: os.environ.get("LBAPPLIANCE_CONFIG", DEFAULT_CONFIG), show_default=DEFAULT_CONFIG,
        help="Appliance config.yaml (defaults apply when the file does not exist).",
    )(func)


def pools_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--pools", "pools_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="pools.yaml (default: paths.pools from the config).",
    )(func)


def load_config(path: Path, required: bool = False) -> ApplianceConfig:
    if not path.exists():
        if required:
            fail(f"{path}: file not found")
        return parse_config("", str(path))
    try:
        return parse_config(read_text(path), str(path))
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        fail(f"{path}: {exc.strerror}", EXIT_CONFIG)


def pools_path_for(config: ApplianceConfig, given: Path | None) -> Path:
    return given if given is not None else Path(config.paths.pools)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)
