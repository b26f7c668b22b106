"""The [tencent] table's rules, as an operator meets them through `load_config`: SDKAppIDs and
their callback tokens, the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from tests.test_config import MINIMAL, write


def test_sdk_app_id_int_or_list(tmp_path: Path) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", "sdk_app_id = [1400000000, 1400000001]")
    assert load_config(write(tmp_path, text)).tencent.sdk_app_id == (1400000000, 1400000001)


TWO_APPS = "sdk_app_id = [1400000000, 1400000001]"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ('callback_tokens = { 1400000000 = "a", 1400000001 = "b" }', {0: "a", 1: "b"}),
        ('callback_token = "s"\ncallback_tokens = { 1400000001 = "b" }', {0: "s", 1: "b"}),
        ('callback_token = "s"', {0: "s", 1: "s"}),
        ("", {0: None, 1: None}),
    ],
)
def test_each_app_may_have_its_own_callback_token(
    tmp_path: Path, tokens: str, expected: dict[int, str | None]
) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"{TWO_APPS}\n{tokens}")
    tencent = load_config(write(tmp_path, text)).tencent
    for offset, token in expected.items():
        given = tencent.token_for(1400000000 + offset)
        assert (given.get_secret_value() if given else None) == token


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        # Tokens for some apps and none for the rest would take the rest's callbacks unsigned.
        ('callback_tokens = { 1400000000 = "VERY-SECRET" }', "SDKAppID 1400000001 has no token"),
        ('callback_token = "VERY-SECRET"\ncallback_tokens = { 1400000009 = "VERY-SECRET" }',
         "callback_tokens names 1400000009, not in sdk_app_id"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "" }',
         "[tencent] callback_tokens: 1400000001: Tencent callback tokens are 1 to 128"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "VERY-SECRET' + "x" * 128
         + '" }', "[tencent] callback_tokens: 1400000001: Tencent callback tokens are 1 to 128"),
        # Accepted, then every callback refused "bad Sign": an "after" callback refused is gone.
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = "VERY-SECRET\\n" }',
         "[tencent] callback_tokens: 1400000001: a space or newline at the token's start or end"),
        ('callback_token = " VERY-SECRET"',
         "[tencent] callback_token: a space or newline at the token"),
        ('callback_token = "VERY\\tSECRET"',
         "or a control character in it"),
        ('callback_tokens = { room = "VERY-SECRET" }', "[tencent] callback_tokens.room.[key]"),
        ('callback_tokens = { 1400000000 = "a", 01400000000 = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "a", 1_400_000_000 = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "a", "+1400000000" = "b", 1400000001 = "c" }',
         "[tencent] callback_tokens: names one SDKAppID twice"),
        ('callback_tokens = { 1400000000 = "VERY-SECRET", 1400000001 = 5 }',
         "[tencent] callback_tokens.1400000001: Input should be a valid string"),
    ],
)  # fmt: skip
def test_callback_tokens_name_every_app_and_only_apps_listed(
    tmp_path: Path, tokens: str, expected: str
) -> None:
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"{TWO_APPS}\n{tokens}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert expected in str(caught.value)
    assert "VERY-SECRET" not in str(caught.value)


@pytest.mark.parametrize(
    "value", ["0", "-1400000000", "100000000000000000000", "9223372036854775808", "[1400000000, 0]"]
)
def test_sdk_app_id_outside_what_a_callback_can_carry_is_an_error(
    tmp_path: Path, value: str
) -> None:
    # A callback's SdkAppid is up to 20 digits (bridge.verify): an ID that no callback can match
    # would refuse every callback with 403.
    text = MINIMAL.replace("sdk_app_id = 1400000000", f"sdk_app_id = {value}")
    with pytest.raises(ConfigError, match="sdk_app_id"):
        load_config(write(tmp_path, text))
