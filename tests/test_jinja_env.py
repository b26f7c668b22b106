from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from bridge.jinja_env import SHIPPED, environments, is_command_name, variables_used


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Live.CallbackAfterChangeOwner", True),
        ("Group.CallbackAfterSendMsg", True),
        ("A.b_9", True),
        ("digest", False),
        ("default", False),
        ("../slack/default", False),
        ("Live.Callback/../x", False),
        ("Live.", False),
        (".Callback", False),
        ("9Live.X", False),
        ("Live.X\n", False),
        ("Live.X.Y", False),
        (None, False),
        (7, False),
    ],
)
def test_only_names_shaped_like_tencent_commands_pick_a_template(
    value: object, expected: bool
) -> None:
    assert is_command_name(value) is expected


def test_the_config_folder_is_searched_before_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / "default.j2").write_text("mine {{ x }}")
    env = environments(tmp_path)["console"]
    assert env.get_template("console/default.j2").render(x="a") == "mine a"
    shipped = (SHIPPED / "console" / "digest.j2").read_text()
    assert env.loader is not None
    assert env.loader.get_source(env, "console/digest.j2")[0] == shipped


def test_each_kind_escapes_for_its_own_output(tmp_path: Path) -> None:
    envs = environments(tmp_path)
    value = '<!channel> "q"\nline'
    slack = envs["slack"].from_string('{"text": "{{ v }}"}').render(v=value)
    assert json.loads(slack)["text"] == '&lt;!channel&gt; "q"\\nline'  # the break shown, not made
    webhook = envs["webhook"].from_string('{"text": "{{ v }}"}').render(v=value)
    assert json.loads(webhook)["text"] == value
    console = envs["console"].from_string("{{ v }}").render(v=value)
    assert "\n" not in console


def test_undefined_names_are_errors_not_empty_text(tmp_path: Path) -> None:
    with pytest.raises(jinja2.UndefinedError):
        environments(tmp_path)["webhook"].from_string("{{ typo }}").render()


def test_a_file_that_is_not_utf8_is_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "slack").mkdir()
    bad = tmp_path / "slack" / "x.j2"
    bad.write_bytes(b"one\ntwo\ncaf\xe9")
    with pytest.raises(jinja2.TemplateSyntaxError) as caught:
        environments(tmp_path)["slack"].get_template("slack/x.j2")
    assert (caught.value.lineno, caught.value.filename) == (3, str(bad))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ room_id }} {{ fields.A }}", frozenset({"room_id", "fields"})),
        ("{% set a = 1 %}{{ a }}{{ b }}", frozenset({"b"})),
        ("{% for e in entries %}{{ e.room_id }}{% endfor %}", frozenset({"entries"})),
        ('{% include "console/default.j2" %}', None),
        ('{% import "console/default.j2" as m %}', None),
        ('{% from "console/default.j2" import x %}', None),
        ('{% extends "console/default.j2" %}', None),
    ],
)
def test_the_variables_a_template_names(
    tmp_path: Path, source: str, expected: frozenset[str] | None
) -> None:
    (tmp_path / "console").mkdir()
    (tmp_path / "console" / "t.j2").write_text(source)
    assert variables_used(environments(tmp_path)["console"], "console/t.j2") == expected


NAME = "console/default.j2"


def test_a_template_is_compiled_once_a_process_and_again_when_its_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload builds new environments; compiling the same templates again for each took
    # 0.3 s for one Slack channel's, beside the callbacks.
    compiled: list[str | None] = []
    compile_ = jinja2.Environment.compile

    def counted(env: jinja2.Environment, source: str, name: str | None = None,
                *args: object, **kwargs: object) -> object:  # fmt: skip
        compiled.append(name)
        return compile_(env, source, name, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(jinja2.Environment, "compile", counted)
    (tmp_path / "console").mkdir()
    path = tmp_path / "console" / "default.j2"
    path.write_text("first {{ a }}")
    for _ in range(3):  # start-up, then two reloads
        env = environments(tmp_path)["console"]
        assert env.get_template(NAME).render(a=1) == "first 1"
        assert variables_used(env, NAME) == frozenset({"a"})
    assert compiled == [NAME]
    path.write_text("second {{ b }}")
    env = environments(tmp_path)["console"]
    assert env.get_template(NAME).render(b=2) == "second 2"
    assert variables_used(env, NAME) == frozenset({"b"})
    assert compiled == [NAME, NAME]
    # Each channel type compiles its own: its options are its own.
    assert environments(tmp_path)["slack"].get_template(NAME).render(b=3) == "second 3"
    assert compiled == [NAME, NAME, NAME]


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
