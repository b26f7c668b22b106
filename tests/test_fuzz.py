"""Fuzzing the callback endpoint over real HTTP: never a 5xx, always a well-formed packet, and a
refused request stores nothing.

One bridge serves the whole module (a callback token configured, routes to a Slack webhook, a
generic webhook and the console, so every renderer runs inside the request). Hypothesis sends
query strings, bodies, methods and headers; each answer is checked against the same rule.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sqlite3
import string
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.events import MODELS
from bridge.samples import SAMPLES, UNKNOWN_SAMPLE
from bridge.verify import sign
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    OWNER,
    SEED_BODY,
    InThread,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn

TOKEN = "fuzz-callback-token"
MAX_BODY = 262_144  # [server] max_body_bytes, the default
# 405 for another method; 503 would mean the store failed, and it is healthy here.
ALLOWED = {200, 400, 401, 403, 405, 413}
PACKET_KEYS = {"ActionStatus", "ErrorInfo", "ErrorCode"}
INT64 = range(-(2**63), 2**63)
# Python refuses to convert longer digit strings to int (sys.int_max_str_digits).
INT_DIGITS_LIMIT = 4300
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- the bridge and one exchange with it ---------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in() -> Iterator[SlackStandIn]:
    with SlackStandIn() as running:
        yield running


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, stand_in: SlackStandIn) -> Iterator[InThread]:
    channels = (
        f'[channels.slack]\ntype = "slack"\nwebhook_url = "{stand_in.add_webhook()}"\n'
        "rate_per_s = 1000.0\nburst = 100\n"
        f'[channels.sink]\ntype = "webhook"\nurl = "{stand_in.sink_url()}"\n'
        '[channels.console]\ntype = "console"\n'
    )
    routes = '[[routes]]\nname = "all"\nchannels = ["slack", "sink", "console"]\n'
    path = write_config(
        tmp_path_factory.mktemp("fuzz"), channels=channels, routes=routes,
        tencent=f'callback_token = "{TOKEN}"',
    )  # fmt: skip
    with InThread(path) as running:
        yield running


@pytest.fixture(autouse=True)
def drained(bridge: InThread) -> Iterator[None]:
    """After each test, the worker's sends (the console's lines) finish while output is captured."""
    yield

    def settled() -> bool:
        with contextlib.closing(sqlite3.connect(bridge.config.store.path)) as conn:
            sql = "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'in_flight')"
            return int(conn.execute(sql).fetchone()[0]) == 0

    wait_until(settled, timeout=20)


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes


def exchange(
    running: InThread, target: str, body: bytes | Iterable[bytes] = b"", method: str = "POST",
    headers: dict[str, str] | None = None,
) -> Reply:  # fmt: skip
    """One request on a fresh connection; an iterable body goes out chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    try:
        chunked = not isinstance(body, bytes)
        conn.request(method, target, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        conn.close()


def stored(running: InThread) -> tuple[int, int]:
    """(events, deliveries) rows in the store."""
    with contextlib.closing(sqlite3.connect(running.config.store.path)) as conn:
        (events,) = conn.execute("SELECT count(*) FROM events").fetchone()
        (deliveries,) = conn.execute("SELECT count(*) FROM deliveries").fetchone()
        return events, deliveries


def check(running: InThread, target: str, body: bytes | Iterable[bytes] = b"", **kw: Any) -> Reply:
    """Send, then hold the answer to the contract: a packet, and storage that matches it."""
    before = stored(running)
    reply = exchange(running, target, body, **kw)
    after = stored(running)
    assert reply.status in ALLOWED, (reply.status, reply.body[:300])
    assert reply.content_type.split(";")[0].strip() == "application/json"
    packet = json.loads(reply.body)
    assert isinstance(packet, dict) and set(packet) == PACKET_KEYS, packet
    assert packet["ActionStatus"] in ("OK", "FAIL")
    assert isinstance(packet["ErrorInfo"], str)
    assert type(packet["ErrorCode"]) is int
    ok = packet["ActionStatus"] == "OK"
    assert ok == (reply.status == 200) == (packet["ErrorCode"] == 0), packet
    if ok:
        assert reply.body == OK_PACKET
        assert before[0] <= after[0] <= before[0] + 1  # stored once, or a duplicate
    else:
        assert packet["ErrorCode"] == reply.status
        assert after == before, "a refused request left rows in the store"
    return reply


def signed_target() -> str:
    """The callback path with a valid query: SdkAppid, RequestTime now and its Sign."""
    now = str(int(time.time()))
    return f"/tencent/callback?SdkAppid={APP_ID}&RequestTime={now}&Sign={sign(TOKEN, now)}"


# -- strategies ----------------------------------------------------------------------------------


def any_case(word: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(word), max_size=len(word))
    return flips.map(
        lambda f: "".join(c.swapcase() if s else c for c, s in zip(word, f, strict=True))
    )


def key_variants(*names: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(names), *(any_case(n) for n in names))


# What a URL's query may hold unencoded (RFC 3986), but its separators: sent as is. A stray "%"
# makes an invalid escape, which is worth sending too.
RAW_SAFE = string.ascii_letters + string.digits + "-._~!$'()*+,;:@/?%"
FULLWIDTH = str.maketrans(
    "0123456789", "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19"
)
ODD_TEXTS = ["", " ", "0", "-1", "%", "%zz", "%ff", "+", "1e9", "1400".translate(FULLWIDTH),
             "null", "[]", "\x00", "\ud800", "1" * 5000]  # fmt: skip
ODD_APP_IDS = [f" {APP_ID} ", f"+{APP_ID}", f"{APP_ID}.0", f"0{APP_ID}", str(APP_ID + 1),
               f"-{APP_ID}", str(APP_ID).translate(FULLWIDTH)]  # fmt: skip
junk = st.one_of(
    st.text(max_size=30), st.text(alphabet=RAW_SAFE, max_size=30), st.sampled_from(ODD_TEXTS)
)
app_ids = st.one_of(st.just(str(APP_ID)), st.sampled_from(ODD_APP_IDS), junk)


@dataclass(frozen=True)
class Stamp:
    """RequestTime = now + offset, filled in when the request is sent."""

    offset: int


@dataclass(frozen=True)
class SignOf:
    """A Sign computed at send time for now + offset, in the given letter case."""

    offset: int
    upper: bool = False
    token: str = TOKEN


Value = str | Stamp | SignOf
offsets = st.sampled_from([0, 0, 0, 30, -59, -61, 61, -86_400, 10**9])
times = st.one_of(offsets.map(Stamp), junk)
signs = st.one_of(
    st.builds(SignOf, offsets, st.booleans()),
    st.builds(SignOf, offsets, st.just(False), st.sampled_from(["", "wrong", TOKEN + " "])),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    junk,
)
commands = st.one_of(st.sampled_from([*MODELS, "Live.CallbackAfterSomethingNew"]), junk)


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` two times in three: enough valid requests get through to reach the body."""
    return st.integers(0, 2).flatmap(lambda n: other if n == 2 else good)


@st.composite
def queries(draw: st.DrawFn) -> list[tuple[str, Value, bool]]:
    """(key, value, percent-encode) pairs: Tencent's keys in any case, junk, repeats, any order."""
    offset = draw(mostly(st.just(0), offsets))
    wanted: list[tuple[st.SearchStrategy[str], st.SearchStrategy[Value]]] = [
        (key_variants("SdkAppid", "SdkAppId"), mostly(st.just(str(APP_ID)), app_ids)),
        (key_variants("RequestTime"), mostly(st.just(Stamp(offset)), times)),
        (key_variants("Sign"), mostly(st.builds(SignOf, st.just(offset), st.booleans()), signs)),
        (key_variants("CallbackCommand", "WebhookCommand"), commands),
        (key_variants("contenttype"), st.sampled_from(["json", "JSON", "xml", ""])),
    ]
    pairs: list[tuple[str, Value, bool]] = []
    for keys, values in wanted:
        if draw(st.integers(0, 9)) < 9:  # usually present
            pairs.append((draw(keys), draw(values), draw(st.booleans())))
    extra_keys = st.one_of(junk, key_variants("ClientIP", "OptPlatform"))
    extras: list[tuple[str, Value, bool]] = draw(
        st.lists(st.tuples(extra_keys, junk, st.booleans()), max_size=4)
    )
    pairs += extras
    if draw(st.booleans()) and pairs:  # a repeated key with another value
        key, _, encode = draw(st.sampled_from(pairs))
        pairs.append((key, draw(st.one_of(app_ids, times, signs, junk)), encode))
    return draw(st.permutations(pairs))


def escape(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")  # a lone surrogate as %ED%A0%80


def materialize(pairs: list[tuple[str, Value, bool]]) -> tuple[str, list[tuple[str, str]]]:
    """The query string to send, and the pairs as the bridge will decode them."""
    now = int(time.time())
    decoded: list[tuple[str, str]] = []
    parts: list[str] = []
    for key, value, encode in pairs:
        if isinstance(value, Stamp):
            text = str(now + value.offset)
        elif isinstance(value, SignOf):
            text = sign(value.token, str(now + value.offset))
            text = text.upper() if value.upper else text
        else:
            text = value
        decoded.append((key, text))
        if not encode and all(c in RAW_SAFE for c in key + text):
            parts.append(f"{key}={text}")
        else:
            parts.append(f"{escape(key)}={escape(text)}")
    return "&".join(parts), decoded


LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**53, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
FIELD_NAMES = sorted({name for model in MODELS.values() for name in model.model_fields})


@st.composite
def callback_objects(draw: st.DrawFn) -> dict[str, Any]:
    """An object with a CallbackCommand (of any type) and known field names set to anything."""
    body: dict[str, Any] = {"CallbackCommand": draw(st.one_of(commands, json_values))}
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=5, unique=True)):
        body[name] = draw(json_values)
    body.update(draw(st.dictionaries(st.text(max_size=12), json_values, max_size=3)))
    return body


def nested(depth: int, opener: str) -> str:
    """`depth` arrays or objects, one inside the other."""
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def deep_envelope(depth: int, opener: str) -> bytes:
    return f'{{"CallbackCommand":"{OWNER}","RoomId":"deep","x":{nested(depth, opener)}}}'.encode()


def envelope_with(fragment: str) -> bytes:
    head = f'{{"CallbackCommand":"{OWNER}","RoomId":"r","EventTime":1703589922780,'
    return f"{head}{fragment}}}".encode()


HUGE = "9" * 5001  # over Python's int conversion limit: json.loads refuses it
BIG = "9" * 4000  # under it: a valid, exact integer
ODD_BODIES = [
    b"", b" ", b"null", b"[]", b'"x"', b"0", b"{", b"\xef\xbb\xbf{}", b"\xff\xfe{", b"\x00",
    b'{"CallbackCommand":"X"} trailing', b'{"CallbackCommand":"X","CallbackCommand":5}',
    b'{"CallbackCommand":NaN}', envelope_with('"v":NaN'), envelope_with('"v":Infinity'),
    envelope_with('"v":-Infinity'), envelope_with('"RoomId":1e400'), envelope_with(f'"v":{HUGE}'),
    envelope_with(f'"RoomId":{HUGE}'), envelope_with(f'"RoomId":{BIG}'),
    envelope_with(f'"Operator_Account":{2**64 + 1}'), envelope_with('"RoomId":"\\ud800"'),
    envelope_with('"v":"\\udfff"'), envelope_with('"v":"\\ud83d\\ude00"'),
    envelope_with('"v":"\\u0000"'), b'{"CallbackCommand":"X","v":"caf\xc3\xa9"}',
    b'{"CallbackCommand":"X","v":"\xed\xa0\x80"}', b'{"CallbackCommand":"X","v":"\xc0\xaf"}',
    b'{"CallbackCommand":"X","v":"\xff"}', b'{"CallbackCommand":"X","v":"caf\xe9"}',
]  # fmt: skip
WIDE_ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32"]


def encoded(pair: tuple[dict[str, Any], str]) -> bytes:
    return json.dumps(pair[0]).encode(pair[1])


def spliced(parts: tuple[dict[str, Any], bytes, int]) -> bytes:
    """Valid JSON with a few random bytes pushed in at some position."""
    text = json.dumps(parts[0]).encode()
    return text[: parts[2]] + parts[1] + text[parts[2] :]


depths = st.tuples(st.integers(0, 6000), st.sampled_from(["[", "{"]))
raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(ODD_BODIES),
    depths.map(lambda d: deep_envelope(*d)),
    depths.map(lambda d: nested(*d).encode()),
    st.tuples(callback_objects(), st.sampled_from(WIDE_ENCODINGS)).map(encoded),
    st.tuples(callback_objects(), st.binary(min_size=1, max_size=4), st.integers(0, 40)).map(
        spliced
    ),
)


def leaf_paths(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path in a sample body, containers and leaves alike."""
    paths = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            paths += leaf_paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += leaf_paths(value, (*path, index))
    return paths


def replaced(node: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A copy of `node` with the value at `path` (created if missing) set to `value`."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: replaced(node.get(head), rest, value)}
    items = list(node)
    items[int(head)] = replaced(items[int(head)], rest, value)
    return items


ALL_SAMPLES = {**SAMPLES, "Live.CallbackAfterSomethingNew": UNKNOWN_SAMPLE}
ODD_VALUES = [
    [], ["a"], {}, {"k": "v"}, True, False, None, 1.5, -0.0, 1e308, 2**63, 2**64 + 1,
    -(2**63) - 1, "1703589922780", " 12 ", "1_000", "99999999999999999999", "", "x" * 70_000,
    "\u202e\u2028\x1b[31m<!channel>", 10**300,
]  # fmt: skip
wrong_values = st.one_of(json_values, st.sampled_from(ODD_VALUES))


@st.composite
def wrong_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A sample callback with one field, at any depth, replaced by a value of another type."""
    command = draw(st.sampled_from(sorted(ALL_SAMPLES)))
    body = ALL_SAMPLES[command]
    paths = [p for p in leaf_paths(body) if p != ("CallbackCommand",)]
    path = draw(st.sampled_from([*paths, ("EventTime",), ("RoomId",)]))
    if path != ("EventTime",):  # a new time each, so dedup does not answer for the bridge
        body = {**body, "EventTime": draw(st.integers(0, 2**40))}
    result: dict[str, Any] = replaced(body, path, draw(wrong_values))
    return result


# -- properties ----------------------------------------------------------------------------------


@FUZZ
@given(pairs=queries(), room=st.integers(0, 10**6))
@example(pairs=[("SdkAppid", str(APP_ID), False)], room=0)  # no Sign at all
@example(pairs=[("sdkappid", str(APP_ID), False), ("requesttime", Stamp(0), True),
                ("SIGN", SignOf(0, upper=True), False)], room=1)  # fmt: skip
@example(pairs=[("SdkAppid", "1", False), ("SdkAppId", str(APP_ID), False),
                ("RequestTime", Stamp(0), False), ("Sign", SignOf(0), False)], room=2)  # fmt: skip
@example(pairs=[("SdkAppid", str(APP_ID), True), ("RequestTime", Stamp(-61), False),
                ("Sign", SignOf(-61), False)], room=3)  # fmt: skip
def test_any_query_string(
    bridge: InThread, pairs: list[tuple[str, Value, bool]], room: int
) -> None:
    query, _ = materialize(pairs)
    body = SEED_BODY.replace(b'"room_id"', f'"fuzz-{room}"'.encode())
    check(bridge, f"/tencent/callback?{query}", body)


@FUZZ
@given(value=json_values)
@example(value={"CallbackCommand": OWNER, "RoomId": "r", "EventTime": 1703589922780})
@example(value={"CallbackCommand": ""})
@example(value={"CallbackCommand": None})
@example(value={"CallbackCommand": ["x"]})
@example(value=[{"CallbackCommand": OWNER}])
def test_any_json_value(bridge: InThread, value: Any) -> None:
    body = json.dumps(value).encode()
    check(bridge, signed_target(), body)


@FUZZ
@given(fields=callback_objects())
def test_any_object_with_a_command(bridge: InThread, fields: dict[str, Any]) -> None:
    body = json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogatepass")
    check(bridge, signed_target(), body)


@FUZZ
@given(body=raw_bodies)
@example(body=b"")
@example(body=deep_envelope(5000, "["))
@example(body=deep_envelope(990, "{"))
@example(body=nested(100_000, "[").encode())
@example(body=envelope_with(f'"v":{HUGE}'))
@example(body=json.dumps(SAMPLES[OWNER]).encode("utf-16"))
@example(body=b'{"CallbackCommand":"X","v":"\xed\xa0\x80"}')
def test_any_bytes(bridge: InThread, body: bytes) -> None:
    check(bridge, signed_target(), body)


@FUZZ
@given(fields=wrong_envelopes())
@example(fields={**SAMPLES[OWNER], "RoomId": ["r"]})
@example(fields={**SAMPLES[OWNER], "RoomId": {"r": 1}})
@example(fields={**SAMPLES[OWNER], "RoomId": True})
@example(fields={**SAMPLES[OWNER], "RoomId": 1.5})
@example(fields={**SAMPLES[OWNER], "EventTime": "1703589922780"})
@example(fields={**SAMPLES[OWNER], "EventTime": 1.5})
@example(fields={**SAMPLES[OWNER], "EventTime": 1e300})
@example(fields={**SAMPLES[OWNER], "RoomId": "x" * 200_000})
def test_wrong_field_types(bridge: InThread, fields: dict[str, Any]) -> None:
    body = json.dumps(fields).encode()
    check(bridge, signed_target(), body)


CONTENT_TYPES = [
    "application/json", "text/plain; charset=utf-16", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=latin-1", "*/*", "",
]  # fmt: skip


@FUZZ
@given(
    method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    content_type=st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
    chunks=st.lists(st.binary(max_size=64), max_size=4),
    body=st.sampled_from([SEED_BODY, b"a=1&b=2", b"--x\r\n\r\n--x--", b""]),
)
def test_any_method_and_headers(
    bridge: InThread, method: str, content_type: str | None, chunks: list[bytes], body: bytes
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    sent: bytes | list[bytes] = [body, *chunks] if chunks else body
    reply = check(bridge, signed_target(), sent, method=method, headers=headers)
    assert (reply.status == 405) == (method != "POST")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_bodies_are_413(bridge: InThread, chunked: bool) -> None:
    body = envelope_with(f'"v":"{"x" * MAX_BODY}"')
    sent: bytes | list[bytes] = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    reply = check(bridge, signed_target(), sent if chunked else body)
    assert reply.status == 413


def event_time(value: object) -> bytes:
    return envelope_with(f'"EventTime":{json.dumps(value)}')


@pytest.mark.parametrize(
    ("first_keys", "body"),
    [
        pytest.param("", event_time(2**63), id="EventTime 2**63"),
        pytest.param("", event_time(2**64 + 1), id="EventTime 2**64+1"),
        pytest.param("", event_time(-(2**63) - 1), id="EventTime -2**63-1"),
        pytest.param("", event_time("9" * 20), id="EventTime as a string"),
        pytest.param("", event_time(int(BIG)), id="EventTime 4000 digits"),
        pytest.param("SdkAppid=" + "1" * 5000, SEED_BODY, id="SdkAppid"),
        pytest.param("RequestTime=" + "1" * 5000, SEED_BODY, id="RequestTime"),
        pytest.param("", event_time(2**63 - 1), id="EventTime 2**63-1"),
        pytest.param("", event_time(-(2**63)), id="EventTime -2**63"),
        pytest.param("", event_time(1e19), id="EventTime 1e19"),
    ],
)
def test_out_of_range_integers_are_never_a_500(
    bridge: InThread, first_keys: str, body: bytes
) -> None:
    """Refused (400, 401, 403) or stored; the first occurrence of a query key is the one used."""
    target = signed_target()
    if first_keys:
        target = target.replace("?", f"?{first_keys}&", 1)
    check(bridge, target, body)


def test_an_overflowing_float_is_refused_or_delivered_as_json(
    bridge: InThread, stand_in: SlackStandIn
) -> None:
    body = b'{"CallbackCommand":"X","RoomId":"float-overflow","v":1e400}'
    reply = check(bridge, signed_target(), body)
    if reply.status == 200:
        assert stand_in.wait_for(
            lambda s: any(b"float-overflow" in r.body for r in s.sink_requests)
        )
        sent = next(r.body for r in stand_in.sink_requests if b"float-overflow" in r.body)

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        json.loads(sent, parse_constant=no_constants)


def test_the_fuzzed_bridge_still_accepts_a_plain_callback(bridge: InThread) -> None:
    body = SEED_BODY.replace(b'"room_id"', f'"after-fuzz-{time.time_ns()}"'.encode())
    assert check(bridge, signed_target(), body).status == 200
