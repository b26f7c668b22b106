from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.config_tables import TemplatesConfig
from bridge.escape import slack_escape, slack_text
from bridge.events_body import decode_body
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer, RenderError
from tests.payloads import strings

ROOT = Path(__file__).parent.parent
CTX = Context(sdk_app_id=1400000000, received_at=1703589923.5, query={"clientip": "1.2.3.4"})
SEED: dict[str, Any] = {
    "CallbackCommand": "Live.CallbackAfterChangeOwner", "RoomId": "room_id",
    "EventTime": 1703589922780, "Operator_Account": "admin",
    "CurrentOwner_Account": "user2", "OriginalOwner_Account": "user1",
}  # fmt: skip
INJECTIONS = [
    "<!channel>", "<!here>", "<!everyone>", "<@U123>", "<!subteam^S1>", "<http://x|y>",
    "a & b", 'say "hi"', "back\\slash", "two\nlines", "tab\tand\x1b[31mescape", "}]}",
    "{{ 7 * 7 }}", "room_1\n*New owner*\nalice", "old \u202e→ wen", "a\r\nb\u2028c",
]  # fmt: skip


def renderer(tmp_path: Path | None = None, **settings: Any) -> Renderer:
    return Renderer(TemplatesConfig(dir=tmp_path or ROOT / "templates", **settings))


def render(kind: str, fields: dict[str, Any], r: Renderer | None = None) -> str:
    return (r or renderer()).render(kind, parse_event(fields), fields, CTX)


def test_owner_changed_slack_message_for_moderators() -> None:
    payload = json.loads(render("slack", SEED, renderer(room_url="https://c.example/r/{room_id}")))
    assert payload["text"] == "Room owner changed in room_id: user1 → user2"
    header, section, context, actions = payload["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Room owner changed"},
    }
    fields = [f["text"] for f in section["fields"]]
    assert fields[:4] == [
        "*Room*\nroom_id",
        "*New owner*\nuser2",
        "*Previous owner*\nuser1",
        "*Changed by*\nadmin",
    ]
    assert fields[4] == (
        "*When*\n<!date^1703589922^{date_short_pretty} {time_secs}|2023-12-26 11:25:22 UTC>"
    )
    assert context["elements"][0]["text"] == "Live.CallbackAfterChangeOwner · SDKAppID 1400000000"
    assert actions["elements"][0]["url"] == "https://c.example/r/room_id"


def test_no_button_without_room_url_and_fallback_time_in_configured_zone() -> None:
    payload = json.loads(render("slack", SEED, renderer(timezone="Asia/Shanghai")))
    assert [b["type"] for b in payload["blocks"]] == ["header", "section", "context"]
    assert "|2023-12-26 19:25:22 CST>" in payload["blocks"][1]["fields"][4]["text"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("field", ["RoomId", "CurrentOwner_Account", "Operator_Account"])
def test_untrusted_values_come_out_as_literal_text(field: str, value: str) -> None:
    fields = {**SEED, field: value}
    payload = json.loads(render("slack", fields, renderer(room_url="https://c.example/{room_id}")))
    texts = strings(payload)
    assert any(slack_text(value) in t for t in texts)
    if value != slack_escape(value) or value != slack_text(value):
        assert not any(value in t for t in texts)  # never as it came: no forged line, no escape
    for text in texts:
        without_date = text.replace("<!date^", "")
        assert "<!" not in without_date and "<@" not in text and "<http" not in text
    webhook = json.loads(render("webhook", fields))
    assert webhook["event"][field] == value  # exact, unescaped, valid JSON
    line = render("console", fields)
    assert "\n" not in line and "\x1b" not in line


@pytest.mark.parametrize(
    ("room", "segment"),
    [
        ("a b/<!here>&x", "a%20b%2F%3C%21here%3E%26x"),
        ("..", "%2E%2E"),  # a browser opens /rooms/../moderate as /moderate
        (".", "%2E"),
        ("a..b", "a..b"),
        ("...", "..."),
    ],
)
def test_room_url_is_percent_encoded(room: str, segment: str) -> None:
    fields = {**SEED, "RoomId": room}
    r = renderer(room_url="https://c.example/rooms/{room_id}/moderate")
    payload = json.loads(render("slack", fields, r))
    url = payload["blocks"][-1]["elements"][0]["url"]
    assert url == f"https://c.example/rooms/{segment}/moderate"


def test_webhook_default_body_keeps_original_fields_and_big_numbers() -> None:
    body = (
        b'{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":"r",'
        b'"Operator_Account":144115233775727695,"Extra":{"k":[1,2]}}'
    )
    fields = decode_body(body)
    out = render("webhook", fields)
    assert '"Operator_Account":144115233775727695' in out.replace(" ", "")
    data = json.loads(out)
    assert data["type"] == "Live.CallbackAfterChangeOwner"
    assert data["sdk_app_id"] == 1400000000
    assert data["received_at"] == "2023-12-26T11:25:23.500000+00:00"
    assert data["event"] == {**fields}


def test_lookup_order_channel_template_then_command_then_default(tmp_path: Path) -> None:
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "default.j2").write_text('{"text": "override default {{ command }}"}')
    (tmp_path / "mine.j2").write_text('{"text": "mine {{ event.RoomId }}"}')
    r = renderer(tmp_path)
    unknown = {"CallbackCommand": "Live.CallbackAfterSomethingNew", "RoomId": "r"}
    assert json.loads(render("slack", unknown, r))["text"].startswith("override default")
    # The shipped per-command template still wins over an overriding default.
    assert r.template_name("slack", "Live.CallbackAfterChangeOwner", None) == (
        "slack/Live.CallbackAfterChangeOwner.j2"
    )
    event = parse_event(SEED)
    assert json.loads(r.render("slack", event, SEED, CTX, "mine.j2"))["text"] == "mine room_id"


# Every variable a template may name, and what it gives for SEED and CTX.
VARIABLES = {
    "command": "Live.CallbackAfterChangeOwner", "sdk_app_id": "1400000000",
    "room_id": "room_id", "event.RoomId": "room_id", "fields.RoomId": "room_id",
    "query.clientip": "1.2.3.4", "received_at.year": "2023",
    "received_at_iso": "2023-12-26T11:25:23.500000+00:00", "happened_at.second": "22",
    "happened_at_text": "2023-12-26 11:25:22 UTC", "slack_date": "<!date^1703589922^",
    "room_url": "https://c.example/r/room_id",
}  # fmt: skip


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("how", ["direct", "include", "import", "extends"])
def test_every_variable_reaches_the_template_however_it_is_named(
    tmp_path: Path, variable: str, how: str
) -> None:
    # Only the variables a template names are worked out; one that draws on another template
    # (include, import, extends) gets them all, since its own text does not say which it needs.
    value = "{{ " + variable + " }}"
    (tmp_path / "inner.j2").write_text(value)
    (tmp_path / "macros.j2").write_text("{% macro show() %}" + value + "{% endmacro %}")
    (tmp_path / "base.j2").write_text('{"text": "{% block body %}{% endblock %}"}')
    (tmp_path / "mine.j2").write_text(
        {
            "direct": '{"text": "' + value + '"}',
            "include": '{"text": "{% include "inner.j2" %}"}',
            "import": '{% import "macros.j2" as m with context %}{"text": "{{ m.show() }}"}',
            "extends": '{% extends "base.j2" %}{% block body %}' + value + "{% endblock %}",
        }[how]
    )
    r = renderer(tmp_path, room_url="https://c.example/r/{room_id}")
    text = json.loads(r.render("webhook", parse_event(SEED), SEED, CTX, "mine.j2"))["text"]
    assert text.startswith(VARIABLES[variable])


def test_override_directory_replaces_a_shipped_file_by_name(tmp_path: Path) -> None:
    (tmp_path / "slack").mkdir()
    (tmp_path / "slack" / "Live.CallbackAfterChangeOwner.j2").write_text('{"text": "custom"}')
    assert json.loads(render("slack", SEED, renderer(tmp_path)))["text"] == "custom"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{"text": "{{ event.RoomIdd }}"}', "mine.j2, line 1"),
        ('{"text": "a",\n "x": "{{ nope }}"}', "mine.j2, line 2: UndefinedError"),
        ('{"text": "{% if %}"}', "line 1"),
        ('{"text": "a" "b"}', "output is not JSON"),
        ('{"blocks": []}', "needs a non-empty top-level text"),
        ('{"text": "x", "blocks": [{"text": 1}]}', "every block needs a type"),
    ],
)
def test_template_mistakes_name_file_and_line(tmp_path: Path, template: str, message: str) -> None:
    (tmp_path / "mine.j2").write_text(template)
    with pytest.raises(RenderError) as caught:
        renderer(tmp_path).render("slack", parse_event(SEED), SEED, CTX, "mine.j2")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "template",
    [
        '{"a": NaN}',
        '{"a": -Infinity}',
        '{"a": 1e400}',  # a number JSON allows, read as Infinity and written so
        '{"a": {{ (event.EventTime * 1e308) | tojson }}}',  # a float out of range: Infinity
    ],
)
def test_a_template_whose_output_is_not_strict_json_is_an_error(
    tmp_path: Path, template: str
) -> None:
    # Python's json reads and writes NaN and Infinity, which JSON has not: the receiver's parser
    # (JSON.parse, Go's encoding/json, …) would refuse the body every time.
    (tmp_path / "mine.j2").write_text(template)
    with pytest.raises(RenderError, match=r"mine\.j2: output is not JSON"):
        renderer(tmp_path).render("webhook", parse_event(SEED), SEED, CTX, "mine.j2")


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{ " + "(" * 1200 + "room_id" + ")" * 1200 + " }}", "RecursionError"),
        ("{% for a in [1] %}" * 25 + "x" + "{% endfor %}" * 25, "SyntaxError"),
    ],
    ids=["too deep to parse", "too deep for Python"],
)
@pytest.mark.parametrize("kind", ["console", "webhook"])
def test_a_command_template_that_does_not_load_is_a_render_error(
    tmp_path: Path, template: str, error: str, kind: str
) -> None:
    # Looked for as kind/COMMAND.j2 outside the render's own catch: the callback was answered
    # 500 and not stored, and a delivery process's lane failed with the delivery in flight.
    (tmp_path / kind).mkdir()
    (tmp_path / kind / "Live.CallbackAfterChangeOwner.j2").write_text(template)
    with pytest.raises(RenderError) as caught:
        renderer(tmp_path).render(kind, parse_event(SEED), SEED, CTX)
    assert f"{kind}/Live.CallbackAfterChangeOwner.j2: {error}" in str(caught.value)


def test_missing_template_is_a_render_error(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"absent\.j2 not found"):
        renderer(tmp_path).render("slack", parse_event(SEED), SEED, CTX, "absent.j2")


@pytest.mark.parametrize(
    ("explicit", "inner"),
    [("x\x1b[2Jy\nlive-bridge: FAKE.j2", None), ("mine.j2", "{% include 'a\\nb\\x1b.j2' %}")],
)
def test_a_template_name_is_shown_escaped_in_errors(
    tmp_path: Path, explicit: str, inner: str | None
) -> None:
    # Names come from the config and from callers: none may write a line of its own.
    (tmp_path / "slack").mkdir()
    if inner is not None:
        (tmp_path / explicit).write_text('{"text": "' + inner + '"}', encoding="utf-8")
    with pytest.raises(RenderError) as caught:
        renderer(tmp_path).render("slack", parse_event(SEED), SEED, CTX, explicit)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert "\\n" in message and "\\u001b" in message


# (what mine.j2 holds, what inner.j2 holds, the file and line the message names, and why)
INCLUDED_MISTAKES = [
    ('{"text": "a",\n "b": "{% include "absent.j2" %}"}', None, "mine.j2, line 2",
     "includes absent.j2, which does not exist"),
    ('{"text": "a",\n "b": "{% include "inner.j2" %}"}', "x\n{{ event.RoomIdd }}",
     "inner.j2, line 2", "UndefinedError"),
    ('{"text": "a",\n "b": "{% include "inner.j2" %}"}', "x\n{% include 'absent.j2' %}",
     "inner.j2, line 2", "includes absent.j2, which does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("mine", "inner", "where", "why"), INCLUDED_MISTAKES)
def test_a_mistake_in_or_of_an_included_template_names_its_file_and_line(
    tmp_path: Path, mine: str, inner: str | None, where: str, why: str
) -> None:
    (tmp_path / "mine.j2").write_text(mine)
    if inner is not None:
        (tmp_path / "inner.j2").write_text(inner)
    with pytest.raises(RenderError) as caught:
        renderer(tmp_path).render("slack", parse_event(SEED), SEED, CTX, "mine.j2")
    assert str(caught.value).startswith(f"{tmp_path / where}: ")
    assert why in str(caught.value)


@pytest.mark.parametrize("included", [False, True])
def test_a_template_that_is_not_utf8_names_its_file_and_line(
    tmp_path: Path, included: bool
) -> None:
    (tmp_path / "slack").mkdir()
    bad = tmp_path / "slack" / ("inner.j2" if included else "Live.CallbackAfterChangeOwner.j2")
    bad.write_bytes(b'{"text": "a",\n\n "b": "caf\xe9"}')
    if included:
        (tmp_path / "slack" / "Live.CallbackAfterChangeOwner.j2").write_text(
            '{"text": "a", "b": "{% include "slack/inner.j2" %}"}'
        )
    with pytest.raises(RenderError) as caught:
        render("slack", SEED, renderer(tmp_path))
    assert str(caught.value) == f"{bad}, line 3: not UTF-8 text"


def test_long_values_are_cut_with_an_ellipsis() -> None:
    fields = {**SEED, "RoomId": "x" * 5000, "CurrentOwner_Account": "<" * 3000}
    payload = json.loads(render("slack", fields))
    room = payload["blocks"][1]["fields"][0]["text"]
    assert len(room) == 2000 and room.endswith("…")
    owner = payload["blocks"][1]["fields"][1]["text"]
    assert owner.endswith("&lt;…") and len(owner) <= 2000
    assert len(payload["text"]) <= 4000


@pytest.mark.parametrize("event_time", [2**63 - 1, -(10**18)])  # in range, but no calendar date
def test_impossible_event_time_falls_back_to_received_time(event_time: int) -> None:
    payload = json.loads(render("slack", {**SEED, "EventTime": event_time}))
    assert "|2023-12-26 11:25:23 UTC>" in payload["blocks"][1]["fields"][4]["text"]


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\u2028", "\u2029", "\r", "\x00"])
def test_console_line_stays_one_line(char: str) -> None:
    # Not in RoomId: a NUL there is refused at parsing (the room is a store column).
    line = render("console", {**SEED, "CurrentOwner_Account": f"a{char}b"})
    assert len(line.splitlines()) == 1 and char not in line


def test_slack_tojson_escapes_keys_too(tmp_path: Path) -> None:
    (tmp_path / "mine.j2").write_text('{"text": "x", "data": {{ fields | tojson }}}')
    fields = {**SEED, "<!channel>": "<!here>"}
    out = renderer(tmp_path).render("slack", parse_event(fields), fields, CTX, "mine.j2")
    assert json.loads(out)["data"]["&lt;!channel&gt;"] == "&lt;!here&gt;"


def test_button_with_an_overlong_url_is_left_out() -> None:
    fields = {**SEED, "RoomId": "x" * 5000}
    payload = json.loads(render("slack", fields, renderer(room_url="https://c.example/{room_id}")))
    assert [b["type"] for b in payload["blocks"]] == ["header", "section", "context"]


@pytest.mark.parametrize("kind", ["slack", "webhook", "console"])
@pytest.mark.parametrize("variable", ["fields", "query", "event", "fields.RoomId"])
def test_as_text_turns_fields_and_query_into_text(tmp_path: Path, kind: str, variable: str) -> None:
    # `fields` and `query` are objects like any other to `as_text`, however they are held.
    (tmp_path / "mine.j2").write_text(
        "{{ " + variable + " | as_text }}"
        if kind == "console"
        else '{"text": "{{ ' + variable + ' | as_text }}"}'
    )
    out = renderer(tmp_path).render(kind, parse_event(SEED), SEED, CTX, "mine.j2")
    text = out if kind == "console" else json.loads(out)["text"]
    expected = {
        "fields": json.dumps(SEED, ensure_ascii=False),
        "query": '{"clientip": "1.2.3.4"}',
        "fields.RoomId": "room_id",
    }
    if variable in expected:
        assert text == expected[variable]
    else:
        assert json.loads(text)["RoomId"] == "room_id"
