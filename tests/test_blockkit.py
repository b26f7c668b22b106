from __future__ import annotations

from typing import Any

import pytest

from bridge.blockkit import LimitError, cut, fit


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("abcdefghij", 10, "abcdefghij"),
        ("abcdefghijk", 10, "abcdefghi…"),
        ("abcdef&amp;xyz", 9, "abcdef…"),
        ("ab <!date^1|x> tail", 8, "ab …"),
    ],
)
def test_cut(text: str, limit: int, expected: str) -> None:
    assert cut(text, limit) == expected
    assert len(cut(text, limit)) <= limit


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def test_fit_keeps_a_valid_message_unchanged() -> None:
    message = {"text": "hi", "blocks": [section("a")]}
    assert fit(message) == message


def test_fit_cuts_every_limit() -> None:
    fields = [{"type": "mrkdwn", "text": "f" * 2500} for _ in range(12)]
    message = {
        "text": "t" * 5000,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "h" * 200}},
            section("s" * 4000),
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 12},
            *[section("more") for _ in range(60)],
        ],
    }
    out = fit(message)
    assert len(out["text"]) == 4000
    blocks = out["blocks"]
    assert len(blocks) == 50
    assert len(blocks[0]["text"]["text"]) == 150
    assert len(blocks[1]["text"]["text"]) == 3000
    assert len(blocks[2]["fields"]) == 10
    assert all(len(f["text"]) <= 2000 for f in blocks[2]["fields"])
    assert len(blocks[3]["elements"]) == 10
    assert "more blocks not shown" in blocks[-1]["elements"][0]["text"]


@pytest.mark.parametrize(
    "message",
    [[], {"blocks": []}, {"text": "  "}, {"text": "x", "blocks": {}}, {"text": "x", "blocks": [1]}],
)
def test_fit_refuses_what_cannot_be_made_valid(message: Any) -> None:
    with pytest.raises(LimitError):
        fit(message)
