"""Slack's message limits, and a text measured and cut to one.

Lengths are counted in UTF-16 code units (`units`), as JavaScript counts them: an emoji, a flag
half or a rare CJK character outside the Basic Multilingual Plane is two. Slack does not say how
it counts; counted in code points, a text of such characters under a limit may be twice over it
in units, and Slack's refusal (invalid_blocks, msg_blocks_too_long) is permanent: the message a
dead letter. In units, a text within the limit is within it either way. `cut` shortens a text to
a limit at a grapheme's start, never inside an escape or a Slack token, ending in an ellipsis.
"""

from __future__ import annotations

import re
import unicodedata

MAX_BLOCKS = 50
HEADER_CHARS = 150
SECTION_CHARS = 3000
FIELD_CHARS = 2000
MAX_FIELDS = 10
MAX_CONTEXT = 10
TEXT_OBJECT_CHARS = 3000
TOP_TEXT_CHARS = 4000  # ours, for a readable notification
SLACK_TEXT_CHARS = 40_000  # Slack's
URL_CHARS = 3000
BUTTON_CHARS = 75  # a button's plain text
ALT_TEXT_CHARS = 2000  # an image's
BLOCK_ID_CHARS = 255
MAX_ATTACHMENTS = 100
# Not in Slack's reference: chat.postMessage answers msg_blocks_too_long for blocks of about
# 11,000 to 13,000 characters in all, though each block is within its own limits
# (slackapi/bolt-js#2509 and #2867; a Slack engineer there: "12,000 text characters with a
# buffer for block containers"). The error is permanent: blocks longer than this in JSON,
# containers included, have their longest texts cut (`fit`), and a digest is split first
# (`overflows`), which would otherwise make every entry a dead letter at once.
BLOCKS_CHARS = 12_000
SHORTEST_CUT = 100  # `fit` cuts no text shorter than this to bring the blocks under BLOCKS_CHARS
ELLIPSIS = "…"

# Never cut inside an escape (&amp;); a Slack token (<!date^…|…>, <@U…>, <https://…|…>) is
# dropped whole in `cut`.
_PARTIAL_ESCAPE = re.compile(r"&[a-z]{0,4}$")


def units(text: str) -> int:
    """`text`'s length in UTF-16 code units: a character past U+FFFF is two."""
    # surrogatepass: a template may write a lone surrogate (a "\ud800" escape), one unit.
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


def _within(text: str, limit: int) -> int:
    """The length (in characters) of `text`'s longest start of at most `limit` UTF-16 units."""
    if units(text[:limit]) <= limit:
        return min(limit, len(text))
    count = 0
    for index, char in enumerate(text):
        count += 2 if ord(char) > 0xFFFF else 1
        if count > limit:
            return index
    return len(text)


def cut(text: str, limit: int) -> str:
    """`text` if it fits, else its start and an ellipsis, `limit` UTF-16 units at most."""
    if units(text) <= limit:
        return text
    head = text[: _grapheme_start(text, _within(text, limit - len(ELLIPSIS)))]
    # Escaped text has no "<" of its own: the last one opens a token, unfinished if no ">" follows.
    start = head.rfind("<")
    if start >= 0 and ">" not in head[start:]:
        head = head[:start]
    head = _PARTIAL_ESCAPE.sub("", head)
    return head + ELLIPSIS


def _extends(char: str) -> bool:
    """Whether `char` belongs to the character before it (one grapheme): a combining mark, a
    variation selector, the zero-width joiner, an emoji's skin tone or tag."""
    code = ord(char)
    return (
        unicodedata.category(char) in ("Mn", "Me", "Mc")
        or code == 0x200D
        or 0x1F3FB <= code <= 0x1F3FF
        or 0xE0020 <= code <= 0xE007F
    )


def _regional(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF  # two make a flag


def _grapheme_start(text: str, index: int) -> int:
    """`index`, moved back to where a grapheme starts: a cut there leaves no half of a flag, a
    family joined by ZWJ, a keycap or an accent alone before the ellipsis."""
    while 0 < index < len(text) and (_extends(text[index]) or text[index - 1] == "\u200d"):
        index -= 1
    if 0 < index < len(text) and _regional(text[index]):
        run = index
        while run > 0 and _regional(text[run - 1]):
            run -= 1
        index -= (index - run) % 2  # the flags before are whole; one half of the next is not
    return index
