"""A Slack message checked, in words, for `live-bridge check`: `problems(payload)` lists what
Slack would refuse, `crowded(payload)` what `fit` (bridge/blockkit.py) would fold. `fit` cuts
what is too long; `problems` also finds what no cut can fix, such as an empty header or section.
"""

from __future__ import annotations

from typing import Any

from bridge.blockkit import FOLD, blocks_length, folds
from bridge.blockkit_limits import (
    ALT_TEXT_CHARS,
    BLOCK_ID_CHARS,
    BLOCKS_CHARS,
    BUTTON_CHARS,
    FIELD_CHARS,
    HEADER_CHARS,
    MAX_ATTACHMENTS,
    MAX_BLOCKS,
    MAX_CONTEXT,
    MAX_FIELDS,
    SECTION_CHARS,
    SLACK_TEXT_CHARS,
    TEXT_OBJECT_CHARS,
    units,
)


def crowded(payload: Any) -> list[str]:
    """The blocks with more fields or context elements than Slack takes, in words: `fit` folds
    the rest into the tenth, so they are sent, but not as the template laid them out."""
    blocks = payload.get("blocks") if isinstance(payload, dict) else None
    if not isinstance(blocks, list):
        return []
    found = []
    for number, block in enumerate(blocks, 1):
        if folds(block):
            key, most, _ = FOLD[block["type"]]
            count = len(block[key])
            found.append(
                f"block {number} ({block['type']}): {count} {key}, over {most} (sent with the"
                f" last {count - most + 1} folded into the {most}th)"
            )
    return found


def problems(payload: Any) -> list[str]:
    """What Slack would refuse in `payload`, in words (empty: Slack takes it). `fit` cuts what is
    too long; this also finds what no cut can fix, such as an empty header or section."""
    if not isinstance(payload, dict):
        return ["not a JSON object"]
    found = []
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        found.append("no top-level text")
    elif units(text) > SLACK_TEXT_CHARS:
        found.append(f"top-level text over {SLACK_TEXT_CHARS} characters")
    blocks = payload.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        return [*found, "blocks must be a list of objects"]
    if len(blocks) > MAX_BLOCKS:
        found.append(f"{len(blocks)} blocks, over {MAX_BLOCKS}")
    attachments = payload.get("attachments")
    if isinstance(attachments, list) and len(attachments) > MAX_ATTACHMENTS:
        found.append(f"{len(attachments)} attachments, over {MAX_ATTACHMENTS}")
    if blocks_length(blocks) > BLOCKS_CHARS:
        found.append(f"blocks over {BLOCKS_CHARS} characters in all (msg_blocks_too_long)")
    for number, block in enumerate(blocks, 1):
        found += [f"block {number} ({block.get('type')}): {p}" for p in _block_problems(block)]
    return found


def _element_problems(element: Any, number: int) -> list[str]:
    """What Slack would refuse in an interactive or image element (number 0: an accessory)."""
    if not isinstance(element, dict):
        return []
    what = f"element {number}" if number else "accessory"
    found = []
    if units(str(element.get("action_id", ""))) > BLOCK_ID_CHARS:
        found.append(f"{what}: action_id over {BLOCK_ID_CHARS} characters")
    if element.get("type") == "image":
        if units(str(element.get("alt_text", ""))) > ALT_TEXT_CHARS:
            found.append(f"{what}: alt_text over {ALT_TEXT_CHARS} characters")
    elif isinstance(element.get("text"), dict):
        found += _text_problem(element["text"], BUTTON_CHARS, f"{what}'s text")
    return found


def _text_problem(obj: Any, limit: int, what: str) -> list[str]:
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text:
        return [f"{what} is empty"]
    return [f"{what} over {limit} characters"] if units(text) > limit else []


def _block_problems(block: dict[str, Any]) -> list[str]:
    kind = block.get("type")
    if not isinstance(kind, str):
        return ["no type"]
    if units(str(block.get("block_id", ""))) > BLOCK_ID_CHARS:
        return [f"block_id over {BLOCK_ID_CHARS} characters"]
    if kind == "image" and units(str(block.get("alt_text", ""))) > ALT_TEXT_CHARS:
        return [f"alt_text over {ALT_TEXT_CHARS} characters"]
    if kind == "actions" and isinstance(elements := block.get("elements"), list):
        return [p for number, e in enumerate(elements, 1) for p in _element_problems(e, number)]
    if kind == "section" and (accessory := _element_problems(block.get("accessory"), 0)):
        return accessory
    if kind == "header":
        return _text_problem(block.get("text"), HEADER_CHARS, "text")
    if kind == "section":
        fields = block.get("fields")
        if "text" not in block and not fields:
            return ["neither text nor fields"]
        found = _text_problem(block["text"], SECTION_CHARS, "text") if "text" in block else []
        if fields is not None:
            if not isinstance(fields, list) or len(fields) > MAX_FIELDS:
                return [*found, f"fields must be a list of at most {MAX_FIELDS}"]
            for number, field in enumerate(fields, 1):
                found += _text_problem(field, FIELD_CHARS, f"field {number}")
        return found
    if kind == "context":
        elements = block.get("elements")
        if not isinstance(elements, list) or not 0 < len(elements) <= MAX_CONTEXT:
            return [f"needs 1 to {MAX_CONTEXT} elements"]
        return [
            p
            for number, e in enumerate(elements, 1)
            if isinstance(e, dict) and "text" in e
            for p in _text_problem(e, TEXT_OBJECT_CHARS, f"element {number}")
        ]
    return []
