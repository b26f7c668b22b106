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


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pa[SEKRET]ss@example.com/hook",  # urlsplit quoted the bracketed part
        "http://[SEKRET]/hook",
        "http://example.com:SEKRET/hook",
        # Names no lookup takes: every send failed with a traceback, and send-test stopped.
        "https://hooks..example.com/services/SEKRET",
        "https://" + "h" * 64 + ".example.com/SEKRET",
    ],
)
@pytest.mark.parametrize("key", ["url", "webhook_url"])
def test_a_url_that_cannot_be_read_is_refused_without_quoting_it(
    tmp_path: Path, url: str, key: str
) -> None:
    kind = "webhook" if key == "url" else "slack"
    text = MINIMAL + f"[channels.x]\ntype = '{kind}'\n{key} = '{url}'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert f"[channels.x] {key}: is not a URL that can be sent to" in str(caught.value)
    assert "SEKRET" not in str(caught.value)


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("server", "host", "a..b"),
        ("store", "url", "postgresql://u:SEKRET@db..internal/x"),
        ("store", "url", "postgresql://u:SEKRET@db.internal,other..internal/x"),
    ],
)
def test_a_host_no_lookup_takes_is_refused(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    # serve ended in a traceback (UnicodeError: encoding with 'idna' codec failed), and so did
    # the outbox commands for a PostgreSQL URL.
    text = MINIMAL + f"[{table}]\n{key} = '{value}'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert f"[{table}] {key}: " in str(caught.value), str(caught.value)
    assert "empty label" in str(caught.value) and "SEKRET" not in str(caught.value)


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("server", "host", "::1"),
        ("server", "host", "localhost."),
        # A Unix socket's folder, as libpq's documentation writes it: one long "label".
        (
            "store",
            "url",
            "postgresql://u@%2Fvar%2Frun%2Fpostgresql-sockets-of-the-production-cluster-primary/db",
        ),
        ("store", "url", "postgresql://u@h1:5432,[::1]:5433/db"),
        ("store", "url", "postgresql:///db?host=/var/run/postgresql"),
    ],
)
def test_a_host_a_lookup_or_libpq_takes_is_accepted(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    load_config(write(tmp_path, MINIMAL + f"[{table}]\n{key} = '{value}'\n"))


def test_a_name_idna_2008_allows_is_accepted_though_pythons_codec_refuses_it(
    tmp_path: Path,
) -> None:
    # aiohttp sends to it as xn--1-ymcl5hc.example; Python's codec follows IDNA 2003.
    url = "https://\u0645\u062b\u0627\u06441.example/x"
    load_config(write(tmp_path, MINIMAL + f"[channels.x]\ntype = 'webhook'\nurl = '{url}'\n"))


@pytest.mark.parametrize("char", ["\\u007f", "\\u0085", "\\u001f", " ", "\\t"])
def test_a_url_with_a_space_or_control_character_is_refused(tmp_path: Path, char: str) -> None:
    # TOML's escapes: DEL and C0 controls cannot be written raw in a string.
    text = MINIMAL + f'[channels.x]\ntype = "webhook"\nurl = "https://h.example/a{char}SEKRET"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "[channels.x] url: cannot hold spaces or control characters" in str(caught.value)
    assert "SEKRET" not in str(caught.value)


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


TWO_APPS = "sdk_app_id = [1400000000, 1400000001]"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ('callback_tokens = { 1400000000 = "a", 1400000001 = "b" }', {0: "a", 1: "b"}),
        ('callback_token = "s"\ncallback_tokens = { 1400000001 = "b" }', {0: "s", 1: "b"}),
        ('callback_token = "s"', {0: "s", 1: "s"}),
        ("", {0: None, 1: None}),
    ],
)
def test_each_app_may_have_its_own_callback_token(
    tmp_path: Path, tokens: str, expected: dict[int, str | None]
) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"{TWO_APPS}\n{tokens}")
    tencent = load_config(write(tmp_path, text)).tencent
    for offset, token in expected.items():
        given = tencent.token_for(1400000000 + offset)
        assert (given.get_secret_value() if given else None) == token


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        # Tokens for some apps and none for the rest would take the rest's callbacks unsigned.
        ('callback_tokens = { 1400000000 = "VERY-SECRET" }', "SDKAppID 1400000001 has no token"),
        ('callback_token = "VERY-SECRET"\ncallback_tokens = { 1400000009 = "VERY-SECRET" }',
         "callback_tokens names 1400000009, not in sdk_app_id"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "" }',
         "[tencent] callback_tokens: 1400000001: Tencent callback tokens are 1 to 128"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "VERY-SECRET' + "x" * 128
         + '" }', "[tencent] callback_tokens: 1400000001: Tencent callback tokens are 1 to 128"),
        # Accepted, then every callback refused "bad Sign": an "after" callback refused is gone.
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "VERY-SECRET\\n" }',
         "[tencent] callback_tokens: 1400000001: a space or newline at the token's start or end"),
        ('callback_token = " VERY-SECRET"',
         "[tencent] callback_token: a space or newline at the token"),
        ('callback_token = "VERY\\tSECRET"',
         "or a control character in it"),
        ('callback_tokens = { room = "VERY-SECRET" }', "[tencent] callback_tokens.room.[key]"),
        ('callback_tokens = { 1400000000 = "a", 01400000000 = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "a", 1_400_000_000 = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "a", "+1400000000" = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = 5 }',
         "[tencent] callback_tokens.1400000001: Input should be a valid string"),
    ],
)  # fmt: skip
def test_callback_tokens_name_every_app_and_only_apps_listed(
    tmp_path: Path, tokens: str, expected: str
) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"{TWO_APPS}\n{tokens}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert expected in str(caught.value)
    assert "VERY-SECRET" not in str(caught.value)


@pytest.mark.parametrize(
    "value", ["0", "-1400000000", "100000000000000000000", "9223372036854775808", "[1400000000, 0]"]
)
def test_sdk_app_id_outside_what_a_callback_can_carry_is_an_error(
    tmp_path: Path, value: str
) -> None:
    # A callback's SdkAppid is up to 20 digits (bridge.verify): an ID that no callback can match
    # would refuse every callback with 403.
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"sdk_app_id = {value}")
    with pytest.raises(ConfigError, match="sdk_app_id"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[delivery]\ntimeout_s = inf\n", "[delivery] timeout_s: Input should be a finite number"),
        ("[delivery]\nshutdown_grace_s = inf\n", "[delivery] shutdown_grace_s: Input should be a"),
        ("[delivery]\ninitial_backoff_s = inf\nmax_backoff_s = inf\n", "initial_backoff_s: Input"),
        ("[server]\ndrain_s = inf\n", "[server] drain_s: Input should be a finite number"),
        ("[server]\nrequest_timeout_s = inf\n", "[server] request_timeout_s: Input should be a"),
        ("[store]\nretention_h = inf\n", "[store] retention_h: Input should be a finite number"),
        ("[channels.s]\ntype = 'console'\n[channels.w]\ntype = 'webhook'\nurl = 'http://x'\n"
         "rate_per_s = inf\n", "[channels.w] rate_per_s: Input should be a finite number"),
    ],
)  # fmt: skip
def test_an_infinite_number_is_refused(tmp_path: Path, extra: str, expected: str) -> None:
    # An infinite timeout_s crashed start-up (a Slack channel's timeout is a whole number of
    # seconds); an infinite drain_s, the process at SIGTERM.
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    assert expected in str(caught.value)


def test_a_drain_longer_than_a_timer_can_wait_is_refused(tmp_path: Path) -> None:
    # threading.Timer cannot wait past threading.TIMEOUT_MAX (292 years): SIGTERM then raised
    # OverflowError in the timer's thread and the process never stopped.
    with pytest.raises(ConfigError, match=r"\[server\] drain_s: Input should be less than"):
        load_config(write(tmp_path, MINIMAL + "[server]\ndrain_s = 1e10\n"))
    config = load_config(write(tmp_path, MINIMAL + "[server]\ndrain_s = 86400\n"))
    assert config.server.drain_s == 86400


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[store]\npath = "a\\u0000b.db"\n', "[store] path: a path cannot hold a NUL"),
        ('[templates]\ndir = "a\\u0000b"\n', "[templates] dir: a path cannot hold a NUL"),
    ],
)
def test_a_path_with_a_nul_is_refused(tmp_path: Path, extra: str, expected: str) -> None:
    # No file can have one: serve stopped with a traceback (ValueError: embedded null byte).
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("[server]\nmax_body_bytes = {n}\n", "[server] max_body_bytes"),
        ("[tencent]\nmax_request_age_s = {n}\n", "[tencent] max_request_age_s"),
        ("[store]\npool_size = {n}\n", "[store] pool_size"),
        ("[delivery]\nmax_attempts = {n}\n", "[delivery] max_attempts"),
        ("[channels.c]\ntype = 'console'\ndigest_after = {n}\n", "[channels.c] digest_after"),
        ("[channels.s]\ntype = 'slack'\nwebhook_url = 'http://x'\nburst = {n}\n", "s] burst"),
        (
            "[channels.w]\ntype = 'webhook'\nurl = 'http://x'\nmax_in_flight = {n}\n",
            "[channels.w] max_in_flight",
        ),
    ],
)
def test_a_count_past_a_32_bit_integer_is_refused(tmp_path: Path, extra: str, where: str) -> None:
    # digest_after = 10**20 (or max_in_flight, times the claim factor) went into a claim's SQL
    # LIMIT: OverflowError in every lane, and nothing was delivered, with no word at start-up.

    def text(n: int) -> str:  # [tencent] is MINIMAL's own table: the key goes into it
        if extra.startswith("[tencent]"):
            return MINIMAL.replace("[tencent]\n", extra.format(n=n))
        return MINIMAL + extra.format(n=n)

    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text(2**31)))
    assert f"{where}: Input should be less than or equal to 2147483647" in str(caught.value)
    assert load_config(write(tmp_path, text(2**31 - 1)))


@pytest.mark.parametrize("path", ["/metrics2", "/statuses", "/healthzx", "/readyz-callback", "/-x"])
def test_a_path_beside_the_bridges_own_is_free(tmp_path: Path, path: str) -> None:
    # Each reserved path and what lies under it are taken, not every path it begins.
    config = load_config(write(tmp_path, MINIMAL + f"[server]\ncallback_path = '{path}'\n"))
    assert config.server.callback_path == path
