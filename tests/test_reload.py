"""Reloads on the real app under uvicorn (POST /-/reload): under traffic, removed and retyped
channels, callbacks received across one, and every way a new config can fail."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.checks import load_validated
from bridge.config import Config
from bridge.render import Renderer
from bridge.store import StoreUnavailable
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    SEED_BODY,
    InThread,
    db_rows,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn
from tests.test_admin import CHANNEL, HOOK, ROUTE, room


def test_reload_under_live_traffic(tmp_path: Path, slack: SlackStandIn) -> None:
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    original = config.read_text()
    answers: list[tuple[int, bytes]] = []
    stop = threading.Event()
    with InThread(config) as bridge:

        def traffic() -> None:
            n = 0
            while not stop.is_set():
                answers.append(post_callback(bridge.url, room(n)))
                n += 1

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            time.sleep(0.3)
            # A good config: a second channel, both routed.
            audit = CHANNEL.format(name="audit", url=slack.sink_url("audit"))
            config.write_text(original.replace(ROUTE, "") + audit + ROUTE.replace(
                '["hook"]', '["hook", "audit"]'))  # fmt: skip
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert status == 200 and json.loads(body)["status"] == "reloaded"
            time.sleep(0.3)
            # A bad one: refused with the reason, the running config stays.
            config.write_text(original.replace('name = "all"', 'name = "all"\nbogus = 1'))
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert status == 400
            assert "[[routes]] #1 bogus: unknown key" in json.loads(body)["message"]
            time.sleep(0.3)
        finally:
            stop.set()
            sender.join()
        posted = len(answers)
        assert answers == [(200, OK_PACKET)] * posted  # nothing refused, nothing dropped
        db = bridge.config.store.path
        assert db_rows(db, "SELECT COUNT(*) FROM events") == [(posted,)]
        assert slack.wait_for(
            lambda s: len([r for r in s.sink_requests if r.path.endswith("/sink")]) == posted
        )
        assert len([r for r in slack.sink_requests if r.path.endswith("/audit")]) > 0
        metrics = http_request(bridge.url + "/metrics")[2].decode()
        assert 'live_bridge_config_reloads_total{result="success"} 1.0' in metrics
        assert 'live_bridge_config_reloads_total{result="failure"} 1.0' in metrics


def test_callbacks_are_answered_while_a_reload_reads_the_config(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading the config and compiling and trying every template took 0.3 s for one Slack
    # channel's, on the event loop: no callback was answered meanwhile. Here the reading is
    # held until a callback has been answered.
    reading, release, read = threading.Event(), threading.Event(), threading.Event()

    def held(path: Path) -> tuple[Config, Renderer]:
        reading.set()
        release.wait(3)  # on the event loop, it waits in vain: no callback can be answered
        read.set()
        return load_validated(path)

    monkeypatch.setattr("bridge.checks.load_validated", held)
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    with InThread(config) as bridge:
        reloaded: list[int] = []
        reloading = threading.Thread(
            target=lambda: reloaded.append(http_request(bridge.url + "/-/reload", "POST")[0])
        )
        reloading.start()
        try:
            assert reading.wait(10)
            assert post_callback(bridge.url, room(1)) == (200, OK_PACKET)
            assert not read.is_set()  # answered while the reload was still reading
        finally:
            release.set()
            reloading.join(10)
    assert reloaded == [200]


def test_a_check_that_never_ends_is_refused_and_holds_up_no_later_reload(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A template whose loops never end (nested loops over a long string) held the reload for
    # good: every later reload waited behind it, the reload endpoint never answered, and the
    # process did not end at a SIGTERM, its executor waiting for the check's thread.
    release = threading.Event()
    threads: list[threading.Thread] = []
    calls = 0

    def first_never_ends(path: Path) -> tuple[Config, Renderer]:
        nonlocal calls
        calls += 1
        if calls == 1:
            threads.append(threading.current_thread())
            release.wait(30)
        return load_validated(path)

    monkeypatch.setattr("bridge.checks.load_validated", first_never_ends)
    monkeypatch.setattr("bridge.checks.CHECK_WITHIN_S", 0.5)
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    try:
        with InThread(config) as bridge:
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert status == 400 and b"took over 0.5s (a loop that never ends?)" in body
            assert post_callback(bridge.url, room(1)) == (200, OK_PACKET)
            assert http_request(bridge.url + "/-/reload", "POST")[0] == 200  # not held up
            assert threads[0].daemon and threads[0].is_alive()  # not the executor's: no wait
    finally:
        release.set()


def test_reload_buries_deliveries_of_a_removed_channel(tmp_path: Path, slack: SlackStandIn) -> None:
    slack.set_sink_status("gone", 503)
    gone = CHANNEL.format(name="gone", url=slack.sink_url("gone"))
    both = ROUTE.replace('["hook"]', '["hook", "gone"]')
    config = write_config(
        tmp_path, channels=HOOK.format(url=slack.sink_url()) + gone, routes=both,
        delivery="initial_backoff_s = 30.0\nmax_backoff_s = 30.0\n",
    )  # fmt: skip
    with InThread(config) as bridge:
        assert post_callback(bridge.url) == (200, OK_PACKET)
        db = bridge.config.store.path
        assert wait_until(
            lambda: ("gone", "pending") in db_rows(db, "SELECT channel, state FROM deliveries")
        )
        config.write_text(config.read_text().replace(gone, "").replace(both, ROUTE))
        status, _, body = http_request(bridge.url + "/-/reload", "POST")
        assert status == 200 and "1 deliveries to removed channels" in json.loads(body)["message"]
        # The page shows what the store still holds for it, as /metrics does, with no retry.
        page = http_request(bridge.url + "/status")[2].decode()
        row = page.split('<tr data-channel="gone">', 1)[1].split("</tr>", 1)[0]
        assert "not in the config" in row and 'data-label="Dead">1<' in row
        assert "/status/retry" not in row
    assert ("gone", "dead", "channel removed from the config") in db_rows(
        db, "SELECT channel, state, last_error FROM deliveries"
    )


def test_a_reload_that_changes_a_channels_type_renders_its_waiting_messages_again(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # Rendered at receipt as a webhook's body, they went to Slack as such after the reload:
    # refused (no_text), dead letters for events that had been acknowledged.
    config, retyped = webhook_to_retype(tmp_path, slack, backoff_s=2.0)  # the reload comes first
    with InThread(config) as bridge:
        for n in range(3):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        assert wait_until(lambda: len(slack.sink_requests) == 3)  # each met the 503 once
        config.write_text(retyped)
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        assert post_callback(bridge.url, room(3)) == (200, OK_PACKET)  # rendered for Slack
        assert wait_until(lambda: all_delivered(bridge))
    assert rooms_in_slack(slack) == [f"*Room*\nroom-{n}" for n in range(4)]  # Slack's own, each


def webhook_to_retype(tmp_path: Path, slack: SlackStandIn, backoff_s: float) -> tuple[Path, str]:
    """A config whose channel "hook" is a webhook to the stand-in's sink, which answers 503, and
    the config's text with "hook" a Slack channel (an incoming webhook) instead."""
    slack.set_sink_status("sink", 503)
    before = HOOK.format(url=slack.sink_url())
    after = f'[channels.hook]\ntype = "slack"\nwebhook_url = "{slack.add_webhook()}"\n'
    delivery = f"initial_backoff_s = {backoff_s}\nmax_backoff_s = {backoff_s}\nmax_attempts = 100\n"
    config = write_config(tmp_path, channels=before, routes=ROUTE, delivery=delivery)
    return config, config.read_text().replace(before, after)


def all_delivered(bridge: InThread) -> bool:
    states = db_rows(bridge.config.store.path, "SELECT state FROM deliveries")
    return bool(states) and {state for (state,) in states} == {"delivered"}


def rooms_in_slack(slack: SlackStandIn) -> list[str]:
    """The room field of each message Slack took, sorted: there only in Slack's own layout."""
    return sorted(p.payload["blocks"][1]["fields"][0]["text"] for p in slack.posted)


def test_messages_waiting_for_a_retyped_channel_are_never_sent_as_its_old_type(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # Their payloads were forgotten only after the new config was in place (and after the
    # reload's wait for callbacks under way): a lane of the new config claimed one meanwhile and
    # sent the webhook's body to Slack, which refused it (no_text): a dead letter. Here the
    # store takes its time forgetting, and the deliveries are due all along.
    config, retyped = webhook_to_retype(tmp_path, slack, backoff_s=0.05)
    with InThread(config) as bridge:
        store = bridge.app.bridge.store
        forget = store.forget_payloads

        async def slowly(channels: Sequence[str]) -> int:
            await asyncio.sleep(0.5)
            return await forget(channels)

        store.forget_payloads = slowly  # type: ignore[method-assign]
        for n in range(3):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        assert wait_until(lambda: len(slack.sink_requests) >= 6)  # retried, due again and again
        config.write_text(retyped)
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        assert wait_until(lambda: all_delivered(bridge))
    assert rooms_in_slack(slack) == [f"*Room*\nroom-{n}" for n in range(3)]


def test_a_reload_whose_settling_the_store_refuses_takes_effect_and_settles_later(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # The new config was in force, but the reload answered 500 with a traceback, counted
    # neither success nor failure, and nothing forgot again what callbacks had rendered for
    # the old type meanwhile.
    monkeypatch.setattr("bridge.reload.SETTLE_AGAIN_S", 0.2)
    config, retyped = webhook_to_retype(tmp_path, slack, backoff_s=0.05)
    with InThread(config) as bridge:
        store = bridge.app.bridge.store
        forget = store.forget_payloads
        calls: list[int] = []

        async def refused_once_settling(channels: Sequence[str]) -> int:
            calls.append(len(calls))
            if len(calls) == 2:  # the reload's settling, after the new config took over
                raise StoreUnavailable("store commit failed: database is locked")
            return await forget(channels)

        store.forget_payloads = refused_once_settling  # type: ignore[method-assign]
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert wait_until(lambda: len(slack.sink_requests) >= 1)
        config.write_text(retyped)
        status, _, body = http_request(bridge.url + "/-/reload", "POST")
        assert status == 200 and json.loads(body)["status"] == "reloaded"
        assert wait_until(lambda: len(calls) >= 3)  # settled later
        assert wait_until(lambda: all_delivered(bridge))
    assert rooms_in_slack(slack) == ["*Room*\nroom-0"]
    assert "settled once the store takes it" in caplog.text and "Traceback" not in caplog.text


def start_callback(bridge: InThread) -> socket.socket:
    """A callback to `bridge` whose body is still on its way: the rest is SEED_BODY[20:]."""
    tencent = socket.create_connection(("127.0.0.1", bridge.port), timeout=10)
    tencent.sendall(
        f"POST /tencent/callback?SdkAppid={APP_ID} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(SEED_BODY)}\r\n\r\n".encode()
        + SEED_BODY[:20]
    )
    assert wait_until(lambda: bridge.app.bridge.receiver.in_flight == 1)
    return tencent


def read_reply(tencent: socket.socket) -> bytes:
    """What the bridge answered the callback `start_callback` began, up to its packet."""
    reply = b""
    while not reply.endswith((OK_PACKET, b"}")) and (chunk := tencent.recv(4096)):
        reply += chunk
    return reply


def reload_in_background(bridge: InThread) -> tuple[threading.Thread, list[tuple[int, str]]]:
    """POST /-/reload from a thread; the list gets (status, message) when it is answered."""
    answers: list[tuple[int, str]] = []

    def reload() -> None:
        status, _, body = http_request(bridge.url + "/-/reload", "POST")
        answers.append((status, json.loads(body)["message"]))

    thread = threading.Thread(target=reload)
    thread.start()
    return thread, answers


def test_a_callback_received_across_a_reload_is_buried_with_its_removed_channel(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    gone = CHANNEL.format(name="gone", url=slack.sink_url("gone"))
    both = ROUTE.replace('["hook"]', '["hook", "gone"]')
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()) + gone, routes=both)
    with InThread(config) as bridge:
        with start_callback(bridge) as tencent:
            old = bridge.app.bridge.receiver  # routes to "gone" too
            config.write_text(config.read_text().replace(gone, "").replace(both, ROUTE))
            reload, answers = reload_in_background(bridge)
            assert wait_until(lambda: bridge.app.bridge.receiver is not old)
            tencent.sendall(SEED_BODY[20:])  # received under the old config, recorded now
            assert read_reply(tencent).endswith(OK_PACKET)
            reload.join()
        # The reload waited for the callback, and buried what it recorded.
        assert answers == [(200, "reloaded: 1 channels, 1 routes; 1 deliveries to removed "
                                 "channels are dead letters")]  # fmt: skip
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
        db = bridge.config.store.path
    assert sorted(db_rows(db, "SELECT channel, state, last_error FROM deliveries")) == [
        ("gone", "dead", "channel removed from the config"),
        ("hook", "delivered", None),
    ]


def test_a_callback_that_outlasts_the_reloads_wait_is_buried_when_it_ends(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.reload.SETTLE_S", 0.5)
    gone = CHANNEL.format(name="gone", url=slack.sink_url("gone"))
    both = ROUTE.replace('["hook"]', '["hook", "gone"]')
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()) + gone, routes=both)
    with InThread(config) as bridge:
        db = bridge.config.store.path
        with start_callback(bridge) as tencent:
            config.write_text(config.read_text().replace(gone, "").replace(both, ROUTE))
            started = time.monotonic()
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert status == 200 and json.loads(body)["message"] == "reloaded: 1 channels, 1 routes"
            assert 0.5 <= time.monotonic() - started < 5  # it waited, but only so long
            tencent.sendall(SEED_BODY[20:])
            assert read_reply(tencent).endswith(OK_PACKET)
        assert wait_until(
            lambda: (
                ("gone", "dead", "channel removed from the config")
                in db_rows(db, "SELECT channel, state, last_error FROM deliveries")
            )
        )


def test_a_callback_received_across_a_retyping_reload_is_sent_as_the_new_type(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # Its body still arriving, it was rendered by the old receiver for the channel's old type,
    # and the new config's lane claimed it before the reload forgot that: a webhook's body
    # posted to Slack, refused (no_text), a dead letter for an acknowledged event.
    config, retyped = webhook_to_retype(tmp_path, slack, backoff_s=0.05)
    with InThread(config) as bridge:
        with start_callback(bridge) as tencent:
            old = bridge.app.bridge.receiver
            config.write_text(retyped)
            reload, answers = reload_in_background(bridge)
            assert wait_until(lambda: bridge.app.bridge.receiver is not old)
            tencent.sendall(SEED_BODY[20:])
            assert read_reply(tencent).endswith(OK_PACKET)
            reload.join()
        assert answers[0][0] == 200
        assert wait_until(lambda: all_delivered(bridge))
    assert rooms_in_slack(slack) == ["*Room*\nroom_id"] and slack.sink_requests == []


def test_a_callback_rendered_before_a_retyping_reload_and_stored_after_is_sent_as_the_new_type(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # Rendered for the old type before the reload and committed after its first forgetting: the
    # new config's lane, woken by the commit, claimed it before the second.
    config, retyped = webhook_to_retype(tmp_path, slack, backoff_s=0.05)
    with InThread(config) as bridge:
        first = bridge.app.bridge.receiver
        store = bridge.app.bridge.store
        record = store.record

        async def after_the_swap(*args: Any, **kwargs: Any) -> Any:
            while bridge.app.bridge.receiver is first:  # noqa: ASYNC110  # polled, as _finish does
                await asyncio.sleep(0.01)
            return await record(*args, **kwargs)

        store.record = after_the_swap  # type: ignore[method-assign]
        answers: list[tuple[int, bytes]] = []
        tencent = threading.Thread(target=lambda: answers.append(post_callback(bridge.url)))
        tencent.start()
        assert wait_until(lambda: first.in_flight == 1)
        config.write_text(retyped)
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        tencent.join()
        assert answers == [(200, OK_PACKET)]
        assert wait_until(lambda: all_delivered(bridge))
    assert rooms_in_slack(slack) == ["*Room*\nroom_id"] and slack.sink_requests == []


def bad_room_url(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = config.read_text()
    config.write_text(text.replace("[templates]\n", '[templates]\nroom_url = "x/{room_id.a}"\n'))


def huge_repeat(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = config.read_text()
    config.write_text(text.replace('name = "all"', 'name = "all"\nroom_regex = "a{99999999999}"'))


def config_not_utf8(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.write_bytes(config.read_bytes() + b"# caf\xe9\n")


def template_not_utf8(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (config.parent / "t" / "webhook").mkdir(parents=True)
    (config.parent / "t" / "webhook" / "default.j2").write_bytes(b'{"a": "caf\xe9"}')
    text = config.read_text()
    config.write_text(text.replace("[templates]\ndir = ", '[templates]\ndir = "t"\n# '))


def unforeseen(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check_templates(*args: object) -> None:
        raise RuntimeError("no one saw this coming")

    monkeypatch.setattr("bridge.checks.check_templates", check_templates)


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (bad_room_url, "[templates] room_url: room_url may only use the placeholder {room_id}"),
        (huge_repeat, "route 'all': bad room_regex: the repetition number is too large"),
        (config_not_utf8, "is not UTF-8 text, as TOML must be"),
        (template_not_utf8, "webhook/default.j2, line 1: not UTF-8 text"),
        (unforeseen, "config.toml: cannot be loaded: RuntimeError: no one saw this coming"),
    ],
)
def test_a_config_that_fails_in_any_way_is_refused_and_counted(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch,
    break_it: Callable[[Path, pytest.MonkeyPatch], None], reason: str,
) -> None:  # fmt: skip
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    with InThread(config) as bridge:
        break_it(config, monkeypatch)
        status, _, body = http_request(bridge.url + "/-/reload", "POST")
        assert (status, json.loads(body)["status"]) == (400, "refused")
        assert reason in json.loads(body)["message"]
        failures = ("live_bridge_config_reloads_total", (("result", "failure"),))
        assert samples(bridge.url)[failures] == 1
        assert post_callback(bridge.url) == (200, OK_PACKET)  # the running config serves on
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)


def test_a_reload_keeps_what_was_logged_once_a_minute(
    tmp_path: Path, slack: SlackStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    # Each reload made a new receiver, which had said nothing yet: reloads every few seconds
    # logged every refusal again, and the count of those left unlogged was lost.
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    with InThread(config) as bridge, caplog.at_level(logging.INFO, logger="bridge.receive"):
        for _ in range(3):
            assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403
            assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403
            status, _, body = http_request(bridge.url + "/-/reload", "POST")
            assert (status, json.loads(body)["status"]) == (200, "reloaded")
    assert caplog.messages == ["refused callback: HTTP 403 unknown SdkAppid"]
