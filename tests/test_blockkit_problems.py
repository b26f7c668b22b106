from __future__ import annotations

from typing import Any

import pytest

from bridge.blockkit_problems import problems
from tests.test_blockkit import header, section


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"text": "hi", "blocks": [header("h"), section("s")]}, []),
        ({"text": "hi", "blocks": [section("s")] * 50}, []),
        ({"text": "hi"}, []),
        ([], ["not a JSON object"]),
        ({"text": " "}, ["no top-level text"]),
        ({"text": "t" * 40_000}, []),
        ({"text": "t" * 40_001}, ["top-level text over 40000 characters"]),
        ({"text": "hi", "blocks": {}}, ["blocks must be a list of objects"]),
        ({"text": "hi", "blocks": [section("s")] * 51}, ["51 blocks, over 50"]),
        ({"text": "hi", "blocks": [{"text": "x"}]}, ["block 1 (None): no type"]),
        ({"text": "hi", "blocks": [header("")]}, ["block 1 (header): text is empty"]),
        (
            {"text": "hi", "blocks": [header("h" * 151)]},
            ["block 1 (header): text over 150 characters"],
        ),
        ({"text": "hi", "blocks": [section("")]}, ["block 1 (section): text is empty"]),
        (
            {"text": "hi", "blocks": [{"type": "section"}]},
            ["block 1 (section): neither text nor fields"],
        ),
        (
            {
                "text": "hi",
                "blocks": [{"type": "section", "fields": [{"type": "mrkdwn", "text": ""}]}],
            },
            ["block 1 (section): field 1 is empty"],
        ),
        (
            {"text": "hi", "blocks": [{"type": "section", "fields": [{"text": "f"}] * 11}]},
            ["block 1 (section): fields must be a list of at most 10"],
        ),
        (
            {"text": "hi", "blocks": [{"type": "context", "elements": []}]},
            ["block 1 (context): needs 1 to 10 elements"],
        ),
        (
            {"text": "", "blocks": [section("s"), {"type": "context", "elements": [{"text": ""}]}]},
            ["no top-level text", "block 2 (context): element 1 is empty"],
        ),
    ],
)
def test_problems_names_what_slack_would_refuse(message: Any, expected: list[str]) -> None:
    assert problems(message) == expected
