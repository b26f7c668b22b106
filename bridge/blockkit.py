"""Slack's message limits: a payload is cut to fit, never dropped, before it is queued.

`fit(payload)` returns a copy within Slack's documented limits (50 blocks, header 150, section
text 3000, 10 fields of 2000, context 10 elements, button URLs 3000 and texts 75, alt texts
2000, block ids 255, 100 attachments, top-level text kept
under 4000) and under the blocks' reported total (BLOCKS_CHARS), with long values cut and
ending in an ellipsis, the fields or context elements past the tenth folded into the tenth, and
the last blocks left out (a note says how many) where 50 blocks, or many short texts, are still
too many;
`LimitError` when the payload cannot be made valid. What Slack would refuse, and what `fit`
would fold, are said in words by bridge/blockkit_problems.py; the limits themselves, and how a
text is measured and cut, are in bridge/blockkit_limits.py.
"""

from __future__ import annotations

import json
from typing import Any

from bridge.blockkit_limits import (
    ALT_TEXT_CHARS,
    BLOCK_ID_CHARS,
    BLOCKS_CHARS,
    BUTTON_CHARS,
    ELLIPSIS,
    FIELD_CHARS,
    HEADER_CHARS,
    MAX_ATTACHMENTS,
    MAX_BLOCKS,
    MAX_CONTEXT,
    MAX_FIELDS,
    SECTION_CHARS,
    SHORTEST_CUT,
    TEXT_OBJECT_CHARS,
    TOP_TEXT_CHARS,
    URL_CHARS,
    cut,
    units,
)

# A payload as it is queued and sent (bridge/render.py encodes with it too): built once, as
# json.dumps with any option builds an encoder per call.
COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class LimitError(ValueError):
    pass


def fit(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise LimitError("a Slack payload must be a JSON object")
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise LimitError("a Slack payload needs a non-empty top-level text")
    out = dict(payload)
    out["text"] = cut(text, TOP_TEXT_CHARS)
    attachments = payload.get("attachments")
    if isinstance(attachments, list):
        if len(attachments) > MAX_ATTACHMENTS:
            # Slack refuses more (too_many_attachments): the rest are said, not sent.
            hidden = len(attachments) - (MAX_ATTACHMENTS - 1)
            note = {"text": f"{ELLIPSIS} {hidden} more attachments not shown"}
            attachments = [*attachments[: MAX_ATTACHMENTS - 1], note]
        out["attachments"] = [_fit_attachment(a) for a in attachments]
    blocks = payload.get("blocks")
    if blocks is None:
        return out
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise LimitError("blocks must be a list of objects")
    fitted = [_fit_block(b) for b in blocks]
    fitted = [b for b in fitted if b.get("type") != "actions" or b.get("elements")]
    hidden = 0
    if len(fitted) > MAX_BLOCKS:
        hidden = len(fitted) - (MAX_BLOCKS - 1)
        fitted = [*fitted[: MAX_BLOCKS - 1], _not_shown(hidden)]
    out["blocks"] = _shorten(fitted, hidden) if blocks_length(fitted) > BLOCKS_CHARS else fitted
    return out


def _not_shown(count: int) -> dict[str, Any]:
    return {"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"{ELLIPSIS} {count} more blocks not shown"}]}  # fmt: skip


def blocks_length(blocks: list[Any]) -> int:
    """The blocks' length as they are sent."""
    return units(COMPACT.encode(blocks))


def _shorten(blocks: list[Any], hidden: int) -> list[Any]:
    """`blocks` under BLOCKS_CHARS: the longest text halved, and again, as long as they are over
    and a text of SHORTEST_CUT or more is left to cut; then, if many short texts still make them
    too long (a field for each of 400 members), the last blocks left out, and said so. `hidden`:
    blocks left out already, the last block saying so."""
    blocks = json.loads(json.dumps(blocks))  # its own copy: the texts are cut in place
    texts = [obj for block in blocks for obj in _text_objects(block)]
    while texts and blocks_length(blocks) > BLOCKS_CHARS:
        longest = max(texts, key=lambda obj: units(obj["text"]))
        if (length := units(longest["text"])) < SHORTEST_CUT:
            break
        longest["text"] = cut(longest["text"], max(length // 2, SHORTEST_CUT - 1))
    if blocks_length(blocks) <= BLOCKS_CHARS:
        return blocks
    # Sent over it, Slack's msg_blocks_too_long is permanent: the whole message a dead letter.
    shown = blocks[:-1] if hidden else blocks
    while len(shown) > 1 and blocks_length([*shown, _not_shown(hidden)]) > BLOCKS_CHARS:
        shown, hidden = shown[:-1], hidden + 1
    return [*shown, _not_shown(hidden)]


def _text_objects(block: dict[str, Any]) -> list[dict[str, Any]]:
    """The text objects of a block whose text `fit` may cut: its text, fields, context elements."""
    found = [block.get("text"), *(block.get("fields") or [])]
    if block.get("type") == "context":
        found += block.get("elements") or []
    return [obj for obj in found if isinstance(obj, dict) and isinstance(obj.get("text"), str)]


def overflows(payload: Any) -> bool:
    """Would `fit` have to drop blocks, fold fields or context elements, or cut the top-level
    text (not just cut a value)? A digest may give each entry a field or an element, not a block.
    Or are its blocks longer than Slack is reported to take (`BLOCKS_CHARS`)?"""
    if not isinstance(payload, dict):
        return False
    blocks = payload.get("blocks")
    text = payload.get("text")
    if isinstance(text, str) and units(text) > TOP_TEXT_CHARS:
        return True
    if not isinstance(blocks, list):
        return False
    if len(blocks) > MAX_BLOCKS or any(folds(block) for block in blocks):
        return True
    if not all(isinstance(block, dict) for block in blocks):
        return False  # `fit` says what is wrong with them
    try:
        fitted = [_fit_block(block) for block in blocks]  # a value cut to fit loses no entry
    except LimitError:
        return False
    return blocks_length(fitted) > BLOCKS_CHARS


def cut_texts(payload: Any) -> list[str]:
    """The texts `fit` would cut to their own block's limit (a header, a section's text or
    fields, a context element), as they are before the cut."""
    blocks = payload.get("blocks") if isinstance(payload, dict) else None
    if not isinstance(blocks, list):
        return []
    return [
        obj["text"]
        for block in blocks
        for obj, limit in _limited(block)
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and units(obj["text"]) > limit
    ]


# What `fit` cuts, by block type: each key's text object (or list of them) to its limit.
_CUT: dict[str, dict[str, int]] = {
    "header": {"text": HEADER_CHARS},
    "section": {"text": SECTION_CHARS, "fields": FIELD_CHARS},
    "context": {"elements": TEXT_OBJECT_CHARS},
}
# What `fit` folds, by block type: the list past its count, and what joins the folded texts.
FOLD: dict[str, tuple[str, int, str]] = {
    "section": ("fields", MAX_FIELDS, "\n"),
    "context": ("elements", MAX_CONTEXT, "  "),
}


def _limited(block: Any) -> list[tuple[Any, int]]:
    """A block's text objects, each with the limit `_fit_block` cuts it to."""
    if not isinstance(block, dict):
        return []
    found: list[tuple[Any, int]] = []
    for key, limit in _CUT.get(str(block.get("type")), {}).items():
        value = block.get(key)
        found += [(v, limit) for v in value] if isinstance(value, list) else [(value, limit)]
    return found


def folds(block: Any) -> bool:
    """Would `_fit_block` fold some of the block's fields or context elements into one?"""
    if not isinstance(block, dict) or (fold := FOLD.get(str(block.get("type")))) is None:
        return False
    key, most, _ = fold
    items = block.get(key)
    return isinstance(items, list) and len(items) > most


def _fit_text(obj: Any, limit: int) -> Any:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return {**obj, "text": cut(obj["text"], limit)}
    return obj


def _long_url(element: Any) -> bool:
    return isinstance(element, dict) and units(str(element.get("url", ""))) > URL_CHARS


def _fit_block(block: dict[str, Any]) -> dict[str, Any]:
    kind = block.get("type")
    if not isinstance(kind, str):
        raise LimitError("every block needs a type")
    out = dict(block)
    if units(str(block.get("block_id", ""))) > BLOCK_ID_CHARS:
        del out["block_id"]  # optional; cut, two could end alike, which Slack refuses
    if kind == "image":
        out = _fit_element(out)
    if (fold := FOLD.get(kind)) is not None and isinstance(block.get(fold[0]), list):
        key, most, separator = fold
        out[key] = _fold(block[key], most, separator)
    for key, limit in _CUT.get(kind, {}).items():
        if isinstance(value := out.get(key), list):
            out[key] = [_fit_text(v, limit) for v in value]
        elif key in out:
            out[key] = _fit_text(value, limit)
    if kind == "actions":
        # A cut URL leads nowhere: a button whose URL Slack would refuse is left out.
        elements = block.get("elements")
        if isinstance(elements, list):
            out["elements"] = [_fit_element(e) for e in elements if not _long_url(e)]
    if kind == "section" and "accessory" in out:
        out["accessory"] = _fit_element(out["accessory"])
    if kind == "context" and isinstance(elements := out.get("elements"), list):
        out["elements"] = [_fit_element(e) for e in elements]
    return out


def _fit_element(element: Any) -> Any:
    """An image (a block, an accessory, a context element) with its alt text cut to 2000; an
    interactive element (a button, in an actions block or as an accessory) with its text cut to
    75 and an action_id over 255 left out."""
    if not isinstance(element, dict):
        return element
    out = dict(element)
    if units(str(element.get("action_id", ""))) > BLOCK_ID_CHARS:
        del out["action_id"]  # optional, as block_id
    if element.get("type") == "image" and isinstance(element.get("alt_text"), str):
        out["alt_text"] = cut(element["alt_text"], ALT_TEXT_CHARS)
    elif isinstance(label := element.get("text"), dict):  # a button's; a text object's is a str
        out["text"] = _fit_text(label, BUTTON_CHARS)
    return out


def _fit_attachment(attachment: Any) -> Any:
    """An attachment's own blocks, fitted as a message's each are."""
    if isinstance(attachment, dict) and isinstance(blocks := attachment.get("blocks"), list):
        fitted = [_fit_block(b) if isinstance(b, dict) and "type" in b else b for b in blocks]
        return {**attachment, "blocks": fitted}
    return attachment


def _fold(items: list[Any], most: int, separator: str) -> list[Any]:
    """`items`, or when there are more than `most`, the first `most - 1` and one text object
    with the text of the rest (an image's alt_text): Slack refuses more (invalid_blocks), and a
    message must not lose text unseen. The fold is mrkdwn if any of them is."""
    if len(items) <= most:
        return items
    rest = [item for item in items[most - 1 :] if isinstance(item, dict)]
    texts = [item.get("text", item.get("alt_text")) for item in rest]
    kinds = {item.get("type") for item in rest}
    kind = "plain_text" if kinds == {"plain_text"} else "mrkdwn"
    first = rest[0] if rest else {}
    # The first's other keys (emoji, verbatim) belong to its type: kept only if the type stays.
    fold = {**first} if first.get("type") == kind else {"type": kind}
    fold["text"] = separator.join(t for t in texts if isinstance(t, str) and t) or ELLIPSIS
    fold.pop("alt_text", None)
    fold.pop("image_url", None)
    return [*items[: most - 1], fold]
