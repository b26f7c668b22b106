from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from bridge.channels import Outcome, Result, Thread, permanent, retry
from bridge.channels.slack import SlackSender
from bridge.config_channels import SlackChannel
from tests.farend import ANSWERS, OK_JSON, far_end, fixed, self_signed
from tests.slack_standin import SlackStandIn

pytestmark = pytest.mark.anyio

TOKEN = "xoxb-test-token"
CHANNEL = "C0123456789"
HI = '{"text":"hi"}'
HEADER_BLOCKS = json.dumps(
    {"text": "room created", "blocks": [{"type": "header", "text": {"type": "plain_text",
     "text": "room created"}}]}
)  # fmt: skip


def bot(api_url: str, token: str = TOKEN, channel: str = CHANNEL) -> SlackChannel:
    return SlackChannel(type="slack", token=SecretStr(token), channel=channel, api_url=api_url)


def hook(url: str) -> SlackChannel:
    return SlackChannel(type="slack", webhook_url=SecretStr(url))


async def send(
    settings: SlackChannel, session: aiohttp.ClientSession, payload: str = HI,
    timeout_s: float = 2,
) -> Outcome:  # fmt: skip
    outcome = await SlackSender(settings, session, timeout_s).send(payload, "1")
    # The shared check every case passes: no credential in what is logged and stored.
    for secret in (settings.token, settings.webhook_url):
        if secret is not None:
            value = secret.get_secret_value()
            assert value not in outcome.error
            assert value.rsplit("/", 1)[-1] not in outcome.error
    assert "://" not in outcome.error
    return outcome


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("mode", ["api", "webhook"])
@pytest.mark.parametrize("payload", [HI, HEADER_BLOCKS])
async def test_delivered_without_link_previews(
    slack: SlackStandIn, session: aiohttp.ClientSession, mode: str, payload: str
) -> None:
    settings = bot(slack.api_url) if mode == "api" else hook(slack.add_webhook())
    outcome = await send(settings, session, payload)
    assert outcome.result is Result.DELIVERED
    (posted,) = slack.posted
    assert outcome.ts == (posted.ts if mode == "api" else None)  # webhooks return no ts
    assert (posted.via, posted.channel) == (mode, CHANNEL)
    assert posted.payload["text"] == json.loads(payload)["text"]
    assert posted.payload["unfurl_links"] is False
    assert posted.payload["unfurl_media"] is False


async def test_a_payload_cannot_move_a_bot_message_to_another_channel(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    slack.add_webhook("C0OTHER")  # a channel the stand-in knows, not the configured one
    payload = '{"text":"hi","channel":"C0OTHER"}'
    assert (await send(bot(slack.api_url), session, payload)).result is Result.DELIVERED
    assert [p.channel for p in slack.posted] == [CHANNEL]


@pytest.mark.parametrize("broadcast", [False, True])
async def test_thread_replies_carry_thread_ts(
    slack: SlackStandIn, session: aiohttp.ClientSession, broadcast: bool
) -> None:
    sender = SlackSender(bot(slack.api_url), session, 2.0)
    parent = await sender.send(HI, "1")
    assert parent.ts is not None
    reply = await sender.send(HI, "2", Thread(parent.ts, broadcast))
    assert reply.result is Result.DELIVERED and reply.ts != parent.ts
    first, second = slack.posted
    assert "thread_ts" not in first.payload
    assert second.payload["thread_ts"] == parent.ts
    assert second.payload["reply_broadcast"] is broadcast


async def test_unknown_thread_is_refused(
    slack: SlackStandIn, session: aiohttp.ClientSession
) -> None:
    sender = SlackSender(bot(slack.api_url), session, 2.0)
    outcome = await sender.send(HI, "1", Thread("1.000001"))
    assert outcome == Outcome(Result.PERMANENT, "HTTP 200: thread_not_found")


# Slack's own answers to requests it will never accept, produced by the stand-in's rules.
@pytest.mark.parametrize(
    ("token", "channel", "archived", "payload", "error"),
    [
        ("xoxb-revoked-elsewhere", CHANNEL, False, HI, "invalid_auth"),
        (TOKEN, "C0NOTHERE", False, HI, "channel_not_found"),
        (TOKEN, CHANNEL, True, HI, "is_archived"),
        (TOKEN, CHANNEL, False, '{"text":"x","blocks":[{"type":"header"}]}', "invalid_blocks"),
        (TOKEN, CHANNEL, False, '{"text":"x","blocks":{"type":"x"}}', "invalid_blocks_format"),
        (TOKEN, CHANNEL, False, json.dumps({"text": "x" * 40_001}), "msg_too_long"),
        (TOKEN, CHANNEL, False, '{"text":"x","thread_ts":"1.000001"}', "thread_not_found"),
    ],
)
async def test_api_refusals_are_permanent(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    token: str,
    channel: str,
    archived: bool,
    payload: str,
    error: str,
) -> None:
    if archived:
        slack.archive(channel)
    outcome = await send(bot(slack.api_url, token, channel), session, payload)
    assert outcome == Outcome(Result.PERMANENT, f"HTTP 200: {error}")
    assert slack.posted == []


@pytest.mark.parametrize(
    ("path", "archived", "payload", "expected"),
    [
        ("/services/T0000TEST/BNOPE/nope", False, HI, "HTTP 404: no_service"),
        ("", True, HI, "HTTP 410: channel_is_archived"),
        ("", False, '{"text":"x","blocks":[{"type":"header"}]}', "HTTP 400: invalid_blocks"),
        ("", False, '{"blocks":[]}', "HTTP 400: no_text"),
    ],
)
async def test_webhook_refusals_are_permanent(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    path: str,
    archived: bool,
    payload: str,
    expected: str,
) -> None:
    url = slack.add_webhook()
    if archived:
        slack.archive(CHANNEL)
    outcome = await send(hook(slack.base_url + path if path else url), session, payload)
    assert outcome == Outcome(Result.PERMANENT, expected)
    assert slack.posted == []


# Answers forced ahead of the stand-in's rules: (mode, fail_next arguments, expected outcome).
API_PERMANENT = (
    "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "not_authed",
    "token_revoked", "missing_scope", "invalid_blocks", "no_text",
)  # fmt: skip
WEBHOOK_PERMANENT = (
    (400, "invalid_payload"), (400, "user_not_found"), (403, "action_prohibited"),
    (404, "channel_not_found"), (410, "channel_is_archived"),
)  # fmt: skip
FORCED: list[tuple[str, dict[str, Any], Outcome]] = [
    *[("api", {"error": e}, permanent(f"HTTP 200: {e}")) for e in API_PERMANENT],
    ("api", {"status": 429, "retry_after": 3}, retry("HTTP 429: ratelimited", 3.0, True)),
    ("api", {"status": 429}, retry("HTTP 429: ratelimited", None, True)),  # the lane's to say
    ("api", {"status": 500}, retry("HTTP 500: internal_error")),
    ("api", {"status": 503}, retry("HTTP 503: service_unavailable")),
    ("api", {"status": 503, "retry_after": 5}, retry("HTTP 503: service_unavailable", 5.0)),
    ("api", {"error": "internal_error"}, retry("HTTP 200: internal_error")),
    ("api", {"error": "fatal_error"}, retry("HTTP 200: fatal_error")),
    ("api", {"error": "service_unavailable"}, retry("HTTP 200: service_unavailable")),
    ("api", {"error": "team_added_to_org"}, retry("HTTP 200: team_added_to_org")),
    # Named errors beyond the reference's list: final too, not ten requests to a dead letter.
    ("api", {"error": "not_allowed_token_type"}, permanent("HTTP 200: not_allowed_token_type")),
    ("api", {"error": "invalid_charset"}, permanent("HTTP 200: invalid_charset")),
    # A success status that is not 200 carries no post: slack-sdk raises, and it was delivered.
    ("api", {"status": 202, "error": "fatal_error"}, retry("HTTP 202: fatal_error")),
    ("api", {"status": 201, "error": "internal_error"}, retry("HTTP 201: internal_error")),
    ("api", {"status": 206, "error": "invalid_auth"}, permanent("HTTP 206: invalid_auth")),
    ("webhook", {"status": 202, "error": "rollup_error"}, permanent("HTTP 202 without Slack's ok")),
    ("webhook", {"status": 204}, permanent("HTTP 204 without Slack's ok")),
    ("webhook", {"status": 202, "error": "ok"}, permanent("HTTP 202 without Slack's ok")),
    *[
        ("webhook", {"status": s, "error": e}, permanent(f"HTTP {s}: {e}"))
        for s, e in WEBHOOK_PERMANENT
    ],
    ("webhook", {"status": 429, "retry_after": 2}, retry("HTTP 429", 2.0, True)),
    ("webhook", {"status": 429}, retry("HTTP 429", None, True)),
    ("webhook", {"status": 500, "error": "rollup_error"}, retry("HTTP 500: rollup_error")),
    ("webhook", {"status": 503}, retry("HTTP 503")),
]


@pytest.mark.parametrize(("mode", "force", "expected"), FORCED)
async def test_forced_answers_are_classified(
    slack: SlackStandIn,
    session: aiohttp.ClientSession,
    mode: str,
    force: dict[str, Any],
    expected: Outcome,
) -> None:
    settings = bot(slack.api_url) if mode == "api" else hook(slack.add_webhook())
    slack.fail_next(1, kind=mode, **force)
    assert await send(settings, session) == expected
    assert slack.requests_seen == 1 and slack.posted == []
    # One attempt each: the sender never retries.
    assert (await send(settings, session)).result is Result.DELIVERED


# A proxy between us and Slack answers text/plain; the stand-in's sink plays that proxy.
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Outcome(Result.RETRY, "HTTP 200: not Slack's JSON")),
        (502, Outcome(Result.RETRY, "HTTP 502")),
        (503, Outcome(Result.RETRY, "HTTP 503")),
        (429, Outcome(Result.RETRY, "HTTP 429: ratelimited", None, True)),
        (403, Outcome(Result.PERMANENT, "HTTP 403")),
    ],
)
async def test_api_answers_that_are_not_slack_json(
    slack: SlackStandIn, session: aiohttp.ClientSession, status: int, expected: Outcome
) -> None:
    slack.set_sink_status("chat.postMessage", status)
    assert await send(bot(slack.base_url + "/sink/"), session) == expected
    assert len(slack.sink_requests) == 1


@pytest.mark.parametrize("mode", ["api", "webhook"])
async def test_connection_refused_is_retried(session: aiohttp.ClientSession, mode: str) -> None:
    base = f"http://127.0.0.1:{closed_port()}"
    settings = (
        bot(base + "/api/") if mode == "api" else hook(base + "/services/T0/B0/s3cr3tHookPath")
    )
    outcome = await send(settings, session)
    assert outcome.result is Result.RETRY
    assert outcome.error.startswith("cannot connect: ")
    assert "://" not in outcome.error and "s3cr3t" not in outcome.error


SECRET_PATH = "/services/T0123ABCD/B0123ABCD/s3cr3tW3bh00kT0k3n"
REDIRECTS: dict[str, type[web.HTTPMove]] = {
    "301": web.HTTPMovedPermanently, "302": web.HTTPFound, "303": web.HTTPSeeOther,
}  # fmt: skip


@pytest.fixture
async def odd() -> AsyncIterator[tuple[str, list[str]]]:
    """Not Slack: a redirect, a gateway that echoes the request path, a forged log line, an
    answer that never comes. Yields its base URL and the requests it saw."""
    seen: list[str] = []
    release = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        kind = request.match_info["kind"]
        if kind == "landing":
            return web.Response(text="<html>a landing page</html>", content_type="text/html")
        if kind in REDIRECTS:
            raise REDIRECTS[kind]("/landing/x")
        if kind == "echo":
            return web.Response(status=404, text=f"Cannot POST {request.path}")
        if kind == "echo-api":
            return web.json_response({"ok": False, "error": f"Cannot POST {request.path}"})
        if kind == "forged":
            return web.Response(status=400, text="bad\n2024-01-01 INFO bridge.worker: delivered")
        if kind == "latin1":  # a proxy's page that is not UTF-8, with or without a JSON type
            kind_of = "application/json" if request.path.startswith("/latin1/api") else "text/html"
            return web.Response(status=502, body="réessayez".encode("latin-1"),
                                content_type=kind_of)  # fmt: skip
        if kind == "broken":  # a JSON type, a status of its own, and JSON cut short
            status = int(request.path.split("/")[2])
            return web.Response(status=status, body=b'{"ok": fa', content_type="application/json")
        await release.wait()  # "hang": until the test is over
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{kind}/{rest:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.parametrize("kind", ["301", "302", "303"])
async def test_a_webhook_redirect_is_never_taken_for_delivered(
    odd: tuple[str, list[str]], session: aiohttp.ClientSession, kind: str
) -> None:
    base, seen = odd
    outcome = await send(hook(f"{base}/{kind}{SECRET_PATH}"), session)
    # Followed, it was a GET to a page that said 200, taken for delivered: nothing was posted.
    assert seen == [f"POST /{kind}{SECRET_PATH}"]
    assert outcome == permanent(f"HTTP {kind}")


@pytest.mark.parametrize("mode", ["api", "webhook"])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_to_another_host_is_not_followed(
    session: aiohttp.ClientSession, mode: str, status: int
) -> None:
    # slack-sdk's clients let aiohttp follow redirects: a 307 posted the message (the room, the
    # accounts) to a host nobody configured, over plain HTTP too, and its "ok" counted as
    # delivered.
    elsewhere: list[str] = []
    asked: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(f"{request.method} {request.path}")
        if mode == "api":
            return web.json_response({"ok": True, "ts": "1.2"})
        return web.Response(text="ok")

    async with serving(other) as other_base:

        async def moved(request: web.Request) -> web.Response:
            asked.append(request.method)
            return web.Response(status=status, headers={"Location": other_base + "/taken"})

        async with serving(moved) as base:
            settings = bot(f"{base}/api/") if mode == "api" else hook(base + SECRET_PATH)
            assert await send(settings, session) == permanent(f"HTTP {status}")
    assert (asked, elsewhere) == (["POST"], [])


@pytest.mark.parametrize(
    "answer",
    [
        # slack-sdk passes a binary type as valid, unread: reading its ts failed in the sender.
        web.Response(body=b"\x1f\x8b\x08\x00", content_type="application/gzip"),
        # slack-sdk takes any true value for Slack's ok: a message never posted was delivered.
        web.json_response({"ok": "false"}),
        web.json_response({"ok": 1, "ts": "1.2"}),
    ],
    ids=["binary", "ok a string", "ok a number"],
)
async def test_an_answer_to_the_api_that_is_not_slacks_json(
    session: aiohttp.ClientSession, answer: web.Response
) -> None:
    async def odd(request: web.Request) -> web.Response:
        return answer

    async with serving(odd) as base:
        assert await send(bot(f"{base}/api/"), session) == retry("HTTP 200: not Slack's JSON")


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        ("echo", "webhook", permanent("HTTP 404")),
        ("forged", "webhook", permanent("HTTP 400")),
        ("echo-api", "api", retry("HTTP 200: ok false")),
    ],
)
async def test_only_slack_error_names_reach_the_error(
    odd: tuple[str, list[str]], session: aiohttp.ClientSession, kind: str, mode: str,
    expected: Outcome,
) -> None:  # fmt: skip
    base, _ = odd
    settings = hook(f"{base}/{kind}{SECRET_PATH}") if mode == "webhook" else bot(f"{base}/{kind}/")
    assert await send(settings, session) == expected


@pytest.mark.parametrize("mode", ["api", "webhook"])
async def test_an_answer_that_is_not_utf8_is_a_retry(
    odd: tuple[str, list[str]], session: aiohttp.ClientSession, mode: str
) -> None:
    # slack-sdk's UnicodeDecodeError escaped the sender: the worker logged a traceback for
    # each attempt of a delivery behind a proxy that writes Latin-1.
    base, _ = odd
    settings = bot(f"{base}/latin1/api/") if mode == "api" else hook(f"{base}/latin1{SECRET_PATH}")
    assert await send(settings, session) == retry("an answer that is not UTF-8 (not Slack's)")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (502, retry("HTTP 502")),
        (503, retry("HTTP 503")),
        (404, permanent("HTTP 404")),
        (200, retry("HTTP 200: ok false")),
    ],
)
async def test_an_api_answer_with_broken_json_is_classified_by_its_status(
    odd: tuple[str, list[str]], session: aiohttp.ClientSession, status: int, expected: Outcome
) -> None:
    # slack-sdk hands over aiohttp's own response then, whose status is `status`.
    base, _ = odd
    assert await send(bot(f"{base}/broken/{status}/"), session) == expected


@pytest.mark.parametrize("mode", ["api", "webhook"])
async def test_a_send_ends_at_the_configured_timeout(
    odd: tuple[str, list[str]], session: aiohttp.ClientSession, mode: str
) -> None:
    # slack-sdk times only sessions it makes itself; the worker's session has no timeout.
    base, _ = odd
    settings = bot(f"{base}/hang/") if mode == "api" else hook(f"{base}/hang{SECRET_PATH}")
    started = time.monotonic()
    outcome = await SlackSender(settings, session, timeout_s=0.5).send(HI, "1")
    assert outcome == retry("timed out")
    assert time.monotonic() - started < 5


# A far end's misbehaviour below HTTP (tests/farend.py), for both clients. Slack's verdict is in
# the body ("ok", or {"ok": true, "ts": …}): a body that never comes whole is no verdict, and
# the message is sent again (at least once, as after a crash), never taken for delivered.
SLACK_FAR_ENDS: list[tuple[str, Outcome]] = [
    ("drip", retry("timed out")),
    ("silent", retry("timed out")),
    ("close mid-headers", retry("server disconnected")),
    ("close mid-body", retry("answer cut short")),
    ("reset mid-body", retry("answer cut short")),
    ("close-delimited", Outcome(Result.DELIVERED)),
    ("broken chunked", retry("timed out")),
    ("broken chunked at once", retry("malformed answer")),
    ("length past the body", retry("timed out")),
    ("100 continue first", Outcome(Result.DELIVERED)),
    ("103 early hints first", Outcome(Result.DELIVERED)),
    ("header over the limit", retry("malformed answer")),
]


@pytest.mark.parametrize("mode", ["api", "webhook"])
@pytest.mark.parametrize(("case", "expected"), SLACK_FAR_ENDS, ids=[c for c, _ in SLACK_FAR_ENDS])
async def test_a_far_end_that_misbehaves(
    session: aiohttp.ClientSession, mode: str, case: str, expected: Outcome
) -> None:
    body = OK_JSON if mode == "api" else b"ok"
    started = time.monotonic()
    async with far_end(ANSWERS[case], fixed(b"200 OK", body), body) as base:
        settings = bot(f"{base}/api/") if mode == "api" else hook(base + SECRET_PATH)
        outcome = await send(settings, session, timeout_s=0.3)
        if expected.result is Result.DELIVERED and mode == "api":
            expected = Outcome(Result.DELIVERED, ts="1700000000.000100")
        assert outcome == expected
        assert time.monotonic() - started < 0.3 + 0.2
        # The lane goes on: the next message to that far end, on a connection of its own.
        assert (await send(settings, session, timeout_s=0.3)).result is Result.DELIVERED


@pytest.mark.parametrize("mode", ["api", "webhook"])
@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_loop_is_permanent(
    session: aiohttp.ClientSession, mode: str, status: int
) -> None:
    # slack-sdk's clients follow redirects (a 307 with the message, ten times over); a loop is
    # a URL that will not change by itself, like the webhooks' 3xx.
    seen: list[str] = []

    async def loop(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(status=status, headers={"Location": request.path})

    async with serving(loop) as base:
        settings = bot(f"{base}/api/") if mode == "api" else hook(base + SECRET_PATH)
        assert await send(settings, session) == permanent(f"HTTP {status}")
    assert len(seen) == 1  # not followed at all (test_a_redirect_to_another_host_is_not_followed)


@pytest.mark.parametrize(
    ("mode", "status", "expected"),
    [
        ("api", 200, retry("HTTP 200: not Slack's JSON (over 1 MiB)")),
        ("webhook", 200, permanent("HTTP 200 without Slack's ok (over 1 MiB)")),
        ("api", 502, retry("HTTP 502")),
        ("webhook", 404, permanent("HTTP 404")),
    ],
)
async def test_an_answer_over_a_mebibyte_is_not_read_whole(
    session: aiohttp.ClientSession, mode: str, status: int, expected: Outcome
) -> None:
    # slack-sdk reads every answer whole: 100 MiB took 350 MB, and one that never ends grew the
    # process by 500 MB a second until the send timed out.
    written = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal written
        await request.read()
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while written < 64 * 1_048_576:
                await response.write(b"x" * 65_536)
                written += 65_536
        return response

    async with serving(huge) as base:
        settings = bot(f"{base}/api/") if mode == "api" else hook(base + SECRET_PATH)
        assert await send(settings, session) == expected
    assert written < 16 * 1_048_576  # the rest waited in socket buffers, or was never sent


async def test_a_self_signed_certificate_is_refused(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with far_end(["answer"], fixed(b"200 OK", b"ok"), tls=self_signed(tmp_path)) as base:
        outcome = await send(hook(base + SECRET_PATH), session, timeout_s=0.3)
    assert outcome.result is Result.RETRY
    # OpenSSL's reason, which names no host (one that would is left out: test_channels_http).
    assert outcome.error.startswith("cannot connect: TLS certificate not accepted (self")


@pytest.mark.parametrize("mode", ["api", "webhook"])
async def test_https_to_plain_http_and_a_name_that_does_not_resolve_are_retried(
    session: aiohttp.ClientSession, mode: str
) -> None:
    async with far_end(ANSWERS["https to plain http"]) as plain:
        for base in (plain.replace("http://", "https://"), "http://nonexistent.invalid"):
            settings = bot(f"{base}/api/") if mode == "api" else hook(base + SECRET_PATH)
            outcome = await send(settings, session, timeout_s=0.3)
            assert outcome.result is Result.RETRY
            # "timed out" where a resolver does not answer in time
            assert outcome.error.startswith("cannot connect: ") or outcome.error == "timed out"


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{rest:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
