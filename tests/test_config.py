from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, SlackChannel, WebhookChannel, config_path, load_config

ROOT = Path(__file__).parent.parent

MINIMAL = """
[tencent]
sdk_app_id = 1400000000

[channels.console]
type = "console"

[[routes]]
name = "all"
channels = ["console"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.tencent.sdk_app_id == (1400000000,)
    assert config.server.callback_path == "/tencent/callback"
    assert config.store.path == ROOT / "live-bridge.db"
    assert config.templates.dir == ROOT / "templates"
    assert [r.name for r in config.routes] == ["everything"]


def test_issue_example_loads_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/Zq1")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-Zq2")
    monkeypatch.setenv("AUDIT_TOKEN", "Zq3")
    monkeypatch.setenv("AUDIT_SIGNING_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    path = write(tmp_path, ISSUE_EXAMPLE)
    config = load_config(path)
    moderators = config.channels["moderators"]
    assert isinstance(moderators, SlackChannel) and moderators.webhook_url is not None
    assert moderators.webhook_url.get_secret_value().endswith("Zq1")
    audit = config.channels["audit"]
    assert isinstance(audit, WebhookChannel)
    assert audit.headers["Authorization"].get_secret_value() == "Bearer Zq3"
    assert not any(z in repr(config) + str(config) for z in ("Zq1", "Zq2", "Zq3", "MfKQ9"))
    games = config.routes[1]
    assert games.continue_ and games.room_regex == "^game-[0-9]+$"
    assert config.tencent.sdk_app_id == (1400000000,)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[server]\nprot = 1\n", "[server] prot: unknown key"),
        ("[delivery]\nmax_attemps = 3\n", "[delivery] max_attemps: unknown key"),
        ("[channels.x]\ntype = 'console'\ncolour = 'red'\n", "[channels.x] colour: unknown key"),
        ("[[routes]]\nname = 'b'\nchannels = ['console']\nroom = 'x'\n", "[[routes]] #2 room"),
        ("[bogus]\na = 1\n", "bogus: unknown key"),
        ("[server]\nport = 'eighty'\n", "[server] port"),
        ("[channels.y]\ntype = 'carrier-pigeon'\n", "[channels.y]"),
        ("[channels.z]\ntype = 'slack'\ntoken = 'xoxb-1'\n", "needs channel"),
        ("[channels.z]\ntype = 'slack'\n", "exactly one of webhook_url"),
        ("[templates]\ntimezone = 'Mars/Olympus'\n", "unknown time zone"),
        ("[templates]\nroom_url = 'https://x/{room}'\n", "only use the placeholder {room_id}"),
        ("[templates]\nroom_url = 'https://x/{room_id.foo}'\n", "only use the placeholder"),
        ("[templates]\nroom_url = 'https://x/{room_id[0]}'\n", "only use the placeholder"),
        ("[store]\nurl = 'mysql://u:pw@h/db'\n", "[store] url: must be a PostgreSQL URL"),
        ("[store]\npath = 'a.db'\nurl = 'postgresql://h/db'\n", "set path (SQLite) or url"),
        ("[store]\npool_size = 0\n", "[store] pool_size"),
        ("[store]\nsync = 'off'\n", "[store] sync"),
        ("[store]\nurl = 'postgresql://h/db'\nsync = 'normal'\n", "sync is SQLite's"),
        ("[admin]\ntoken = ''\n", "[admin] token: is empty"),
        ("[admin]\ntoken = '  '\n", "[admin] token: is empty"),
    ],
)
def test_bad_keys_are_named_with_their_table(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    assert expected in str(caught.value)
    assert str(tmp_path / "config.toml") in str(caught.value)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("[[routes]]\nname = 'r'\nchannels = ['nowhere']\n", "route 'r': undefined channel"),
        ("[[routes]]\nname = 'r'\nroom_regex = '(['\nchannels = ['console']\n", "route 'r': bad"),
        (
            "[[routes]]\nname = 'r'\nroom_regex = 'a{99999999999}'\nchannels = ['console']\n",
            "route 'r': bad room_regex",
        ),
        (
            f"[[routes]]\nname = 'r'\nroom_regex = '{'(' * 1200 + ')' * 1200}'\n"
            "channels = ['console']\n",
            "route 'r': bad room_regex: groups nested too deeply",
        ),
        ("[[routes]]\nname = 'all'\nchannels = ['console']\n", "route 'all': another route"),
    ],
)
def test_route_cross_references(tmp_path: Path, routes: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="route") as caught:
        load_config(write(tmp_path, MINIMAL + routes))
    assert expected in str(caught.value)


def test_secrets_never_in_error_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "xoxb-VERY-SECRET-VALUE"
    monkeypatch.setenv("TOKEN", secret)
    text = MINIMAL + (
        "[channels.bad]\ntype = 'slack'\ntoken = '${TOKEN}'\n"  # no channel: invalid
        "[channels.hook]\ntype = 'webhook'\nurl = 'ftp://VERY-SECRET-VALUE@x'\n"
        "signing_secret = 'VERY-SECRET-VALUE'\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "VERY-SECRET" not in str(caught.value)
    assert "[channels.hook] url" in str(caught.value)
    assert "[channels.hook] signing_secret" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "header", "refused"),
    [
        ("https://bot:Zq7@hooks.example.com/x", "Authorization", True),
        ("https://:Zq7@hooks.example.com/x", "authorization", True),
        ("https://bot@hooks.example.com/x", "AUTHORIZATION", True),
        ("https://bot:Zq7@hooks.example.com/x", "X-Token", False),
        ("https://hooks.example.com/x?to=a@b", "Authorization", False),
    ],
)
def test_webhook_credentials_in_url_or_authorization_header_not_both(
    tmp_path: Path, url: str, header: str, refused: bool
) -> None:
    text = MINIMAL + f"[channels.hook]\ntype = 'webhook'\nurl = '{url}'\n"
    text += f"headers = {{ {header} = 'Bearer Zq8' }}\n"
    if not refused:
        assert isinstance(load_config(write(tmp_path, text)).channels["hook"], WebhookChannel)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "[channels.hook]: url has credentials (user:password@) and headers an Authorization" in (
        message
    )
    assert "Zq7" not in message and "Zq8" not in message


@pytest.mark.parametrize("token", ["Zq9\n", "Zq9\r\nX-Evil: 1"])
def test_webhook_header_value_that_no_request_can_carry_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    # aiohttp refuses such a request (header injection): every delivery would fail, each one
    # retried to a dead letter as "internal error in sender".
    monkeypatch.setenv("HOOK_TOKEN", token)  # a token read from a file, its newline kept
    text = MINIMAL + "[channels.hook]\ntype = 'webhook'\nurl = 'https://hooks.example.com/x'\n"
    text += "headers = { X-Token = 'Bearer ${HOOK_TOKEN}' }\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "[channels.hook] headers" in str(caught.value)
    assert "Zq9" not in str(caught.value)


def test_store_url_selects_postgresql_and_stays_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://bridge:Pw-VERY-SECRET@db:5432/live")
    config = load_config(write(tmp_path, MINIMAL + "[store]\nurl = '${DATABASE_URL}'\n"))
    assert config.store.url is not None
    assert config.store.url.get_secret_value().endswith("@db:5432/live")
    assert "VERY-SECRET" not in repr(config) + str(config)
    bad = MINIMAL + "[store]\nurl = 'postgresql://x:VERY-SECRET@h/db'\npath = 'x.db'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bad))
    assert "VERY-SECRET" not in str(caught.value)


def test_sdk_app_id_int_or_list(tmp_path: Path) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", "sdk_app_id = [1400000000, 1400000001]")
    assert load_config(write(tmp_path, text)).tencent.sdk_app_id == (1400000000, 1400000001)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVE_BRIDGE_CONFIG", raising=False)
    assert config_path(None) == Path("config.toml")
    monkeypatch.setenv("LIVE_BRIDGE_CONFIG", "/etc/live-bridge.toml")
    assert config_path(None) == Path("/etc/live-bridge.toml")
    assert config_path("x.toml") == Path("x.toml")


ISSUE_EXAMPLE = """
[server]
host = "127.0.0.1"
port = 8080
callback_path = "/tencent/callback"
max_body_bytes = 262144

[tencent]
sdk_app_id = 1400000000
max_request_age_s = 60

[store]
path = "live-bridge.db"

[delivery]
max_attempts = 10
initial_backoff_s = 1.0
max_backoff_s = 300.0
timeout_s = 10.0
dedup_window_s = 600

[templates]
dir = "templates"
timezone = "UTC"

[channels.console]
type = "console"

[channels.moderators]
type = "slack"
webhook_url = "${SLACK_WEBHOOK_URL}"

[channels.mod-bot]
type = "slack"
token = "${SLACK_BOT_TOKEN}"
channel = "C0123456789"
api_url = "https://slack.com/api/"

[channels.audit]
type = "webhook"
url = "https://audit.example.com/live"
headers = { Authorization = "Bearer ${AUDIT_TOKEN}" }
signing_secret = "${AUDIT_SIGNING_SECRET}"

[[routes]]
name = "vip"
rooms = ["vip-*"]
channels = ["moderators", "audit"]

[[routes]]
name = "games"
room_regex = "^game-[0-9]+$"
commands = ["Live.CallbackAfterChangeOwner"]
operators = ["admin*"]
channels = ["mod-bot"]
continue = true

[[routes]]
name = "everything else"
channels = ["console"]
"""
