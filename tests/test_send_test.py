"""`live-bridge send-test` against the Slack stand-in, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bridge_server import OWNER, write_config
from tests.slack_standin import SlackStandIn

TOKEN = "xoxb-test-token"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROUTES = '[[routes]]\nname = "all"\nchannels = ["console"]\n'


def run(*args: str) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=60,
        env=clean,
    )  # fmt: skip


def config(tmp_path: Path, slack: SlackStandIn, channel_id: str = "C0123456789") -> Path:
    channels = f"""
[channels.console]
type = "console"
[channels.bot]
type = "slack"
token = "{TOKEN}"
channel = "{channel_id}"
api_url = "{slack.api_url}"
thread_by_room = true
[channels.hook]
type = "slack"
webhook_url = "{slack.add_webhook()}"
[channels.audit]
type = "webhook"
url = "{slack.sink_url("audit")}"
signing_secret = "{SIGNING_SECRET}"
"""
    return write_config(tmp_path, channels=channels, routes=ROUTES)


def test_bot_token_delivered_with_ts(tmp_path: Path, slack: SlackStandIn) -> None:
    result = run("send-test", "--config", str(config(tmp_path, slack)), "--channel", "bot")
    assert result.returncode == 0, result.stdout + result.stderr
    [posted] = slack.posted
    assert posted.via == "api" and posted.channel == "C0123456789"
    assert "Room owner changed" in posted.payload["text"]
    assert "thread_ts" not in posted.payload  # no thread: it bypasses the store's room map
    assert (
        result.stdout == f"bot (slack, bot token, channel C0123456789): delivered, ts {posted.ts}\n"
    )
    assert not (tmp_path / "bridge.db").exists()


def test_incoming_webhook_delivered_and_its_url_not_shown(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    path = config(tmp_path, slack)
    result = run("send-test", "--config", str(path), "--channel", "hook")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "hook (slack, incoming webhook): delivered\n"
    [posted] = slack.posted
    assert posted.via == "webhook" and "Room owner changed" in posted.payload["text"]
    assert "/services/" not in result.stdout + result.stderr


def test_webhook_gets_a_fresh_webhook_id_each_time(tmp_path: Path, slack: SlackStandIn) -> None:
    path = str(config(tmp_path, slack))
    for _ in range(2):
        result = run("send-test", "--config", path, "--channel", "audit")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "audit (webhook): delivered\n"
    first, second = slack.sink_requests
    assert json.loads(first.body)["type"] == OWNER
    assert json.loads(first.body)["event"]["CurrentOwner_Account"] == "user2"
    # A receiver dropping repeats by webhook-id must take a second test too.
    assert first.headers["webhook-id"] != second.headers["webhook-id"]
    assert "webhook-signature" in first.headers


def test_permanent_error_names_slacks_error_not_the_token(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    path = config(tmp_path, slack, channel_id="C0UNKNOWN")
    result = run("send-test", "--config", str(path), "--channel", "bot")
    assert result.returncode == 1
    assert result.stdout == (
        "bot (slack, bot token, channel C0UNKNOWN): permanent: HTTP 200: channel_not_found\n"
    )
    assert TOKEN not in result.stdout + result.stderr
    assert slack.posted == []


def test_retry_shows_the_delay_slack_asked_for(tmp_path: Path, slack: SlackStandIn) -> None:
    slack.fail_next(1, status=429, retry_after=7, kind="webhook")
    result = run("send-test", "--config", str(config(tmp_path, slack)), "--channel", "hook")
    assert result.returncode == 1
    assert result.stdout.startswith("hook (slack, incoming webhook): retry: HTTP 429")
    assert "(Retry-After 7s), rate limited" in result.stdout


def test_console_prints_the_line(tmp_path: Path, slack: SlackStandIn) -> None:
    result = run("send-test", "--config", str(config(tmp_path, slack)), "--channel", "console")
    assert result.returncode == 0
    line, outcome = result.stdout.splitlines()
    assert "room owner changed: room room_id, user1 -> user2 (by admin" in line
    assert outcome == "console (console): delivered"


def test_unknown_channel(tmp_path: Path, slack: SlackStandIn) -> None:
    result = run("send-test", "--config", str(config(tmp_path, slack)), "--channel", "nope")
    assert result.returncode == 2
    assert "no channel 'nope'; configured: audit, bot, console, hook" in result.stderr
