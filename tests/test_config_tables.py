"""Each table's own rules, as an operator meets them through `load_config`: the table and key
named, the value never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from tests.test_config import MINIMAL, write


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
        ("[admin]\ntoken = 'pässwort'\n", "[admin] token: must be printable ASCII"),
        ("[admin]\ntoken = ' padded '\n", "[admin] token: must be printable ASCII"),
        ("[templates]\nroom_url = 'https://x/{room_id:>999999999}'\n", "only use the placeholder"),
        ("[templates]\nroom_url = 'https://x/{room_id!r}'\n", "only use the placeholder"),
        (
            "[server]\ncallback_path = '/tencent/{id:bogus}'\n",
            "[server] callback_path: must be a plain",
        ),
        ("[server]\ncallback_path = '/{x:path}'\n", "[server] callback_path: must be a plain"),
        ("[server]\ncallback_path = '/cb?x=1'\n", "[server] callback_path: must be a plain"),
        ("[server]\ncallback_path = '/-/reload'\n", "[server] callback_path: is taken"),
        ("[server]\ncallback_path = '/status/'\n", "[server] callback_path: is taken"),
        ("[server]\ncallback_path = '/metrics'\n", "[server] callback_path: is taken"),
        ("[server]\ncallback_path = '/status/login'\n", "[server] callback_path: is taken"),
        ("[server]\ncallback_path = '/healthz/'\n", "[server] callback_path: is taken"),
        ("[server]\ncallback_path = '/'\n", "[server] callback_path: is taken"),
        (
            "[channels.s]\ntype = 'slack'\nwebhook_url = 'hooks.slack.com/services/T/B/x'\n",
            "[channels.s] webhook_url: must be an http:// or https:// URL with a host",
        ),
        (
            "[channels.s]\ntype = 'slack'\nwebhook_url = 'https://h:port/x'\n",
            "[channels.s] webhook_url: is not a URL that can be sent to",
        ),
        (
            "[channels.s]\ntype = 'slack'\ntoken = 'x'\nchannel = 'C1'\napi_url = 'h/api'\n",
            "[channels.s] api_url: must be an http:// or https:// URL",
        ),
        (
            "[channels.w]\ntype = 'webhook'\nurl = 'http://h:99999/x'\n",
            "[channels.w] url: is not a URL that can be sent to",
        ),
        (
            "[channels.w]\ntype = 'webhook'\nurl = 'http://h/a b'\n",
            "[channels.w] url: cannot hold spaces",
        ),
        (
            "[channels.w]\ntype = 'webhook'\nurl = 'http://h'\nheaders = { 'X A' = 'v' }\n",
            "[channels.w] headers: 'X A' is no header name",
        ),
        *[
            (f'[channels.s]\ntype = "slack"\nchannel = "C1"\ntoken = "{token}"\n',
             "[channels.s] token: is not a Slack token")
            for token in ("xoxb-1\\nX-Evil: 1", "xoxb-1\\u0000", "xoxb 1", "\\n")
        ],
    ],
)  # fmt: skip
def test_bad_keys_are_named_with_their_table(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    assert expected in str(caught.value)
    assert str(tmp_path / "config.toml") in str(caught.value)


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


def test_a_drain_longer_than_a_timer_can_wait_is_refused(tmp_path: Path) -> None:
    # threading.Timer cannot wait past threading.TIMEOUT_MAX (292 years): SIGTERM then raised
    # OverflowError in the timer's thread and the process never stopped.
    with pytest.raises(ConfigError, match=r"\[server\] drain_s: Input should be less than"):
        load_config(write(tmp_path, MINIMAL + "[server]\ndrain_s = 1e10\n"))
    config = load_config(write(tmp_path, MINIMAL + "[server]\ndrain_s = 86400\n"))
    assert config.server.drain_s == 86400


@pytest.mark.parametrize("path", ["/metrics2", "/statuses", "/healthzx", "/readyz-callback", "/-x"])
def test_a_path_beside_the_bridges_own_is_free(tmp_path: Path, path: str) -> None:
    # Each reserved path and what lies under it are taken, not every path it begins.
    config = load_config(write(tmp_path, MINIMAL + f"[server]\ncallback_path = '{path}'\n"))
    assert config.server.callback_path == path
