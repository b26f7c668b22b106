from __future__ import annotations

import base64
import re
import shutil
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bridge.channels import DELIVERED, Outcome, Result
from bridge.channels.webhook import WebhookSender, message_id
from bridge.config_channels import WebhookChannel
from bridge.store.sqlite import SQLiteStore
from tests.bridge_server import signing_secret
from tests.farend import ANSWERS, far_end, fixed, self_signed, with_status
from tests.slack_standin import SlackStandIn
from tests.store_rows import add
from tests.test_channels_slack import serving

pytestmark = pytest.mark.anyio

PAYLOAD = '{"event":"room created","room":"r1","owner":"Zoë"}'
QUERY_TOKEN = "s3cr3tQueryToken"
HEADER_SECRET = "Bearer s3cr3tHeaderValue"


def channel(url: str, signing_secret: str | None = None) -> WebhookChannel:
    return WebhookChannel(
        type="webhook",
        url=SecretStr(url),
        headers={"Authorization": SecretStr(HEADER_SECRET), "X-Team": SecretStr("live-ops")},
        signing_secret=None if signing_secret is None else SecretStr(signing_secret),
    )


async def send(
    settings: WebhookChannel, session: aiohttp.ClientSession, message_key: str = "1@1.5",
    name: str = "hooks", timeout_s: float = 2,
) -> Outcome:  # fmt: skip
    sender = WebhookSender(name, settings, session, timeout_s, "store")
    outcome = await sender.send(PAYLOAD, message_key)
    # The shared check every case passes: no configured secret in what is logged and stored.
    secrets = [settings.url.get_secret_value(), QUERY_TOKEN, HEADER_SECRET, "s3cr3t"]
    if settings.signing_secret is not None:
        secrets.append(settings.signing_secret.get_secret_value())
    assert not [s for s in secrets if s in outcome.error]
    assert "://" not in outcome.error
    return outcome


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_delivered_with_configured_headers(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    url = slack.sink_url("hooks") + f"?token={QUERY_TOKEN}"
    assert await send(channel(url), session) == DELIVERED
    (request,) = slack.sink_requests
    assert request.path == "/sink/hooks"
    assert request.body == PAYLOAD.encode()
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == HEADER_SECRET
    assert request.headers["x-team"] == "live-ops"
    # Unsigned, and still the id and time a receiver drops a repeat by.
    assert sorted(h for h in request.headers if h.startswith("webhook-")) == [
        "webhook-id", "webhook-timestamp",
    ]  # fmt: skip


async def test_configured_standard_webhooks_headers_are_left_out(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    # In any case of letters; unsigned, a configured signature would be sent as it is: forged.
    headers = {
        "Webhook-Id": SecretStr("mine"), "WEBHOOK-TIMESTAMP": SecretStr("1"),
        "Webhook-Signature": SecretStr("v1,forged"),
    }  # fmt: skip
    settings = channel(slack.sink_url()).model_copy(update={"headers": headers})
    assert await send(settings, session) == DELIVERED
    (request,) = slack.sink_requests
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["webhook-timestamp"] != "1"
    assert "webhook-signature" not in request.headers


def test_a_message_id_is_the_stores_channels_and_messages() -> None:
    # Each part on its own makes another id: another database hands out the same delivery ids
    # (and may receive at the same moment), another channel of one store sends the same event.
    ids = {
        message_id("store-a", "hooks", "1@1.0"), message_id("store-b", "hooks", "1@1.0"),
        message_id("store-a", "audit", "1@1.0"), message_id("store-a", "hooks", "2@1.0"),
    }  # fmt: skip
    assert len(ids) == 4 and all(re.fullmatch(r"msg_[0-9a-f]{24}", i) for i in ids)
    assert message_id("store-a", "hooks", "1@1.0") == message_id("store-a", "hooks", "1@1.0")


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        ("ops:pa%20ss", b"ops:pa ss"),
        ("ops:p%C3%A4ss", "ops:päss".encode("latin-1")),  # as aiohttp always sent it
        ("ops:p%C3%A4%E5%AF%86", "ops:pä密".encode()),  # no Latin-1 for it: UTF-8 (RFC 7617)
        ("ops", b"ops:"),
        ("%E5%AF%86", "密:".encode()),  # a login alone, outside Latin-1 too
    ],
)
async def test_credentials_in_the_url_are_basic_authentication(
    slack: SlackStandIn, session: aiohttp.ClientSession, credentials: str, expected: bytes
) -> None:
    # A password outside Latin-1 made aiohttp raise at every send, naming one of its characters.
    url = slack.sink_url("hooks").replace("://", f"://{credentials}@")
    settings = WebhookChannel(type="webhook", url=SecretStr(url))
    assert await send(settings, session) == DELIVERED
    (request,) = slack.sink_requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(expected).decode()


async def test_signed_request_verifies_with_standard_webhooks(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    secret = signing_secret()
    assert await send(channel(slack.sink_url(), secret), session) == DELIVERED
    (request,) = slack.sink_requests
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= request.headers.keys()
    assert Webhook(secret).verify(request.body, request.headers) == {
        "event": "room created", "room": "r1", "owner": "Zoë",
    }  # fmt: skip
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body.replace(b"r1", b"r2"), request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing_secret()).verify(request.body, request.headers)


async def test_webhook_id_is_stable_per_delivery(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    settings = channel(slack.sink_url(), signing_secret())
    for key, name in [
        ("7@1.5", "hooks"),
        ("7@1.5", "hooks"),
        ("8@1.5", "hooks"),
        ("7@1.5", "other"),
    ]:
        assert await send(settings, session, key, name) == DELIVERED
    first, again, next_delivery, other_channel = (
        r.headers["webhook-id"] for r in slack.sink_requests
    )
    assert first == again
    assert len({first, next_delivery, other_channel}) == 3
    # The same form in every version: a receiver's record of ids outlives an upgrade.
    assert re.fullmatch("msg_[0-9a-f]{24}", first)


async def test_webhook_id_is_not_reused_by_another_store(
    slack: SlackStandIn, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A database replaced (or a second bridge with its own, or a move to PostgreSQL) hands out
    # delivery ids from 1 again: a receiver dropping repeats by webhook-id would drop its
    # messages as repeats of the old one's.
    settings = channel(slack.sink_url(), signing_secret())

    async def send_first(name: str, record: bool) -> None:
        store = SQLiteStore(tmp_path / name)
        await store.open()
        try:
            if record:
                await add(store, name, channel="hooks")
            else:  # a restart: what was in flight is sent again
                await store.recover()
            (row,) = await store.claim("hooks", time.time(), 1, 60)
            sender = WebhookSender("hooks", settings, session, 2, store.identity)
            assert await sender.send(PAYLOAD, row.message_key) == DELIVERED
        finally:
            await store.close()

    await send_first("old.db", record=True)
    await send_first("new.db", record=True)
    await send_first("old.db", record=False)  # the old store again, after a restart
    old, new, old_again = (r.headers["webhook-id"] for r in slack.sink_requests)
    assert old != new
    assert old == old_again


async def test_webhook_id_is_not_reused_by_a_restored_copy(
    slack: SlackStandIn, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A copy holds the store's identity and the ids handed out until it was made: restored, it
    # hands out the later ones again, to other events. A receiver dropping repeats by
    # webhook-id dropped those events.
    settings = channel(slack.sink_url(), signing_secret())
    path = tmp_path / "bridge.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    shutil.copy(path, tmp_path / "copy.db")
    sent = []
    for key in ("before the restore", "after the restore"):
        store = SQLiteStore(path)
        await store.open()
        try:
            await add(store, key, channel="hooks")
            (row,) = await store.claim("hooks", time.time(), 1, 60)
            sender = WebhookSender("hooks", settings, session, 2, store.identity)
            assert await sender.send(PAYLOAD, row.message_key) == DELIVERED
            sent.append(row.id)
        finally:
            await store.close()
        shutil.copy(tmp_path / "copy.db", path)
        for wal in (tmp_path / "bridge.db-wal", tmp_path / "bridge.db-shm"):
            wal.unlink(missing_ok=True)
    assert sent[0] == sent[1]  # the same delivery id, for another event
    first, second = (r.headers["webhook-id"] for r in slack.sink_requests)
    assert first != second


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *[(status, DELIVERED) for status in (200, 201, 202, 204, 299)],
        *[
            (status, Outcome(Result.RETRY, f"HTTP {status}"))
            for status in (408, 500, 502, 503, 504)
        ],
        (429, Outcome(Result.RETRY, "HTTP 429", None, True)),  # how long: the lane's to say
        *[
            (status, Outcome(Result.PERMANENT, f"HTTP {status}"))
            for status in (301, 307, 400, 401, 403, 404, 409, 410, 413, 422)
        ],
    ],
)
async def test_status_is_classified(
    slack: SlackStandIn, session: aiohttp.ClientSession, status: int, expected: Outcome
) -> None:
    slack.set_sink_status("hooks", status)
    url = slack.sink_url("hooks") + f"?token={QUERY_TOKEN}"
    assert await send(channel(url, signing_secret()), session) == expected
    assert len(slack.sink_requests) == 1


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, 3, Outcome(Result.RETRY, "HTTP 429", 3.0, True)),
        (503, 4, Outcome(Result.RETRY, "HTTP 503", 4.0)),
        (400, 4, Outcome(Result.PERMANENT, "HTTP 400")),
    ],
)
async def test_retry_after_is_passed_on(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    status: int,
    retry_after: int,
    expected: Outcome,
) -> None:
    slack.fail_next(1, status=status, retry_after=retry_after, kind="sink")
    assert await send(channel(slack.sink_url(), signing_secret()), session) == expected


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed(session: aiohttp.ClientSession, status: int) -> None:
    # Followed, it would take the signed body and the configured headers somewhere else, and a
    # 302 answered 200 there would count as delivered.
    seen: list[str] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path.startswith("/hooks/"):
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{rest:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/s3cr3tPath?token={QUERY_TOKEN}"
        outcome = await send(channel(url, signing_secret()), session)
    finally:
        await runner.cleanup()
    assert outcome == Outcome(Result.PERMANENT, f"HTTP {status}")
    assert seen == ["/hooks/s3cr3tPath"]


async def test_a_cookie_one_far_end_sets_goes_back_to_none(
    session: aiohttp.ClientSession,
) -> None:
    # The senders share a session: a jar would send one channel's cookie to every channel on
    # that host (another tenant's endpoint behind one gateway, a Slack channel).
    cookies: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("tenant", "a-s3cr3t")
        return response

    async with serving(answer) as base:
        base = base.replace("127.0.0.1", "localhost")  # aiohttp's jar keeps no IP's cookie
        for path in ("/tenant-a", "/tenant-b"):
            assert await send(channel(base + path), session) == DELIVERED
    assert cookies == [None, None]


async def test_connection_refused_is_retried(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}/hooks/s3cr3tPath?token={QUERY_TOKEN}"
    outcome = await send(channel(url, signing_secret()), session)
    assert outcome.result is Result.RETRY
    assert outcome.error.startswith("cannot connect: ")


async def endless_sink(status: int) -> web.AppRunner:
    """A far end that answers `status`, then streams a body that never ends."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=status)
        await response.prepare(request)
        chunk = b"x" * 65_536
        while True:
            await response.write(chunk)

    app = web.Application()
    app.router.add_post("/hooks", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, DELIVERED),
        (503, Outcome(Result.RETRY, "HTTP 503")),
        (404, Outcome(Result.PERMANENT, "HTTP 404")),
    ],
)
async def test_an_endless_answer_is_not_read_to_its_end(
    session: aiohttp.ClientSession, status: int, expected: Outcome
) -> None:
    # Read whole, such an answer grew the process until the send timed out, and a delivered
    # message was then retried for ever (a receiver that echoes a download, a wrong URL).
    runner = await endless_sink(status)
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
        assert await send(channel(url), session) == expected  # not "timed out"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("size", "reused"), [(0, True), (2_000, True), (1_048_576, False)])
async def test_a_short_answer_keeps_the_connection_a_long_one_closes_it(
    session: aiohttp.ClientSession, size: int, reused: bool
) -> None:
    ports: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.Response(body=b"y" * size)

    app = web.Application()
    app.router.add_post("/hooks", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
        assert [await send(channel(url), session) for _ in range(2)] == [DELIVERED] * 2
    finally:
        await runner.cleanup()
    assert (ports[0] == ports[1]) is reused


# A far end's misbehaviour below HTTP, and what the sender makes of it. Once the status line and
# headers are in, the status decides, as for an endless body: the body only keeps the connection
# usable, and a 200 whose body then stalls or breaks is a message the receiver took (retried, it
# would be sent again at every attempt, each one delivered and each one taken for a failure).
FAR_ENDS: list[tuple[str, Outcome]] = [
    ("drip", DELIVERED),
    ("silent", Outcome(Result.RETRY, "timed out")),
    ("close mid-headers", Outcome(Result.RETRY, "server disconnected")),
    ("close mid-body", DELIVERED),
    ("reset mid-body", DELIVERED),
    ("close-delimited", DELIVERED),
    ("broken chunked", DELIVERED),
    ("broken chunked at once", Outcome(Result.RETRY, "malformed answer")),  # no status yet
    ("length past the body", DELIVERED),
    ("100 continue first", DELIVERED),
    ("103 early hints first", DELIVERED),
    ("header over the limit", Outcome(Result.RETRY, "malformed answer")),
]


@pytest.mark.parametrize(("case", "expected"), FAR_ENDS, ids=[c for c, _ in FAR_ENDS])
async def test_a_far_end_that_misbehaves(
    session: aiohttp.ClientSession, case: str, expected: Outcome
) -> None:
    started = time.monotonic()
    async with far_end(ANSWERS[case], fixed(b"200 OK", b"")) as base:
        settings = channel(f"{base}/hooks/s3cr3tPath?token={QUERY_TOKEN}", signing_secret())
        assert await send(settings, session, timeout_s=0.3) == expected
        assert time.monotonic() - started < 0.3 + 0.2
        # The lane goes on: the next message to that far end, on a connection of its own.
        assert await send(settings, session, timeout_s=0.3) == DELIVERED


@pytest.mark.parametrize(
    ("status", "expected"),
    [(b"503 Service Unavailable", Outcome(Result.RETRY, "HTTP 503")),
     (b"404 Not Found", Outcome(Result.PERMANENT, "HTTP 404"))],
)  # fmt: skip
@pytest.mark.parametrize("case", ["drip", "reset mid-body", "broken chunked"])
async def test_a_body_that_breaks_leaves_the_status_to_decide(
    session: aiohttp.ClientSession, case: str, status: bytes, expected: Outcome
) -> None:
    async with far_end(with_status(ANSWERS[case], status)) as base:
        assert await send(channel(f"{base}/hooks"), session, timeout_s=0.3) == expected


async def test_https_to_a_plain_http_port_is_retried(session: aiohttp.ClientSession) -> None:
    async with far_end(ANSWERS["https to plain http"]) as base:
        url = base.replace("http://", "https://") + f"/hooks/s3cr3tPath?token={QUERY_TOKEN}"
        outcome = await send(channel(url), session, timeout_s=0.3)
    assert outcome.result is Result.RETRY
    assert outcome.error.startswith("cannot connect: ")


async def test_a_self_signed_certificate_is_refused(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with far_end(["answer"], fixed(b"200 OK", b""), tls=self_signed(tmp_path)) as base:
        outcome = await send(channel(f"{base}/hooks/s3cr3tPath"), session, timeout_s=0.3)
    assert outcome.result is Result.RETRY
    # OpenSSL's reason, which names no host (one that would is left out: test_channels_http).
    assert outcome.error.startswith("cannot connect: TLS certificate not accepted (self")


async def test_a_name_that_does_not_resolve_is_retried(session: aiohttp.ClientSession) -> None:
    url = f"http://nonexistent.invalid/hooks/s3cr3tPath?token={QUERY_TOKEN}"
    outcome = await send(channel(url), session, timeout_s=0.3)
    assert outcome.result is Result.RETRY
    # The resolver's own words, or "timed out" where a resolver does not answer in time.
    assert outcome.error.startswith("cannot connect: ") or outcome.error == "timed out"
