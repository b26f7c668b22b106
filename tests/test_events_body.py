from __future__ import annotations

import json

import pytest

from bridge.events import OWNER_CHANGED
from bridge.events_body import BadEvent, decode_body
from bridge.events_parse import parse_event
from bridge.samples import SAMPLES


def test_a_byte_order_mark_in_front_is_read_past() -> None:
    body = b"\xef\xbb\xbf" + json.dumps(SAMPLES[OWNER_CHANGED]).encode()
    assert parse_event(decode_body(body)).RoomId == SAMPLES[OWNER_CHANGED]["RoomId"]
    with pytest.raises(BadEvent, match="not valid JSON"):
        decode_body(b"\xef\xbb\xbf\xef\xbb\xbf{}")  # one, in front: no more


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"CallbackCommand": NaN}', "not a JSON number"),
        (b'{"a": 1e999999}', None),  # parses (inf) but then lacks CallbackCommand
        (b"{}", "string CallbackCommand"),
        (b'{"CallbackCommand": 5}', "string CallbackCommand"),
        (b'{"CallbackCommand": ""}', "string CallbackCommand"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"CallbackCommand": "x", "RoomId": "' + b"9" * 5000 + b'"}', None),  # fine: a string
        (b'{"CallbackCommand": "x", "v": 1e400}', "out of range"),
        (b'{"CallbackCommand": "x", "v": -1e400}', "out of range"),
        (b'{"CallbackCommand": "x\\u0000"}', "NUL"),
        (b'{"CallbackCommand": "x", "RoomId": "r\\u0000"}', "NUL"),
        (b'{"CallbackCommand": "x", "FromRoomId": "r\\u0000"}', "NUL"),
    ],
)
def test_bad_bodies_are_refused_with_a_short_reason(body: bytes, message: str | None) -> None:
    if message is None and b'"x"' in body:
        assert parse_event(decode_body(body)).RoomId == "9" * 5000
        return
    with pytest.raises(BadEvent) as caught:
        parse_event(decode_body(body))
    if message is not None:
        assert message in str(caught.value)
    assert len(str(caught.value)) <= 200


def test_fractional_numbers_keep_their_value() -> None:
    fields = decode_body(b'{"CallbackCommand": "x", "Score": 1.5, "Ratio": -2.5e-3}')
    assert (fields["Score"], fields["Ratio"]) == (1.5, -0.0025)


def test_huge_integer_literal_is_refused_not_crashing() -> None:
    with pytest.raises(BadEvent):
        decode_body(b'{"CallbackCommand": "x", "n": ' + b"9" * 5000 + b"}")


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(BadEvent, match="surrogate"):
        decode_body(b'{"CallbackCommand": "x", "RoomId": "\\ud800"}')
