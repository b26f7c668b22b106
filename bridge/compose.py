"""What the worker sends for claimed deliveries: the stored payload, a fresh render, or digests.

A delivery stored without a payload is rendered from its stored event with today's templates:
every one with `[delivery] own_process` (the serving process renders nothing), and one whose
rendering failed at receive time once an operator retries it. A backlog is combined into
digests of at most `DIGEST_ENTRIES` events, each split further until no entry would be lost to
Slack's limits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bridge.config import Config
from bridge.events import BadEvent, Envelope, decode_body, parse_event
from bridge.render import Context, Renderer, RenderError, TooBig
from bridge.store import Claimed

DIGEST_ENTRIES = 40  # a header, 40 sections and a context line stay under Slack's 50 blocks


def _item(row: Claimed) -> tuple[Envelope, dict[str, Any], Context]:
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

    def digests(
        self, channel_name: str, rows: Sequence[Claimed]
    ) -> list[tuple[str, list[Claimed]]]:
        """(payload, the deliveries it carries) for each digest message, oldest first."""
        channel = self._config.channels[channel_name]
        explicit = getattr(channel, "digest_template", None)
        items = [(row, _item(row)) for row in rows]
        out: list[tuple[str, list[Claimed]]] = []
        for start in range(0, len(items), DIGEST_ENTRIES):
            out.extend(self._fit(channel.type, explicit, items[start : start + DIGEST_ENTRIES]))
        return out

    def _fit(
        self, kind: str, explicit: str | None,
        items: list[tuple[Claimed, tuple[Envelope, dict[str, Any], Context]]],
    ) -> list[tuple[str, list[Claimed]]]:  # fmt: skip
        rows = [row for row, _ in items]
        events = [item for _, item in items]
        try:
            return [(self._renderer.render_digest(kind, events, explicit), rows)]
        except TooBig:
            if len(items) == 1:  # one event too big even alone: cut it rather than lose it
                return [(self._renderer.render_digest(kind, events, explicit, whole=False), rows)]
        half = len(items) // 2
        return self._fit(kind, explicit, items[:half]) + self._fit(kind, explicit, items[half:])
