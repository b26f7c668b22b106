"""Slack, through slack-sdk's async clients: incoming webhook or bot token (chat.postMessage)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bridge.channels import DELIVERED, SDK_LOG, Outcome, Result, Thread, permanent, retry
from bridge.channels.http import (
    TRANSPORT_ERRORS,
    AnswerTooLong,
    Redirected,
    classify_status,
    parse_retry_after,
    transport_failure,
)
from bridge.config_channels import SlackChannel

# Slack's error names that say a retry may go through: its own trouble, or a migration under way.
# Every other name in Slack's JSON (chat.postMessage lists dozens: not_allowed_token_type,
# invalid_charset, cannot_reply_to_message, …) needs a change on the operator's side.
TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "team_added_to_org"}
)

# Slack's error names that no retry will fix without a change on the operator's side.
PERMANENT_ERRORS = frozenset(
    {
        "channel_not_found", "not_in_channel", "is_archived", "invalid_auth", "not_authed",
        "account_inactive", "token_revoked", "token_expired", "no_permission", "missing_scope",
        "invalid_blocks", "invalid_blocks_format", "msg_blocks_too_long", "msg_too_long",
        "no_text", "too_many_attachments", "restricted_action", "ekm_access_denied",
        "team_access_not_granted", "invalid_arguments", "thread_not_found",
        "action_prohibited", "channel_is_archived", "no_service", "invalid_payload",
        "user_not_found",
    }
)  # fmt: skip

# What Slack writes as an error: a name like channel_not_found. Anything else in an answer's body
# (a proxy's page, a gateway echoing the request path, which holds a webhook's secret) stays out
# of the delivery's error, and so out of the store, the logs and the status page.
_ERROR_NAME = re.compile(r"[a-z0-9_]{1,60}")


def _error_name(text: str) -> str:
    text = text.strip()
    return text if _ERROR_NAME.fullmatch(text) else ""


class SlackSender:
    def __init__(self, settings: SlackChannel, session: aiohttp.ClientSession, timeout_s: float):
        # slack-sdk applies its own timeout only to a session it creates itself, so each send is
        # also bounded here; its whole-second value stays for any request it times.
        self._timeout_s = timeout_s
        timeout = max(1, math.ceil(timeout_s))
        self._channel = settings.channel or ""
        self._web: AsyncWebClient | None = None
        self._hook: AsyncWebhookClient | None = None
        if settings.token is not None:
            self._web = AsyncWebClient(
                token=settings.token.get_secret_value(),
                base_url=settings.api_url,
                timeout=timeout,
                session=session,
                logger=SDK_LOG,
                retry_handlers=[],  # the worker retries, with backoff and pacing
            )
        elif settings.webhook_url is not None:
            self._hook = AsyncWebhookClient(
                settings.webhook_url.get_secret_value(),
                timeout=timeout,
                session=session,
                logger=SDK_LOG,
                retry_handlers=[],
            )

    async def send(self, payload: str, message_key: str, thread: Thread | None = None) -> Outcome:
        message = json.loads(payload)
        message.setdefault("unfurl_links", False)
        message.setdefault("unfurl_media", False)
        if thread is not None:
            message.update(thread_ts=thread.ts, reply_broadcast=thread.broadcast)
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._web is not None:
                    return await self._post(message)
                assert self._hook is not None
                response = await self._hook.send_dict(message)
        except SlackApiError as exc:
            return _classify_api_error(exc)
        except AnswerTooLong as exc:
            # Not Slack's: classified as a short answer that is not Slack's would be.
            if exc.status != 200:
                return classify_status(exc.status, exc.headers)
            if self._web is not None:
                return retry("HTTP 200: not Slack's JSON (over 1 MiB)")
            return permanent("HTTP 200 without Slack's ok (over 1 MiB)")
        except Redirected as exc:
            # Slack does not redirect its API or its webhooks: a URL that will not mend itself,
            # as a webhook's 3xx (http.sender_session follows none).
            return classify_status(exc.status, exc.headers)
        except TRANSPORT_ERRORS as exc:
            return transport_failure(exc)
        except UnicodeDecodeError:
            # slack-sdk decodes every answer as UTF-8 and lets the error out. Slack writes
            # UTF-8; a proxy's page in Latin-1 (a 502 saying "réessayez") does not. Its status
            # is lost with the exception: retry, as for other answers that are not Slack's.
            return retry("an answer that is not UTF-8 (not Slack's)")
        body = (response.body or "").strip()
        status = response.status_code
        if status == 200 and body == "ok":
            return DELIVERED
        error = _error_name(body)
        if error in PERMANENT_ERRORS:
            return permanent(f"HTTP {status}: {error}")
        if 200 <= status < 300:
            # Slack answers a webhook with 200 and "ok" alone. Any other success is some other
            # server's (a proxy answers 202 or 204): the message was not posted, and sending it
            # again would meet the same.
            return permanent(f"HTTP {status} without Slack's ok")
        return classify_status(status, response.headers, error)

    async def _post(self, message: dict[str, Any]) -> Outcome:
        assert self._web is not None
        # The configured channel wins over a "channel" key a template may have written.
        try:
            answer = await self._web.chat_postMessage(**{**message, "channel": self._channel})
        except AttributeError:
            # slack-sdk takes any HTTP 200 answer for Slack's JSON object and fails on
            # anything else (a proxy's plain text, a JSON array) while checking "ok".
            return retry("HTTP 200: not Slack's JSON")
        if not isinstance(answer.data, dict) or answer.data.get("ok") is not True:
            # A binary type (application/gzip, …): slack-sdk passes it as valid, unread; an
            # "ok" that is not JSON's true ("false", 1) too: a message never posted was taken
            # for delivered.
            return retry("HTTP 200: not Slack's JSON")
        ts = answer.data.get("ts")
        return Outcome(Result.DELIVERED, ts=ts if isinstance(ts, str) else None)


def _classify_api_error(exc: SlackApiError) -> Outcome:
    # An answer that is not Slack's JSON (a proxy's text/plain 502) arrives as text, or as
    # aiohttp's own response when the JSON is broken: classify it by its status alone.
    response = exc.response
    status: int = getattr(response, "status_code", 0) or getattr(response, "status", 0)
    data = getattr(response, "data", None)
    error = _error_name(str(data.get("error", "") or "")) if isinstance(data, dict) else ""
    headers = dict(response.headers or {})
    if status == 429 or error == "ratelimited":
        return retry(f"HTTP {status}: ratelimited", parse_retry_after(headers) or None, True)
    if error in PERMANENT_ERRORS:
        return permanent(f"HTTP {status}: {error}")
    if 200 <= status < 300:
        # Slack's JSON said ok:false (slack-sdk raises for any status but 200 too, so a 202
        # with an error lands here): never delivered. A name Slack gives for its own trouble
        # is retried, any other needs a change; no name (some other server's answer) retries.
        if error and error not in TRANSIENT_ERRORS:
            return permanent(f"HTTP {status}: {error}")
        return retry(f"HTTP {status}: {error or 'ok false'}")
    return classify_status(status, headers, error)
