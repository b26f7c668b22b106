"""`live-bridge simulate` against the real bridge under uvicorn, through the command line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from bridge.config import load_config
from bridge.simulate import default_url
from tests.bridge_server import APP_ID, OK_PACKET, OWNER, InThread, free_port, write_config

ROOT = Path(__file__).parent.parent
TOKEN = "xxxxyyyy"
# Keys Tencent sends that the README's shorter curl line leaves out.
BEYOND_THE_README = {"clientip", "optplatform", "requesttime"}


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, timeout=60, input=stdin,
        env=clean,
    )  # fmt: skip
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def simulate(running: InThread, config: Path, *args: str, stdin: bytes | None = None) -> Any:
    url = f"{running.url}/tencent/callback"
    return run("simulate", "--config", str(config), "--url", url, *args, stdin=stdin)


def stored(running: InThread) -> list[tuple[int, str, str, dict[str, str]]]:
    """(sdk_app_id, command, room, query) of every stored event, oldest first."""
    with contextlib.closing(sqlite3.connect(running.config.store.path)) as db:
        found = db.execute("SELECT sdk_app_id, command, room_id, query FROM events ORDER BY id")
        return [(a, c, r, json.loads(q)) for a, c, r, q in found.fetchall()]


def test_posts_the_owner_change_and_prints_the_packet(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with InThread(path) as running:
        result = simulate(running, path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"HTTP 200\n{OK_PACKET.decode()}\n"
        [(app_id, command, room, query)] = stored(running)
    assert (app_id, command, room) == (APP_ID, OWNER, "room_id")
    assert query == {
        "sdkappid": str(APP_ID), "callbackcommand": OWNER, "contenttype": "json",
        "clientip": "127.0.0.1", "optplatform": "RESTAPI",
    }  # fmt: skip
    assert f"POST {running.url}/tencent/callback ({OWNER}, SdkAppid {APP_ID})" in result.stderr


def test_signed_when_the_config_has_a_callback_token(tmp_path: Path) -> None:
    path = write_config(tmp_path, tencent=f'callback_token = "{TOKEN}"')
    with InThread(path) as running:
        result = simulate(running, path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert ", signed)" in result.stderr
        [(_, _, _, query)] = stored(running)
        assert query["requesttime"].isdigit() and "sign" not in query  # the store drops Sign
        other = tmp_path / "other"
        other.mkdir()
        wrong = write_config(other, tencent='callback_token = "not-the-token"')
        refused = simulate(running, wrong)
        assert refused.returncode == 1
        assert (
            refused.stdout
            == 'HTTP 401\n{"ActionStatus":"FAIL","ErrorInfo":"bad Sign","ErrorCode":401}\n'
        )
        assert TOKEN not in result.stdout + result.stderr + refused.stdout + refused.stderr
        assert len(stored(running)) == 1


def test_signed_with_the_apps_own_token(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace(
            f"sdk_app_id = {APP_ID}\n",
            f"sdk_app_id = [{APP_ID}, {APP_ID + 1}]\n"
            f'callback_tokens = {{ {APP_ID} = "first", {APP_ID + 1} = "{TOKEN}" }}\n',
        )
    )
    with InThread(path) as running:
        for app in (APP_ID, APP_ID + 1):
            result = simulate(running, path, "--app-id", str(app))
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"SdkAppid {app}, signed)" in result.stderr
        assert len(stored(running)) == 2


def test_wrong_app_id_shows_the_fail_packet(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with InThread(path) as running:
        result = simulate(running, path, "--app-id", "1400000001")
        assert result.returncode == 1
        assert result.stdout == (
            'HTTP 403\n{"ActionStatus":"FAIL","ErrorInfo":"unknown SdkAppid","ErrorCode":403}\n'
        )
        assert stored(running) == []


def test_event_from_stdin_and_a_sample_by_command(tmp_path: Path) -> None:
    body = b'{"CallbackCommand":"Live.CallbackAfterDelMetadata","RoomId":"vip-1","Keys":["a"]}'
    path = write_config(tmp_path)
    with InThread(path) as running:
        from_stdin = simulate(running, path, "--event", "-", stdin=body)
        assert from_stdin.returncode == 0, from_stdin.stderr
        by_command = simulate(running, path, "--command", "Live.CallbackAfterEndBattle")
        assert by_command.returncode == 0, by_command.stderr
        not_json = simulate(running, path, "--event", "-", stdin=b"{nope")
        assert not_json.returncode == 1
        assert not_json.stdout.startswith('HTTP 400\n{"ActionStatus":"FAIL"')
        events = stored(running)
    assert [(c, r) for _, c, r, _ in events] == [
        ("Live.CallbackAfterDelMetadata", "vip-1"),
        ("Live.CallbackAfterEndBattle", "live-42"),
    ]
    assert events[0][3]["callbackcommand"] == "Live.CallbackAfterDelMetadata"  # the body's


def test_default_url_comes_from_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with InThread(path) as running:
        own = tmp_path / "own"
        own.mkdir()
        # The bridge's port, and a wildcard host reached on loopback.
        same = write_config(own, running.port, server='host = "0.0.0.0"')
        result = run("simulate", "--config", str(same))
        assert result.returncode == 0, result.stderr
        assert f"POST http://127.0.0.1:{running.port}/tencent/callback " in result.stderr
        assert len(stored(running)) == 1


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "\u00e9x\u0301:{port}",
    ],  # the second: a traceback, urllib cannot encode it
    ids=["nothing listening", "a host name outside ASCII"],
)
def test_bridge_not_running(tmp_path: Path, host: str) -> None:
    url = f"http://{host.format(port=free_port())}/tencent/callback"
    result = run("simulate", "--config", str(write_config(tmp_path)), "--url", url)
    assert result.returncode == 1
    assert f"live-bridge: cannot reach the bridge at {url}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_an_events_command_cannot_drive_the_terminal(tmp_path: Path) -> None:
    # It went raw into the POST line and the note on stderr: a screen cleared, a line forged.
    (tmp_path / "event.json").write_text(
        json.dumps({"CallbackCommand": "Live.A\x1b[2J\x9b2J\u202e\nFORGED", "RoomId": "r"})
    )
    url = f"http://127.0.0.1:{free_port()}/tencent/callback"
    args = ("--event", str(tmp_path / "event.json"), "--command", "Live.CallbackAfterCreateRoom")
    result = run("simulate", "--config", str(write_config(tmp_path)), "--url", url, *args)
    assert result.returncode == 1
    assert not set(result.stderr) & set("\x1b\x9b\u202e")
    note, post, unreachable = result.stderr.splitlines()
    assert note.endswith("the event says Live.A\\u001b[2J\\u009b2J\\u202e\\nFORGED")
    assert post.startswith("POST http") and "(Live.A\\u001b[2J\\u009b2J\\u202e\\nFORGED, " in post
    assert unreachable.startswith("live-bridge: cannot reach the bridge")


def test_config_and_url_errors(tmp_path: Path) -> None:
    missing = run("simulate", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    path = str(write_config(tmp_path))
    for url in ("ftp://x/", "http://[bad", "http://h:port/", "http://u:S3cr3t@127.0.0.1:9/"):
        result = run("simulate", "--config", path, "--url", url)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("live-bridge: --url ") and "S3cr3t" not in result.stderr


def test_a_body_nested_past_the_parsers_depth_is_posted_and_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    deep = b'{"CallbackCommand":"X","a":' + b"[" * 2000 + b"]" * 2000 + b"}"
    with InThread(path) as running:
        result = simulate(running, path, "--event", "-", stdin=deep)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert '"ErrorInfo":"body is nested too deeply"' in result.stdout


def readme_curl() -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL, query and body of the curl line in the README (under `make run`)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"curl [^\n]*'(http://[^']+)'[^\n]*\n\s*-d '([^']+)'", readme)
    assert match, "no curl line in README.md"
    url = urlsplit(match.group(1))
    base = f"{url.scheme}://{url.netloc}{url.path}"
    return base, dict(parse_qsl(url.query)), json.loads(match.group(2))


def test_readme_curl_line_and_simulate_agree(tmp_path: Path) -> None:
    base, query, body = readme_curl()
    example = load_config(ROOT / "config.example.toml")
    assert base == default_url(example)  # `make run` serves where the curl line posts
    path = write_config(tmp_path)
    with InThread(path) as running:
        assert simulate(running, path).returncode == 0
        [(_, _, _, sent)] = stored(running)
        with contextlib.closing(sqlite3.connect(running.config.store.path)) as db:
            [(sent_body,)] = db.execute("SELECT body FROM events").fetchall()
    readme = {k.lower(): v for k, v in query.items()}
    assert {k: sent[k] for k in readme} == readme  # the same keys, with the same values
    assert set(sent) - set(readme) <= BEYOND_THE_README
    assert json.loads(sent_body) == body  # Tencent's own sample, both times
