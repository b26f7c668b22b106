"""`live-bridge check` and the start-up template check, through the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from bridge.checks import check_templates
from bridge.config import load_config
from bridge.events_parse import parse_event
from bridge.render import Context, Renderer, RenderError
from bridge.routing import Router
from bridge.samples import sample

ROOT = Path(__file__).parent.parent
OWNER = "Live.CallbackAfterChangeOwner"

CHANNELS = """
[channels.console]
type = "console"
[channels.hook]
type = "slack"
webhook_url = "https://hooks.slack.com/services/T0/B0/${HOOK_SECRET:-x}"
[channels.bot]
type = "slack"
token = "xoxb-not-used"
channel = "C0123456789"
digest_after = 0
[channels.audit]
type = "webhook"
url = "https://audit.example.com/live"
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=60,
        env={**clean, **(env or {})},
    )  # fmt: skip


def write(
    tmp_path: Path, routes: str, templates: Mapping[str, str | bytes] | None = None,
    channels: str = CHANNELS,
) -> Path:  # fmt: skip
    """A config in tmp_path whose [templates] dir holds `templates` (name → text or bytes)."""
    for name, text in (templates or {}).items():
        (tmp_path / "templates" / name).parent.mkdir(parents=True, exist_ok=True)
        data = text.encode() if isinstance(text, str) else text
        (tmp_path / "templates" / name).write_bytes(data)
    path = tmp_path / "config.toml"
    path.write_text(
        '[tencent]\nsdk_app_id = 1400000000\n[store]\npath = "bridge.db"\n'
        f'[templates]\ndir = "templates"\n{channels}\n{routes}'
    )
    return path


def rows(stdout: str) -> list[list[str]]:
    """The table's rows, split on the two-space column gap; the header first."""
    return [
        [cell.strip() for cell in line.split("  ") if cell.strip()]
        for line in stdout.splitlines()
        if line and not line.startswith(("/", "config.toml"))
    ]


def test_example_config_passes() -> None:
    result = run("check", "--config", str(ROOT / "config.example.toml"))
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table[0] == ["ROUTE", "CHANNEL", "COMMAND", "RESULT"]
    assert ["everything", "console", OWNER, "ok"] in table
    assert ["-", "console", "digest", "ok"] in table
    assert len(table) == 1 + 1 + 15  # header, digest, 14 known commands and an unknown one
    assert "combinations render" in result.stdout
    assert result.stderr == ""


def test_what_loading_the_config_warns_of_is_said_as_live_bridges(tmp_path: Path) -> None:
    # Its templates folder is not there: said once, as live-bridge's, not bare.
    path = write(tmp_path, '[[routes]]\nname = "all"\nchannels = ["console"]\n')
    result = run("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"live-bridge: WARNING: {path}: [templates] dir: no such folder (a relative one is taken"
        " from the config file's folder); only the shipped templates serve\n"
    )


def test_names_are_shown_escaped_in_the_table(tmp_path: Path) -> None:
    # A right-to-left override in a route's name reversed the rest of its row on the terminal.
    routes = '[[routes]]\nname = "r\\u202eevil\\u001b[31m"\nchannels = ["console"]\n'
    result = run("check", "--config", str(write(tmp_path, routes)))
    assert result.returncode == 0, result.stderr
    assert "\u202e" not in result.stdout and "\x1b" not in result.stdout
    assert "r\\u202eevil\\x1b[31m" in result.stdout


def test_every_channel_type_with_the_shipped_templates_passes(tmp_path: Path) -> None:
    routes = (
        '[[routes]]\nname = "vip"\nrooms = ["vip-*"]\nchannels = ["hook", "audit"]\n'
        'continue = true\n[[routes]]\nname = "all"\nchannels = ["console", "bot"]\n'
    )
    result = run("check", "--config", str(write(tmp_path, routes)))
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    # A 5000-character name is cut to fit Slack, as documented: a note, not a failure.
    assert ["vip", "hook", OWNER, "ok (long values cut to fit Slack)"] in table
    assert ["vip", "audit", OWNER, "ok"] in table
    assert ["all", "bot", "Live.CallbackAfterEndBattle", "ok (long values cut to fit Slack)"] in (
        table
    )
    assert ["-", "hook", "digest", "ok (long values cut to fit Slack)"] in table
    assert not any(r[1] == "bot" and r[2] == "digest" for r in table)  # digest_after = 0


TYPO_ON_LINE_3: dict[str, str | bytes] = {
    "syntax": '{\n  "text": "owner changed",\n  "blocks": [{{ event.RoomId }]\n}\n',
    "undefined name": '{\n  "text": "owner changed",\n  "note": "{{ event.RoomIdd }}"\n}\n',
    "missing include": '{\n  "text": "owner changed",\n  "note": "{% include "x.j2" %}"\n}\n',
    "not UTF-8": b'{\n  "text": "owner changed",\n  "note": "caf\xe9"\n}\n',
    # It would filter escaped text and write the result unescaped: striptags undid `&lt;!channel`.
    "filter block": (
        '{\n  "text": "x",\n  "n": "{% filter striptags %}{{ event.RoomId }}{% endfilter %}"\n}\n'
    ),
}


@pytest.mark.parametrize("typo", TYPO_ON_LINE_3)
def test_template_typo_names_file_route_channel_and_line(tmp_path: Path, typo: str) -> None:
    name = f"slack/{OWNER}.j2"
    routes = '[[routes]]\nname = "mods"\nchannels = ["hook"]\n'
    path = write(tmp_path, routes, {name: TYPO_ON_LINE_3[typo]})
    result = run("check", "--config", str(path))
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if OWNER in line)
    assert message.startswith(f"live-bridge: {path}: route 'mods', channel 'hook', {OWNER}: ")
    assert f"{tmp_path / 'templates' / name}, line 3" in message
    assert ["mods", "hook", OWNER, "FAIL"] in rows(result.stdout)
    assert "Traceback" not in result.stderr


def test_a_template_that_reaches_for_the_environment_fails_check(tmp_path: Path) -> None:
    # Rendered in Jinja's sandbox: a template copied from the internet read every secret so.
    name = f"slack/{OWNER}.j2"
    leak = '{\n  "text": "x",\n  "note": "{{ lipsum.__globals__.os.environ.LB_TEST_SECRET }}"\n}\n'
    path = write(tmp_path, '[[routes]]\nname = "mods"\nchannels = ["hook"]\n', {name: leak})
    result = run("check", "--config", str(path), env={"LB_TEST_SECRET": "Zq8-leaked-value"})
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if OWNER in line)
    assert f"{tmp_path / 'templates' / name}, line 3: SecurityError: " in message
    assert "Zq8-leaked-value" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("commands", "failing"),
    [
        ('["Live.*"]', "Live.CallbackAfterSomethingNew"),
        ('["Live.CallbackAfter*"]', "Live.CallbackAfterSomethingNew"),
        ('["Group.*"]', "Group.SomethingNew"),
        ('["Mic.CallbackAfterSeatInfoChanged", "Group.CallbackAfterSendMsg"]', "Group.Callback"),
        (f'["{OWNER}"]', None),  # every command it can receive has a template of its own
    ],
)
def test_a_glob_reaches_default_j2_with_a_command_outside_the_table(
    tmp_path: Path, commands: str, failing: str | None
) -> None:
    routes = f'[[routes]]\nname = "live"\ncommands = {commands}\nchannels = ["console"]\n'
    path = write(tmp_path, routes, {"console/default.j2": "{{ roomid }}\n"})
    assert_fails_only(path, failing, "default.j2, line 1: UndefinedError")


def assert_fails_only(path: Path, failing: str | None, detail: str) -> None:
    """The config at `path` has no problem but, when `failing` names a command, that one of
    route "live"'s console channel, saying `detail`."""
    config = load_config(path)
    problems = [str(p) for p in check_templates(config, Renderer(config.templates))]
    # The console digest renders one line per event, default.j2 for an unknown command too.
    problems = [p for p in problems if "digest" not in p]
    if failing is None:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"route 'live', channel 'console', {failing}")
        assert detail in problems[0]


@pytest.mark.parametrize(
    ("commands", "failing"),
    [
        (None, "Live.CallbackAfterNewThing"),
        ('["Live.*"]', "Live.CallbackAfterNewThing"),
        ('["Mic.*"]', None),  # the route never sees it
    ],
)
def test_a_template_named_after_a_command_outside_the_table_is_tried(
    tmp_path: Path, commands: str | None, failing: str | None
) -> None:
    # Its own template, which no command of the table loads: one that did not load (nested
    # too deep) passed check and start-up, and failed its first callback.
    deep = "{{ " + "(" * 1200 + "room_id" + ")" * 1200 + " }}\n"
    chosen = "" if commands is None else f"commands = {commands}\n"
    routes = f'[[routes]]\nname = "live"\n{chosen}channels = ["console"]\n'
    path = write(tmp_path, routes, {"console/Live.CallbackAfterNewThing.j2": deep})
    assert_fails_only(path, failing, "console/Live.CallbackAfterNewThing.j2: RecursionError")


def test_a_typo_in_default_j2_behind_a_character_class_fails_start_up(tmp_path: Path) -> None:
    # Every command of the table this route receives has a Slack template of its own; a new
    # command Tencent adds, or one of another family, gets slack/default.j2.
    routes = '[[routes]]\nname = "r"\ncommands = ["Live.CallbackAfter[CD]*"]\nchannels = ["bot"]\n'
    path = write(tmp_path, routes, {"slack/default.j2": '{"text": "{{ event.RoomIdd }}"}'})
    config = load_config(path)
    renderer = Renderer(config.templates)
    new = sample("Live.CallbackAfterCloseRoom")
    assert Router(config.routes).route_event(parse_event(new)).channels == ("bot",)
    with pytest.raises(RenderError, match=r"default\.j2, line 1"):  # what delivery would meet
        renderer.render("slack", parse_event(new), new, Context(1400000000, time.time(), {}))
    [problem] = check_templates(config, renderer)
    assert str(problem).startswith("route 'r', channel 'bot', Live.CallbackAfterC")
    assert "default.j2, line 1: UndefinedError" in str(problem)


# (what is wrong, channel type, the template for the command, what the message says)
HOSTILE_FAILURES = [
    (
        "an account ID outside quotes: digits in the sample, anything from a client",
        "slack",
        '{"text": "room {{ event.RoomId }}", "owner": {{ event.RoomInfo.Owner_Account }}}',
        "Live.CallbackAfterCreateRoom",
        ["hostile value '<!channel>'", "output is not JSON"],
    ),
    (
        "an empty room leaves no text",
        "slack",
        '{"text": "{{ event.RoomId }}"}',
        OWNER,
        ["hostile value '' (empty)", "non-empty top-level text"],
    ),
    (
        "more than 10 context elements: Slack takes 10, delivery folds the rest into the tenth",
        "slack",
        '{"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}},'
        ' {"type": "context", "elements": ['
        + ", ".join(['{"type": "mrkdwn", "text": "{{ event.RoomId }}"}'] * 12)
        + "]}]}",
        OWNER,
        ["block 2 (context): 12 elements, over 10 (sent with the last 3 folded into the 10th)"],
    ),
    (
        "a newline in a value breaks the console line",
        "console",
        '{% filter replace("\\\\n", "\\n") %}{{ event.RoomId }}{% endfilter %}',
        OWNER,
        ["hostile value 'line1\\nline2'", "line break or terminal escape"],
    ),
    (
        "a division by a count that can be 0",
        "slack",
        '{"text": "{{ event.CurRoomCount * 100 // event.MaxRoomCount }}% of rooms in use"}',
        "Live.CallbackAfterCreateRoomReachingThreshold",
        ["hostile value integer 0", "ZeroDivisionError"],
    ),
]


@pytest.mark.parametrize(
    ("kind", "text", "command", "expected"),
    [case[1:] for case in HOSTILE_FAILURES],
    ids=[case[0] for case in HOSTILE_FAILURES],
)
def test_hostile_values_find_what_the_sample_does_not(
    tmp_path: Path, kind: str, text: str, command: str, expected: list[str]
) -> None:
    channel = "bot" if kind == "slack" else "console"
    routes = f'[[routes]]\nname = "r"\ncommands = ["{command}"]\nchannels = ["{channel}"]\n'
    path = write(tmp_path, routes, {f"{kind}/{command}.j2": text})
    config = load_config(path)
    assert check_templates(config, Renderer(config.templates)) == []  # start-up lets it through
    result = run("check", "--config", str(path))
    assert result.returncode == 1, result.stdout
    message = next(line for line in result.stderr.splitlines() if "route 'r'" in line)
    assert f"channel '{channel}', {command}: " in message
    assert f"{kind}/{command}.j2" in message
    for fragment in expected:
        assert fragment in message
    assert ["r", channel, command, "FAIL"] in rows(result.stdout)


def test_a_message_slack_would_refuse_fails_start_up_too(tmp_path: Path) -> None:
    text = '{"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": ""}}]}'
    routes = '[[routes]]\nname = "r"\nchannels = ["hook"]\n'
    path = write(tmp_path, routes, {"slack/default.j2": text})
    config = load_config(path)
    problems = check_templates(config, Renderer(config.templates))
    assert problems and "block 1 (section): text is empty" in str(problems[0])
    result = run("check", "--config", str(path))
    assert result.returncode == 1
    assert (
        "sample event: slack/default.j2: Slack would refuse it: block 1 (section): text is empty"
        in (result.stderr)
    )


def test_a_broken_digest_template_is_named(tmp_path: Path) -> None:
    channels = CHANNELS.replace("digest_after = 0\n", 'digest_template = "my-digest.j2"\n')
    routes = '[[routes]]\nname = "r"\nchannels = ["bot"]\n'
    path = write(tmp_path, routes, {"my-digest.j2": '{"text": "{{ count }"}'}, channels)
    result = run("check", "--config", str(path))
    assert result.returncode == 1
    assert f"live-bridge: {path}: channel 'bot', digest: " in result.stderr
    assert "my-digest.j2, line 1" in result.stderr
    assert ["-", "bot", "digest", "FAIL"] in rows(result.stdout)


def test_unset_variable_is_a_config_error_like_serve(tmp_path: Path) -> None:
    channels = CHANNELS.replace("${HOOK_SECRET:-x}", "${HOOK_SECRET}")
    path = write(tmp_path, '[[routes]]\nname = "r"\nchannels = ["hook"]\n', channels=channels)
    result = run("check", "--config", str(path))
    assert result.returncode == 2
    assert "environment variable HOOK_SECRET is not set" in result.stderr
    assert result.stdout == ""
    assert run("check", "--config", str(path), env={"HOOK_SECRET": "s3cret"}).returncode == 0
