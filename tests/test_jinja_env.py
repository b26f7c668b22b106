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
