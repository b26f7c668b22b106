"""Channel policies (policy.py): which channels share a Slack channel's rate bucket."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from bridge.config_channels import SlackChannel
from bridge.policy import same_url, slack_destination

TOKEN = SecretStr("xoxb-test-token")


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("https://slack.com/api/", "HTTPS://SLACK.com/api/", True),
        ("https://slack.com/api/", "https://slack.com:443/api/", True),
        ("https://slack.com/api/", "https://slack.com./api/", True),
        ("http://127.0.0.1:8000/api/", "HTTP://127.0.0.1:8000/api/", True),
        ("http://[::1]:80/api/", "http://[::1]/api/", True),
        ("https://slack.com/api/", "https://slack.com:8443/api/", False),
        ("https://slack.com/api/", "http://slack.com/api/", False),
        ("https://slack.com/api/", "https://slack.com/API/", False),  # paths are case-sensitive
        ("https://slack.com/api/", "https://www.slack.com/api/", False),  # another host
    ],
)
def test_spellings_of_one_url_are_one_destination(one: str, other: str, same: bool) -> None:
    # Compared as written, each spelling was a Slack channel of its own, paced to Slack's whole
    # limit: twice that reached the one channel.
    assert (same_url(one) == same_url(other)) is same
    bots = [SlackChannel(type="slack", token=TOKEN, channel="C1", api_url=u) for u in (one, other)]
    assert (slack_destination(bots[0]) == slack_destination(bots[1])) is same
    hooks = [
        SlackChannel(type="slack", webhook_url=SecretStr(u + "services/T/B/x"))
        for u in (one, other)
    ]
    assert (slack_destination(hooks[0]) == slack_destination(hooks[1])) is same


def test_a_webhooks_destination_names_no_secret() -> None:
    url = "https://hooks.slack.com/services/T0/B0/s3cr3t"
    hook = SlackChannel(type="slack", webhook_url=SecretStr(url))
    assert "s3cr3t" not in slack_destination(hook) and "hooks" not in slack_destination(hook)
