"""A template's output, bounded as it is written: at most PIECES_LIMIT pieces and CHARS_LIMIT
characters in one buffer, whether Jinja joins it from the template's generator (`bounded`, which
bridge/escape.py's concat joins) or collects it in a list for a macro, a `{% set %}` or a
`{% call %}` block (`OutputBuffer`, which bridge/sandbox.py has the compiled code make). A
refusal, OutputTooLong, names the template line that was writing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from types import FrameType, GeneratorType
from typing import Any

# The most pieces (texts between tags, and each {{ }}) one buffer of a template joins: a loop
# that writes something stops here, however deep its loops are nested. And the most characters
# (a string doubled 26 times with `~` was a 67 MB message, stored and sent).
PIECES_LIMIT = 200_000
CHARS_LIMIT = 16_777_216


class OutputTooLong(OverflowError):
    """A buffer over PIECES_LIMIT or CHARS_LIMIT; `where` is the template's `file, line N` that
    was writing it. The limit is met in Jinja's own code (which joins the template's output) or
    in a buffer's append, so the error's traceback may name no line of the template, as other
    render errors' do (bridge/render.py)."""

    def __init__(self, message: str, where: str | None) -> None:
        super().__init__(message)
        self.where = where


class OutputBuffer(list[str]):
    """A buffer Jinja collects in a list and joins where it ends: a macro's, a `{% set %}` or
    `{% call %}` block's (bridge/sandbox.py has Jinja's compiled code make one). Held whole until
    then, so bounded as it is written: a set block of 60 pieces of 4 MB held 229 MB before
    it was joined, and of the 10,000 range() allows, 40 GB."""

    __slots__ = ("_size",)

    def __init__(self) -> None:
        super().__init__()
        self._size = 0

    def append(self, piece: str) -> None:
        self._size += len(piece)
        super().append(piece)
        if self._size > CHARS_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {CHARS_LIMIT} characters", _calling(sys._getframe(1))
            )
        if len(self) > PIECES_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {PIECES_LIMIT} pieces", _calling(sys._getframe(1))
            )

    def extend(self, pieces: Iterable[str]) -> None:
        for piece in pieces:
            self.append(piece)


def bounded(parts: Iterable[str]) -> list[str]:
    """`parts` as a list, counted as the template writes each piece: measured once joined, a
    loop of 250 pieces of 4 MB each held 2 GB before it was refused (and 10,000 would have
    held 40)."""
    if isinstance(parts, OutputBuffer):
        return parts  # counted as it was written
    pieces: list[str] = []
    size = 0
    for piece in parts:
        size += len(piece)
        if size > CHARS_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {CHARS_LIMIT} characters", _writing(parts)
            )
        pieces.append(piece)
        if len(pieces) > PIECES_LIMIT:
            raise OutputTooLong(
                f"a template's output of over {PIECES_LIMIT} pieces", _writing(parts)
            )
    return pieces


def _writing(parts: Iterable[str]) -> str | None:
    """`file, line N` of the template code that wrote the buffer's last piece: the innermost
    template generator `parts` is suspended in (a block or an included template is a generator
    the outer one yields from), else the template code that called for the join."""
    found = None
    generator: Any = parts
    while (frame := getattr(generator, "gi_frame", None)) is not None:
        found = _template_line(frame) or found
        generator = getattr(generator, "gi_yieldfrom", None) or _iterating(frame)
    return found or _calling(sys._getframe(3))  # escaped_concat's caller


def _calling(frame: FrameType | None) -> str | None:
    """`file, line N` of the innermost template code on the stack from `frame` outwards."""
    while frame is not None:
        if found := _template_line(frame):
            return found
        frame = frame.f_back
    return None


def _iterating(frame: FrameType) -> Any:
    """The template generator a suspended template frame is looping over: an included
    template's, which Jinja writes as `gen = ….root_render_func(…)` and `for event in gen:
    yield event`, not `yield from`."""
    for held in frame.f_locals.values():
        frame_held = held.gi_frame if isinstance(held, GeneratorType) else None
        if frame_held is not None and "__jinja_template__" in frame_held.f_globals:
            return held
    return None


def _template_line(frame: FrameType) -> str | None:
    # Jinja keeps the template in its compiled code's globals, and maps that code's lines to the
    # template's (what jinja2.debug does for a traceback).
    template = frame.f_globals.get("__jinja_template__")
    if template is None:
        return None
    line = template.get_corresponding_lineno(frame.f_lineno)
    return f"{template.filename or template.name or '<template>'}, line {line}"
