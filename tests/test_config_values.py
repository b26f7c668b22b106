"""What the tables share, as an operator meets it through `load_config`: URLs and hosts that
cannot be sent to, infinite numbers, NUL in paths, counts past 32 bits; the value never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from tests.test_config import MINIMAL, write


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
