"""Configs that try to break the loader: TOML documents from a grammar close to the real schema
(right and wrong tables, keys and types, extreme numbers, odd strings, `${VAR}` references,
LIVE_BRIDGE_* overrides). `load_config` returns a Config or raises ConfigError naming the file and
never showing a secret; nothing else escapes, nothing hangs, and `check`/`serve` exit 2 on one.

`CONFIG_FUZZ_EXAMPLES=5000 pytest tests/test_config_fuzz.py` hunts longer than `make test` does.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from bridge.checks import validate
from bridge.cli import main as cli_main
from bridge.config import Config, ConfigError, load_config

SECRET = "Zq9SECRET"  # in every secret's value and every variable's; never in a message
EXAMPLES = int(os.environ.get("CONFIG_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
EXAMPLE_LIMIT_S = 10  # one load; far above the few milliseconds one takes

# -- values ---------------------------------------------------------------------------------------

VARIABLES = {"FUZZ_SECRET": SECRET, "FUZZ_EMPTY": "", "FUZZ_URL": f"https://{SECRET}.invalid/"}
REFERENCES = st.sampled_from([
    "${FUZZ_SECRET}", "${FUZZ_EMPTY}", "${FUZZ_EMPTY:-d}", "${FUZZ_URL}", "${FUZZ_UNSET}",
    "${FUZZ_UNSET:-}", "${FUZZ_UNSET:-${FUZZ_SECRET}}", "$${FUZZ_SECRET}", "${1BAD}", "${A-B}",
    "${}", "${FUZZ_SECRET", "$", "${FUZZ_SECRET:-}}",
])  # fmt: skip
ODD_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
STRINGS = st.one_of(
    ODD_TEXT, st.sampled_from(["", " ", "\0", "\n", "\u2028", "é", "日本", "\x1b[31m"]),
    st.builds(lambda c, n: c * n, st.sampled_from("a/€"), st.sampled_from([300, 70_000])),
    st.builds("{}{}{}".format, ODD_TEXT, REFERENCES, ODD_TEXT),
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.integers(-(10**30), 10**30),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, 5e-324, -0.0]),
)  # fmt: skip
DATETIMES = st.one_of(
    st.datetimes(), st.dates(), st.times(),
    st.datetimes(timezones=st.just(datetime.UTC)),
)  # fmt: skip
SCALARS = st.one_of(STRINGS, NUMBERS, st.booleans(), DATETIMES)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=6,
)
SECRETS = st.sampled_from([
    SECRET, f"whsec_{SECRET}", "whsec_", f"postgresql://u:{SECRET}@h/db", f"mysql://{SECRET}",
    f"https://u:{SECRET}@x.invalid/", f"ftp://{SECRET}", f"x\n{SECRET}", "${FUZZ_SECRET}",
    "${FUZZ_URL}", "${FUZZ_SECRET:-x}", f"{SECRET}" * 40,
]) | SCALARS  # fmt: skip
REGEXES = st.sampled_from([
    "(a+)+$", "a{99999999999}", "(" * 1200 + ")" * 1200, "([", "(?P<x>a)(?P<x>b)", "\\", "*",
    "(?<=a+)b", "^game-[0-9]+$", "(?i)" + "a" * 5000, "(?P<${FUZZ_SECRET}>a)", "\\${FUZZ_SECRET}",
]) | STRINGS  # fmt: skip
GLOBS = st.lists(st.sampled_from(["*", "[", "[!]", "vip-*", "**", "\\", "?"]) | STRINGS, max_size=3)


Schema = dict[str, st.SearchStrategy[Any]]


def keys(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """A table: some of its keys with plausible values, now and then any value or a wrong key."""
    pairs = [st.tuples(st.just(k), st.one_of(v, v, v, ANY)) for k, v in schema.items()]
    pairs.append(st.tuples(st.sampled_from(["", "bogus", "PORT", "é", " port"]) | ODD_TEXT, ANY))
    return st.lists(st.one_of(pairs), max_size=6).map(dict)


SECONDS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, -1, 1e10, 1e308])
CHANNEL_NAMES = st.sampled_from(["console", "hook", "bot", "", "é", "a.b", " "]) | ODD_TEXT
SCHEMAS: dict[str, Schema] = {
    "server": dict(
        host=STRINGS, port=NUMBERS, callback_path=STRINGS, max_body_bytes=NUMBERS,
        request_timeout_s=SECONDS, drain_s=SECONDS,
    ),
    "tencent": dict(
        sdk_app_id=st.integers(1, 10**20) | NUMBERS | st.lists(NUMBERS, max_size=3),
        callback_token=SECRETS, max_request_age_s=NUMBERS,
    ),
    "store": dict(
        path=STRINGS, url=SECRETS, sync=st.sampled_from(["full", "normal", "off"]),
        pool_size=NUMBERS, retention_h=SECONDS,
    ),
    "delivery": dict(
        max_attempts=NUMBERS, initial_backoff_s=SECONDS, max_backoff_s=SECONDS,
        timeout_s=SECONDS, dedup_window_s=SECONDS, shutdown_grace_s=SECONDS,
        own_process=st.booleans(),
    ),
    "templates": dict(dir=STRINGS, timezone=STRINGS, room_url=STRINGS),
    "admin": dict(token=SECRETS),
    "channels": dict(
        type=st.sampled_from(["console", "slack", "webhook", "pigeon", ""]), webhook_url=SECRETS,
        token=SECRETS, channel=STRINGS, api_url=STRINGS, template=STRINGS, rate_per_s=SECONDS,
        burst=NUMBERS, digest_after=NUMBERS, digest_template=STRINGS, thread_by_room=st.booleans(),
        thread_ttl_h=SECONDS, url=SECRETS, headers=st.dictionaries(ODD_TEXT, SECRETS, max_size=2),
        signing_secret=SECRETS, max_in_flight=NUMBERS,
    ),
    "routes": {
        "name": STRINGS, "rooms": GLOBS, "room_regex": REGEXES, "commands": GLOBS,
        "operators": GLOBS, "continue": st.booleans(),
        "channels": st.lists(CHANNEL_NAMES | st.just("missing"), max_size=3),
    },
}  # fmt: skip
TABLES = {name: keys(SCHEMAS[name]) for name in SCHEMAS if name not in ("channels", "routes")}
CHANNEL = keys(SCHEMAS["channels"])
ROUTE = keys(SCHEMAS["routes"])
ENVIRONMENT = st.dictionaries(
    st.sampled_from([
        "LIVE_BRIDGE_SERVER__PORT", "LIVE_BRIDGE_STORE__URL", "LIVE_BRIDGE_TENCENT__SDK_APP_ID",
        "LIVE_BRIDGE_TENCENT__CALLBACK_TOKEN", "LIVE_BRIDGE_ADMIN__TOKEN", "LIVE_BRIDGE_CHANNELS",
        "LIVE_BRIDGE_TENCENT", "LIVE_BRIDGE_SERVERS__PORT", "LIVE_BRIDGE_ROUTES__0__NAME",
        "live_bridge_delivery__timeout_s", "LIVE_BRIDGE_CHANNELS__HOOK__URL", "LIVE_BRIDGE_X",
    ]),
    st.sampled_from([
        SECRET, "9000", "-1", "inf", "nan", "1e999", "[1, 2]", "{", "", f'{{"x": "{SECRET}"}}',
        f'{{"callback_token": "{SECRET}"}}', f"postgresql://{SECRET}", f"[{SECRET}]",
    ]),
    max_size=2,
)  # fmt: skip

# -- TOML text ------------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    escaped = (c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf: TOML's own spelling
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return repr(value)


def toml_table(header: str, table: dict[str, Any]) -> str:
    lines = (f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())
    return header + "\n" + "".join(lines)


@st.composite
def documents(draw: st.DrawFn) -> str:
    parts = [
        toml_table(f"[{name}]", draw(strategy))
        for name, strategy in TABLES.items()
        if name == "tencent" or draw(st.booleans())
    ]
    for name in draw(st.lists(CHANNEL_NAMES, max_size=3)):
        parts.append(toml_table(f"[channels.{toml_string(name)}]", draw(CHANNEL)))
    parts += [toml_table("[[routes]]", draw(ROUTE)) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 9)) == 0:  # now and then a table named twice, or one that is not one
        junk = ["[server]\n", "[bogus]\na = 1\n", "x = = 1\n", f"[deep]\nx = {'[' * 3000}"]
        parts.append(draw(st.sampled_from(junk)))
    return "".join(draw(st.permutations(parts)))


# -- the rule every load keeps ------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update({**VARIABLES, **values})
    os.environ.pop("FUZZ_UNSET", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_or_refuse(path: Path) -> Config | None:
    """The config, or None after checking the refusal's message keeps the rule."""
    try:
        with time_limit(EXAMPLE_LIMIT_S):
            return load_config(path)
    except ConfigError as exc:
        message = str(exc)
    assert message.startswith(f"{path}: "), message
    assert SECRET not in message, message
    return None


def exits_2_with_one_line(path: Path, command: str) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), time_limit(EXAMPLE_LIMIT_S):
        try:
            cli_main([command, "--config", str(path)])
        except SystemExit as exc:
            code = exc.code
    first, *rest = stderr.getvalue().splitlines()
    assert code == 2, stderr.getvalue()
    assert first.startswith(f"live-bridge: {path}: "), first
    assert all(line.startswith("  ") for line in rest), rest  # its details, indented under it
    assert SECRET not in stderr.getvalue()


def secrets_of(node: Any) -> Iterator[str]:
    if isinstance(node, SecretStr):
        yield node.get_secret_value()
    elif isinstance(node, BaseModel):
        for value in dict(node).values():
            yield from secrets_of(value)
    elif isinstance(node, dict | tuple):
        for value in node.values() if isinstance(node, dict) else node:
            yield from secrets_of(value)


def templates_render_or_are_refused(config: Config) -> None:
    """What start-up does next. Names (templates, channels, routes) are shown in its errors,
    whatever ${VAR} gave them; a secret must not be, unless it is also such a name."""
    try:
        with time_limit(EXAMPLE_LIMIT_S):
            validate(config)
    except ConfigError as exc:
        names = [str(getattr(c, key, "")) for c in config.channels.values() for key in (
            "template", "digest_template")]  # fmt: skip
        names += [*config.channels, *(route.name for route in config.routes)]
        for secret in secrets_of(config):
            if len(secret) > 3 and not any(secret in name for name in names):
                assert secret not in str(exc)


@FUZZ
@given(document=documents(), env=ENVIRONMENT)
def test_any_document_loads_or_is_refused_naming_the_file(
    document: str, env: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory() as folder, environment(env):
        path = Path(folder, "config.toml")
        path.write_text(document)
        config = load_or_refuse(path)
        event("refused" if config is None else "loaded")
        if config is None:
            exits_2_with_one_line(path, "check")
            exits_2_with_one_line(path, "serve")
            return
        templates_render_or_are_refused(config)


@FUZZ
@given(data=st.binary(max_size=200) | documents().map(str.encode).map(lambda b: b[: len(b) // 2]))
def test_any_bytes_load_or_are_refused_naming_the_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder, environment({}):
        path = Path(folder, "config.toml")
        path.write_bytes(data)
        load_or_refuse(path)


# -- one wrong value in a config that is otherwise right --------------------------------------

BASE: dict[str, dict[str, Any]] = {
    "tencent": {"sdk_app_id": 1400000000},
    "channels.console": {"type": "console"},
    "channels.bot": {"type": "slack", "token": "${FUZZ_SECRET}", "channel": "C1"},
    "channels.hook": {"type": "webhook", "url": "${FUZZ_URL}", "signing_secret": "whsec_Zm9v"},
}
ROUTE_BASE = {"name": "all", "channels": ["console", "bot", "hook"]}
ENV_VALUES = st.sampled_from(["inf", "-1", "1e999", "[]", "{", "null", "true", SECRET]) | STRINGS


@st.composite
def one_wrong_value(draw: st.DrawFn) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """A right config with one key set, in the file or by its LIVE_BRIDGE_* variable: the text,
    the environment, and what the error must name (the table or route, or the variable)."""
    table = draw(st.sampled_from(sorted(set(SCHEMAS) - {"channels"} | set(BASE))))
    schema = SCHEMAS["channels" if table.startswith("channels.") else table]
    key = draw(st.sampled_from(sorted(schema)) | ODD_TEXT)
    value: st.SearchStrategy[Any] = schema.get(key, ANY)
    tables = {name: dict(body) for name, body in BASE.items()}
    route = dict(ROUTE_BASE)
    env: dict[str, str] = {}
    if table != "routes" and key in schema and draw(st.booleans()):
        name = "LIVE_BRIDGE_" + "__".join([*table.split("."), key]).upper()
        env[name] = draw(ENV_VALUES.filter(lambda v: "\0" not in v))
        named: tuple[str, ...] = (name,)
    elif table == "routes":
        route[key] = draw(st.one_of(value, ANY))
        named = ("[[routes]] #1", "route ")
    else:
        tables.setdefault(table, {})[key] = draw(st.one_of(value, ANY))
        named = ("[" + table + "]", f"  {table}: ")  # a key, or the table's own rule
    text = "".join(toml_table(f"[{name}]", body) for name, body in tables.items())
    return text + toml_table("[[routes]]", route), env, named


@FUZZ
@given(case=one_wrong_value())
def test_one_wrong_value_is_named_with_its_table(
    case: tuple[str, dict[str, str], tuple[str, ...]],
) -> None:
    document, env, named = case
    with tempfile.TemporaryDirectory() as folder, environment(env):
        path = Path(folder, "config.toml")
        path.write_text(document)
        try:
            with time_limit(EXAMPLE_LIMIT_S):
                config = load_config(path)
        except ConfigError as exc:
            event("refused")
            message = str(exc)
            assert message.startswith(f"{path}: "), message
            assert SECRET not in message, message
            assert any(n in message for n in named), (named, message)
            return
        event("loaded")
        templates_render_or_are_refused(config)
