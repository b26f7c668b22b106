from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.receive import QUIET_S, Quiet, dedup_key
from bridge.verify import sign
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    OWNER,
    ROOT,
    SEED_BODY,
    InThread,
    get,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn

TOKEN = "xxxxyyyy"


@pytest.fixture
def bridge(tmp_path: Path, slack: SlackStandIn) -> Iterator[InThread]:
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    with InThread(write_config(tmp_path, channels=channels, routes=routes)) as running:
        yield running


@pytest.fixture
def signed(tmp_path: Path, slack: SlackStandIn) -> Iterator[InThread]:
    path = write_config(tmp_path, tencent=f'callback_token = "{TOKEN}"')
    with InThread(path) as running:
        yield running


def events(running: InThread) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(running.config.store.path)
    try:
        return conn.execute("SELECT command, room_id, body, query FROM events").fetchall()
    finally:
        conn.close()


def fail_packet(reply: bytes, status: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(reply)
    assert set(data) == {"ActionStatus", "ErrorInfo", "ErrorCode"}
    assert data["ActionStatus"] == "FAIL" and data["ErrorCode"] == status
    assert 0 < len(data["ErrorInfo"]) <= 100
    return data


def test_seed_request_gets_the_exact_ok_packet(bridge: InThread, slack: SlackStandIn) -> None:
    status, reply = post_callback(bridge.url)
    assert (status, reply) == (200, OK_PACKET)
    (command, room, body, query), = events(bridge)  # fmt: skip
    assert (command, room, body) == (OWNER, "room_id", SEED_BODY.decode())
    assert json.loads(query)["contenttype"] == "json"
    assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    delivered = json.loads(slack.sink_requests[0].body)
    assert delivered["type"] == OWNER and delivered["event"] == json.loads(SEED_BODY)


def test_query_keys_any_case_and_both_names(bridge: InThread) -> None:
    query = f"sdkappid={APP_ID}&WebhookCommand={OWNER}&CONTENTTYPE=json"
    assert post_callback(bridge.url, query=query) == (200, OK_PACKET)
    assert (
        post_callback(bridge.url, SEED_BODY.replace(b"user2", b"u3"), query=f"SdkAppId={APP_ID}")[0]
        == 200
    )
    assert len(events(bridge)) == 2


def test_a_blank_query_value_is_kept_and_counts_as_the_first(bridge: InThread) -> None:
    # Query keys: first occurrence wins, a blank one too; templates see blank values as sent.
    assert post_callback(bridge.url, query=f"SdkAppid=&SdkAppid={APP_ID}")[0] == 403
    assert post_callback(bridge.url, query=f"SdkAppid={APP_ID}&OptPlatform=") == (200, OK_PACKET)
    assert json.loads(events(bridge)[0][3]) == {"sdkappid": str(APP_ID), "optplatform": ""}


def test_body_command_wins_over_query(bridge: InThread, caplog: pytest.LogCaptureFixture) -> None:
    query = {"SdkAppid": str(APP_ID), "CallbackCommand": "Live.CallbackAfterChangeOwner"}
    body = b'{"CallbackCommand":"Live.CallbackAfterMemberStateChanged","RoomId":"r"}'
    with caplog.at_level(logging.INFO, logger="bridge.receive"):
        assert post_callback(bridge.url) == (200, OK_PACKET)  # the query agrees: nothing to say
        assert caplog.messages == []
        for n in range(3):
            assert post_callback(bridge.url, body.replace(b'"r"', b'"r%d"' % n), query)[0] == 200
    assert caplog.messages == [  # once: a sender that does it does it every time
        "query says Live.CallbackAfterChangeOwner, "
        "body says Live.CallbackAfterMemberStateChanged: using the body (logged once)"
    ]
    assert events(bridge)[1][0] == "Live.CallbackAfterMemberStateChanged"


def test_tencents_own_url_name_for_member_changes_is_no_mismatch(
    bridge: InThread, caplog: pytest.LogCaptureFixture
) -> None:
    # Tencent's page names it Live.CallbackMemberStateChanged in the URL, ...After... in the body.
    query = {"SdkAppid": str(APP_ID), "CallbackCommand": "Live.CallbackMemberStateChanged"}
    body = b'{"CallbackCommand":"Live.CallbackAfterMemberStateChanged","RoomId":"r"}'
    with caplog.at_level(logging.INFO, logger="bridge.receive"):
        assert post_callback(bridge.url, body, query) == (200, OK_PACKET)
    assert caplog.messages == []


def test_a_refusal_is_counted_under_the_command_the_query_names(bridge: InThread) -> None:
    query = {"SdkAppid": str(APP_ID), "CallbackCommand": "Live.CallbackMemberStateChanged"}
    assert post_callback(bridge.url, b"{not json", query)[0] == 400
    labels = (("command", "Live.CallbackAfterMemberStateChanged"), ("result", "refused_400"))
    assert samples(bridge.url)["live_bridge_callbacks_total", labels] == 1


@pytest.mark.parametrize(
    "body",
    [
        SEED_BODY.replace(b'"room_id"', b'{"a":1}'),
        SEED_BODY.replace(b"1703589922780", b'"later"'),
        b'{"CallbackCommand":"Live.CallbackAfterStartBattle","RoomId":"r","FromRoomInfo":"r",'
        b'"Duration":1.5,"EventTime":1703589922780}',
    ],
)
def test_a_field_not_as_documented_is_acknowledged_stored_and_delivered(
    bridge: InThread, slack: SlackStandIn, body: bytes
) -> None:
    # Tencent's tables and samples disagree on types, and an "after" callback refused is lost.
    assert post_callback(bridge.url, body) == (200, OK_PACKET)
    ((_, _, stored, _),) = events(bridge)
    assert stored == body.decode()
    assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    assert json.loads(slack.sink_requests[0].body)["event"] == json.loads(body)


@pytest.mark.parametrize(
    ("query", "body", "status"),
    [
        (f"SdkAppid=1&CallbackCommand={OWNER}", SEED_BODY, 403),
        (f"CallbackCommand={OWNER}", SEED_BODY, 403),
        (f"SdkAppid={APP_ID}x", SEED_BODY, 403),
        (f"SdkAppid={APP_ID}", b"", 400),
        (f"SdkAppid={APP_ID}", b"{not json", 400),
        (f"SdkAppid={APP_ID}", b"[]", 400),
        (f"SdkAppid={APP_ID}", b'{"RoomId":"r"}', 400),
        (f"SdkAppid={APP_ID}", b'{"CallbackCommand":7}', 400),
        (f"SdkAppid={APP_ID}", b"\xff" + SEED_BODY, 400),
        (f"SdkAppid={APP_ID}", b'{"CallbackCommand":"x","p":"' + b"a" * 262144 + b'"}', 413),
    ],
)
def test_refusals_are_fail_packets_and_store_nothing(
    bridge: InThread, query: str, body: bytes, status: int
) -> None:
    got, reply = post_callback(bridge.url, body, query)
    assert got == status
    fail_packet(reply, status)
    assert events(bridge) == []


def test_a_refusal_and_an_unexpected_error_are_logged(
    bridge: InThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with caplog.at_level(logging.INFO, logger="bridge.receive"):
        assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403
        assert caplog.messages == ["refused callback: HTTP 403 unknown SdkAppid"]
        assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403  # within the minute
        assert len(caplog.messages) == 1

        def broken(event: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(bridge.app.state.bridge.receiver.router, "route_event", broken)
        status, reply = post_callback(bridge.url)
    assert status == 500 and fail_packet(reply, 500)["ErrorInfo"] == "internal error"
    assert caplog.records[-1].getMessage() == "callback failed"
    assert caplog.records[-1].exc_info is not None  # the traceback, for whoever fixes the bug


def test_refusals_by_the_thousand_make_a_line_a_minute_each_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Anyone can be refused: 2,000 refused callbacks made 2,001 lines and filled the log queue.
    clock = [1000.0]
    monkeypatch.setattr("bridge.receive.time.monotonic", lambda: clock[0])
    quiet = Quiet()
    said = [quiet.unsaid("HTTP 403") for _ in range(2000)]
    assert said[0] == "" and said[1:] == [None] * 1999
    assert quiet.unsaid("HTTP 401") == ""  # another kind has its own minute
    clock[0] += QUIET_S
    assert quiet.unsaid("HTTP 403") == " (1999 more since the last line, not logged)"
    assert quiet.unsaid("HTTP 403") is None


def test_a_reload_after_callbacks_waits_for_none_of_them(
    bridge: InThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The receiver counts the callbacks it is handling; a reload waits for the old one's.
    assert post_callback(bridge.url) == (200, OK_PACKET)
    assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403
    with caplog.at_level(logging.INFO, logger="bridge.app"):
        status, _, body = http_request(bridge.url + "/-/reload", "POST", data=b"")
    assert status == 200, body
    assert not [m for m in caplog.messages if "unfinished" in m]


def read_reply(conn: socket.socket) -> bytes:
    """Bytes until the reply packet's closing brace, or until the server closes."""
    reply = b""
    while b"}" not in reply.partition(b"\r\n\r\n")[2]:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        reply += data
    return reply


def test_oversized_chunked_body_is_refused_without_reading_it(bridge: InThread) -> None:
    host, port = bridge.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /tencent/callback?SdkAppid={APP_ID} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"a" * 65536
        try:
            for _ in range(10):  # 640 KiB offered, far past max_body_bytes
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server may close on us once it has answered
        reply = read_reply(conn)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    fail_packet(body[: body.index(b"}") + 1], 413)
    assert events(bridge) == []


def test_a_client_gone_before_its_body_arrived_is_no_error(
    bridge: InThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A hang-up mid-body is the client's doing: one info line and the result `disconnected`,
    not an ERROR with a traceback (anyone could fill the log with them) counted as `error`."""
    host, port = bridge.url.removeprefix("http://").split(":")
    caplog.set_level(logging.INFO)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            f"POST /tencent/callback?SdkAppid={APP_ID} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        time.sleep(0.2)  # the receiver is reading the body
    key = ("live_bridge_callbacks_total", (("command", "other"), ("result", "disconnected")))
    assert wait_until(lambda: samples(bridge.url).get(key) == 1.0)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "client went away before its body arrived" in caplog.text
    assert events(bridge) == []


def body_of(size: int, owner: bytes) -> bytes:
    """SEED_BODY with the new owner `owner` (5 bytes), padded with JSON's spaces to `size`."""
    body = SEED_BODY.replace(b"user2", owner)
    return body[:-1] + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_max_body_bytes_is_taken_and_one_byte_more_is_not(
    bridge: InThread, chunked: bool
) -> None:
    limit = 262_144  # [server] max_body_bytes's default
    for size, owner, status in ((limit, b"user3", 200), (limit + 1, b"user4", 413)):
        body = body_of(size, owner)
        if chunked:  # read as it streams in: no Content-Length to judge by
            host, port = bridge.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(
                    f"POST /tencent/callback?SdkAppid={APP_ID}&CallbackCommand={OWNER} HTTP/1.1"
                    "\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                )
                half = len(body) // 2
                with contextlib.suppress(OSError):  # answered and closed before the rest
                    for part in (body[:half], body[half:], b""):
                        conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                head = read_reply(conn).split(b"\r\n", 1)[0]
            assert head.startswith(b"HTTP/1.1 %d" % status), (size, head)
        else:
            assert post_callback(bridge.url, body)[0] == status, size
    assert len(events(bridge)) == 1


def test_content_length_over_the_limit_is_refused_at_once(bridge: InThread) -> None:
    host, port = bridge.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /tencent/callback?SdkAppid={APP_ID} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 999999999\r\n\r\n{".encode()
        )
        reply = read_reply(conn)
    assert reply.startswith(b"HTTP/1.1 413")


def test_sign_required_and_checked(signed: InThread) -> None:
    now = str(int(time.time()))
    good = f"SdkAppid={APP_ID}&RequestTime={now}&Sign={sign(TOKEN, now)}"
    assert post_callback(signed.url, query=good) == (200, OK_PACKET)
    stale = str(int(time.time()) - 120)
    for query in (
        f"SdkAppid={APP_ID}",
        f"SdkAppid={APP_ID}&RequestTime={now}&Sign={'0' * 64}",
        f"SdkAppid={APP_ID}&RequestTime={stale}&Sign={sign(TOKEN, stale)}",
    ):
        status, reply = post_callback(signed.url, query=query)
        assert status == 401
        assert TOKEN not in fail_packet(reply, 401)["ErrorInfo"]
    assert len(events(signed)) == 1
    # The Sign never lands in the store.
    assert "sign" not in json.loads(events(signed)[0][3])


def test_each_app_is_signed_with_its_own_token(tmp_path: Path) -> None:
    # Tencent keeps a token per app: a staging and a production app on one bridge each sign
    # with theirs, and one app's token does not sign the other's callbacks.
    path = write_config(tmp_path, tencent=f'callback_tokens = {{ {APP_ID + 1} = "other" }}')
    path.write_text(
        path.read_text().replace(
            f"sdk_app_id = {APP_ID}\n",
            f'sdk_app_id = [{APP_ID}, {APP_ID + 1}]\ncallback_token = "{TOKEN}"\n',
        )
    )
    now = str(int(time.time()))
    with InThread(path) as running:
        for app, token, status in [
            (APP_ID, TOKEN, 200), (APP_ID + 1, "other", 200),
            (APP_ID, "other", 401), (APP_ID + 1, TOKEN, 401),
        ]:  # fmt: skip
            query = f"SdkAppid={app}&RequestTime={now}&Sign={sign(token, now)}"
            body = SEED_BODY.replace(b"user2", f"{app}-{token}".encode())
            assert post_callback(running.url, body, query)[0] == status
        assert len(events(running)) == 2


def test_duplicate_within_window_acknowledged_and_stored_once(
    bridge: InThread, slack: SlackStandIn
) -> None:
    assert post_callback(bridge.url) == (200, OK_PACKET)
    assert post_callback(bridge.url) == (200, OK_PACKET)
    assert post_callback(bridge.url, SEED_BODY.replace(b"user2", b"user3"))[0] == 200
    assert len(events(bridge)) == 2
    assert slack.wait_for(lambda s: len(s.sink_requests) == 2)
    time.sleep(0.2)
    assert len(slack.sink_requests) == 2


def test_the_same_bytes_from_two_apps_are_two_events(tmp_path: Path, slack: SlackStandIn) -> None:
    # Tencent calls each app's URL for its own events: the same bytes from another app are
    # another event, not a retry. The second app's was answered OK and dropped as a duplicate.
    channels = f'[channels.sink]\ntype = "webhook"\nurl = "{slack.sink_url()}"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["sink"]\n'
    path = write_config(tmp_path, channels=channels, routes=routes)
    path.write_text(
        path.read_text().replace(f"sdk_app_id = {APP_ID}", f"sdk_app_id = [{APP_ID}, {APP_ID + 1}]")
    )
    with InThread(path) as running:
        for app in (APP_ID, APP_ID + 1, APP_ID):  # the last: a retry of the first
            query = {"SdkAppid": str(app), "CallbackCommand": OWNER}
            assert post_callback(running.url, SEED_BODY, query) == (200, OK_PACKET)
        assert len(events(running)) == 2
        assert slack.wait_for(lambda s: len(s.sink_requests) == 2)
    assert sorted(json.loads(r.body)["sdk_app_id"] for r in slack.sink_requests) == [
        APP_ID,
        APP_ID + 1,
    ]


def test_before_callbacks_the_same_byte_for_byte_are_each_stored(bridge: InThread) -> None:
    # Tencent's own gift sample: no EventTime, a Time in seconds. The same gift sent twice in
    # one second is two gifts, not a retry.
    gift = (
        b'{"CallbackCommand":"Live.CallbackBeforeSendGift","Operator_Account":"brennanli",'
        b'"RoomId":"room_id","GiftWater":{"From_Account":"from","To_Account":["to1"],'
        b'"Time":1703589922,"GiftId":"gift1","Count":1,"Coins":1000}}'
    )
    query = {"SdkAppid": str(APP_ID), "CallbackCommand": "Live.CallbackBeforeSendGift"}
    assert post_callback(bridge.url, gift, query) == (200, OK_PACKET)
    assert post_callback(bridge.url, gift, query) == (200, OK_PACKET)
    assert len(events(bridge)) == 2


def test_big_integer_accounts_arrive_with_every_digit(
    bridge: InThread, slack: SlackStandIn
) -> None:
    body = SEED_BODY.replace(b'"admin"', b"144115233775727695")
    assert post_callback(bridge.url, body) == (200, OK_PACKET)
    assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    assert b'"Operator_Account":144115233775727695' in slack.sink_requests[0].body


def test_in_one_process_the_message_is_rendered_at_receipt(
    bridge: InThread, slack: SlackStandIn
) -> None:
    # With a delivery process the payload is left for it to render (test_deliver.py); here the
    # stored payload is what the sink gets, rendered before the acknowledgement.
    assert post_callback(bridge.url) == (200, OK_PACKET)
    assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    conn = sqlite3.connect(bridge.config.store.path)
    try:
        ((payload,),) = conn.execute("SELECT payload FROM deliveries").fetchall()
    finally:
        conn.close()
    assert payload is not None
    assert json.loads(payload) == json.loads(slack.sink_requests[0].body)


def test_unrouted_event_is_acknowledged_and_counted(tmp_path: Path) -> None:
    routes = '[[routes]]\nname = "vip"\nrooms = ["vip-*"]\nchannels = ["console"]\n'
    with InThread(write_config(tmp_path, routes=routes)) as running:
        assert post_callback(running.url) == (200, OK_PACKET)
        registry = running.app.state.bridge.metrics.registry
        labels = {"command": OWNER, "result": "unrouted"}
        assert registry.get_sample_value("live_bridge_callbacks_total", labels) == 1
        assert len(events(running)) == 1


def test_store_that_cannot_write_answers_503_then_recovers(
    bridge: InThread, caplog: pytest.LogCaptureFixture
) -> None:
    store = bridge.app.state.bridge.store

    def full(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    bridge.run(store._submit(full))
    big = SEED_BODY.replace(b"user1", b"u" * 100000)
    with caplog.at_level(logging.INFO, logger="bridge.receive"):
        status, reply = post_callback(bridge.url, big)
        assert status == 503
        fail_packet(reply, 503)
        assert post_callback(bridge.url, big)[0] == 503
        assert get(bridge.url + "/readyz")[0] in (200, 503)
        bridge.app.state.bridge.receiver._unstored = 998  # as if 996 more had been refused
        assert post_callback(bridge.url, big)[0] == 503  # the 999th: no line
        assert post_callback(bridge.url, big)[0] == 503  # the 1000th: a line
        bridge.run(store._submit(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823")))
        assert post_callback(bridge.url, big) == (200, OK_PACKET)
    # One line when the outage starts, then one per 1000 refusals, one when it ends.
    assert [m.split(":")[0] for m in caplog.messages] == [
        "cannot store callbacks (1 refused with 503 so far)",
        "cannot store callbacks (1000 refused with 503 so far)",
        "store available again",
    ]
    assert "1000 callbacks were refused" in caplog.messages[-1]


def test_health_and_other_paths_answer_packets(bridge: InThread) -> None:
    assert get(bridge.url + "/healthz") == (200, {"status": "ok"})
    assert get(bridge.url + "/readyz") == (200, {"status": "ready"})
    for path in ("/tencent/callback", "/tencent/callback/"):
        status, reply = get(bridge.url + path)
        assert status == 405 and reply["ActionStatus"] == "FAIL", path
        status, headers, _ = http_request(bridge.url + path, "PUT")
        assert status == 405 and headers["allow"] == "POST", path  # as HTTP requires
    assert get(bridge.url + "/nowhere")[1]["ErrorCode"] == 404


def test_a_trailing_slash_reaches_the_receiver_and_nothing_redirects(bridge: InThread) -> None:
    assert post_callback(bridge.url, path="/tencent/callback/") == (200, OK_PACKET)
    assert len(events(bridge)) == 1
    status, headers, body = http_request(bridge.url + "/healthz/")
    assert status == 404 and "location" not in headers
    fail_packet(body, 404)
    status, headers, body = http_request(bridge.url + "/tencent/callback//", "POST", data=SEED_BODY)
    assert status == 404 and "location" not in headers


def test_content_type_is_not_required_nor_trusted(bridge: InThread) -> None:
    assert post_callback(bridge.url, headers={"Content-Type": "text/plain"}) == (200, OK_PACKET)
    assert wait_until(lambda: len(events(bridge)) == 1)


def test_dedup_key_is_app_command_and_bytes() -> None:
    at = 1703589922780
    key = dedup_key(OWNER, APP_ID, SEED_BODY, at)
    assert key == dedup_key(OWNER, APP_ID, SEED_BODY, at)
    assert key != dedup_key("Live.CallbackAfterCreateRoom", APP_ID, SEED_BODY, at)
    assert key != dedup_key(OWNER, APP_ID, SEED_BODY + b" ", at)
    assert key != dedup_key(OWNER, APP_ID + 1, SEED_BODY, at)  # another app's: another event


@pytest.mark.parametrize(
    ("event_time", "prefix"),
    [
        (1703589922780, "0000018ca5df47dc"),
        (0, "0000000000000000"),
        (2**63 - 1, "7fffffffffffffff"),  # the largest EventTime the model accepts
        (-1, "ffffffffffffffff"),  # two's complement, as SQLite's printf('%016x') writes it
        (-(2**63), "8000000000000000"),
        (None, ""),  # some of Tencent's samples have no EventTime
    ],
)
def test_dedup_key_leads_with_the_event_time(event_time: int | None, prefix: str) -> None:
    digest = hashlib.sha256(f"{OWNER}\0{APP_ID}\0".encode() + SEED_BODY).hexdigest()
    assert dedup_key(OWNER, APP_ID, SEED_BODY, event_time) == f"{prefix}:{digest}"


def test_dedup_keys_sort_in_event_time_order() -> None:
    # What keeps each commit's dedup writes on the last pages of the index.
    times = [1703589922780 + step for step in (0, 1, 999, 10**6, 10**9)]
    keys = [dedup_key(OWNER, APP_ID, b"%d" % n, at) for n, at in enumerate(times)]
    assert keys == sorted(keys)


def test_a_delivery_dead_at_receipt_is_counted_and_shown(tmp_path: Path) -> None:
    # Its template failed for this event only (start-up's check passed): stored dead, and the
    # metrics and the status page said nothing of it, unlike a send's dead letter.
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / "default.j2").write_text("{{ 1 // (room_id != 'boom') }}")
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace(f'dir = "{ROOT / "templates"}"', f'dir = "{tmp_path}"')
    )
    with InThread(path) as running:
        body = SEED_BODY.replace(b'"room_id"', b'"boom"')
        query = {"SdkAppid": str(APP_ID), "CallbackCommand": OWNER}
        assert post_callback(running.url, body.replace(b"ChangeOwner", b"Other"), query)[0] == 200
        labels = (("channel", "console"), ("outcome", "dead"))
        assert wait_until(
            lambda: samples(running.url).get(("live_bridge_deliveries_total", labels)) == 1
        )
        page = http_request(running.url + "/status")[2].decode()
        assert "render failed" in page and "ZeroDivisionError" in page
