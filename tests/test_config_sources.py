"""The file and the environment: `${VAR}` expansion, LIVE_BRIDGE_* overrides, unreadable files;
through `load_config`, as an operator meets them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from bridge.config_channels import WebhookChannel
from tests.test_config import MINIMAL, write


def test_env_expansion_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK", "https://example.invalid/hook")
    monkeypatch.delenv("UNSET_PATH", raising=False)
    monkeypatch.setenv("EMPTY", "")
    text = MINIMAL + (
        "[channels.w]\ntype = 'webhook'\nurl = '${HOOK}'\n"
        "[store]\npath = '${UNSET_PATH:-data/x.db}'\n[server]\nhost = '${EMPTY:-0.0.0.0}'\n"
    )
    config = load_config(write(tmp_path, text))
    channel = config.channels["w"]
    assert isinstance(channel, WebhookChannel)
    assert channel.url.get_secret_value() == "https://example.invalid/hook"
    assert config.store.path == tmp_path / "data" / "x.db"
    assert config.server.host == "0.0.0.0"  # an empty value takes the default, as in the shell


@pytest.mark.parametrize(
    "value",
    [
        "${ADMIN_TOKEN-changeme}",  # the shell's form without the colon
        "${SLACK-BOT-TOKEN}",  # no variable can be named so
        "x${UNSET_PATH:-${HOME}}",  # a default holding another
        "tail ${",
    ],
)
def test_a_dollar_brace_that_is_no_variable_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # It stayed in the value as text: an admin token anyone reading the config knew.
    monkeypatch.delenv("UNSET_PATH", raising=False)
    text = MINIMAL + f"[admin]\ntoken = '{value}'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "[admin] token: a ${ that is not ${VAR} or ${VAR:-default}" in str(caught.value)


def test_default_then_literal_dollar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    text = MINIMAL + "[store]\npath = '${NOT_SET_ANYWHERE:-a}$$b.db'\n"
    assert load_config(write(tmp_path, text)).store.path.name == "a$b.db"


def test_unset_variable_is_named_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    text = MINIMAL + "[channels.m]\ntype = 'slack'\nwebhook_url = '${SLACK_WEBHOOK_URL}'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "SLACK_WEBHOOK_URL is not set" in message
    assert "[channels.m] webhook_url" in message


def test_env_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVE_BRIDGE_SERVER__PORT", "9000")
    monkeypatch.setenv("LIVE_BRIDGE_DELIVERY__MAX_ATTEMPTS", "3")
    config = load_config(write(tmp_path, MINIMAL))
    assert config.server.port == 9000
    assert config.delivery.max_attempts == 3


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LIVE_BRIDGE_TENCENT__SDK_APP_ID", "Zq7", "variable LIVE_BRIDGE_TENCENT__SDK_APP_ID: not"),
        ("LIVE_BRIDGE_CHANNELS", "{Zq7", "variable LIVE_BRIDGE_CHANNELS: not a value for"),
        ("LIVE_BRIDGE_TENCENT", '{"callback_token": "Zq7', "variable LIVE_BRIDGE_TENCENT: not"),
        ("LIVE_BRIDGE_SERVER__PORT", "Zq7", "[server] port (set by LIVE_BRIDGE_SERVER__PORT): "),
        ("LIVE_BRIDGE_STORE__URL", "mysql://Zq7", "[store] url (set by LIVE_BRIDGE_STORE__URL): "),
        ("LIVE_BRIDGE_ROUTES__0__NAME", "Zq7", "routes (set by LIVE_BRIDGE_ROUTES__0__NAME): "),
        # JSON nested deeper than Python's decoder recurses: RecursionError, a traceback.
        ("LIVE_BRIDGE_CHANNELS", "[" * 100_000 + "Zq7", "variable LIVE_BRIDGE_CHANNELS: not"),
        ("LIVE_BRIDGE_TENCENT", '{"a":' * 100_000 + "Zq7", "variable LIVE_BRIDGE_TENCENT: not"),
        ("LIVE_BRIDGE_TENCENT__SDK_APP_ID", "[" * 100_000, "LIVE_BRIDGE_TENCENT__SDK_APP_ID: n"),
        ("LIVE_BRIDGE_CHANNELS__X", "[" * 100_000 + "Zq7", "LIVE_BRIDGE_CHANNELS__X"),
        # One variable: the key it sets, as the file names it; not only its table.
        ("LIVE_BRIDGE_CHANNELS__X__HEADERS", "Zq7", "S: not a value for [channels.x] headers"),
        ("LIVE_BRIDGE_TENCENT__SDK_APP_ID", "Zq7", "not a value for [tencent] sdk_app_id "),
    ],
)
def test_bad_environment_value_names_the_variable_not_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL))
    assert expected in str(caught.value)
    assert "Zq7" not in str(caught.value)


def test_not_toml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2"):
        load_config(write(tmp_path, "[server]\nport = = 1\n"))


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"config\.toml: line 11 is not UTF-8"):
        load_config(path)


def test_unreadable_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, whom no file mode stops: the refusal is the operating system's.
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL)
    real = Path.read_bytes

    def refused(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ConfigError, match=r"config\.toml: cannot be read: Permission denied"):
        load_config(path)


@pytest.mark.parametrize(
    "name", ["LIVE_BRIDGE_SERVERS__PORT", "live_bridge_Stores__url", "LIVE_BRIDGE___PORT"]
)
def test_override_of_a_table_that_does_not_exist_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "9Zq7")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL))
    message = str(caught.value)
    assert f"environment variable {name}: " in message
    assert "no table" in message
    assert "Zq7" not in message


def test_prefixed_variables_that_are_not_overrides_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LIVE_BRIDGE_CONFIG names the file; others are for ${VAR}, the file's own choice of names.
    monkeypatch.setenv("LIVE_BRIDGE_HOOK_URL", "https://example.invalid/a")
    monkeypatch.setenv("LIVE_BRIDGE_SECRETS__HOOK", "https://example.invalid/b")
    text = MINIMAL + (
        "[channels.a]\ntype = 'webhook'\nurl = '${LIVE_BRIDGE_HOOK_URL}'\n"
        "[channels.b]\ntype = 'webhook'\nurl = '${LIVE_BRIDGE_SECRETS__HOOK:-x}'\n"
    )
    config = load_config(write(tmp_path, text))
    channel = config.channels["b"]
    assert isinstance(channel, WebhookChannel)
    assert channel.url.get_secret_value() == "https://example.invalid/b"


def test_bad_environment_value_names_the_config_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVE_BRIDGE_TENCENT__SDK_APP_ID", "Zq7")
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: environment variable LIVE_BRIDGE_TENCENT__")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[channels."a\\rb"]\ntype = "x"\n', "[channels.a\\rb]: type must be one of"),
        ('[channels."a\\nb"]\n', "[channels.a\\nb]: missing key type"),
        ('[server]\n"x\\u001b[2J" = 1\n', "[server] x\\x1b[2J: unknown key"),
        ('[channels.c]\ntype = "console"\n"\\u2028" = 1\n', "[channels.c] \\u2028: unknown key"),
    ],
)
def test_a_name_with_a_line_break_or_escape_cannot_break_the_message(
    tmp_path: Path, extra: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    message = str(caught.value)
    assert expected in message
    assert all(line.startswith("  ") for line in message.splitlines()[1:]), message
    assert "\x1b" not in message and "\r" not in message and "\u2028" not in message


def test_a_bad_route_is_one_error_not_also_too_few_routes(tmp_path: Path) -> None:
    # pydantic also reports a tuple as too short when its only item fails.
    path = write(tmp_path, MINIMAL.replace("[[routes]]\n", "[[routes]]\nbogus = 1\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).splitlines()[1:] == ["  [[routes]] #1 bogus: unknown key"]


def test_an_empty_list_of_routes_is_still_too_short(tmp_path: Path) -> None:
    path = write(tmp_path, "routes = []\n" + MINIMAL.split("[[routes]]")[0])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).splitlines()[1:] == [
        "  routes: Tuple should have at least 1 item after validation, not 0"
    ]


def test_a_byte_order_mark_is_not_part_of_the_document(tmp_path: Path) -> None:
    # Windows editors (Notepad) write one; it is no TOML statement.
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.replace("\n", "\r\n").encode())
    assert load_config(path).routes[0].name == "all"


@pytest.mark.parametrize(
    "extra",
    [
        "[server]\nhost = " + "[" * 5000 + "]" * 5000 + "\n",
        "[server]\nhost = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n",
        "[channels.x]\ntype = 'console'\n" + ".".join(["a"] * 2000) + " = 1\n",
    ],
    ids=["arrays", "inline tables", "dotted key"],
)
def test_values_nested_too_deeply_are_a_config_error(tmp_path: Path, extra: str) -> None:
    # Python's TOML parser, and ${VAR} expansion after it, recurse once a level: RecursionError.
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: tables or arrays nested too deeply"


def test_an_integer_past_pythons_digit_limit_is_a_config_error(tmp_path: Path) -> None:
    # tomllib's int() raised ValueError, which stopped serve with a traceback and exit status 1.
    text = MINIMAL + "[delivery]\nmax_attempts = " + "9" * 5000 + "\n"
    with pytest.raises(ConfigError, match="not valid TOML: an integer of more than 4300 digits"):
        load_config(write(tmp_path, text))
