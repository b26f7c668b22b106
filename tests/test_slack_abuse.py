"""Slack abuse, end to end: mention and link injections in every field of every command, and
values that would forge an entity, a line of the message or its reading order.

A bridge under uvicorn delivers to the Slack stand-in through an incoming webhook and a bot
token. Every string of every command's sample (and of an unknown command's) is set to one of the
injection strings; whatever reaches Slack must be valid Block Kit, must ping nobody and disguise
no link, and must still show the value, escaped.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge import blockkit_problems
from bridge.events import MODELS
from bridge.samples import HOSTILE_VALUES, hostile
from tests.bridge_server import APP_ID, OK_PACKET, InThread, post_callback, wait_until, write_config
from tests.payloads import strings
from tests.slack_standin import Posted, SlackStandIn

COMMANDS = [*MODELS, "Live.CallbackAfterSomethingNew"]
INJECTIONS = [v for v in HOSTILE_VALUES if v.startswith("<")]  # mentions and links
FORBIDDEN = ("<!channel>", "<!here>", "<!everyone>", "<@", "<!subteam", "<http")
DATE_TOKEN = re.compile(r"<!date\^[^<>]*>")  # written by the bridge itself
BOT_CHANNEL = "C0123456789"
HOOK_CHANNEL = "C0HOOK0001"
EVENT_TIME = 1_703_589_922_780
# Written out, not computed with the bridge's own slack_escape: what Slack must be sent.
ESCAPED = {v: v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for v in INJECTIONS}


def test_the_injections_are_the_six_slack_ones() -> None:
    assert set(INJECTIONS) == {
        "<!channel>", "<!here>", "<!everyone>", "<@U123ABC>", "<!subteam^S123>",
        "<http://evil.example|click me>",
    }  # fmt: skip


@contextlib.contextmanager
def bridge(tmp_path: Path, slack: SlackStandIn, digest_after: int) -> Iterator[InThread]:
    paced = f"rate_per_s = 1000.0\nburst = 100\ndigest_after = {digest_after}\n"
    channels = (
        f'[channels.hook]\ntype = "slack"\nwebhook_url = "{slack.add_webhook(HOOK_CHANNEL)}"\n'
        f'{paced}[channels.bot]\ntype = "slack"\ntoken = "xoxb-test-token"\n'
        f'channel = "{BOT_CHANNEL}"\napi_url = "{slack.api_url}"\nthread_by_room = true\n{paced}'
    )
    routes = '[[routes]]\nname = "all"\nchannels = ["hook", "bot"]\n'
    room_url = 'room_url = "https://console.example.com/rooms/{room_id}"\n'  # [templates]
    config = write_config(tmp_path, channels=channels, routes=routes, extra=room_url)
    with InThread(config) as running:
        yield running


def hostile_bodies(first_time: int, values: list[str] = INJECTIONS) -> list[bytes]:
    """Every command with every value; a distinct EventTime each, so dedup keeps them all."""
    bodies = []
    for number, (command, value) in enumerate(
        (c, v) for c in COMMANDS for v in values
    ):  # fmt: skip
        body = hostile(command, value)
        body["EventTime"] = first_time + number * 1000
        bodies.append(json.dumps(body, ensure_ascii=False).encode())
    return bodies


def post_all(running: InThread, bodies: list[bytes]) -> None:
    def post(body: bytes) -> tuple[int, bytes]:
        command = json.loads(body)["CallbackCommand"]
        query = {"SdkAppid": str(APP_ID), "CallbackCommand": command, "contenttype": "json"}
        return post_callback(running.url, body, query=query)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(post, bodies))
    assert replies == [(200, OK_PACKET)] * len(bodies)


def states(running: InThread) -> Counter[str]:
    with contextlib.closing(sqlite3.connect(running.config.store.path)) as conn:
        return Counter(dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state")))


def dead_letters(running: InThread) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(running.config.store.path)) as conn:
        sql = "SELECT channel, last_error FROM deliveries WHERE state = 'dead'"
        return conn.execute(sql).fetchall()


def settle(running: InThread, expected: int) -> None:
    """Wait until every delivery is delivered or dead; then insist on delivered."""
    assert wait_until(lambda: sum(states(running).values()) == expected, timeout=20)
    finished = {"delivered", "dead"}
    assert wait_until(lambda: set(states(running)) <= finished, timeout=20), states(running)
    assert dead_letters(running) == []  # Slack (the stand-in) refused nothing
    assert states(running) == {"delivered": expected}


def as_text(message: Posted) -> str:
    return json.dumps(message.payload, ensure_ascii=False)


def assert_harmless(message: Posted) -> None:
    """Valid Block Kit that pings nobody and disguises no link."""
    assert blockkit_problems.problems(message.payload) == [], message.payload
    text = DATE_TOKEN.sub("", as_text(message))
    for token in FORBIDDEN:
        assert token not in text, (token, message.payload)
    assert "<" not in text and ">" not in text, message.payload  # Slack's control characters


def shown(message: Posted) -> list[str]:
    """The injections whose escaped text the message shows."""
    text = as_text(message)
    return [value for value in INJECTIONS if ESCAPED[value] in text]


def test_every_field_of_every_command_is_shown_escaped(tmp_path: Path, slack: SlackStandIn) -> None:
    bodies = hostile_bodies(EVENT_TIME)
    with bridge(tmp_path, slack, digest_after=0) as running:
        post_all(running, bodies)
        settle(running, 2 * len(bodies))
        posted = slack.posted
    assert len(posted) == 2 * len(bodies)  # every event its own message, on each channel
    for message in posted:
        assert_harmless(message)
        assert len(shown(message)) == 1, message.payload  # its own value, and only that
    for via in ("webhook", "api"):
        counts = Counter(shown(m)[0] for m in posted if m.via == via)
        assert counts == dict.fromkeys(INJECTIONS, len(COMMANDS))


def test_digests_of_hostile_events_are_harmless_too(tmp_path: Path, slack: SlackStandIn) -> None:
    # A 429 on the first message blocks both channels for 2 s; the backlog that builds up in the
    # meantime goes out as digests.
    slack.fail_next(1, status=429, retry_after=2, kind="webhook")
    slack.fail_next(1, status=429, error="ratelimited", retry_after=2, kind="api")
    first, *rest = hostile_bodies(EVENT_TIME)
    with bridge(tmp_path, slack, digest_after=2) as running:
        post_all(running, [first])
        assert wait_until(lambda: slack.rejected_429 == 2)
        post_all(running, rest)
        settle(running, 2 * (1 + len(rest)))
        posted = slack.posted
    assert slack.rejected_429 == 2
    digests = [m for m in posted if is_digest(m)]
    assert {m.via for m in digests} == {"webhook", "api"}
    for message in posted:
        assert_harmless(message)
    for via in ("webhook", "api"):
        values = {value for m in posted if m.via == via for value in shown(m)}
        assert values == set(INJECTIONS)
        entries = sum(digest_size(m) for m in digests if m.via == via)
        singles = sum(1 for m in posted if m.via == via and not is_digest(m))
        assert entries + singles == 1 + len(rest)


# What else a value may try, and how Slack must be sent it: an entity of its own, a line of the
# message forged, the text after it shown backwards (an "exe" passing for a "gnp").
FORGERIES = {
    "a &amp; b": "a &amp;amp; b",
    "line1\n*Owner*\nU999": "line1\\n*Owner*\\nU999",
    "evil\u202egnp.exe": "evil\\u202egnp.exe",
}


def test_no_value_forges_an_entity_a_line_or_its_reading_order(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    bodies = hostile_bodies(EVENT_TIME, list(FORGERIES))
    with bridge(tmp_path, slack, digest_after=0) as running:
        post_all(running, bodies)
        settle(running, 2 * len(bodies))
        posted = slack.posted
    for message in posted:
        assert blockkit_problems.problems(message.payload) == [], message.payload
        text = "\0".join(strings(message.payload))  # as Slack reads them: JSON decoded
        assert not any(value in text for value in FORGERIES), message.payload
        assert sum(sent in text for sent in FORGERIES.values()) == 1, message.payload


def is_digest(message: Posted) -> bool:
    header = message.payload["blocks"][0]
    return header["type"] == "header" and re.fullmatch(
        r"\d+ Live events?", header["text"]["text"]
    ) is not None  # fmt: skip


def digest_size(message: Posted) -> int:
    return int(message.payload["blocks"][0]["text"]["text"].split()[0])
