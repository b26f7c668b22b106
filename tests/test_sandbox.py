"""What a template may do (bridge/sandbox.py), through the environments it renders in: nothing
that reaches the process or changes what it is given, and nothing of any size."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from bridge.jinja_env import environments


def test_range_is_capped_so_that_a_loop_ends(tmp_path: Path) -> None:
    # range(10**12) held start-up, `check` and a reload for good, at 100% CPU; so did three
    # loops over range(10000), one in another: the cap is on all of a render's range() calls.
    env = environments(tmp_path)["console"]
    assert env.from_string("{{ range(10000) | length }}").render() == "10000"
    assert env.from_string("{{ range(10000) | length }}").render() == "10000"  # each render's
    for source in (
        "{% for i in range(10**12) %}{% endfor %}",
        "{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
    ):
        with pytest.raises(OverflowError, match="at most 10000"):
            env.from_string(source).render()


@pytest.mark.parametrize(
    "source",
    [
        # 26 pieces an item, 260,000 in all: a loop that writes stops, however it is nested.
        "{% for i in range(10000) %}{% for c in 'abcdefghijklmnopqrstuvwxyz' %}{{ c }}"
        "{% endfor %}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ 10**9 * ['x'] }}",
    ],
    ids=["pieces", "string repeated", "list repeated"],
)
def test_a_templates_output_is_bounded(tmp_path: Path, source: str) -> None:
    # 'x' * 10**9 took 1.4 GB and 18 s of `check`.
    for env in environments(tmp_path).values():
        with pytest.raises(OverflowError):
            env.from_string(source).render()


@pytest.mark.parametrize(
    "source",
    [
        "{{ lipsum.__globals__['os'].environ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ range.__self__ }}",
        "{{ event.__class__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ joiner.__init__.__code__ }}",
    ],
)
def test_a_template_cannot_reach_the_process(tmp_path: Path, source: str) -> None:
    # A template copied from the internet put the environment (every secret), files, the
    # config and a shell's output into a message through any function's globals.
    for env in environments(tmp_path).values():
        with pytest.raises((jinja2.exceptions.SecurityError, jinja2.TemplateSyntaxError,
                            jinja2.UndefinedError)):  # fmt: skip
            env.from_string(source).render(event=object())


def test_a_template_builds_new_lists_and_changes_nothing_it_is_given(tmp_path: Path) -> None:
    # A template emptied the event every other channel's template reads (`MemberList.clear()`)
    # and the event classes for the rest of the process (`event.model_fields.clear()`).
    env = environments(tmp_path)["console"]
    source = "{% set xs = [] %}{% set xs = xs + [1] %}{{ xs | length }} {{ 'ab' * 2 }}"
    assert env.from_string(source).render() == "1 abab"  # as the room-update template does
    members = [1, 2]
    for source in ("{{ members.clear() }}", "{% set xs = [] %}{{ xs.append(1) }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            env.from_string(source).render(members=members)
    assert members == [1, 2]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ('%999999999d' % 1) | length }}",
        "{{ ('%*d' % (999999999, 1)) | length }}",
        "{{ ('%.99999999f' % 1.0) | length }}",
        "{{ '{:>99999999}'.format(1) | length }}",
        "{{ '{:>{w}}'.format(1, w=999999999) | length }}",
        "{{ ('%99999999d' | format(1)) | length }}",
        "{{ ('x' | center(99999999)) | length }}",
        "{{ 'x'.ljust(99999999) | length }}",
        "{{ ('x'.encode() * 99999999) | length }}",
        "{{ (2 ** 2000000000) > 1 }}",
        "{{ lipsum(200000) | length }}",
        "{% set ns = namespace(s='x' * 4000000) %}{% for i in range(3) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    ],
)
def test_what_makes_a_string_or_number_of_any_size_is_bounded(tmp_path: Path, source: str) -> None:
    # Each took a gigabyte or seconds, and the constant ones did at `check` already, where
    # Jinja folds a constant expression while it compiles.
    env = environments(tmp_path)["webhook"]
    with pytest.raises(OverflowError):
        env.from_string(source).render()


def test_lipsum_gives_at_most_100_paragraphs(tmp_path: Path) -> None:
    env = environments(tmp_path)["console"]
    assert env.from_string("{{ lipsum(100, html=False) | wordcount > 0 }}").render() == "True"
    with pytest.raises(OverflowError):
        env.from_string("{{ lipsum(101) }}").render()


def test_ordinary_formatting_still_works(tmp_path: Path) -> None:
    env = environments(tmp_path)["console"]
    source = "{{ '%05d|%.2f|%s' % (42, 1.5, 'a') }} {{ '{:>6}'.format('b') }} {{ 2 ** 10 }}"
    assert env.from_string(source).render() == "00042|1.50|a      b 1024"


def test_a_filter_block_is_refused_where_it_is(tmp_path: Path) -> None:
    # It filtered escaped text and wrote the result as it was: striptags made an escaped
    # `<!channel>` a ping again.
    envs = environments(tmp_path)
    source = "{\n\n{% filter striptags %}{{ v }}{% endfilter %}}"
    for kind in ("slack", "webhook"):
        with pytest.raises(jinja2.TemplateSyntaxError, match="filter") as caught:
            envs[kind].from_string(source).render(v="<!channel>")
        assert caught.value.lineno == 3
    assert envs["slack"].from_string("{{ v | striptags | upper }}").render(v="<!here> a") == "A"
    # The console's digest joins an entry's lines with one: its values are one_line's already.
    joined = "{% filter replace('\\n', ' ') %}{{ a }}\n{{ b }}{% endfilter %}"
    assert envs["console"].from_string(joined).render(a="x\ny", b="z") == "x\\ny z"
