"""The Slack stand-in answers like Slack, as seen through slack_sdk's real async clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse
from slack_sdk.webhook import WebhookResponse
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.slack_standin import SlackStandIn

TOKEN = "xoxb-test-token"
CHANNEL = "C0123456789"


def api_post(slack: SlackStandIn, token: str | None = TOKEN, **kwargs: Any) -> AsyncSlackResponse:
    async def call() -> AsyncSlackResponse:
        client = AsyncWebClient(token=token, base_url=slack.api_url, retry_handlers=[])
        return await client.chat_postMessage(**kwargs)

    return asyncio.run(call())


def api_error(slack: SlackStandIn, token: str | None = TOKEN, **kwargs: Any) -> SlackApiError:
    with pytest.raises(SlackApiError) as info:
        api_post(slack, token, **kwargs)
    return info.value


def webhook_send(url: str, body: dict[str, Any]) -> WebhookResponse:
    async def call() -> WebhookResponse:
        return await AsyncWebhookClient(url, retry_handlers=[]).send_dict(body)

    return asyncio.run(call())


def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=5)
    try:
        conn.request("POST", parts.path, body, headers)
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def field(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text}}


def context(n: int) -> dict[str, Any]:
    return {"type": "context", "elements": [field("x")] * n}


def test_post_message_returns_ts_and_is_recorded() -> None:
    with SlackStandIn() as slack:
        response = api_post(slack, channel=CHANNEL, text="hello", unfurl_links=False)
        assert response["ok"] is True
        assert response["channel"] == CHANNEL
        assert response["message"]["text"] == "hello"
        assert response.headers["content-type"].startswith("application/json")
        [posted] = slack.posted
        assert (posted.via, posted.channel, posted.ts) == ("api", CHANNEL, response["ts"])
        assert posted.payload["text"] == "hello"
        assert posted.payload["unfurl_links"] is False
        assert slack.requests_seen == 1


def test_thread_reply_needs_an_earlier_ts_in_the_same_channel() -> None:
    with SlackStandIn(channels=(CHANNEL, "C2")) as slack:
        parent = api_post(slack, channel=CHANNEL, text="parent")["ts"]
        reply = api_post(slack, channel=CHANNEL, text="reply", thread_ts=parent)
        assert float(reply["ts"]) > float(parent)
        assert reply["message"]["thread_ts"] == parent
        assert slack.posted[1].payload["thread_ts"] == parent
        error = api_error(slack, channel="C2", text="elsewhere", thread_ts=parent)
        assert error.response["error"] == "thread_not_found"


def test_concurrent_posts_get_unique_increasing_ts() -> None:
    async def post_many() -> list[str]:
        async def one(i: int) -> str:
            client = AsyncWebClient(token=TOKEN, base_url=slack.api_url, retry_handlers=[])
            response = await client.chat_postMessage(channel=CHANNEL, text=f"m{i}")
            return str(response["ts"])

        return await asyncio.gather(*(one(i) for i in range(20)))

    with SlackStandIn() as slack:
        ts = asyncio.run(post_many())
        assert len(set(ts)) == 20
        recorded = [p.ts for p in slack.posted]
        assert recorded == sorted(recorded, key=float)
        assert all(len(t.split(".")[1]) == 6 for t in recorded)


def button(text: str, url: str) -> dict[str, Any]:
    return {"type": "button", "text": {"type": "plain_text", "text": text}, "url": url}


def total(length: int) -> list[dict[str, Any]]:
    """Sections whose blocks are `length` characters in all, as JSON."""
    blocks = [section("s" * 2000)] * 5
    size = len(json.dumps(blocks, ensure_ascii=False, separators=(",", ":")))
    return [
        *blocks,
        section(
            "s" * (length - size - len(',{"type":"section","text":{"type":"mrkdwn","text":""}}'))
        ),
    ]


def test_limits_are_inclusive() -> None:
    messages = [
        [header("h" * 150), section("s" * 3000), context(10)],
        [{"type": "section", "fields": [field("f" * 2000)] + [field("f" * 500)] * 9}],
        [{"type": "context", "elements": [field("c" * 3000)]}],
        [{"type": "actions", "elements": [button("b" * 75, "https://x/" + "u" * 2990)]}],
        total(12_000),
        [{"type": "divider"}] * 50,
    ]
    with SlackStandIn() as slack:
        assert api_post(slack, channel=CHANNEL, text="t" * 40_000, blocks=messages[0])["ok"]
        for blocks in messages[1:]:
            assert api_post(slack, channel=CHANNEL, text="fallback", blocks=blocks)["ok"]


@pytest.mark.parametrize(
    ("token", "kwargs", "error"),
    [
        (None, {}, "not_authed"),
        ("xoxb-revoked", {}, "invalid_auth"),
        (TOKEN, {"channel": "C404"}, "channel_not_found"),
        (TOKEN, {"blocks": '{"type": "section"}'}, "invalid_blocks_format"),
        (TOKEN, {"blocks": [{"text": field("no type")}]}, "invalid_blocks_format"),
        (TOKEN, {"blocks": [{"type": "divider"}] * 51}, "invalid_blocks"),
        (TOKEN, {"blocks": [header("h" * 151)]}, "invalid_blocks"),
        (TOKEN, {"blocks": [section("s" * 3001)]}, "invalid_blocks"),
        (TOKEN, {"blocks": [section("")]}, "invalid_blocks"),
        (TOKEN, {"blocks": [{"type": "section", "fields": [field("f")] * 11}]}, "invalid_blocks"),
        (TOKEN, {"blocks": [{"type": "section", "fields": [field("f" * 2001)]}]}, "invalid_blocks"),
        (TOKEN, {"blocks": [context(11)]}, "invalid_blocks"),
        (
            TOKEN,
            {"blocks": [{"type": "context", "elements": [field("c" * 3001)]}]},
            "invalid_blocks",
        ),
        (TOKEN, {"blocks": [{"type": "context", "elements": [field("")]}]}, "invalid_blocks"),
        (TOKEN, {"blocks": [{"type": "header", "text": field("h")}]}, "invalid_blocks"),
        (
            TOKEN,
            {"blocks": [{"type": "actions", "elements": [button("b" * 76, "https://x/")]}]},
            "invalid_blocks",
        ),
        (
            TOKEN,
            {"blocks": [{"type": "actions", "elements": [button("b", "h" * 3001)]}]},
            "invalid_blocks",
        ),
        (TOKEN, {"blocks": total(12_001)}, "msg_blocks_too_long"),
        (TOKEN, {"text": "t" * 40_001}, "msg_too_long"),
        (TOKEN, {"thread_ts": "1700000000.000001"}, "thread_not_found"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 30 else "",
)
def test_post_message_errors(token: str | None, kwargs: dict[str, Any], error: str) -> None:
    with SlackStandIn() as slack:
        failure = api_error(slack, token, **({"channel": CHANNEL, "text": "fallback"} | kwargs))
        assert failure.response.status_code == 200
        assert failure.response["ok"] is False
        assert failure.response["error"] == error
        assert slack.posted == []


def test_post_message_without_text_or_blocks_is_no_text() -> None:
    with SlackStandIn() as slack, pytest.warns(UserWarning, match="`text` argument is missing"):
        failure = api_error(slack, channel=CHANNEL, blocks=[])
    assert failure.response["error"] == "no_text"


def test_archived_channel_refuses_api_and_webhook() -> None:
    with SlackStandIn() as slack:
        url = slack.add_webhook(CHANNEL)
        slack.archive(CHANNEL)
        assert api_error(slack, channel=CHANNEL, text="hi").response["error"] == "is_archived"
        response = webhook_send(url, {"text": "hi"})
        assert (response.status_code, response.body) == (410, "channel_is_archived")
        assert slack.posted == []


def test_form_encoded_post_message_with_token_in_body() -> None:
    with SlackStandIn() as slack:
        blocks = '[{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]'
        form = urlencode({"token": TOKEN, "channel": CHANNEL, "text": "hi", "blocks": blocks})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, body = raw_post(slack.api_url + "chat.postMessage", form.encode(), headers)
        assert status == 200
        assert b'"ok":true' in body
        assert slack.posted[0].payload["blocks"][0]["type"] == "section"


def test_webhook_success_is_plain_ok_and_recorded() -> None:
    with SlackStandIn(channels=()) as slack:
        url = slack.add_webhook("C0WEBHOOK")
        assert url.startswith(slack.base_url + "/services/T")
        response = webhook_send(url, {"text": "hello", "blocks": [section("hello")]})
        assert (response.status_code, response.body) == (200, "ok")
        assert response.headers["content-type"].startswith("text/html")
        [posted] = slack.posted
        assert (posted.via, posted.channel) == ("webhook", "C0WEBHOOK")
        assert posted.payload == {"text": "hello", "blocks": [section("hello")]}


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        ({"unfurl_links": False}, 400, "no_text"),
        ({"text": "x", "blocks": [section("")]}, 400, "invalid_blocks"),
        ({"text": "x", "blocks": "not a list"}, 400, "invalid_blocks"),
    ],
)
def test_webhook_errors(body: dict[str, Any], status: int, answer: str) -> None:
    with SlackStandIn() as slack:
        response = webhook_send(slack.add_webhook(), body)
        assert (response.status_code, response.body) == (status, answer)
        assert slack.posted == []


def test_webhook_unknown_path_and_bad_json() -> None:
    with SlackStandIn() as slack:
        response = webhook_send(slack.base_url + "/services/T0/B0/nope", {"text": "x"})
        assert (response.status_code, response.body) == (404, "no_service")
        status, _, body = raw_post(slack.add_webhook(), b"{not json", {})
        assert (status, body) == (400, b"invalid_payload")


def test_rate_limit_is_a_token_bucket_per_channel_across_api_and_webhook() -> None:
    # The bucket's clock moves only when the test turns it: on the real clock the five requests
    # had to come within 0.5 s, or a busy machine saw a token refilled before m3 or m4.
    now = [1000.0]
    with SlackStandIn(
        channels=(CHANNEL, "C2"), rate_per_s=2, burst=3, clock=lambda: now[0]
    ) as slack:
        url = slack.add_webhook(CHANNEL)
        for i in range(2):
            assert api_post(slack, channel=CHANNEL, text=f"m{i}")["ok"]
        assert webhook_send(url, {"text": "m2"}).status_code == 200
        limited = api_error(slack, channel=CHANNEL, text="m3").response
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "1"
        assert limited["error"] == "ratelimited"
        response = webhook_send(url, {"text": "m4"})
        assert (response.status_code, response.body) == (429, "")
        assert response.headers["Retry-After"] == "1"
        assert api_post(slack, channel="C2", text="other channel")["ok"]
        assert slack.rejected_429 == 2
        assert [p.payload["text"] for p in slack.posted] == ["m0", "m1", "m2", "other channel"]
        now[0] += 0.45
        assert api_error(slack, channel=CHANNEL, text="not yet").response.status_code == 429
        now[0] += 0.1  # 0.55 s after m4: a token again
        assert api_post(slack, channel=CHANNEL, text="refilled")["ok"]


def test_fail_next_forces_answers_by_kind_and_channel() -> None:
    with SlackStandIn(channels=(CHANNEL, "C2")) as slack:
        url = slack.add_webhook(CHANNEL)
        slack.fail_next(2, status=503, retry_after=7, kind="api")
        assert webhook_send(url, {"text": "webhook passes"}).status_code == 200
        for _ in range(2):
            forced = api_error(slack, channel=CHANNEL, text="x").response
            assert (forced.status_code, forced["error"]) == (503, "service_unavailable")
            assert forced.headers["Retry-After"] == "7"
        assert api_post(slack, channel=CHANNEL, text="third passes")["ok"]

        slack.fail_next(1, status=429, channel="C2")
        assert api_post(slack, channel=CHANNEL, text="other channel passes")["ok"]
        forced = api_error(slack, channel="C2", text="x").response
        assert (forced.status_code, forced["error"]) == (429, "ratelimited")
        assert slack.rejected_429 == 1

        slack.fail_next(1, status=500, error="rollup_error", kind="webhook")
        response = webhook_send(url, {"text": "x"})
        assert (response.status_code, response.body) == (500, "rollup_error")

        slack.fail_next(1, status=200, error="fatal_error")
        assert api_error(slack, channel=CHANNEL, text="x").response["error"] == "fatal_error"
        assert len(slack.posted) == 3
        assert slack.requests_seen == 8


def test_sink_records_requests_and_answers_its_status() -> None:
    with SlackStandIn() as slack:
        url = slack.sink_url("hooks")
        headers = {"Content-Type": "application/json", "X-Signature": "v1,abc"}
        assert raw_post(url, b'{"a": 1}', headers)[::2] == (200, b"ok")
        slack.set_sink_status("hooks", 503)
        assert raw_post(url, b"second", {})[0] == 503
        assert raw_post(slack.sink_url(), b"other sink", {})[0] == 200
        slack.fail_next(1, status=502, retry_after=3, kind="sink")
        status, answer_headers, body = raw_post(url, b"forced", {})
        assert (status, answer_headers["retry-after"], body) == (502, "3", b"")

        first, second, other = slack.sink_requests
        assert (first.path, first.body) == ("/sink/hooks", b'{"a": 1}')
        assert first.headers["x-signature"] == "v1,abc"
        assert (second.body, other.path) == (b"second", "/sink/sink")


def test_wait_for_sees_posts_from_another_thread() -> None:
    with SlackStandIn() as slack:
        poster = threading.Thread(
            target=api_post, args=(slack,), kwargs={"channel": CHANNEL, "text": "x"}
        )
        poster.start()
        assert slack.wait_for(lambda s: len(s.posted) == 1, timeout=5)
        poster.join()
        assert not slack.wait_for(lambda s: len(s.posted) == 2, timeout=0.05)


def test_stop_joins_the_thread_and_frees_the_port() -> None:
    threads_before = threading.active_count()
    with SlackStandIn() as slack:
        port = int(urlsplit(slack.api_url).port or 0)
        assert slack.api_url.endswith("/api/")
        assert api_error(slack, channel=CHANNEL, text="x", token="bad").response["error"]
    assert threading.active_count() == threads_before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    slack.stop()
