from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import __version__
from tests.bridge_server import (
    OK_PACKET,
    SEED_BODY,
    Subprocess,
    free_port,
    get,
    post_callback,
    wait_until,
    write_config,
)

ROOT = Path(__file__).parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "live-bridge"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_version() -> None:
    assert run("--version").stdout.strip() == f"live-bridge {__version__}"


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "serve" in result.stdout


def test_bad_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tencent]\nsdk_app_id = 1\n[channels.c]\ntype = 'console'\nextra = 1\n")
    result = run("serve", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: invalid configuration" in result.stderr
    assert "[channels.c] extra: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


GOOD = b"""[tencent]
sdk_app_id = 1400000000
[store]
path = "bridge.db"
[templates]
dir = "t"
[channels.c]
type = "console"
[[routes]]
name = "r"
channels = ["c"]
"""
OWNER_TEMPLATE = "t/console/Live.CallbackAfterChangeOwner.j2"

# (what is wrong, the config, its templates, the environment, what the message says)
BAD_INPUTS: list[tuple[str, bytes, dict[str, bytes], dict[str, str], str]] = [
    ("a repeat count too large", GOOD.replace(b'"r"', b'"r"\nroom_regex = "a{99999999999}"'),
     {}, {}, "route 'r': bad room_regex"),
    ("groups nested too deep", GOOD.replace(b'"r"', b'"r"\nroom_regex = "%s"'
     % (b"(" * 1200 + b")" * 1200)), {}, {}, "route 'r': bad room_regex"),
    ("an attribute in room_url", GOOD.replace(b'"t"', b'"t"\nroom_url = "x/{room_id.a}"'), {}, {},
     "[templates] room_url: room_url may only use the placeholder {room_id}"),
    ("a config that is not UTF-8", GOOD + b"# caf\xe9\n", {}, {}, "line 12 is not UTF-8 text"),
    ("a template that is not UTF-8", GOOD, {OWNER_TEMPLATE: b"caf\xe9"}, {},
     "Live.CallbackAfterChangeOwner.j2, line 1: not UTF-8 text"),
    ("a list from the environment", GOOD, {}, {"LIVE_BRIDGE_TENCENT__SDK_APP_ID": "abc"},
     "environment variable LIVE_BRIDGE_TENCENT__SDK_APP_ID: not a value for [tencent] sdk_app_id"),
    ("a table from the environment", GOOD, {}, {"LIVE_BRIDGE_CHANNELS": "{bad"},
     "environment variable LIVE_BRIDGE_CHANNELS: not a value for [channels]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "templates", "env", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_of_any_kind_exits_2_naming_it(
    tmp_path: Path, config: bytes, templates: dict[str, bytes], env: dict[str, str], message: str
) -> None:
    (tmp_path / "config.toml").write_bytes(config)
    for name, data in templates.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    result = run("serve", "--config", str(tmp_path / "config.toml"), env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_default_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"], capture_output=True, text=True, timeout=30,
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "LIVE_BRIDGE_CONFIG"},
    )  # fmt: skip
    assert result.returncode == 2 and "config.toml: no such config file" in result.stderr


def test_example_config_serves_the_seed_sample(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "LIVE_BRIDGE_SERVER__PORT": str(port),
        "LIVE_BRIDGE_STORE__PATH": str(tmp_path / "example.db"),
        "LIVE_BRIDGE_CONFIG": str(ROOT / "config.example.toml"),
    }
    out = tmp_path / "stdout.txt"
    with out.open("w") as stdout:
        process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "serve"], stdout=stdout, stderr=subprocess.PIPE, env=env
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return get(url + "/readyz")[0] == 200
            except OSError:
                return False

        assert wait_until(ready, timeout=20)
        assert post_callback(url) == (200, OK_PACKET)
        expected = (
            "[2023-12-26 11:25:22 UTC] room owner changed: room room_id, user1 -> user2 "
            "(by admin, SDKAppID 1400000000)"
        )
        assert wait_until(lambda: expected in out.read_text())
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why.
    assert process.returncode in (0, -15)
    assert b"live-bridge stopped" in stderr


def test_sigterm_drains_then_stops_keeping_what_is_pending(tmp_path: Path) -> None:
    port = free_port()
    channels = '[channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:9/closed"\n'
    routes = '[[routes]]\nname = "all"\nchannels = ["hook"]\n'
    config = write_config(
        tmp_path, port, channels=channels, routes=routes, server="drain_s = 2.0",
        delivery="initial_backoff_s = 60.0\nmax_backoff_s = 60.0\n",
    )  # fmt: skip
    bridge = Subprocess(config, port, tmp_path / "bridge.log")
    with bridge:
        assert bridge.process is not None
        assert post_callback(bridge.url) == (200, OK_PACKET)
        bridge.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: get(bridge.url + "/readyz") == (503, {"status": "draining"}))
        # Still acknowledged, durably, until the listener closes.
        other = SEED_BODY.replace(b"user2", b"user3")
        assert post_callback(bridge.url, other) == (200, OK_PACKET)
        bridge.process.wait(timeout=20)
    log = (tmp_path / "bridge.log").read_text()
    assert "draining for 2.0s before closing" in log
    assert "live-bridge stopped" in log
    with contextlib.closing(sqlite3.connect(tmp_path / "bridge.db")) as conn:
        states = conn.execute("SELECT state FROM deliveries").fetchall()
    assert states == [("pending",), ("pending",)]  # nothing lost, nothing given up


def test_a_reader_that_goes_away_is_no_error() -> None:
    check = subprocess.Popen(
        [sys.executable, "-m", "bridge", "check", "--config", str(ROOT / "config.example.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert check.stdout is not None and check.stderr is not None
    check.stdout.readline()
    check.stdout.close()  # like `| head -1`
    stderr = check.stderr.read()
    check.stderr.close()
    check.wait(timeout=30)
    assert b"Traceback" not in stderr
