"""config.yaml and pools.yaml from disk, for the daemon and the CLI alike.

Every way a file can be bad (missing where required, unreadable, a directory, not UTF-8, not
YAML, not the schema) becomes one `ConfigFileError` whose text names the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from ..core.config import ApplianceConfig, ConfigError, load_pools, parse_config
from ..core.models import Pool
from .files import read_text

EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keeps a bad config from restart-looping


class ConfigFileError(Exception):
    """A config or pools file that cannot be used; the message names the file."""


def _read(path: Path) -> str:
    """A regular file's UTF-8 text, bounded in size (`edges/files.read_text`)."""
    try:
        return read_text(path)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_config(path: Path, required: bool = False) -> ApplianceConfig:
    """The appliance config; every default when the file does not exist (unless `required`)."""
    if not path.exists() and not path.is_symlink():
        if required:
            raise ConfigFileError(f"{path}: file not found")
        return parse_config("", str(path))
    text = _read(path)
    try:
        return parse_config(text, str(path))
    except ConfigError as exc:
        raise ConfigFileError(str(exc)) from None


def read_pools(config: ApplianceConfig, path: Path | None = None) -> tuple[Pool, ...]:
    """The address pools (config's paths.pools unless `path`); they must exist."""
    where = path if path is not None else Path(config.paths.pools)
    if not where.exists() and not where.is_symlink():
        raise ConfigFileError(f"{where}: file not found")
    text = _read(where)
    try:
        return load_pools(text, str(where), config.own_addresses())
    except ConfigError as exc:
        raise ConfigFileError(str(exc) or f"{where}: invalid") from None
