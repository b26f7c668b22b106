"""The whole path end to end: callbacks into the real app, messages out at the Slack stand-in."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from standardwebhooks.webhooks import Webhook

from bridge.store import STORE_STOP_S
from tests.bridge_server import (
    DELIVERY,
    OK_PACKET,
    SEED_BODY,
    SINK_ROUTE,
    InThread,
    Subprocess,
    db_rows,
    free_port,
    get,
    post_callback,
    signed_sink,
    signing_secret,
    wait_until,
    write_config,
)
from tests.pg_proxy import PgProxy
from tests.slack_standin import SlackStandIn

TOKEN = "xoxb-test-token"
CHANNEL = "C0123456789"


def deliveries(db: Path) -> list[tuple[str, str, int, str | None]]:
    return db_rows(db, "SELECT channel, state, attempts, last_error FROM deliveries ORDER BY id")


def owner_change(room: str, new: str = "user2") -> bytes:
    return SEED_BODY.replace(b'"room_id"', json.dumps(room).encode()).replace(
        b'"user2"', json.dumps(new).encode()
    )


def test_every_channel_type_delivers(
    tmp_path: Path, slack: SlackStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = signing_secret()
    channels = f"""
[channels.console]
type = "console"
[channels.hook]
type = "slack"
webhook_url = "{slack.add_webhook(CHANNEL)}"
[channels.bot]
type = "slack"
token = "{TOKEN}"
channel = "{CHANNEL}"
api_url = "{slack.api_url}"
[channels.audit]
type = "webhook"
url = "{slack.sink_url("audit")}"
headers = {{ Authorization = "Bearer audit-token" }}
signing_secret = "{secret}"
"""
    routes = '[[routes]]\nname = "all"\nchannels = ["console", "hook", "bot", "audit"]\n'
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        assert post_callback(bridge.url) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.posted) == 2 and len(s.sink_requests) == 1)
        assert wait_until(lambda: "room owner changed" in capsys.readouterr().out)
        db = bridge.config.store.path
        assert wait_until(lambda: all(d[1] == "delivered" for d in deliveries(db)))
    by_via = {p.via: p for p in slack.posted}
    assert by_via["api"].channel == CHANNEL and by_via["webhook"].channel == CHANNEL
    for posted in slack.posted:
        assert posted.payload["text"] == "Room owner changed in room_id: user1 → user2"
        assert posted.payload["blocks"][0]["text"]["text"] == "Room owner changed"
    request = slack.sink_requests[0]
    assert request.headers["authorization"] == "Bearer audit-token"
    verified = Webhook(secret).verify(request.body, request.headers)
    assert verified["event"]["RoomId"] == "room_id"


def test_routes_in_order_continue_and_one_delivery_per_channel(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    channels = "".join(
        f'[channels.{n}]\ntype = "webhook"\nurl = "{slack.sink_url(n)}"\n'
        for n in ("vip", "games", "rest")
    )
    routes = """
[[routes]]
name = "vip"
rooms = ["vip-*"]
channels = ["vip"]
[[routes]]
name = "games"
room_regex = "^game-[0-9]+$"
operators = ["admin*"]
channels = ["games", "vip"]
continue = true
[[routes]]
name = "also vip"
rooms = ["game-*"]
channels = ["vip", "games"]
continue = true
[[routes]]
name = "everything else"
channels = ["rest"]
"""
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        for room in ("vip-1", "game-7", "lobby"):
            assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 5)
        time.sleep(0.2)
    got = sorted(
        (r.path.rsplit("/", 1)[1], json.loads(r.body)["event"]["RoomId"])
        for r in slack.sink_requests
    )
    assert got == [
        ("games", "game-7"), ("rest", "game-7"), ("rest", "lobby"),
        ("vip", "game-7"), ("vip", "vip-1"),
    ]  # fmt: skip


def test_injection_strings_reach_slack_as_literal_text(tmp_path: Path, slack: SlackStandIn) -> None:
    channels = f'[channels.hook]\ntype = "slack"\nwebhook_url = "{slack.add_webhook()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["hook"]\n'
    hostile = '<!channel> <@U123> <http://evil|click> & "q" \\ \n end'
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        assert post_callback(bridge.url, owner_change(hostile, new="<!here>")) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.posted) == 1)
    payload = json.dumps(slack.posted[0].payload)
    for ping in ("<!channel>", "<!here>", "<@U123>", "<http://evil"):
        assert ping not in payload
    room_field = slack.posted[0].payload["blocks"][1]["fields"][0]["text"]
    assert room_field == (  # the value's line break shown as \n: no line of its own
        '*Room*\n&lt;!channel&gt; &lt;@U123&gt; &lt;http://evil|click&gt; &amp; "q" \\ \\n end'
    )


def test_429_is_honoured_before_anything_else_goes_to_that_channel(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    channels = (
        f'[channels.bot]\ntype = "slack"\ntoken = "{TOKEN}"\nchannel = "{CHANNEL}"\n'
        f'api_url = "{slack.api_url}"\n'
    )
    routes = '[[routes]]\nname = "all"\nchannels = ["bot"]\n'
    slack.fail_next(1, status=429, retry_after=1, kind="api")
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        started = time.monotonic()
        for n in range(3):
            assert post_callback(bridge.url, owner_change(f"r{n}")) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.posted) == 3, timeout=15)
        db = bridge.config.store.path
        assert wait_until(lambda: all(d[1] == "delivered" for d in deliveries(db)))
        states = deliveries(db)
    assert slack.rejected_429 == 1
    assert min(p.received_at for p in slack.posted) - started >= 0.9
    assert [s[1] for s in states] == ["delivered"] * 3
    assert max(s[2] for s in states) == 1  # the 429 cost no attempt


@pytest.mark.parametrize("mode", ["token", "webhook"])
def test_two_channels_for_one_slack_channel_keep_to_its_rate(tmp_path: Path, mode: str) -> None:
    # Two templates for one Slack channel (VIP rooms and the rest) take two channels of the
    # config; each was paced alone, together at twice Slack's rate: a 429 every other message.
    with SlackStandIn(rate_per_s=2.0, burst=1) as slack:
        if mode == "token":
            target = f'token = "{TOKEN}"\nchannel = "{CHANNEL}"\napi_url = "{slack.api_url}"'
        else:
            target = f'webhook_url = "{slack.add_webhook(CHANNEL)}"'
        table = f'type = "slack"\n{target}\nrate_per_s = 2.0\nburst = 1\ndigest_after = 0\n'
        channels = f"[channels.vip]\n{table}\n[channels.rest]\n{table}"
        routes = (
            '[[routes]]\nname = "vip"\nrooms = ["vip-*"]\nchannels = ["vip"]\n'
            '[[routes]]\nname = "rest"\nchannels = ["rest"]\n'
        )
        with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
            for n in range(4):
                for room in (f"vip-{n}", f"room-{n}"):
                    assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
            assert slack.wait_for(lambda s: len(s.posted) == 8, timeout=15)
    assert slack.rejected_429 == 0
    assert {p.channel for p in slack.posted} == {CHANNEL}


def test_permanent_error_is_not_retried(tmp_path: Path, slack: SlackStandIn) -> None:
    channels = (
        f'[channels.bot]\ntype = "slack"\ntoken = "{TOKEN}"\nchannel = "CNOWHERE"\n'
        f'api_url = "{slack.api_url}"\n'
    )
    routes = '[[routes]]\nname = "all"\nchannels = ["bot"]\n'
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        assert post_callback(bridge.url) == (200, OK_PACKET)
        db = bridge.config.store.path
        assert wait_until(lambda: deliveries(db)[0][1] == "dead")
        time.sleep(0.5)
    assert slack.requests_seen == 1
    assert deliveries(db) == [("bot", "dead", 1, "HTTP 200: channel_not_found")]


def test_transient_failures_retry_until_dead_letter(tmp_path: Path, slack: SlackStandIn) -> None:
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    slack.set_sink_status("sink", 503)
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as bridge:
        assert post_callback(bridge.url) == (200, OK_PACKET)
        db = bridge.config.store.path
        assert wait_until(lambda: deliveries(db)[0][1] == "dead")
    assert len(slack.sink_requests) == 3  # max_attempts
    assert deliveries(db) == [("sink", "dead", 3, "gave up after 3 attempts: HTTP 503")]


def test_acknowledged_events_survive_kill_9(tmp_path: Path, slack: SlackStandIn) -> None:
    port = free_port()
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    # Nothing gets through before the kill: every acknowledged event is still pending.
    slack.set_sink_status("sink", 503)
    config = write_config(
        tmp_path, port, channels=channels, routes=routes,
        delivery="initial_backoff_s = 5.0\nmax_backoff_s = 5.0\nmax_attempts = 10\n",
    )  # fmt: skip
    bridge = Subprocess(config, port, tmp_path / "bridge.log")
    rooms = [f"room-{n}" for n in range(20)]
    with bridge:
        for room in rooms:
            assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
        bridge.kill()
    slack.set_sink_status("sink", 200)
    with Subprocess(config, port, tmp_path / "bridge.log") as again:
        assert get(again.url + "/readyz")[0] == 200
        assert slack.wait_for(
            lambda s: {json.loads(r.body)["event"]["RoomId"] for r in s.sink_requests
                       if r.body and b"RoomId" in r.body} >= set(rooms),
            timeout=30,
        )  # fmt: skip


def test_bad_template_stops_start_up_naming_route(tmp_path: Path) -> None:
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / "Live.CallbackAfterChangeOwner.j2").write_text(
        "line one {{ event.RoomId }}\n{{ event.NoSuchField }}\n"
    )
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace(f'dir = "{Path(__file__).parent.parent}/templates"',
                                             'dir = "."'))  # fmt: skip
    from bridge.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        InThread(path)
    message = str(caught.value)
    assert "route 'all', channel 'console', Live.CallbackAfterChangeOwner" in message
    assert "Live.CallbackAfterChangeOwner.j2, line 2" in message


def test_kill_9_during_sends_loses_nothing(tmp_path: Path, slack: SlackStandIn) -> None:
    port = free_port()
    secret = signing_secret()
    channels, routes = signed_sink(slack.sink_url(), secret), SINK_ROUTE
    slack.set_sink_delay("sink", 0.3)  # sends are in flight when the kill comes
    config = write_config(tmp_path, port, channels=channels, routes=routes)
    rooms = [f"room-{n}" for n in range(40)]
    with Subprocess(config, port, tmp_path / "bridge.log") as bridge:
        for room in rooms:
            assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) >= 8)
        bridge.kill()
    in_flight = {  # claimed and not yet recorded at the kill: the only ones that may repeat
        row[0] for row in db_rows(
            tmp_path / "bridge.db",
            "SELECT e.room_id FROM deliveries d JOIN events e ON e.id = d.event_id"
            " WHERE d.state = 'in_flight'",
        )
    }  # fmt: skip
    before = len(slack.sink_requests)
    assert before < len(rooms)  # the kill came mid-way
    slack.set_sink_delay("sink", 0.0)
    with Subprocess(config, port, tmp_path / "bridge.log"):

        def rooms_seen(s: SlackStandIn) -> list[str]:
            return [json.loads(r.body)["event"]["RoomId"] for r in s.sink_requests]

        assert slack.wait_for(lambda s: set(rooms_seen(s)) == set(rooms), timeout=30)
        db = tmp_path / "bridge.db"
        assert wait_until(lambda: {d[1] for d in deliveries(db)} == {"delivered"})
    seen = rooms_seen(slack)
    repeated = {room for room in seen if seen.count(room) > 1}
    assert repeated <= in_flight
    ids_by_room: dict[str, set[str]] = {}
    for request in slack.sink_requests:
        room = json.loads(request.body)["event"]["RoomId"]
        ids_by_room.setdefault(room, set()).add(request.headers["webhook-id"])
        Webhook(secret).verify(request.body, request.headers)
    assert all(len(ids) == 1 for ids in ids_by_room.values())  # a repeat can be recognised
    assert len({i for ids in ids_by_room.values() for i in ids}) == len(rooms)


def test_readyz_asked_at_once_pings_the_store_once(tmp_path: Path) -> None:
    # /readyz is open to anyone, and a ping is a committed write: a flood of probes must not
    # become a flood of writes beside the callbacks' own.
    with InThread(write_config(tmp_path)) as running:
        store = running.app.bridge.store
        real_ping, pings = store.ping, []

        async def slow_ping() -> None:
            pings.append(time.monotonic())
            await asyncio.sleep(0.5)
            await real_ping()

        store.ping = slow_ping  # type: ignore[method-assign]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: get(running.url + "/readyz"), range(20)))
    assert answers == [(200, {"status": "ready"})] * 20
    assert len(pings) <= 3, f"{len(pings)} pings for 20 probes at once"


@pytest.mark.parametrize("own_process", [False, True], ids=["one process", "delivery process"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "sends in flight"])
def test_a_stop_waits_for_a_database_that_hangs_only_so_long(
    tmp_path: Path, postgres_url: str, slack: SlackStandIn, own_process: bool, in_flight: bool
) -> None:
    # The worker's last outcomes, the withdrawal of the replica's channels and closing the pool
    # each waited on connections that no longer answered: 20 to 30 s past the grace period,
    # over 40 s with sends in flight at the stop (their outcomes, cut short at the grace).
    server = urlsplit(postgres_url)
    slack.set_sink_delay("sink", 4.0)
    with PgProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        proxied = server._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
        delivery = DELIVERY + "shutdown_grace_s = 1\n" + ("own_process = true\n" * own_process)
        port = free_port()
        config = write_config(
            tmp_path, port, store=f'url = "{proxied}"\n', delivery=delivery,
            channels=f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url("sink")}"\n',
            routes=SINK_ROUTE,
        )  # fmt: skip
        with Subprocess(config, port, tmp_path / "bridge.log") as bridge:
            for room in ("a", "b", "c") if in_flight else ():
                assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
            assert wait_until(lambda: slack.sink_max_concurrent.get("sink", 0) == 3 * in_flight)
            proxy.freeze()
            assert bridge.process is not None
            stopping = time.monotonic()
            bridge.process.terminate()
            bridge.process.wait(timeout=60)
            took = time.monotonic() - stopping
    # The grace, the store's last work (the delivery process's, then the server's), a margin.
    assert took < 1 + STORE_STOP_S * (1 + own_process) + 2.0, took
    assert "live-bridge stopped" in (tmp_path / "bridge.log").read_text()
