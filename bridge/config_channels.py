"""The channel types of `[channels.*]`: console, Slack (incoming webhook or bot token) and generic
webhook, each with the rules its table owns. As every table (bridge/config_tables.py), each refuses
unknown keys, and a value that breaks a rule is refused with a message that never repeats it.
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.config_values import MAX_COUNT, Strict, check_http_url

# RFC 9110's token: what a header's name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SLACK_TOKEN = re.compile(r"[!-~]+")


class ConsoleChannel(Strict):
    type: Literal["console"]
    template: str | None = None
    # More pending than this: one digest; 0 turns it off.
    digest_after: int = Field(10, ge=0, le=MAX_COUNT)
    digest_template: str | None = None


class SlackChannel(Strict):
    type: Literal["slack"]
    webhook_url: SecretStr | None = None
    token: SecretStr | None = None
    channel: str | None = None
    api_url: str = "https://slack.com/api/"
    template: str | None = None
    rate_per_s: float = Field(1.0, gt=0)  # Slack: about one message a second per channel
    burst: int = Field(3, ge=1, le=MAX_COUNT)
    digest_after: int = Field(10, ge=0, le=MAX_COUNT)
    digest_template: str | None = None
    thread_by_room: bool = False  # bot token only: one thread per room
    reply_broadcast: bool = False  # thread replies also shown in the channel
    thread_ttl_h: float = Field(24.0, gt=0)

    @field_validator("api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        check_http_url(value)
        # slack-sdk appends the method name to base_url as it is.
        return value if value.endswith("/") else value + "/"

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_http_url(value.get_secret_value())
        return value

    @field_validator("token")
    @classmethod
    def _bearer(cls, value: SecretStr | None) -> SecretStr | None:
        # It goes in a header: a line break or NUL inside made every send a traceback
        # (aiohttp refuses a header injection), past a `check` that said all was well. The
        # newline a token read from a file ends with is sent as it is, and works.
        if value is not None and not _SLACK_TOKEN.fullmatch(value.get_secret_value().strip()):
            raise ValueError(
                "is not a Slack token: letters, digits and punctuation, no space or control"
                " character inside"
            )
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> SlackChannel:
        if (self.webhook_url is None) == (self.token is None):
            raise ValueError("set exactly one of webhook_url (incoming webhook) or token (bot)")
        if self.token is not None and not self.channel:
            raise ValueError("a bot-token channel needs channel = the Slack channel ID")
        if self.webhook_url is not None and self.channel:
            raise ValueError("an incoming webhook posts to its own channel: remove channel")
        if self.webhook_url is not None and self.thread_by_room:
            raise ValueError("thread_by_room needs a bot token: webhooks do not return the ts")
        return self


WHSEC_BYTES = 24  # Standard Webhooks: a key of 24 to 64 random bytes


def whsec_key(secret: str) -> bytes:
    """The key of a `whsec_` secret; b"" if it is no base64. Padding may be left out, as the
    standardwebhooks library, which signs with it, takes it."""
    text = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return b""


class WebhookChannel(Strict):
    type: Literal["webhook"]
    url: SecretStr
    headers: dict[str, SecretStr] = {}
    signing_secret: SecretStr | None = None
    template: str | None = None
    # Concurrent requests; one room's are still in order.
    max_in_flight: int = Field(4, ge=1, le=MAX_COUNT)
    rate_per_s: float | None = Field(None, gt=0)
    burst: int = Field(1, ge=1, le=MAX_COUNT)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        check_http_url(value.get_secret_value())
        return value

    @field_validator("headers")
    @classmethod
    def _sendable(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # aiohttp refuses a request with CR, LF or NUL in a header (header injection), so every
        # delivery would fail, each retried to a dead letter. A token read from a file often
        # keeps its newline. The name is no secret; the value stays out of the message.
        for name, header in value.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(
                    f"{name!r} is no header name (letters, digits and !#$%&'*+-.^_`|~)"
                )
            if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in header.get_secret_value()):
                raise ValueError(
                    f"{name!r}: a header cannot hold a line break or control character"
                )
        return value

    @field_validator("signing_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            if not secret.startswith("whsec_") or not whsec_key(secret):
                raise ValueError("must be a Standard Webhooks secret (whsec_ + base64)")
        return value

    @property
    def short_secret(self) -> bool:
        """A signing key under the 24 bytes Standard Webhooks asks for: easier to guess."""
        secret = self.signing_secret
        return secret is not None and len(whsec_key(secret.get_secret_value())) < WHSEC_BYTES

    @model_validator(mode="after")
    def _one_authorization(self) -> WebhookChannel:
        # aiohttp refuses to send a request with both: every delivery would fail.
        url = urlsplit(self.url.get_secret_value())
        in_url = bool(url.username) or url.password is not None
        if in_url and any(name.lower() == "authorization" for name in self.headers):
            raise ValueError(
                "url has credentials (user:password@) and headers an Authorization: keep one"
            )
        return self


Channel = Annotated[ConsoleChannel | SlackChannel | WebhookChannel, Field(discriminator="type")]
