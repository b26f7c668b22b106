"""The channel types' own rules (config_channels.py), as an operator meets them through
`load_config`: the table and key named, the value never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from bridge.config_channels import SlackChannel, WebhookChannel
from tests.test_config import MINIMAL, write


@pytest.mark.parametrize(
    ("secret", "short"),
    [
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", False),  # 24 bytes
        ("whsec_VttvJ1z/wvzpV+NCwD4VeRA", True),  # 17 bytes, unpadded: the library takes it
        ("whsec_AA==", True),  # one byte
    ],
)
def test_a_signing_key_under_24_bytes_is_taken_and_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, secret: str, short: bool
) -> None:
    text = (
        MINIMAL
        + f'[channels.w]\ntype = "webhook"\nurl = "http://h/x"\nsigning_secret = "{secret}"\n'
    )
    load_config(write(tmp_path, text))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ([
        f"{tmp_path / 'config.toml'}: [channels.w] signing_secret: a key under 24 bytes, which"
        " Standard Webhooks asks for (easier to guess)"
    ] if short else [])  # fmt: skip
    assert not any(secret.removeprefix("whsec_") in line for line in warned)


def test_a_slack_token_read_from_a_file_with_its_newline_is_taken(tmp_path: Path) -> None:
    text = MINIMAL + '[channels.s]\ntype = "slack"\nchannel = "C1"\ntoken = "xoxb-1-2-abc\\n"\n'
    channel = load_config(write(tmp_path, text)).channels["s"]
    assert isinstance(channel, SlackChannel) and channel.token is not None


@pytest.mark.parametrize(
    ("url", "header", "refused"),
    [
        ("https://bot:Zq7@hooks.example.com/x", "Authorization", True),
        ("https://:Zq7@hooks.example.com/x", "authorization", True),
        ("https://bot@hooks.example.com/x", "AUTHORIZATION", True),
        ("https://bot:Zq7@hooks.example.com/x", "X-Token", False),
        ("https://hooks.example.com/x?to=a@b", "Authorization", False),
    ],
)
def test_webhook_credentials_in_url_or_authorization_header_not_both(
    tmp_path: Path, url: str, header: str, refused: bool
) -> None:
    text = MINIMAL + f"[channels.hook]\ntype = 'webhook'\nurl = '{url}'\n"
    text += f"headers = {{ {header} = 'Bearer Zq8' }}\n"
    if not refused:
        assert isinstance(load_config(write(tmp_path, text)).channels["hook"], WebhookChannel)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "[channels.hook]: url has credentials (user:password@) and headers an Authorization" in (
        message
    )
    assert "Zq7" not in message and "Zq8" not in message


@pytest.mark.parametrize("token", ["Zq9\n", "Zq9\r\nX-Evil: 1", "tok\u0001en", "Zq9\u007f"])
def test_webhook_header_value_that_no_request_can_carry_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    # aiohttp refuses such a request (header injection): every delivery would fail, each one
    # retried to a dead letter as "internal error in sender".
    monkeypatch.setenv("HOOK_TOKEN", token)  # a token read from a file, its newline kept
    text = MINIMAL + "[channels.hook]\ntype = 'webhook'\nurl = 'https://hooks.example.com/x'\n"
    text += "headers = { X-Token = 'Bearer ${HOOK_TOKEN}' }\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "[channels.hook] headers" in str(caught.value)
    assert "Zq9" not in str(caught.value)


def test_a_header_name_with_a_line_break_is_shown_escaped(tmp_path: Path) -> None:
    extra = '[channels.w]\ntype = "webhook"\nurl = "http://x"\nheaders = { "X-A\\nB" = "v" }\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + extra))
    assert "[channels.w] headers: 'X-A\\nB' is no header name" in str(caught.value)
