from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bridge.blockkit import (
    COMPACT,
    LimitError,
    fit,
    overflows,
)
from bridge.blockkit_limits import BLOCKS_CHARS, ELLIPSIS
from bridge.blockkit_problems import problems
from bridge.channels import Result
from bridge.channels.http import sender_session
from bridge.channels.slack import SlackSender
from bridge.config_channels import SlackChannel
from bridge.config_tables import TemplatesConfig
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer
from bridge.samples import sample
from tests.slack_standin import SlackStandIn, _blocks_problem


@pytest.mark.parametrize("char", ["😀", "𠀀", "a"], ids=["emoji", "CJK extension B", "ascii"])
def test_every_limit_holds_in_utf16_units(char: str) -> None:
    # Cut by code points, 150 emoji made a header of 300 UTF-16 units: if Slack counts so, as
    # JavaScript does, invalid_blocks, and the message a dead letter.
    payload = {
        "text": char * 5000,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": char * 150}},
            {"type": "section", "text": {"type": "mrkdwn", "text": char * 3000},
             "fields": [{"type": "mrkdwn", "text": char * 2000}]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": char * 3000}]},
        ],
    }  # fmt: skip
    fitted = fit(payload)
    assert problems(fitted) == [] and _blocks_problem(fitted["blocks"]) is None
    units = [len(t.encode("utf-16-le")) // 2 for t in texts_of(fitted)]
    assert max(units) <= 4000
    assert units[1] <= 150 and units[2] <= 3000 and units[3] <= 2000


def texts_of(payload: dict[str, object]) -> list[str]:
    """The top-level text, then each text object's, in order."""
    found = [str(payload["text"])]
    for block in payload["blocks"]:  # type: ignore[attr-defined]
        objs = [block.get("text"), *block.get("fields", []), *block.get("elements", [])]
        found += [obj["text"] for obj in objs if isinstance(obj, dict)]
    return found


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def test_fit_keeps_a_valid_message_unchanged() -> None:
    button = {"type": "button", "text": {"type": "plain_text", "text": "Open room"},
              "url": "https://c.example/r/room_id"}  # fmt: skip
    message = {
        "text": "hi",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "h"}},
            section("a"),
            {"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * 10},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 10},
            {"type": "actions", "elements": [button]},
        ],
    }
    assert fit(message) == message


def test_fit_leaves_what_it_cannot_cut_for_problems_to_name() -> None:
    # No text to cut, or not a text object: passed on as it is, not a crash at rendering.
    header = {"type": "header", "text": {"type": "plain_text"}}
    odd = {"type": "section", "fields": ["f", {"type": "mrkdwn"}]}
    message = {"text": "hi", "blocks": [header, odd]}
    assert fit(message) == message
    assert problems(fit(message)) == [
        "block 1 (header): text is empty",
        "block 2 (section): field 1 is empty",
        "block 2 (section): field 2 is empty",
    ]


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
    assert blocks[1]["text"]["text"].endswith(ELLIPSIS)
    assert len(blocks[1]["text"]["text"]) <= 3000
    assert len(blocks[2]["fields"]) == 10
    assert all(len(f["text"]) <= 2000 for f in blocks[2]["fields"])
    assert len(blocks[3]["elements"]) == 10
    # 64 blocks: 49 shown, and the note for the other 15.
    assert blocks[-1]["elements"][0]["text"] == f"{ELLIPSIS} 15 more blocks not shown"
    # Each block's own limit alone, then the reported total of all of them (below).
    assert len(blocks_of(fit({"text": "t", "blocks": [section("s" * 4000)]}))[0]) == 3000
    one_field = fit({"text": "t", "blocks": [{"type": "section", "fields": fields[:1]}]})
    assert len(one_field["blocks"][0]["fields"][0]["text"]) == 2000
    one_element = fit({"text": "t", "blocks": [context_of("c" * 3500)]})
    assert len(one_element["blocks"][0]["elements"][0]["text"]) == 3000
    twelve = [{"type": "mrkdwn", "text": f"field {n}"} for n in range(12)]
    kept = fit({"text": "t", "blocks": [{"type": "section", "fields": twelve}]})["blocks"][0]
    # The 10th and the rest are folded into one: nothing is lost (none is cut to "…").
    assert [f["text"] for f in kept["fields"][-2:]] == ["field 8", "field 9\nfield 10\nfield 11"]
    assert len(json.dumps(blocks, ensure_ascii=False, separators=(",", ":"))) <= BLOCKS_CHARS


def context_of(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def blocks_of(message: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"]]


BUTTON = {"type": "button", "text": {"type": "plain_text", "text": "Open " + "r" * 90},
          "url": "https://console.example.com/rooms/r"}  # fmt: skip
IMAGE = {"type": "image", "image_url": "https://x.example/i.png", "alt_text": "a" * 5000}
MRKDWN = {"type": "mrkdwn", "text": "hello"}


@pytest.mark.parametrize(
    ("payload", "problem", "fitted"),
    [
        ({"blocks": [{"type": "actions", "elements": [BUTTON]}]}, "element 1's text over 75",
         lambda p: len(p["blocks"][0]["elements"][0]["text"]["text"]) == 75),
        ({"blocks": [{"type": "section", "text": MRKDWN, "accessory": BUTTON}]},
         "accessory's text over 75",
         lambda p: len(p["blocks"][0]["accessory"]["text"]["text"]) == 75),
        ({"blocks": [{"type": "section", "text": MRKDWN, "accessory": IMAGE}]},
         "accessory: alt_text over 2000",
         lambda p: len(p["blocks"][0]["accessory"]["alt_text"]) == 2000),
        ({"blocks": [{"type": "actions", "elements": [{**BUTTON, "action_id": "a" * 300}]}]},
         "element 1: action_id over 255",
         lambda p: "action_id" not in p["blocks"][0]["elements"][0]),
        ({"attachments": [{"blocks": [{"type": "actions", "elements": [BUTTON]}]}]}, None,
         lambda p: len(p["attachments"][0]["blocks"][0]["elements"][0]["text"]["text"]) == 75),
        ({"blocks": [IMAGE]}, "alt_text over 2000",
         lambda p: len(p["blocks"][0]["alt_text"]) == 2000),
        ({"blocks": [{"type": "context", "elements": [{**IMAGE, "type": "image"}]}]}, None,
         lambda p: len(p["blocks"][0]["elements"][0]["alt_text"]) == 2000),
        ({"blocks": [{"type": "divider", "block_id": "b" * 256}]}, "block_id over 255",
         lambda p: "block_id" not in p["blocks"][0]),
        ({"attachments": [{"text": str(n)} for n in range(150)]}, "150 attachments, over 100",
         lambda p: len(p["attachments"]) == 100
         and p["attachments"][-1]["text"] == "… 51 more attachments not shown"),
    ],
)  # fmt: skip
def test_fit_cuts_what_custom_templates_may_overfill(
    payload: dict[str, Any], problem: str | None, fitted: Any
) -> None:
    # Slack refuses each for good (invalid_blocks, too_many_attachments): a dead letter for an
    # acknowledged event. The shipped templates make none of them; a custom one may.
    message = {"text": "hello", **payload}
    if problem is not None:
        assert any(problem in found for found in problems(message))
    out = fit(message)
    assert fitted(out)
    assert problems(out) == []


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        # Under the total: nothing cut.
        ([2900] * 4, [2900] * 4),
        # Over it: the longest text is halved, and the next, until the blocks are under it.
        ([2900] * 3 + [200] * 20, [1450, 1450, 2900] + [200] * 20),
        ([2900] * 5, [1450, 1450, 2900, 2900, 2900]),
    ],
)
def test_fit_keeps_the_blocks_under_their_reported_total(
    texts: list[int], expected: list[int]
) -> None:
    # chat.postMessage is reported to answer msg_blocks_too_long (permanent) past ~12,000
    # characters of blocks, each within its own limit (slackapi/bolt-js#2509, #2867).
    message = {"text": "t", "blocks": [section("s" * n) for n in texts]}
    out = blocks_of(fit(message))
    assert [len(text) for text in out] == expected
    assert all(text.endswith(ELLIPSIS) for text, n in zip(out, texts, strict=True) if len(text) < n)
    assert problems(fit(message)) == []
    assert (problems(message) == []) is (out == ["s" * n for n in texts])


@pytest.mark.parametrize("count", [50, 60])
def test_fit_leaves_out_the_last_blocks_when_short_texts_still_make_them_too_long(
    count: int,
) -> None:
    # Sections of 10 fields: over the total however the texts are cut. Each is cut to 99
    # characters (never below, never stuck above), then the last sections are left out and a
    # note says how many: sent over the total, Slack's msg_blocks_too_long is permanent, and
    # the whole message was a dead letter.
    many = {"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 150}] * 10}
    out = fit({"text": "t", "blocks": [many] * count})
    *sections, note = out["blocks"]
    assert {len(f["text"]) for block in sections for f in block["fields"]} == {99}
    assert (
        note["elements"][0]["text"] == f"{ELLIPSIS} {count - len(sections)} more blocks not shown"
    )
    assert len(COMPACT.encode(out["blocks"])) <= 12_000
    assert problems(out) == []
    assert len(COMPACT.encode([*sections, sections[-1], note])) > 12_000  # none left out needlessly


def test_fit_leaves_out_blocks_of_many_short_fields() -> None:
    # A field for each of 400 members of 40 characters: no text long enough to cut.
    member = {"type": "mrkdwn", "text": "m" * 40}
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": "Members"}}] + [
        {"type": "section", "fields": [member] * 10} for _ in range(40)
    ]
    out = fit({"text": "t", "blocks": blocks})
    assert out["blocks"][0] == blocks[0]
    assert problems(out) == [] and problems({"text": "t", "blocks": blocks}) != []


@pytest.mark.parametrize(("length", "expected"), [(12_000, 100), (12_001, 99)])
def test_fit_cuts_a_text_of_exactly_100_when_that_brings_the_blocks_under_12000(
    length: int, expected: int
) -> None:
    image = {"type": "image", "image_url": "https://c.example/", "alt_text": "a"}
    blocks = [section("s" * 100), image]
    image["image_url"] += "x" * (length - len(COMPACT.encode(blocks)))
    out = fit({"text": "t", "blocks": blocks})
    assert len(out["blocks"][0]["text"]["text"]) == expected
    assert len(COMPACT.encode(out["blocks"])) == 12_000
    assert problems(out) == []


def test_fit_cuts_a_long_context_element_to_bring_the_blocks_under() -> None:
    blocks = [*[section("s" * 2900)] * 3, section("s" * 200), context_of("c" * 2990)]
    out = fit({"text": "t", "blocks": blocks})
    assert len(out["blocks"][-1]["elements"][0]["text"]) == 1495  # the longest text, halved
    assert out["blocks"][:4] == blocks[:4]


def test_fit_leaves_out_buttons_whose_url_slack_would_refuse() -> None:
    def button(url: str) -> dict[str, Any]:
        return {"type": "button", "text": {"type": "plain_text", "text": "b"}, "url": url}

    short, long = button("https://c.example/r"), button("https://c.example/" + "r" * 3000)
    out = fit(
        {"text": "t", "blocks": [section("s"), {"type": "actions", "elements": [long, short]}]}
    )
    assert out["blocks"][1]["elements"] == [short]
    out = fit({"text": "t", "blocks": [section("s"), {"type": "actions", "elements": [long]}]})
    assert out["blocks"] == [section("s")]  # an actions block with no button is refused


@pytest.mark.parametrize(
    "message",
    [[], {"blocks": []}, {"text": "  "}, {"text": "x", "blocks": {}}, {"text": "x", "blocks": [1]}],
)
def test_fit_refuses_what_cannot_be_made_valid(message: Any) -> None:
    with pytest.raises(LimitError):
        fit(message)


def header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text}}


def test_what_fit_returns_has_no_problems() -> None:
    fields = [{"type": "mrkdwn", "text": "f" * 2500} for _ in range(12)]
    message = {
        "text": "t" * 50_000,
        "blocks": [header("h" * 200), {"type": "section", "fields": fields}],
    }
    assert problems(message) and problems(fit(message)) == []


def context(n: int) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * n}


def fields(n: int) -> dict[str, Any]:
    return {"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * n}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"text": "hi", "blocks": [section("s")] * 50}, False),
        ({"text": "hi", "blocks": [section("s")] * 51}, True),
        ({"text": "t" * 4000}, False),
        ({"text": "t" * 4001}, True),
        # A value cut to fit loses no entry of a digest...
        ({"text": "hi", "blocks": [section("s" * 5000), header("h" * 200)]}, False),
        # ...fields or context elements left out do.
        ({"text": "hi", "blocks": [fields(10), context(10)]}, False),
        ({"text": "hi", "blocks": [fields(11)]}, True),
        ({"text": "hi", "blocks": [context(11)]}, True),
        # Blocks Slack is reported to refuse in all (msg_blocks_too_long), each within limits.
        ({"text": "hi", "blocks": [section("s" * 2900)] * 4}, False),
        ({"text": "hi", "blocks": [section("s" * 2900)] * 5}, True),
        # Blocks fit refuses: not for a digest to split, for fit to name.
        ({"text": "hi", "blocks": ["not a block"]}, False),
        ({"text": "hi", "blocks": [{"text": "no type"}]}, False),
    ],
)
def test_overflows_when_fit_would_leave_something_out(message: Any, expected: bool) -> None:
    assert overflows(message) is expected


def texts(kind: str, prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"type": kind, "text": f"{prefix}{i}"} for i in range(1, n + 1)]


# (the block, where its items are, the tenth item as sent)
FOLDS = [
    (
        {"type": "context", "elements": texts("mrkdwn", "c", 12)},
        "elements",
        {"type": "mrkdwn", "text": "c10  c11  c12"},
    ),
    (
        {"type": "section", "fields": texts("plain_text", "f", 11)},
        "fields",
        {"type": "plain_text", "text": "f10\nf11"},
    ),
    (  # one mrkdwn among them: the fold is mrkdwn; an image is told by its alt_text
        {
            "type": "context",
            "elements": [
                *texts("plain_text", "p", 9),
                {"type": "plain_text", "text": "p10", "emoji": True},
                {"type": "image", "image_url": "https://example.com/a.png", "alt_text": "logo"},
                {"type": "mrkdwn", "text": "*m12*"},
            ],
        },
        "elements",
        {"type": "mrkdwn", "text": "p10  logo  *m12*"},
    ),
    (  # too long together: cut, and the cut shows
        {
            "type": "section",
            "fields": texts("mrkdwn", "f", 9) + [texts("mrkdwn", "g" * 1500, 1)[0]] * 2,
        },
        "fields",
        {"type": "mrkdwn", "text": "g" * 1500 + "1\n" + "g" * 497 + ELLIPSIS},
    ),
]


@pytest.mark.parametrize(("block", "key", "tenth"), FOLDS)
def test_fit_folds_fields_and_context_elements_over_ten_into_the_tenth(
    block: dict[str, Any], key: str, tenth: dict[str, Any]
) -> None:
    out = fit({"text": "hi", "blocks": [block]})
    kept = out["blocks"][0][key]
    assert kept[:9] == block[key][:9]
    assert kept[9:] == [tenth]
    assert problems(out) == []


async def _post_through_the_standin(payload: str) -> dict[str, Any]:
    with SlackStandIn() as slack:
        settings = SlackChannel(type="slack", webhook_url=SecretStr(slack.add_webhook()))
        async with sender_session() as session:
            outcome = await SlackSender(settings, session, timeout_s=5).send(payload, "1")
        assert outcome.result is Result.DELIVERED, outcome.error
        (posted,) = slack.posted
        return posted.payload


def test_a_message_with_more_than_ten_fields_or_elements_loses_no_text_in_slack(
    tmp_path: Path,
) -> None:
    items = ", ".join(f'{{"type": "mrkdwn", "text": "{{{{ room_id }}}} {i}"}}' for i in range(12))
    (tmp_path / "crowded.j2").write_text(
        f'{{"text": "room {{{{ room_id }}}}", "blocks": [{{"type": "section", "fields": '
        f'[{items}]}}, {{"type": "context", "elements": [{items}]}}]}}'
    )
    event = {**sample("Live.CallbackAfterChangeOwner"), "RoomId": "r<1>"}
    rendered = Renderer(TemplatesConfig(dir=tmp_path)).render(
        "slack", parse_event(event), event, Context(1400000000, 1703589923.5, {}), "crowded.j2"
    )
    posted = asyncio.run(_post_through_the_standin(rendered))  # Slack refuses 11 of either
    for block, key in zip(posted["blocks"], ("fields", "elements"), strict=True):
        sent = " ".join(item["text"] for item in block[key])
        assert [f"r&lt;1&gt; {i}" in sent for i in range(12)] == [True] * 12
