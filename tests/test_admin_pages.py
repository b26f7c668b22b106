"""The status page on the real app under uvicorn: what it shows, escaped and cut short, and the
notices of a retry and a reload."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.admin_pages import GONE_SHOWN
from bridge.store import NewDelivery
from bridge.store.sqlite import SQLiteStore
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    OWNER,
    ROOT,
    SEED_BODY,
    InThread,
    http_request,
    post_callback,
    write_config,
)
from tests.slack_standin import SlackStandIn
from tests.store_rows import new_event
from tests.test_admin import CHANNEL, HOOK, ROUTE, form_token, post_form


@pytest.fixture
def bridge(tmp_path: Path, slack: SlackStandIn) -> Iterator[InThread]:
    channels = HOOK.format(url=slack.sink_url())
    with InThread(write_config(tmp_path, channels=channels, routes=ROUTE)) as running:
        yield running


def test_the_retry_notice_names_a_channel_with_any_characters(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    name = "ops&oncall#2+b"
    channels = CHANNEL.format(name=f'"{name}"', url=slack.sink_url())
    config = write_config(tmp_path, channels=channels, routes=ROUTE.replace("hook", name))
    with InThread(config) as bridge:
        csrf = form_token(bridge)
        status, location = post_form(
            bridge.url + "/status/retry", {"channel": name, "csrf": csrf}, {}
        )
        assert status == 303
        page = http_request(bridge.url + location)[2].decode()
        assert "0 dead letters of ops&amp;oncall#2+b are pending again" in page
        # The page refreshes itself without the notice, which told of one click.
        assert '<meta http-equiv="refresh" content="10; url=/status">' in page


@pytest.mark.parametrize(
    "query",
    [
        "retried=All&channel=hook.%20Session%20expired:%20sign%20in%20at%20https://evil.example",
        "retried=All&channel=hook",
        "retried=3&channel=nosuch",
    ],
)
def test_the_retry_notice_says_only_a_count_and_a_channel_there_is(
    bridge: InThread, query: str
) -> None:
    # The query is anyone's to write: a link made the page say what its author chose.
    page = http_request(f"{bridge.url}/status?{query}")[2].decode()
    assert "pending again" not in page and "evil.example" not in page
    page = http_request(f"{bridge.url}/status?retried=3&channel=hook")[2].decode()
    assert "3 dead letters of hook are pending again." in page


def test_a_rooms_text_is_shown_escaped_and_cut_short(bridge: InThread) -> None:
    # 25 rooms of 125 KB made a page of 15 MB; a right-to-left override made one read backwards.
    for name in ("abc\u202egnp.exe", "r" * 10_000):
        body = SEED_BODY.replace(b'"room_id"', json.dumps(name).encode())
        assert post_callback(bridge.url, body) == (200, OK_PACKET)
    page = http_request(bridge.url + "/status")[2].decode()
    assert "abc\\u202egnp.exe" in page and "\u202e" not in page
    assert "r" * 119 + "…" in page and "r" * 120 not in page


def test_a_last_error_quoting_a_room_is_cut_short(tmp_path: Path, slack: SlackStandIn) -> None:
    # A template that fails at run time may quote a value in its error: three rooms of 200 KB
    # made a page of 807 KB, whole in the channel's Last error and in each delivery's title.
    templates = tmp_path / "tpl"
    (templates / "webhook").mkdir(parents=True)
    (templates / "webhook" / "odd.j2").write_text(
        '{% if event.RoomId and event.RoomId.startswith("zz") %}'
        "{{ fields[event.RoomId] }}{% endif %}{}"
    )
    config = write_config(
        tmp_path, channels=HOOK.format(url=slack.sink_url()) + 'template = "webhook/odd.j2"\n',
        routes=ROUTE,
    )  # fmt: skip
    config.write_text(config.read_text().replace(str(ROOT / "templates"), str(templates)))
    with InThread(config) as bridge:
        body = SEED_BODY.replace(b'"room_id"', json.dumps("zz" + "E" * 200_000).encode())
        assert post_callback(bridge.url, body) == (200, OK_PACKET)
        page = http_request(bridge.url + "/status")[2].decode()
    assert "E" * 1000 not in page and len(page) < 20_000
    assert page.count("E" * 300) == 2  # in the channel's last error and the delivery's title


def test_rooms_of_two_apps_are_told_apart_by_their_app(tmp_path: Path, slack: SlackStandIn) -> None:
    # Two apps may name a room alike: with one app served, no column for it; with two, each
    # event's app beside its room.
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    with InThread(config) as one_app:
        assert post_callback(one_app.url) == (200, OK_PACKET)
        page = http_request(one_app.url + "/status")[2].decode()
    assert ">App<" not in page and str(APP_ID) not in page
    config.write_text(
        config.read_text().replace(f"sdk_app_id = {APP_ID}", f"sdk_app_id = [{APP_ID}, 7]")
    )
    with InThread(config) as two_apps:
        query = {"SdkAppid": "7", "CallbackCommand": OWNER, "contenttype": "json"}
        assert post_callback(two_apps.url, query=query) == (200, OK_PACKET)
        page = http_request(two_apps.url + "/status")[2].decode()
    rows = re.findall(r'<td data-label="App">(\d+)</td>\s*<td data-label="Room">(\w+)</td>', page)
    assert rows == [("7", "room_id"), (str(APP_ID), "room_id")]  # newest first


def test_the_status_page_says_a_reload_was_refused_and_why(
    bridge: InThread, tmp_path: Path
) -> None:
    # The log and the metric said so; the page an operator looks at did not.
    page = http_request(bridge.url + "/status")[2].decode()
    assert 'id="reload"' not in page
    path = tmp_path / "config.toml"
    good = path.read_text()
    path.write_text(good + "\n[bogus]\nx = 1\n")
    assert http_request(bridge.url + "/-/reload", "POST")[0] == 400
    page = http_request(bridge.url + "/status")[2].decode()
    assert "was refused; the running config stays" in page
    assert "bogus: unknown key" in page
    path.write_text(good)
    assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
    page = http_request(bridge.url + "/status")[2].decode()
    assert "was refused" not in page and "Config reloaded at" in page


def test_the_status_page_lists_some_channels_gone_from_the_config_and_counts_the_rest(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # 10,000 removed channels with dead letters made a 14 MB page that held every callback for
    # 1.5 s to render, again at each refresh.
    async def fill() -> None:
        store = SQLiteStore(tmp_path / "bridge.db")
        await store.open()
        try:
            event = new_event("gone")
            dead = [NewDelivery(f"gone-{n:03d}", None, error="x") for n in range(GONE_SHOWN + 5)]
            await store.record(event, dead, time.time(), 0)
        finally:
            await store.close()

    asyncio.run(fill())
    # The config names none of them: the start-up burial leaves dead letters dead.
    config = write_config(tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE)
    with InThread(config) as bridge:
        page = http_request(bridge.url + "/status")[2].decode()
    listed = [n for n in range(GONE_SHOWN + 5) if f'data-channel="gone-{n:03d}"' in page]
    assert listed == list(range(GONE_SHOWN))
    assert "and 5 more channels not in the config: 0 pending or in flight, 5 dead" in page
