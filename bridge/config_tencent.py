"""The `[tencent]` table: the SDKAppIDs the bridge serves, the callback tokens that sign their
callbacks (one for all, or one an app), and how far a callback's RequestTime may be from now.
"""

from __future__ import annotations

import contextlib
from typing import Annotated

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.config_values import MAX_COUNT, Strict

# Positive, and within the stores' 64-bit integer column: 2**64 - 1 passed, and every callback
# for it failed with a 500 when its event was stored.
SdkAppId = Annotated[int, Field(gt=0, le=2**63 - 1)]


_APP_ID: TypeAdapter[int] = TypeAdapter(SdkAppId)


def _token_problem(token: str) -> str | None:
    """What is wrong with a Tencent callback token, in words (never the token itself)."""
    if not 1 <= len(token) <= 128:
        return "Tencent callback tokens are 1 to 128 characters"
    if token != token.strip() or any(not char.isprintable() for char in token):
        # A newline a secret file ends with, say: every callback was refused "bad Sign", and
        # an "after" callback refused is gone.
        return (
            "a space or newline at the token's start or end, or a control character in it"
            " (a file's last newline?)"
        )
    return None


class TencentConfig(Strict):
    sdk_app_id: tuple[SdkAppId, ...]
    callback_token: SecretStr | None = None  # every app's, but those in callback_tokens
    # Tencent keeps a token per app (v4/live_config/set_callback_token): one bridge serving a
    # staging and a production app may be given each one's, by SDKAppID.
    callback_tokens: dict[SdkAppId, SecretStr] = {}
    max_request_age_s: int = Field(60, gt=0, le=MAX_COUNT)

    def token_for(self, sdk_app_id: int) -> SecretStr | None:
        """The token that signs `sdk_app_id`'s callbacks; None: they are not signed."""
        return self.callback_tokens.get(sdk_app_id, self.callback_token)

    @field_validator("sdk_app_id", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, int | str) else value

    @field_validator("sdk_app_id")
    @classmethod
    def _not_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("needs at least one SDKAppID")
        return value

    @field_validator("callback_token")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (problem := _token_problem(value.get_secret_value())):
            raise ValueError(problem)
        return value

    @field_validator("callback_tokens", mode="before")
    @classmethod
    def _each_app_once(cls, value: object) -> object:
        # TOML keys are text: "1", "01", "+1" and "1_0" as 10 are keys apart, read as one
        # app, and the last one won unsaid. Read here as the field reads them.
        if isinstance(value, dict):
            apps = []
            for key in value:
                with contextlib.suppress(ValidationError):  # the field's validation names it
                    apps.append(_APP_ID.validate_python(key))
            if len(set(apps)) < len(apps):
                raise ValueError("names one SDKAppID twice (as 1 and 01, say)")
        return value

    @field_validator("callback_tokens")
    @classmethod
    def _tokens_length(cls, value: dict[int, SecretStr]) -> dict[int, SecretStr]:
        for app, token in value.items():
            if problem := _token_problem(token.get_secret_value()):
                raise ValueError(f"{app}: {problem}")
        return value

    @model_validator(mode="after")
    def _tokens_of_listed_apps(self) -> TencentConfig:
        if unknown := sorted(set(self.callback_tokens) - set(self.sdk_app_id)):
            raise ValueError(
                f"callback_tokens names {', '.join(map(str, unknown))}, not in sdk_app_id"
            )
        # Tokens for some apps and none for the rest would let the rest's callbacks in unsigned:
        # more likely an app forgotten than meant.
        unsigned = [a for a in self.sdk_app_id if self.token_for(a) is None]
        if self.callback_tokens and unsigned:
            raise ValueError(
                f"SDKAppID {', '.join(map(str, unsigned))} has no token: name it in"
                " callback_tokens, or set callback_token for the apps not named there"
            )
        return self
