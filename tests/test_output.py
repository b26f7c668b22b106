"""A template's output bounded as it is written (bridge/output.py): in the template's own
buffer and in those Jinja collects in a list, each refusal naming the line that was writing."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bridge.config_tables import TemplatesConfig
from bridge.events_parse import parse_event
from bridge.jinja_env import environments
from bridge.render import Context, Renderer, RenderError

CTX = Context(sdk_app_id=1400000000, received_at=1703589923.5, query={})
OWNER: dict[str, Any] = {
    "CallbackCommand": "Live.CallbackAfterChangeOwner", "RoomId": "r1",
    "EventTime": 1703589922780, "Operator_Account": "admin",
    "CurrentOwner_Account": "user2", "OriginalOwner_Account": "user1",
}  # fmt: skip

LOOP = '{% for i in range(250) %}{{ "x" * 4000000 }}{% endfor %}'


@pytest.mark.parametrize(
    "source",
    [
        LOOP,
        # Buffers Jinja collects in a list until their block ends: 60 pieces held 229 MB.
        "{% set b %}" + LOOP + "{% endset %}{{ b }}",
        "{% macro m() %}" + LOOP + "{% endmacro %}{{ m() }}",
        "{% macro m() %}{{ caller() }}{% endmacro %}{% call m() %}" + LOOP + "{% endcall %}",
    ],
    ids=["template", "set block", "macro", "call block"],
)
def test_a_templates_output_is_refused_before_it_is_held_whole(tmp_path: Path, source: str) -> None:
    # Measured once joined, 250 pieces of 4 MB each held 2 GB before the refusal (10,000, which
    # range() allows, would have held 40 GB).
    env = environments(tmp_path)["console"]
    tracemalloc.start()
    try:
        with pytest.raises(OverflowError, match="over 16777216 characters"):
            env.from_string(source).render()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak


BIG = '{% for i in range(250) %}\n{{ "x" * 4000000 }}\n{% endfor %}\n'
MANY = '{% for i in range(10000) %}{% for c in "abcdefghijklmnopqrstuvwxyz" %}{{ c }}{% endfor %}'


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ({"mine.j2": "hello\n" + BIG}, "mine.j2, line 3"),
        # An included template's own line, not the include's.
        ({"mine.j2": 'a\n{% include "big.j2" %}\n', "big.j2": BIG}, "big.j2, line 2"),
        (
            {
                "mine.j2": '{% extends "base.j2" %}{% block b %}\n' + BIG + "{% endblock %}",
                "base.j2": "x\n{% block b %}{% endblock %}\n",
            },
            "mine.j2, line 3",
        ),
        # Buffers Jinja collects in a list until their block ends: a macro's, a set block's.
        (
            {
                "mine.j2": "{% macro m() %}\n"
                + MANY
                + "{% endfor %}\n{% endmacro %}\nx\n{{ m() }}\n"
            },
            "mine.j2, line 2",
        ),
        ({"mine.j2": "x\n{% set b %}\n" + BIG + "{% endset %}{{ b }}\n"}, "mine.j2, line 3"),
    ],
    ids=["template", "included", "block", "macro", "set block"],
)
def test_a_refused_output_names_the_template_and_line_writing_it(
    tmp_path: Path, files: dict[str, str], where: str
) -> None:
    # The limit is met in Jinja's own code, which joins the buffer: the error named the
    # template alone, where every other template error names its line as well.
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    renderer = Renderer(TemplatesConfig(dir=tmp_path))
    with pytest.raises(RenderError) as caught:
        renderer.render("console", parse_event(OWNER), OWNER, CTX, "mine.j2")
    assert str(caught.value).startswith(f"{tmp_path / where}: OutputTooLong: a template's output")
