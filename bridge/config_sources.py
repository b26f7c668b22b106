"""Where the config tree's values come from, and where a bad one came from.

The TOML file, with `${VAR}` and `${VAR:-default}` expanded in every string, and `LIVE_BRIDGE_*`
variables over it (`LIVE_BRIDGE_STORE__SYNC` sets `[store] sync`). A message about a bad value
names the file, the table and the key, and the variable that set it, never the value: it may be a
secret.
"""

from __future__ import annotations

import codecs
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, TomlConfigSettingsSource

ENV_PREFIX = "LIVE_BRIDGE_"


class LoadError(Exception):
    """The file, or the environment, cannot give the tree its values; the message names where
    and never holds a value."""


class EnvironmentValueError(Exception):
    """A `LIVE_BRIDGE_*` variable that is not a value for its key: the message names the
    variable, not its value."""


NESTED_TOO_DEEPLY = "tables or arrays nested too deeply"
# The last alternative: a `${` that is neither, which would otherwise stay in the value as text
# (an admin token of "${TOKEN-changeme}", the shell's form without the colon, known to anyone).
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def expand_env(text: str, where: str, missing: list[str], named: set[str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; `$$` is a literal `$`. Unset names go to `missing`,
    every name to `named`."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name is None or (default is not None and "${" in default):
            missing.append(
                f"{where}: a ${{ that is not ${{VAR}} or ${{VAR:-default}}"
                " (a default cannot hold another; $${ is a literal ${)"
            )
            return ""
        named.add(name)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                missing.append(f"{where}: environment variable {name} is not set")
                return ""
            return default
        return value

    return _VAR.sub(one, text)


def _expand_tree(node: Any, loc: tuple[int | str, ...], missing: list[str], named: set[str]) -> Any:
    if isinstance(node, str):
        return expand_env(node, _where(loc), missing, named)
    if isinstance(node, dict):
        return {k: _expand_tree(v, (*loc, k), missing, named) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, (*loc, i), missing, named) for i, v in enumerate(node)]
    return node


class ExpandedToml(TomlConfigSettingsSource):
    # The variables the file names in `${VAR}`: its own to name, whatever their prefix.
    named: frozenset[str] = frozenset()

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        # The bytes load_config read, whose digest it keeps: read again, the file may have
        # changed in between. Before the base class's __init__, which reads the file.
        self._pinned: bytes | None = getattr(settings_cls, "toml_bytes", None)
        super().__init__(settings_cls)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        raw = self._pinned
        try:
            raw = file_path.read_bytes() if raw is None else raw
        except OSError as exc:  # not readable by this user, an I/O error
            raise LoadError(f"cannot be read: {exc.strerror or exc}") from None
        try:
            # A byte order mark (Windows editors write one) is no TOML statement.
            raw = raw.removeprefix(codecs.BOM_UTF8)
            data = tomllib.loads(raw.decode())
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise LoadError(f"line {line} is not UTF-8 text, as TOML must be") from None
        except tomllib.TOMLDecodeError as exc:
            raise LoadError(f"not valid TOML: {exc}") from None
        except ValueError:  # Python's own limit on converting digits, not the parser's
            raise LoadError("not valid TOML: an integer of more than 4300 digits") from None
        except RecursionError:  # the parser recurses once a level
            raise LoadError(NESTED_TOO_DEEPLY) from None
        missing: list[str] = []
        named: set[str] = set()
        try:
            expanded: dict[str, Any] = _expand_tree(data, (), missing, named)
        except RecursionError:  # a depth the parser just managed (a long dotted key)
            raise LoadError(NESTED_TOO_DEEPLY) from None
        if missing:
            raise LoadError("; ".join(missing))
        self.named = frozenset(named)
        return expanded


class Environment(EnvSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], toml: ExpandedToml) -> None:
        super().__init__(settings_cls)
        self.toml = toml

    def __call__(self) -> dict[str, Any]:
        # A `__` says "override a key of a table"; one whose table does not exist is a typo
        # (LIVE_BRIDGE_SERVERS__PORT) that would otherwise be silently ignored. Names without
        # `__`, and those the file names in `${VAR}`, are the operator's to use for anything.
        tables = sorted(self.settings_cls.model_fields)
        prefix = ENV_PREFIX.lower()
        strays = [
            name
            for name in sorted(os.environ)
            if name.lower().startswith(prefix)
            and "__" in name
            and name not in self.toml.named
            and name.lower().removeprefix(prefix).split("__")[0] not in tables
        ]
        if strays:
            raise EnvironmentValueError(
                "; ".join(
                    f"environment variable {name}: no table [{_table(name)}] to override"
                    for name in strays
                )
                + f" (the tables are {', '.join(tables)})"
            )
        return super().__call__()

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except (ValueError, RecursionError):  # JSON nested deeper than its decoder recurses
            # Named, never shown: the value may be a secret.
            names = _from_environment((field_name,))
            # One variable: the key it sets, as the file would name it ([channels.x] headers).
            loc = _env_loc(names[0]) if len(names) == 1 else ()
            where = _where(loc) if len(loc) > 1 else f"[{field_name}]"
            raise EnvironmentValueError(
                f"environment variable {', '.join(names) or '?'}: not a value for {where}"
                " (a list or a table is written in JSON)"
            ) from None


def _env_loc(name: str) -> tuple[str, ...]:
    """The keys a LIVE_BRIDGE_* variable sets: LIVE_BRIDGE_CHANNELS__X__HEADERS → channels, x,
    headers."""
    return tuple(name[len(ENV_PREFIX) :].lower().split("__"))


def _table(name: str) -> str:
    return name[len(ENV_PREFIX) :].split("__")[0].lower()


def _from_environment(loc: tuple[int | str, ...]) -> list[str]:
    """The LIVE_BRIDGE_* variables that set the key at `loc`: the key itself, a table holding it,
    or keys inside it. Names match in any case, as pydantic-settings reads them."""
    keys = [str(k).lower() for k in _keys(loc)]
    prefix = ENV_PREFIX.lower()
    names = []
    for name in os.environ:
        if keys and name.lower().startswith(prefix):
            path = name.lower().removeprefix(prefix).split("__")
            common = min(len(path), len(keys))
            if path[:common] == keys[:common]:
                names.append(name)
    return sorted(names)


def describe(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    errors = exc.errors(include_input=False, include_url=False)
    for error in errors:
        if error["type"] == "too_short" and _has_inner(errors, error["loc"]):
            continue  # pydantic counts a tuple's items that passed: the inner error says why
        names = _from_environment(error["loc"])
        source = f" (set by {', '.join(names)})" if names else ""
        lines.append(f"  {_where(error['loc'])}{source}: {_what(error)}")
    return "\n".join(lines)


def _has_inner(errors: list[Any], loc: tuple[int | str, ...]) -> bool:
    return any(e["loc"][: len(loc)] == loc and len(e["loc"]) > len(loc) for e in errors)


_CHANNEL_TYPES = ("console", "slack", "webhook")


def _keys(loc: tuple[int | str, ...]) -> list[int | str]:
    """The keys of a location as the operator wrote them."""
    parts = list(loc)
    if parts[:1] == ["channels"] and len(parts) >= 3 and parts[2] in _CHANNEL_TYPES:
        del parts[2]  # the discriminator's tag, not a key the operator wrote
    return parts


# C0 (the newline too), DEL, C1 and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _shown(part: int | str) -> int | str:
    """A key as it can be printed: a line break or terminal escape in a name the operator chose
    would otherwise break the message's lines or repaint the terminal."""
    if isinstance(part, int):
        return part
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), part)


def _where(loc: tuple[int | str, ...]) -> str:
    """`("channels", "x", "slack", "token")` → `[channels.x] token`; routes by their position."""
    parts = [_shown(p) for p in _keys(loc)]
    if not parts:
        return "config"
    if parts[0] == "routes" and len(parts) >= 2 and isinstance(parts[1], int):
        table, rest = f"[[routes]] #{parts[1] + 1}", parts[2:]
    elif parts[0] == "channels" and len(parts) >= 2:
        table, rest = f"[channels.{parts[1]}]", parts[2:]
    elif len(parts) == 1:
        table, rest = "", parts
    else:
        table, rest = f"[{parts[0]}]", parts[1:]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).lstrip(".")
    return f"{table} {key}".strip()


def _what(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "union_tag_invalid":
        return "type must be one of console, slack, webhook"
    if kind == "union_tag_not_found":
        return "missing key type (console, slack or webhook)"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")
