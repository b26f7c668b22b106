"""The typed configuration tree, loaded from TOML with `${VAR}` expansion and env overrides.

`load_config(path)` returns a validated `Config` or raises `ConfigError`, whose message names the
file, the table and the key at fault and never contains a configured value. The tables and their
own rules are in config_tables.py and config_tencent.py, the channel types' in config_channels.py,
what they share in config_values.py; `Config`, the root, checks what spans them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bridge.config_channels import WHSEC_BYTES, Channel, WebhookChannel
from bridge.config_sources import (
    ENV_PREFIX,
    Environment,
    EnvironmentValueError,
    ExpandedToml,
    LoadError,
    describe,
)
from bridge.config_tables import (
    AdminConfig,
    DeliveryConfig,
    Route,
    ServerConfig,
    StoreConfig,
    TemplatesConfig,
)
from bridge.config_tencent import TencentConfig

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("config.toml")


class ConfigError(Exception):
    """A configuration that must not be started; the message is safe to print."""


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
    )

    server: ServerConfig = ServerConfig()
    tencent: TencentConfig
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    templates: TemplatesConfig = TemplatesConfig()
    admin: AdminConfig = AdminConfig()
    channels: dict[str, Channel] = Field(min_length=1)
    routes: tuple[Route, ...] = Field(min_length=1)
    # The file's bytes as load_config read them, once: its digest says which version of the file
    # a process runs (the server and its delivery process each read it at a reload).
    toml_bytes: ClassVar[bytes | None] = None
    _digest: str = PrivateAttr("")

    @property
    def digest(self) -> str:
        """SHA-256 of the file this config was read from, as read; "" if not from a file."""
        return self._digest

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        seen: set[str] = set()
        for route in self.routes:
            if route.name in seen:
                raise ValueError(f"route {route.name!r}: another route has the same name")
            seen.add(route.name)
            for channel in route.channels:
                if channel not in self.channels:
                    raise ValueError(f"route {route.name!r}: undefined channel {channel!r}")
            if route.room_regex is not None:
                try:
                    re.compile(route.room_regex)
                except (re.error, OverflowError, RecursionError) as exc:
                    raise ValueError(f"route {route.name!r}: bad room_regex: {_why(exc)}") from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = ExpandedToml(settings_cls)
        return (init_settings, Environment(settings_cls, toml), toml)


# re.error quotes the group name it refuses: the pattern's own text, maybe a ${VAR}'s value.
_QUOTED = re.compile(r" ?'[^']*'")


def _why(exc: Exception) -> str:
    # A repeat count over the engine's limit is an OverflowError, groups nested deeper than
    # its parser recurses a RecursionError: bad patterns all the same.
    if isinstance(exc, RecursionError):
        return "groups nested too deeply"
    if isinstance(exc, re.error) and exc.pos is not None:
        return f"{_QUOTED.sub('', exc.msg)} at position {exc.pos}"
    return str(exc)


CONFIG_HELP = "TOML config (default: $LIVE_BRIDGE_CONFIG, else config.toml)"


def load_for_command(explicit: str | None) -> tuple[Path, Config]:
    """For a command: the config and its path, or `live-bridge: <why>` on stderr and exit 2."""
    path = config_path(explicit)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        print(f"live-bridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def config_path(explicit: str | Path | None) -> Path:
    """The path to load: the explicit one, else $LIVE_BRIDGE_CONFIG, else config.toml."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_PATH)


def load_config(path: str | Path) -> Config:
    """Read, expand and validate the config at `path`; relative paths resolve against its folder."""
    path = Path(path)
    if not _is(path, stat.S_ISREG):
        raise ConfigError(f"{path}: {_not_a_file(path)}")

    try:
        raw = path.read_bytes()
    except OSError as exc:  # not readable by this user, an I/O error
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None

    class _Bound(Config):
        model_config = SettingsConfigDict(toml_file=path)
        toml_bytes = raw

    try:
        config: Config = _Bound()
    except ValidationError as exc:
        raise ConfigError(describe(path, exc)) from None
    except LoadError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except EnvironmentValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    templates = base / config.templates.dir
    # Absent, the shipped templates serve, as they do for a copy of the example config that
    # names "templates" without the folder. A folder the config names is said to be missing, or
    # a typo in its name would leave every override unused without a word.
    for name, channel in config.channels.items():
        if isinstance(channel, WebhookChannel) and channel.short_secret:
            log.warning(
                "%s: [channels.%s] signing_secret: a key under %d bytes, which Standard Webhooks"
                " asks for (easier to guess)", path, name, WHSEC_BYTES,
            )  # fmt: skip
    if "dir" in config.templates.model_fields_set and (problem := _folder_problem(templates)):
        log.warning(
            "%s: [templates] dir: %s; only the shipped templates serve", path, problem
        )  # fmt: skip
    loaded = Config.model_construct(
        **{
            **dict(config),
            "store": config.store.model_copy(update={"path": base / config.store.path}),
            "templates": config.templates.model_copy(update={"dir": templates}),
        }
    )
    loaded._digest = hashlib.sha256(raw).hexdigest()
    return loaded


def _is(path: Path, kind: Callable[[int], bool]) -> bool:
    """Whether `path` is there and of `kind` (stat.S_ISREG, S_ISDIR). Path.is_dir() and
    is_file() raise for a name too long (ENAMETOOLONG), a traceback where a config error is
    due; here it is just not there, and _not_a_folder or _not_a_file say why."""
    try:
        return kind(path.stat().st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def _folder_problem(path: Path) -> str | None:
    """Why the templates folder the config names cannot serve, or None. Its name is not
    repeated: it may have come from ${VAR}, and the operator has it in front of them."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return "no such folder (a relative one is taken from the config file's folder)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISDIR(found.st_mode):
        return "not a folder"
    if not os.access(path, os.R_OK | os.X_OK):
        # Jinja's loader takes every file in it for absent: each override unused, unsaid.
        return "cannot be read: Permission denied"
    return None


def _not_a_file(path: Path) -> str:
    """Why `path`, which is no regular file, cannot be the config: "no such file" only when
    there is none, so an operator does not look for one that is there."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such config file"
    except OSError as exc:  # a symlink loop, a folder it may not enter
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a config file"
    return "is not a regular file"  # a FIFO or a device: reading one may never end
