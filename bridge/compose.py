"""What the worker sends for claimed deliveries: the stored payload, a fresh render, or digests.

A delivery stored without a payload is rendered from its stored event with today's templates:
every one with `[delivery] own_process` (the serving process renders nothing), and one whose
rendering failed at receive time once an operator retries it. A backlog is combined into
digests of at most `DIGEST_ENTRIES` events, each split further until no entry would be lost to
Slack's limits, or until the one event the digest template cannot take stands alone: that one is
sent alone, and the rest still go as digests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from bridge.config import Config
from bridge.events import Envelope
from bridge.events_body import BadEvent, decode_body
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer, RenderError, TooBig
from bridge.store import Claimed

DIGEST_ENTRIES = 40  # a header, 40 sections and a context line stay under Slack's 50 blocks

Item = tuple[Envelope, dict[str, Any], Context]


class Digests(NamedTuple):
    messages: list[tuple[str, list[Claimed]]]  # (payload, the deliveries it carries), oldest first
    apart: list[tuple[Claimed, str]]  # a delivery no digest can carry, and why


def _item(row: Claimed) -> Item:
    try:
        fields = decode_body(row.body.encode())
        event = parse_event(fields)
    except BadEvent as exc:
        raise RenderError(f"stored event {row.event_id} no longer parses: {exc}") from None
    query = json.loads(row.query) if row.query else {}
    ctx = Context(sdk_app_id=row.sdk_app_id, received_at=row.received_at, query=query)
    return event, fields, ctx


class Composer:
    def __init__(self, config: Config, renderer: Renderer) -> None:
        self._config = config
        self._renderer = renderer

    def payload(self, row: Claimed) -> str:
        """The message for one delivery; RenderError when its template cannot make one."""
        if row.payload is not None:
            return row.payload
        channel = self._config.channels[row.channel]
        event, fields, ctx = _item(row)
        return self._renderer.render(channel.type, event, fields, ctx, channel.template)

    def digests(self, channel_name: str, rows: Sequence[Claimed]) -> Digests:
        """The digest messages for `rows`, and the rows no digest can carry."""
        channel = self._config.channels[channel_name]
        explicit = getattr(channel, "digest_template", None)
        out = Digests([], [])
        items: list[tuple[Claimed, Item]] = []
        for row in rows:
            try:
                items.append((row, _item(row)))
            except RenderError as exc:
                out.apart.append((row, str(exc)))
        for start in range(0, len(items), DIGEST_ENTRIES):
            self._fit(channel.type, explicit, items[start : start + DIGEST_ENTRIES], out)
        return out

    def _fit(
        self, kind: str, explicit: str | None, items: list[tuple[Claimed, Item]], out: Digests
    ) -> None:
        rows = [row for row, _ in items]
        events = [item for _, item in items]
        try:
            out.messages.append((self._renderer.render_digest(kind, events, explicit), rows))
            return
        except TooBig:
            if len(items) == 1:  # one event too big even alone: cut it rather than lose it
                payload = self._renderer.render_digest(kind, events, explicit, whole=False)
                out.messages.append((payload, rows))
                return
        except RenderError as exc:
            # One event's values the template cannot take (a digest of every other one can):
            # halved until it stands alone, to be sent alone; the others are not held by it.
            if len(items) == 1:
                out.apart.append((rows[0], str(exc)))
                return
        half = len(items) // 2
        self._fit(kind, explicit, items[:half], out)
        self._fit(kind, explicit, items[half:], out)
