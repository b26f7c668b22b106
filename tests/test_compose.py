"""Digests and re-rendering: what the worker sends for a backlog, built from stored deliveries."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge import blockkit_limits
from bridge.compose import Composer
from bridge.config import Config, load_config
from bridge.config_tables import TemplatesConfig
from bridge.escape import slack_text
from bridge.events import MODELS, OWNER_CHANGED
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer, RenderError
from bridge.samples import HOSTILE_VALUES, UNKNOWN_SAMPLE, hostile, sample
from bridge.store import Claimed, room_key
from tests.payloads import strings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
APP = 1400000000
RECEIVED = 1703589923.5
UNKNOWN = str(UNKNOWN_SAMPLE["CallbackCommand"])
COMMANDS = [*MODELS, UNKNOWN]
ELLIPSIS = blockkit_limits.ELLIPSIS
# The only Slack tokens a digest may contain: the bridge's own dates.
DATE_TOKEN = re.compile(r"<!date\^\d+\^\{date_short_pretty\} \{time_secs\}\|[^<>]*>")
PINGS_AND_LINKS = ("<!channel>", "<!here>", "<!everyone>", "<@U", "<!subteam", "<http")

CONFIG = f"""
[tencent]
sdk_app_id = [{APP}, {APP + 1}]

[templates]
dir = {json.dumps(str(TEMPLATES))}

[channels.slack]
type = "slack"
webhook_url = "https://hooks.example.invalid/x"

[channels.console]
type = "console"

[[routes]]
name = "all"
channels = ["slack", "console"]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("compose") / "config.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_config(path)


@pytest.fixture(scope="module")
def composer(config: Config) -> Composer:
    return Composer(config, Renderer(config.templates))


def make_row(
    n: int, body: dict[str, Any], channel: str = "slack", payload: str | None = None,
    sdk_app_id: int = APP,
) -> Claimed:  # fmt: skip
    """A claimed delivery as the store hands it out, for the event `body`."""
    return Claimed(
        id=n,
        event_id=1000 + n,
        channel=channel,
        payload=payload,
        attempts=1,
        room_key=room_key(sdk_app_id, room) if (room := parse_event(body).room()) else None,
        command=str(body["CallbackCommand"]),
        body=json.dumps(body, ensure_ascii=False),
        query="{}",
        received_at=RECEIVED + n,
        sdk_app_id=sdk_app_id,
    )


def owner_change(n: int, room: str | None = None) -> dict[str, Any]:
    """The n-th owner change of a burst, one second after the one before."""
    return {
        **sample(OWNER_CHANGED),
        "RoomId": room or f"room-{n:03d}",
        "OriginalOwner_Account": f"user-{n}",
        "CurrentOwner_Account": f"user-{n + 1}",
        "EventTime": 1703589922780 + 1000 * n,
    }


def checked(payload: str) -> dict[str, Any]:
    """The Slack message in `payload`, after checking it is within Slack's limits."""
    message: dict[str, Any] = json.loads(payload)
    assert message["text"].strip() and len(message["text"]) <= blockkit_limits.TOP_TEXT_CHARS
    blocks = message["blocks"]
    assert len(blocks) <= blockkit_limits.MAX_BLOCKS
    assert blocks[0]["type"] == "header" and blocks[-1]["type"] == "context"
    for block in blocks:
        if block["type"] == "header":
            assert 1 <= len(block["text"]["text"]) <= blockkit_limits.HEADER_CHARS
        elif block["type"] == "section":
            assert block["text"]["type"] == "mrkdwn"
            assert 1 <= len(block["text"]["text"]) <= blockkit_limits.SECTION_CHARS
        else:
            assert block["type"] == "context"
            assert len(block["elements"]) <= blockkit_limits.MAX_CONTEXT
    return message


def sections(message: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]


def summary(section: str) -> str:
    """A section's text after its `<!date^…> · ` prefix."""
    date, _, rest = section.partition(" · ")
    assert DATE_TOKEN.fullmatch(date), section
    return rest


def ids(chunks: list[tuple[str, list[Claimed]]]) -> list[int]:
    return [row.id for _, rows in chunks for row in rows]


def single_event_line(composer: Composer, row: Claimed) -> str:
    """The console line the event would get on its own (a fresh render: no stored payload)."""
    return composer.payload(Claimed(**{**row.__dict__, "channel": "console", "payload": None}))


# --- a burst ---------------------------------------------------------------------------------


def test_a_burst_of_200_owner_changes_is_five_whole_digests(composer: Composer) -> None:
    rows = [make_row(n, owner_change(n)) for n in range(200)]
    digests = composer.digests("slack", rows).messages
    assert len(digests) == 5  # 40 each: a header, 40 sections, a context = 42 blocks
    assert ids(digests) == [row.id for row in rows]  # each once, oldest first
    for payload, chunk in digests:
        message = checked(payload)
        assert len(message["blocks"]) == len(chunk) + 2
        assert message["text"] == f"{len(chunk)} Live events: {len(chunk)} room owner changes"
        assert message["blocks"][0]["text"] == {"type": "plain_text", "text": "40 Live events"}
        assert message["blocks"][-1]["elements"] == [
            {"type": "mrkdwn", "text": f"SDKAppID {APP} · oldest first"}
        ]
        for text, row in zip(sections(message), chunk, strict=True):
            n = row.id
            assert not text.endswith(ELLIPSIS)
            assert text.startswith(f"<!date^{1703589922 + n}^")
            assert summary(text) == f"Room *room-{n:03d}*: user-{n} → user-{n + 1} (by admin)"


def test_a_console_digest_is_a_first_line_then_each_event_on_its_own(composer: Composer) -> None:
    rows = [make_row(n, owner_change(n), channel="console") for n in range(45)]
    digests = composer.digests("console", rows).messages
    assert [len(chunk) for _, chunk in digests] == [40, 5]
    assert ids(digests) == [row.id for row in rows]
    for payload, chunk in digests:
        first, *lines = payload.split("\n")
        oldest = datetime.fromtimestamp(1703589922 + chunk[0].id, UTC)
        assert first == f"[{oldest:%Y-%m-%d %H:%M:%S} UTC] digest of {len(chunk)} events:"
        assert lines == ["  " + single_event_line(composer, row) for row in chunk]
    assert digests[0][0].split("\n")[1] == (
        "  [2023-12-26 11:25:22 UTC] room owner changed: room room-000, user-0 -> user-1"
        f" (by admin, SDKAppID {APP})"
    )


# --- long values: split rather than cut; cut rather than lost -----------------------------------


def long_room(n: int, size: int) -> str:
    return f"{n:04d}" + "r" * (size - 4)


@pytest.mark.parametrize(
    ("name", "rooms", "digests", "cut"),
    [
        # Each entry still fits its section, but 40 of them are more than Slack takes in all
        # (msg_blocks_too_long, ~12,000 characters): several digests, nothing cut.
        ("long values that fit", [long_room(n, 2800) for n in range(40)], None, set()),
        # One entry over a section's limit: cut in place (it would be cut alone too); the
        # digest is not split for it, and the others stay whole.
        (
            "one row too big",
            [long_room(n, 5000) if n == 17 else f"room-{n}" for n in range(40)],
            1,
            {17},
        ),
        # Every entry too big: each still delivered, cut, in order; none lost.
        ("every row too big", [long_room(n, 5000) for n in range(3)], 1, {0, 1, 2}),
    ],
)
def test_long_values(
    composer: Composer, name: str, rooms: list[str], digests: int | None, cut: set[int]
) -> None:
    rows = [make_row(n, owner_change(n, room)) for n, room in enumerate(rooms)]
    out = composer.digests("slack", rows).messages
    assert ids(out) == list(range(len(rows))), name
    if digests is not None:
        assert len(out) == digests, name
    for payload, chunk in out:
        texts = sections(checked(payload))
        assert len(texts) == len(chunk)
        for text, row in zip(texts, chunk, strict=True):
            if row.id in cut:
                assert text.endswith(ELLIPSIS), name
                assert len(text) == blockkit_limits.SECTION_CHARS
            else:
                assert not text.endswith(ELLIPSIS), name
                assert summary(text).startswith(f"Room *{rooms[row.id]}*: "), name


def test_a_digest_over_a_whole_message_limit_is_split_not_cut(
    config: Config, tmp_path: Path
) -> None:
    # The shipped digest keeps its text and header to counts, so only a single entry can be too
    # big; a template whose text grows with its entries shows the split of a too-big digest.
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "digest.j2").write_text(
        '{"text": "{% for entry in entries %}{{ entry.room_id }} {% endfor %}",'
        ' "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "{{ count }}"}}]}',
        encoding="utf-8",
    )
    composer = Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))
    rooms = [long_room(n, 1000) for n in range(10)]  # three fit in 4000 characters, four do not
    rows = [make_row(n, owner_change(n, room)) for n, room in enumerate(rooms)]
    out = composer.digests("slack", rows).messages
    assert ids(out) == list(range(10))
    assert 1 < len(out) <= 5
    for payload, chunk in out:
        message = json.loads(payload)
        assert message["text"] == "".join(f"{rooms[row.id]} " for row in chunk)  # whole
        assert message["blocks"][0]["text"]["text"] == str(len(chunk))


def rooms_in_text(config: Config, tmp_path: Path) -> Composer:
    """A composer whose Slack digest is only a text naming each entry's room."""
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "digest.j2").write_text(
        '{"text": "{% for entry in entries %}{{ entry.room_id }} {% endfor %}"}', encoding="utf-8"
    )
    return Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))


def test_a_digest_is_split_down_to_one_entry_a_message_if_two_are_too_big(
    config: Config, tmp_path: Path
) -> None:
    composer = rooms_in_text(config, tmp_path)
    rooms = [long_room(n, 2500) for n in range(3)]  # one fits in 4000 characters, two do not
    out = composer.digests(
        "slack", [make_row(n, owner_change(n, rooms[n])) for n in range(3)]
    ).messages
    assert [[row.id for row in chunk] for _, chunk in out] == [[0], [1], [2]]
    assert [json.loads(payload)["text"] for payload, _ in out] == [f"{r} " for r in rooms]


@pytest.mark.parametrize("bad", [[0], [17], [39], [3, 30], []])
def test_an_entry_the_digest_template_cannot_take_is_set_apart(
    config: Config, tmp_path: Path, bad: list[int]
) -> None:
    # A template that divides by something an event may make 0: the rest still go as digests.
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "digest.j2").write_text(
        '{"text": "{% for entry in entries %}{{ 1 // (entry.room_id != \'bad\') }}{% endfor %}"}',
        encoding="utf-8",
    )
    composer = Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))
    rows = [make_row(n, owner_change(n, "bad" if n in bad else None)) for n in range(40)]
    messages, apart = composer.digests("slack", rows)
    assert [row.id for row, _ in apart] == bad
    assert all("ZeroDivisionError" in why for _, why in apart)
    assert sorted(ids(messages)) == [n for n in range(40) if n not in bad]
    # Halved around each (40 entries: at most 6 halvings), not one message an event.
    assert len(messages) <= 1 + 6 * len(bad)


def test_a_stored_event_that_no_longer_parses_is_set_apart(composer: Composer) -> None:
    rows = [make_row(n, owner_change(n)) for n in range(3)]
    rows[1] = Claimed(**{**rows[1].__dict__, "body": "{"})
    messages, [(row, why)] = composer.digests("slack", rows)
    assert row.id == 1 and "no longer parses" in why
    assert ids(messages) == [0, 2]


def test_an_entry_too_big_even_alone_is_cut_not_lost(config: Config, tmp_path: Path) -> None:
    composer = rooms_in_text(config, tmp_path)
    rooms = [long_room(0, 100), long_room(1, 5000)]
    out = composer.digests(
        "slack", [make_row(n, owner_change(n, rooms[n])) for n in range(2)]
    ).messages
    assert [[row.id for row in chunk] for _, chunk in out] == [[0], [1]]
    alone = json.loads(out[1][0])["text"]
    assert len(alone) == blockkit_limits.TOP_TEXT_CHARS and alone.endswith(ELLIPSIS)
    assert alone.startswith(rooms[1][:3000])


@pytest.mark.parametrize(
    "entry",
    [
        '{"type": "context", "elements": [{% for entry in entries %}'
        '{"type": "mrkdwn", "text": "{{ entry.room_id }}"}{{ "," if not loop.last }}'
        "{% endfor %}]}",
        '{"type": "section", "fields": [{% for entry in entries %}'
        '{"type": "mrkdwn", "text": "{{ entry.room_id }}"}{{ "," if not loop.last }}'
        "{% endfor %}]}",
    ],
    ids=["context elements", "section fields"],
)
def test_a_digest_whose_entries_slack_would_leave_out_is_split(
    config: Config, tmp_path: Path, entry: str
) -> None:
    # Slack takes 10 context elements or fields a block: an entry each, 15 entries lost five.
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "digest.j2").write_text(
        '{"text": "{{ count }} events", "blocks": [' + entry + "]}", encoding="utf-8"
    )
    composer = Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))
    rows = [make_row(n, owner_change(n)) for n in range(15)]
    out = composer.digests("slack", rows).messages
    assert ids(out) == list(range(15))
    for payload, chunk in out:
        [block] = json.loads(payload)["blocks"]
        shown = [e["text"] for e in block.get("elements", block.get("fields"))]
        assert shown == [f"room-{row.id:03d}" for row in chunk]


# (a digest template whose entries share one text, the entries' rooms, the one cut alone)
SHARED_TEXT = [
    (  # 40 lines of 100-odd characters: over a section's 3,000 together
        '{"type": "section", "text": {"type": "mrkdwn", "text": "{% for entry in entries %}'
        '{{ entry.room_id }}\\n{% endfor %}"}}',
        [long_room(n, 100) for n in range(40)],
        None,
    ),
    (  # a header of 150 characters: ten rooms of 20
        '{"type": "header", "text": {"type": "plain_text", "text": "{% for entry in entries %}'
        '{{ entry.room_id }} {% endfor %}"}}',
        [long_room(n, 20) for n in range(10)],
        None,
    ),
    (  # one room over the limit alone: that one cut (by itself), the others whole
        '{"type": "section", "text": {"type": "mrkdwn", "text": "{% for entry in entries %}'
        '{{ entry.room_id }}\\n{% endfor %}"}}',
        [long_room(n, 4000 if n == 5 else 30) for n in range(12)],
        5,
    ),
]


@pytest.mark.parametrize(("block", "rooms", "alone"), SHARED_TEXT)
def test_a_digest_whose_entries_share_a_text_is_split_not_cut(
    config: Config, tmp_path: Path, block: str, rooms: list[str], alone: int | None
) -> None:
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "digest.j2").write_text(
        '{"text": "{{ count }} events", "blocks": [' + block + "]}", encoding="utf-8"
    )
    composer = Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))
    rows = [make_row(n, owner_change(n, room)) for n, room in enumerate(rooms)]
    out = composer.digests("slack", rows).messages
    assert ids(out) == list(range(len(rooms)))
    for payload, chunk in out:
        [shown] = json.loads(payload)["blocks"]
        text = shown["text"]["text"]
        if alone is not None and [row.id for row in chunk] == [alone]:
            assert text.endswith(ELLIPSIS) and text.startswith(rooms[alone][:100])
            continue
        assert ELLIPSIS not in text
        assert text.split() == [rooms[row.id] for row in chunk]


def test_a_digest_of_long_entries_is_split_below_what_slack_is_reported_to_refuse(
    composer: Composer,
) -> None:
    # 40 owner changes with long IDs: within every documented limit in one message, but over the
    # ~12,000 characters of blocks that chat.postMessage answers with msg_blocks_too_long.
    rows = [make_row(n, {**owner_change(n), "OriginalOwner_Account": f"u{n}-" + "x" * 300})
            for n in range(40)]  # fmt: skip
    out = composer.digests("slack", rows).messages
    assert ids(out) == list(range(40)) and len(out) > 1
    for payload, chunk in out:
        blocks = checked(payload)["blocks"]
        assert len(json.dumps(blocks, ensure_ascii=False)) <= 12_000
        assert len(blocks) == len(chunk) + 2  # header, an entry each, context: nothing cut


# --- every command ------------------------------------------------------------------------------

SUMMARIES = {
    "Live.CallbackAfterCreateRoom": (
        "Room *live-42* “Friday night karaoke” created by brennanli, owner 144115233775727695"
    ),
    "Live.CallbackAfterDestroyRoom": (
        "Room *live-42* “Friday night karaoke” destroyed by the system (1284 viewers)"
    ),
    "Live.CallbackAfterUpdateRoomInfo": (
        "Room *live-42* updated by host_anna: name, max members, chat muted, listed publicly,"
        " seat mode, activity status, category, cover, custom info"
    ),
    "Live.CallbackAfterSetMetadata": (
        "Room *live-42* metadata set by host_anna: announcement, song_queue"
    ),
    "Live.CallbackAfterDelMetadata": (
        "Room *live-42* metadata deleted by host_anna: announcement, song_queue"
    ),
    "Live.CallbackAfterCreateRoomReachingThreshold": (
        "Room count threshold reached: 950 of 1000 rooms in use (95%)"
    ),
    "Live.CallbackAfterMemberStateChanged": (
        "Room *live-42*: 3 members went online (entered): viewer_01, 144115245442327522, viewer_03"
    ),
    OWNER_CHANGED: "Room *room_id*: user1 → user2 (by admin)",
    "Live.CallbackAfterModifyAdmin": (
        "Room *live-42*: 2 admins added by host_anna: mod_ben, 144115245442327522"
    ),
    "Mic.CallbackAfterSeatInfoChanged": (
        "Room *live-42*: seats changed, 2 of 4 taken: #0 144115233775727695, #1 viewer_01"
    ),
    "Live.CallbackAfterCreateBattle": (
        "Battle created by host_anna: *live-42* vs live-77, live-81 (60 s)"
    ),
    "Live.CallbackAfterStartBattle": "Battle started: *live-42* vs live-77, live-81 (60 s)",
    "Live.CallbackAfterEndBattle": (
        "Battle ended (time up): *live-42* 1250 · live-77 980 · live-81 0"
    ),
    "Live.CallbackBeforeSendGift": (
        "Room *live-42*: viewer_01 is sending 3 × rocket (3000 coins) to 144115233775727695"  # noqa: RUF001
    ),
    UNKNOWN: f"`{UNKNOWN}` in room *live-42* by host_anna",
}


def test_every_command_has_a_summary() -> None:
    assert list(SUMMARIES) == COMMANDS


@pytest.mark.parametrize(("command", "expected"), SUMMARIES.items())
def test_each_command_is_one_line_naming_its_room(
    composer: Composer, command: str, expected: str
) -> None:
    row = make_row(1, sample(command))
    [(payload, chunk)] = composer.digests("slack", [row]).messages
    message = checked(payload)
    assert chunk == [row]
    assert message["text"].startswith("1 Live event: 1 ")
    assert message["blocks"][0]["text"]["text"] == "1 Live event"
    [text] = sections(message)
    assert summary(text) == expected
    if (room := parse_event(json.loads(row.body)).room()) is not None:
        assert f"*{room}*" in text
    [(console, _)] = composer.digests("console", [row]).messages
    fallback = text.partition(" · ")[0].rpartition("|")[2].removesuffix(">")  # the plain time
    assert console.split("\n") == [
        f"[{fallback}] digest of 1 event:",
        "  " + single_event_line(composer, row),
    ]


def test_one_digest_of_every_command(composer: Composer) -> None:
    rows = [make_row(n, sample(command)) for n, command in enumerate(COMMANDS)]
    [(payload, chunk)] = composer.digests("slack", rows).messages
    message = checked(payload)
    assert chunk == rows
    assert message["text"] == (
        "15 Live events: 1 room created, 1 room destroyed, 1 room info update, 1 metadata change,"
        " 1 metadata deletion, 1 room threshold alert, 1 member state change,"
        " 1 room owner change, 1 admin change, 1 seat change, 1 battle created, 1 battle started,"
        " 1 battle ended, 1 gift, 1 other event"
    )
    assert [summary(text) for text in sections(message)] == list(SUMMARIES.values())
    [(console, _)] = composer.digests("console", rows).messages
    lines = console.split("\n")
    assert lines[0] == "[2023-12-26 11:25:22 UTC] digest of 15 events:"
    assert lines[1:] == ["  " + single_event_line(composer, row) for row in rows]


def _bare(command: str) -> dict[str, Any]:
    return {"CallbackCommand": command}


def _nulls(command: str) -> dict[str, Any]:
    return {k: None for k in sample(command)} | {"CallbackCommand": command}


def _empties(command: str) -> dict[str, Any]:
    empty: dict[type, Any] = {dict: {}, list: []}
    body = {k: empty.get(type(v), v) for k, v in sample(command).items()}
    return body | {"CallbackCommand": command}


@pytest.mark.parametrize("shape", [_bare, _nulls, _empties])
def test_events_missing_their_fields_still_make_a_digest(composer: Composer, shape: Any) -> None:
    rows = [make_row(n, shape(command)) for n, command in enumerate(COMMANDS)]
    [(payload, _)] = composer.digests("slack", rows).messages
    texts = sections(checked(payload))
    assert len(texts) == len(COMMANDS)
    for text in texts:
        assert summary(text) and "None" not in text and "Undefined" not in text
    [(console, _)] = composer.digests("console", rows).messages
    assert len(console.split("\n")) == len(COMMANDS) + 1


def test_several_apps_are_all_named_and_one_event_is_singular(composer: Composer) -> None:
    rows = [make_row(0, owner_change(0)), make_row(1, owner_change(1), sdk_app_id=APP + 1)]
    [(payload, _)] = composer.digests("slack", rows).messages
    assert json.loads(payload)["blocks"][-1]["elements"][0]["text"] == (
        f"SDKAppID {APP}, {APP + 1} · oldest first"
    )
    [(payload, _)] = composer.digests("slack", rows[:1]).messages
    assert json.loads(payload)["text"] == "1 Live event: 1 room owner change"


def test_a_command_named_like_the_digest_is_an_ordinary_unknown_command(
    composer: Composer,
) -> None:
    row = make_row(0, {**UNKNOWN_SAMPLE, "CallbackCommand": "digest"})
    [(payload, _)] = composer.digests("slack", [row]).messages
    assert summary(sections(checked(payload))[0]) == "`digest` in room *live-42* by host_anna"
    [(console, _)] = composer.digests("console", [row]).messages
    _, line = console.split("\n")
    assert line.startswith("  [2023-12-26 11:43:42 UTC] digest room live-42 by host_anna: {")
    # On its own, the event is looked up as kind/digest.j2: it gets what default.j2 makes.
    slack = json.loads(composer.payload(row))
    assert slack["text"] == "Live event digest in live-42"
    assert composer.payload(Claimed(**{**row.__dict__, "channel": "console"})) == line[2:]


@pytest.mark.parametrize(
    "command", ["digest", "./digest", "/digest", "./" + OWNER_CHANGED, OWNER_CHANGED + "/"]
)
def test_a_command_shaped_like_a_path_picks_no_console_template(
    composer: Composer, command: str
) -> None:
    # The command is the caller's: a path to the digest itself made the include recurse until
    # the whole digest failed, and "./Live.…" picked a template the event alone does not get.
    body = {**sample(OWNER_CHANGED), "CallbackCommand": command}
    rows = [make_row(0, owner_change(0), "console"), make_row(1, body, "console")]
    [(console, _)] = composer.digests("console", rows).messages
    assert console.split("\n")[1:] == ["  " + single_event_line(composer, row) for row in rows]


# --- hostile values -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v)[:24])
def test_hostile_values_stay_text(composer: Composer, value: str) -> None:
    rows = [make_row(n, hostile(command, value)) for n, command in enumerate(COMMANDS)]
    digests = composer.digests("slack", rows).messages
    assert ids(digests) == [row.id for row in rows]
    for payload, chunk in digests:
        message = checked(payload)
        assert len(sections(message)) == len(chunk)
        for text in strings(message):
            rest = DATE_TOKEN.sub("", text)
            assert "<" not in rest and ">" not in rest, text[:200]
        assert not any(token in DATE_TOKEN.sub("", payload) for token in PINGS_AND_LINKS)
    if len(value) < 100:
        assert any(slack_text(value) in text for p, _ in digests for text in strings(json.loads(p)))

    [(console, chunk)] = composer.digests("console", rows).messages
    assert chunk == rows
    lines = console.split("\n")
    assert len(lines) == len(rows) + 1 == len(console.splitlines())
    assert all(line.startswith("  [") for line in lines[1:])
    assert "\x1b" not in console


# --- one delivery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["slack", "console"])
def test_a_stored_payload_is_sent_as_it_is(composer: Composer, channel: str) -> None:
    row = make_row(0, owner_change(0), channel=channel, payload='{"text":"as stored"}')
    assert composer.payload(row) == '{"text":"as stored"}'


@pytest.mark.parametrize("channel", ["slack", "console"])
@pytest.mark.parametrize("command", [OWNER_CHANGED, "Live.CallbackBeforeSendGift", UNKNOWN])
def test_a_delivery_without_payload_is_rendered_again(
    composer: Composer, config: Config, channel: str, command: str
) -> None:
    body = sample(command)
    row = make_row(3, body, channel=channel)
    expected = Renderer(config.templates).render(
        channel,
        parse_event(body),
        body,
        Context(sdk_app_id=APP, received_at=RECEIVED + 3, query={}),
    )
    assert composer.payload(row) == expected
    text = json.loads(expected)["text"] if channel == "slack" else expected
    assert str(parse_event(json.loads(row.body)).room()) in text and "\n" not in text


@pytest.mark.parametrize(
    ("stored", "expected"), [('{"clientip": "1.2.3.4"}', '{"clientip": "1.2.3.4"}'), ("", "{}")]
)
def test_a_delivery_rendered_again_sees_the_query_it_arrived_with(
    config: Config, tmp_path: Path, stored: str, expected: str
) -> None:
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / "default.j2").write_text("{{ query | as_text }}", encoding="utf-8")
    composer = Composer(config, Renderer(TemplatesConfig(dir=tmp_path)))
    row = Claimed(**{**make_row(0, UNKNOWN_SAMPLE, channel="console").__dict__, "query": stored})
    assert composer.payload(row) == expected


def test_a_stored_event_that_no_longer_parses_is_a_render_error(composer: Composer) -> None:
    row = Claimed(**{**make_row(0, owner_change(0)).__dict__, "body": '{"RoomId": "x"}'})
    with pytest.raises(RenderError, match="stored event 1000 no longer parses"):
        composer.payload(row)
