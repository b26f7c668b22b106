from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.config import ConfigError, config_path, load_config
from bridge.config_channels import SlackChannel, WebhookChannel

ROOT = Path(__file__).parent.parent

MINIMAL = """
[tencent]
sdk_app_id = 1400000000

[channels.console]
type = "console"

[[routes]]
name = "all"
channels = ["console"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.tencent.sdk_app_id == (1400000000,)
    assert config.server.callback_path == "/tencent/callback"
    assert config.store.path == ROOT / "live-bridge.db"
    assert config.templates.dir == ROOT / "templates"
    assert [r.name for r in config.routes] == ["everything"]


def test_issue_example_loads_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/Zq1")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-Zq2")
    monkeypatch.setenv("AUDIT_TOKEN", "Zq3")
    monkeypatch.setenv("AUDIT_SIGNING_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    path = write(tmp_path, ISSUE_EXAMPLE)
    config = load_config(path)
    moderators = config.channels["moderators"]
    assert isinstance(moderators, SlackChannel) and moderators.webhook_url is not None
    assert moderators.webhook_url.get_secret_value().endswith("Zq1")
    audit = config.channels["audit"]
    assert isinstance(audit, WebhookChannel)
    assert audit.headers["Authorization"].get_secret_value() == "Bearer Zq3"
    assert not any(z in repr(config) + str(config) for z in ("Zq1", "Zq2", "Zq3", "MfKQ9"))
    games = config.routes[1]
    assert games.continue_ and games.room_regex == "^game-[0-9]+$"
    assert config.tencent.sdk_app_id == (1400000000,)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("[[routes]]\nname = 'r'\nchannels = ['nowhere']\n", "route 'r': undefined channel"),
        ("[[routes]]\nname = 'r'\nroom_regex = '(['\nchannels = ['console']\n", "route 'r': bad"),
        (
            "[[routes]]\nname = 'r'\nroom_regex = 'a{99999999999}'\nchannels = ['console']\n",
            "route 'r': bad room_regex",
        ),
        (
            f"[[routes]]\nname = 'r'\nroom_regex = '{'(' * 1200 + ')' * 1200}'\n"
            "channels = ['console']\n",
            "route 'r': bad room_regex: groups nested too deeply",
        ),
        ("[[routes]]\nname = 'all'\nchannels = ['console']\n", "route 'all': another route"),
    ],
)
def test_route_cross_references(tmp_path: Path, routes: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="route") as caught:
        load_config(write(tmp_path, MINIMAL + routes))
    assert expected in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.mkdir(), "is a directory, not a config file"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
        (lambda p: p.symlink_to(p), "cannot be read: Too many levels of symbolic links"),
    ],
)
def test_a_config_path_that_is_no_file_says_what_it_is(
    tmp_path: Path, make: Callable[[Path], None], expected: str
) -> None:
    # "no such config file" sent the operator looking for a file that is there.
    path = tmp_path / "config.toml"
    make(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "no such folder (a relative one is taken from the config file's folder)"),
        (lambda p: p.write_text("x"), "not a folder"),
        (lambda p: p.symlink_to(p), "cannot be read: Too many levels of symbolic links"),
    ],
    ids=["absent", "a file", "a symlink loop"],
)
def test_a_templates_folder_the_config_names_is_said_to_be_missing(
    tmp_path: Path, make: Callable[[Path], None] | None, expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # A typo in the folder's name left every override unused without a word.
    if make is not None:
        make(tmp_path / "my-templates")
    path = write(tmp_path, MINIMAL + '[templates]\ndir = "my-templates"\n')
    assert load_config(path).templates.dir == tmp_path / "my-templates"  # the shipped ones serve
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: [templates] dir: {expected}; only the shipped templates serve"
    ]
    caplog.clear()
    (tmp_path / "my-templates").unlink(missing_ok=True)
    (tmp_path / "my-templates").mkdir()
    load_config(path)
    assert caplog.records == []


def test_a_templates_folder_this_user_cannot_read_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Jinja's loader took every file in it for absent: each override unused, without a word.
    # (As root every folder can be read: the permission is what os.access answers.)
    (tmp_path / "my-templates").mkdir()
    path = write(tmp_path, MINIMAL + '[templates]\ndir = "my-templates"\n')
    monkeypatch.setattr("bridge.config.os.access", lambda p, mode: Path(p).name != "my-templates")
    load_config(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: [templates] dir: cannot be read: Permission denied; only the shipped templates"
        " serve"
    ]


def test_names_too_long_for_the_file_system_are_config_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Path.is_file() and is_dir() raise for them: a traceback where a config error was due.
    long = "a" * 300
    with pytest.raises(ConfigError, match="cannot be read: File name too long"):
        load_config(tmp_path / f"{long}.toml")
    path = write(tmp_path, MINIMAL + f'[templates]\ndir = "{long}"\n')
    load_config(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: [templates] dir: cannot be read: File name too long; only the shipped"
        " templates serve"
    ]


def test_the_default_templates_folder_may_be_absent_unsaid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Unnamed, it is optional: the shipped templates serve, and nothing is said.
    assert load_config(write(tmp_path, MINIMAL)).templates.dir == tmp_path / "templates"
    assert caplog.records == []


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIVE_BRIDGE_CONFIG", raising=False)
    assert config_path(None) == Path("config.toml")
    monkeypatch.setenv("LIVE_BRIDGE_CONFIG", "/etc/live-bridge.toml")
    assert config_path(None) == Path("/etc/live-bridge.toml")
    assert config_path("x.toml") == Path("x.toml")


ISSUE_EXAMPLE = """
[server]
host = "127.0.0.1"
port = 8080
callback_path = "/tencent/callback"
max_body_bytes = 262144

[tencent]
sdk_app_id = 1400000000
max_request_age_s = 60

[store]
path = "live-bridge.db"

[delivery]
max_attempts = 10
initial_backoff_s = 1.0
max_backoff_s = 300.0
timeout_s = 10.0
dedup_window_s = 600

[templates]
dir = "templates"
timezone = "UTC"

[channels.console]
type = "console"

[channels.moderators]
type = "slack"
webhook_url = "${SLACK_WEBHOOK_URL}"

[channels.mod-bot]
type = "slack"
token = "${SLACK_BOT_TOKEN}"
channel = "C0123456789"
api_url = "https://slack.com/api/"

[channels.audit]
type = "webhook"
url = "https://audit.example.com/live"
headers = { Authorization = "Bearer ${AUDIT_TOKEN}" }
signing_secret = "${AUDIT_SIGNING_SECRET}"

[[routes]]
name = "vip"
rooms = ["vip-*"]
channels = ["moderators", "audit"]

[[routes]]
name = "games"
room_regex = "^game-[0-9]+$"
commands = ["Live.CallbackAfterChangeOwner"]
operators = ["admin*"]
channels = ["mod-bot"]
continue = true

[[routes]]
name = "everything else"
channels = ["console"]
"""


@pytest.mark.parametrize(
    ("regex", "expected"),
    [
        ("(?P<${NAME}>a)", "bad room_regex: bad character in group name at position 4"),
        ("(?P=${NAME})", "bad room_regex: bad character in group name at position 4"),
        ("(?P<a>x)(?P<${NAME}>y)", "bad room_regex: bad character in group name at position 12"),
    ],
)
def test_a_bad_room_regex_does_not_repeat_a_variables_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, regex: str, expected: str
) -> None:
    # re.error quotes the group name it refuses, which here is the value of ${NAME}.
    monkeypatch.setenv("NAME", "Zq7 secret")
    routes = f"[[routes]]\nname = 'r'\nroom_regex = '{regex}'\nchannels = ['console']\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + routes))
    assert f"route 'r': {expected}" in str(caught.value)
    assert "Zq7" not in str(caught.value)
