"""`live-bridge render`, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bridge_server import OWNER, write_config

CHANNELS = """
[channels.console]
type = "console"
[channels.hook]
type = "slack"
webhook_url = "https://hooks.slack.com/services/T0/B0/not-used"
[channels.audit]
type = "webhook"
url = "https://audit.example.com/live"
"""
ROUTES = '[[routes]]\nname = "all"\nchannels = ["console", "hook", "audit"]\n'
BODY = (
    b'{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":"vip-7","EventTime":1703589922780,'
    b'"Operator_Account":"admin","CurrentOwner_Account":144115233775727695123,'
    b'"OriginalOwner_Account":"<!channel>"}'
)


def run(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The caller's LIVE_BRIDGE_* variables would override the test's config.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, timeout=60,
        input=stdin, env={**clean, **(env or {})},
    )  # fmt: skip
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def config(tmp_path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, channels=CHANNELS, routes=ROUTES, extra=extra)


def test_slack_payload_as_pretty_json(tmp_path: Path) -> None:
    result = run("render", "--config", str(config(tmp_path)), "--channel", "hook")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('{\n  "text": ')
    payload = json.loads(result.stdout)
    assert payload["text"] == "Room owner changed in room_id: user1 → user2"
    assert payload["blocks"][0]["text"]["text"] == "Room owner changed"
    assert not (tmp_path / "bridge.db").exists()  # the store is not touched


def test_event_from_stdin_wins_over_command(tmp_path: Path) -> None:
    path = str(config(tmp_path))
    args = ("render", "--config", path, "--event", "-", "--command", "Live.CallbackAfterEndBattle")
    result = run(*args, "--channel", "hook", stdin=BODY)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (
        payload["text"] == "Room owner changed in vip-7: &lt;!channel&gt; → 144115233775727695123"
    )
    assert "--command ignored, the event says Live.CallbackAfterChangeOwner" in result.stderr


HOSTILE = "A\x1b[2J\x9b2J\x9d0;T\x07\u2028B\u202eC\nFORGED"


def test_callback_values_cannot_drive_the_terminal(tmp_path: Path) -> None:
    # The command went raw into the note on stderr, and JSON leaves C1 controls, U+2028 and
    # bidi overrides as they are: a value could clear the screen, set the terminal's title,
    # forge a line or reorder what it shows.
    body = json.dumps({"CallbackCommand": f"Live.{HOSTILE}", "RoomId": HOSTILE}).encode()
    args = ("render", "--config", str(config(tmp_path)), "--event", "-")
    result = run(*args, "--command", "Live.CallbackAfterCreateRoom", "--channel", "audit",
                 stdin=body)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for text in (result.stdout, result.stderr):
        assert not set(text) & set("\x1b\x07\x9b\x9d\u2028\u202e")
    (note,) = result.stderr.splitlines()
    assert note.startswith("live-bridge: note: --command ignored, the event says Live.A\\u001b")
    assert json.loads(result.stdout)["event"]["RoomId"] == HOSTILE  # the same JSON


def test_an_event_from_a_closed_standard_input_is_no_traceback(tmp_path: Path) -> None:
    # sys.stdin was None: AttributeError, a traceback, where an empty event is an error (exit 2).
    command = (
        f"exec {sys.executable} -m bridge render --config {config(tmp_path)} --channel hook"
        " --event - <&-"
    )
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("live-bridge: the event is not a callback")


def test_webhook_payload_keeps_big_integers(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_bytes(BODY)
    result = run(
        "render", "--config", str(config(tmp_path)), "--channel", "audit", "--event", str(event)
    )
    assert result.returncode == 0, result.stderr
    assert '"CurrentOwner_Account": 144115233775727695123' in result.stdout
    payload = json.loads(result.stdout)
    assert payload["type"] == OWNER
    assert payload["sdk_app_id"] == 1400000000
    assert payload["event"] == json.loads(BODY)


def test_console_line_for_a_command_sample(tmp_path: Path) -> None:
    args = ("--channel", "console", "--command", "Live.CallbackAfterCreateRoom")
    result = run("render", "--config", str(config(tmp_path)), *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "room created" in result.stdout and "live-42" in result.stdout


def test_unknown_channel_lists_the_configured_ones(tmp_path: Path) -> None:
    path = config(tmp_path)
    result = run("render", "--config", str(path), "--channel", "nope")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"live-bridge: {path}: no channel 'nope'; configured: audit, console, hook\n"
    )
    assert result.stdout == ""


def test_an_event_that_is_not_a_callback(tmp_path: Path) -> None:
    path = str(config(tmp_path))
    result = run("render", "--config", path, "--channel", "hook", "--event", "-", stdin=b"[1]")
    assert result.returncode == 2
    assert "the event is not a callback: body must be a JSON object" in result.stderr
    missing = run("render", "--config", path, "--channel", "hook", "--event", "/nonexistent.json")
    assert missing.returncode == 2
    assert "/nonexistent.json: cannot read: No such file or directory" in missing.stderr


def test_a_template_that_fails_names_its_line(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "slack").mkdir(parents=True)
    (templates / "slack" / f"{OWNER}.j2").write_text('{\n"text": "{{ event.Nope }}"\n}\n')
    path = config(tmp_path)
    # write_config points [templates] dir at the shipped ones; the environment overrides it.
    env = {"LIVE_BRIDGE_TEMPLATES__DIR": str(templates)}
    result = run("render", "--config", str(path), "--channel", "hook", env=env)
    assert result.returncode == 1
    assert f"channel 'hook', {OWNER}: {templates / 'slack' / OWNER}.j2, line 2: " in result.stderr
    assert "Traceback" not in result.stderr
