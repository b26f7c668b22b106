from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.config_tables import TemplatesConfig
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer

CTX = Context(sdk_app_id=1400000000, received_at=1703589923.5, query={"clientip": "1.2.3.4"})
MEMBERS: dict[str, Any] = {
    "CallbackCommand": "Live.CallbackAfterMemberStateChanged", "RoomId": "café <!here>",
    "EventTime": 1703589922780, "EventType": "Enter",
    "MemberList": [{"Member_Account": "<!channel>"}, {"Member_Account": 42}],
}  # fmt: skip
CREATED: dict[str, Any] = {
    "CallbackCommand": "Live.CallbackAfterCreateRoom", "EventTime": 1703589922780,
    "RoomInfo": {"RoomId": "r1", "RoomName": "<b>", "MaxMemberCount": 50, "IsSeatEnabled": True},
}  # fmt: skip


def render(tmp_path: Path, kind: str, template: str, fields: dict[str, Any]) -> str:
    (tmp_path / "mine.j2").write_text(template)
    renderer = Renderer(TemplatesConfig(dir=tmp_path))
    return renderer.render(kind, parse_event(fields), fields, CTX, "mine.j2")


def test_slack_tojson_keeps_lists_numbers_and_nested_objects_escaping_their_text(
    tmp_path: Path,
) -> None:
    template = '{"text": "x", "members": {{ event.MemberList | tojson }}, '
    template += '"at": {{ event.EventTime | tojson }}}'
    members = json.loads(render(tmp_path, "slack", template, MEMBERS))
    assert members["members"] == [{"Member_Account": "&lt;!channel&gt;"}, {"Member_Account": "42"}]
    assert members["at"] == 1703589922780
    template = '{"text": "x", "room": {{ event.RoomInfo | tojson }}}'
    room = json.loads(render(tmp_path, "slack", template, CREATED))["room"]
    assert room["RoomName"] == "&lt;b&gt;"
    assert (room["MaxMemberCount"], room["IsSeatEnabled"], room["RoomType"]) == (50, True, None)


def test_webhook_and_console_tojson_give_the_whole_event(tmp_path: Path) -> None:
    body = json.loads(render(tmp_path, "webhook", '{"event": {{ event | tojson }}}', MEMBERS))
    assert body["event"]["RoomId"] == "café <!here>"
    assert body["event"]["MemberList"] == [
        {"Member_Account": "<!channel>"},
        {"Member_Account": "42"},
    ]
    line = render(tmp_path, "console", "{{ event | tojson }}", MEMBERS)
    assert json.loads(line)["RoomId"] == "café <!here>"
    assert "café" in line  # as the operator reads it, not \u00e9


def test_as_text_of_a_list_reads_as_written(tmp_path: Path) -> None:
    fields = {"CallbackCommand": "Live.CallbackAfterDelMetadata", "RoomId": "r", "Keys": ["café"]}
    assert render(tmp_path, "console", "{{ event.Keys | as_text }}", fields) == '["café"]'


MACROS = (
    "{% macro field(label, value) %}*{{ label }}*\\n{{ value }}{% endmacro %}"
    "{% set when %}{{ event.RoomId }} at {{ slack_date }}{% endset %}"
    "{% macro wrap() %}[{{ caller() }}]{% endmacro %}"
    '{"text": "{{ field("Room", event.RoomId) }}", "when": "{{ when }}",'
    ' "called": "{% call wrap() %}{{ event.RoomId }}{% endcall %}"}'
)


def test_a_macro_or_set_block_is_escaped_once_as_it_was_written(tmp_path: Path) -> None:
    # Escaped again where it was inserted, a room "Q&A" showed as "Q&amp;amp;A", a quote as
    # \" and the bridge's date token as text.
    fields = {**MEMBERS, "RoomId": 'Q&A "<!here>"\nx'}
    out = json.loads(render(tmp_path, "slack", MACROS, fields))
    room = 'Q&amp;A "&lt;!here&gt;"\\nx'
    assert out["text"] == f"*Room*\n{room}"
    assert out["when"].startswith(f"{room} at <!date^1703589922^")
    assert out["called"] == f"[{room}]"
    webhook = json.loads(render(tmp_path, "webhook", MACROS, fields))
    assert webhook["text"] == f"*Room*\n{fields['RoomId']}"
    assert webhook["called"] == f"[{fields['RoomId']}]"
