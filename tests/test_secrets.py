"""Secrets stay secret: a full scenario with distinctive secret values, and none of them (nor a
telling part of one) in any log line, command output, error message, status page, metric or row.

Every secret comes from the environment through `${VAR}`, the documented way. The scenario runs
`python -m bridge serve --log-level debug` against the Slack stand-in: signed callbacks,
deliveries that succeed, retry, hit a 429 and die; refused callbacks; refused reloads whose
config puts a secret where it does not belong; and every command that reads the config. The
stand-in itself receives the tokens, as Slack would: what it got is not looked at.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.verify import sign
from tests.bridge_server import (
    APP_ID,
    DELIVERY,
    OK_PACKET,
    SEED_BODY,
    InThread,
    NoRedirect,
    db_rows,
    free_port,
    http_request,
    post_callback,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn


@dataclass(frozen=True)
class Secret:
    env: str
    value: str
    parts: tuple[str, ...]  # pieces distinctive enough that seeing one is a leak too


BOT_TOKEN = "xoxb-2718-2818-Zq8SlackBotS3cret"
SIGNING_KEY = base64.b64encode(b"Zq8 signing key for webhooks!").decode()
FIXED_SECRETS = (
    Secret("LB_TEST_TENCENT_TOKEN", "tct-Zq8TencentTok3n-1669872112", ("Zq8TencentTok3n",)),
    Secret("LB_TEST_SLACK_BOT_TOKEN", BOT_TOKEN, ("Zq8SlackBotS3cret",)),
    Secret("LB_TEST_AUDIT_BEARER", "bearer-Zq8AuditBearerS3cret", ("Zq8AuditBearerS3cret",)),
    Secret("LB_TEST_AUDIT_SIGNING", f"whsec_{SIGNING_KEY}", (SIGNING_KEY,)),
    Secret("LB_TEST_ADMIN_TOKEN", "adm-Zq8AdminS3cret-5150", ("Zq8AdminS3cret",)),
)
AUDIT_QUERY_SECRET = "Zq8AuditQueryS3cret"
DOWN_QUERY_SECRET = "Zq8DownQueryS3cret"
TOKEN = FIXED_SECRETS[0].value  # Tencent's callback token
ADMIN = FIXED_SECRETS[4].value


def secrets_for(slack: SlackStandIn, down_port: int) -> tuple[Secret, ...]:
    """The fixed secrets, and URLs that carry one: the stand-in's webhook (its path is the
    secret), the audit sink and a port nobody listens on (a query parameter is)."""
    hook = slack.add_webhook()
    hook_path = hook.removeprefix(slack.base_url)
    audit = f"{slack.sink_url('audit')}?key={AUDIT_QUERY_SECRET}"
    down = f"http://127.0.0.1:{down_port}/hook?token={DOWN_QUERY_SECRET}"
    return (
        *FIXED_SECRETS,
        Secret("LB_TEST_SLACK_WEBHOOK_URL", hook, (hook_path, hook_path.rsplit("/", 1)[1])),
        Secret("LB_TEST_AUDIT_URL", audit, (AUDIT_QUERY_SECRET,)),
        Secret("LB_TEST_DOWN_URL", down, (DOWN_QUERY_SECRET,)),
    )


def needles(secrets: tuple[Secret, ...]) -> dict[str, str]:
    """Each text that must never be seen, lower-cased, with the variable it belongs to."""
    found = {s.value.lower(): s.env for s in secrets}
    found |= {part.lower(): s.env for s in secrets for part in s.parts}
    return found


@dataclass
class Evidence:
    """Everything the scenario saw, by where it came from."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: str | bytes) -> str:
        decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        self.texts.append((where, decoded))
        return decoded

    def leaks(self, secrets: tuple[Secret, ...]) -> list[str]:
        return [
            f"{env} in {where}"
            for where, text in self.texts
            for needle, env in needles(secrets).items()
            if needle in text.lower()
        ]


CHANNELS = """\
[channels.hook]
type = "slack"
webhook_url = "${LB_TEST_SLACK_WEBHOOK_URL}"
rate_per_s = 1000.0
burst = 100
digest_after = 0

[channels.bot]
type = "slack"
token = "${LB_TEST_SLACK_BOT_TOKEN}"
channel = "C0123456789"
api_url = "API_URL"
rate_per_s = 1000.0
burst = 100
digest_after = 0

[channels.audit]
type = "webhook"
url = "${LB_TEST_AUDIT_URL}"
headers = { Authorization = "Bearer ${LB_TEST_AUDIT_BEARER}" }
signing_secret = "${LB_TEST_AUDIT_SIGNING}"

[channels.down]
type = "webhook"
url = "${LB_TEST_DOWN_URL}"
"""
ROUTES = '[[routes]]\nname = "all"\nchannels = ["hook", "bot", "audit", "down"]\n'
TENCENT = 'callback_token = "${LB_TEST_TENCENT_TOKEN}"'
ADMIN_TABLE = '[admin]\ntoken = "${LB_TEST_ADMIN_TOKEN}"\n'

# Broken configs that put a secret where it does not belong; each reload must be refused
# without echoing the value.
BROKEN_EDITS: tuple[tuple[str, str, str], ...] = (
    ("unknown key", 'digest_after = 0\n\n[channels.bot]',
     'digest_after = 0\nnote = "${LB_TEST_SLACK_BOT_TOKEN}"\n\n[channels.bot]'),
    ("unknown table", ROUTES, ROUTES + '\n[oops]\nkey = "${LB_TEST_AUDIT_BEARER}"\n'),
    ("wrong type", "burst = 100\ndigest_after = 0\n\n[channels.bot]",
     'burst = "${LB_TEST_ADMIN_TOKEN}"\ndigest_after = 0\n\n[channels.bot]'),
    ("not a whsec", 'signing_secret = "${LB_TEST_AUDIT_SIGNING}"',
     'signing_secret = "${LB_TEST_SLACK_BOT_TOKEN}"'),
    ("not a URL", 'url = "${LB_TEST_DOWN_URL}"', 'url = "${LB_TEST_TENCENT_TOKEN}"'),
    ("token too long", TENCENT,
     'callback_token = "' + "${LB_TEST_TENCENT_TOKEN}" * 8 + '"'),
    ("an app's token too long", TENCENT,
     f'{TENCENT}\ncallback_tokens = {{ {APP_ID} = "' + "${LB_TEST_TENCENT_TOKEN}" * 8 + '" }'),
    ("a token for an app not listed", TENCENT,
     f'{TENCENT}\ncallback_tokens = {{ 7 = "${{LB_TEST_TENCENT_TOKEN}}" }}'),
    ("two Slack modes", 'channel = "C0123456789"\n',
     'channel = "C0123456789"\nwebhook_url = "${LB_TEST_AUDIT_URL}"\n'),
    ("unset variable", "${LB_TEST_ADMIN_TOKEN}", "${LB_TEST_NEVER_SET}"),
)  # fmt: skip


def config_text(slack: SlackStandIn, port: int, directory: Path, delivery: str = "") -> str:
    path = write_config(
        directory, port, channels=CHANNELS.replace("API_URL", slack.api_url), routes=ROUTES,
        tencent=TENCENT, extra=ADMIN_TABLE, delivery=DELIVERY + delivery,
    )  # fmt: skip
    return path.read_text()


def request(
    url: str, method: str = "GET", data: bytes | None = None, token: str | None = ADMIN
) -> tuple[int, str, bytes]:
    """Status, headers as text, body; with the admin token unless told otherwise."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, got, body = http_request(url, method, headers, data)
    return status, "\n".join(f"{k}: {v}" for k, v in got.items()), body


def signed_query(token: str, offset: int = 0, bad_sign: bool = False) -> str:
    now = str(int(time.time()) + offset)
    signature = "0" * 64 if bad_sign else sign(token, now)
    return f"SdkAppid={APP_ID}&CallbackCommand=x&RequestTime={now}&Sign={signature}"


def room(name: str) -> bytes:
    return SEED_BODY.replace(b'"room_id"', f'"{name}"'.encode())


def deliveries(db: Path) -> list[tuple[str, str, str | None]]:
    return db_rows(db, "SELECT channel, state, last_error FROM deliveries")


def quiet(db: Path) -> bool:
    """Nothing pending or in flight: every delivery delivered or dead."""
    return all(state in ("delivered", "dead") for _, state, _ in deliveries(db))


def dump(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return "\n".join(conn.iterdump())


@contextlib.contextmanager
def serving(config: Path, log: Path, env: dict[str, str], url: str) -> Iterator[None]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config),
             "--log-level", "debug"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=config.parent,
        )  # fmt: skip
    try:
        ready = wait_until(lambda: up(url) or process.poll() is not None, timeout=20)
        assert ready and process.poll() is None, log.read_text()
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def up(url: str) -> bool:
    try:
        return request(url + "/readyz", token=None)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
def test_no_secret_in_logs_outputs_errors_pages_metrics_or_store(
    tmp_path: Path, own_process: bool
) -> None:
    """With `own_process`, the delivery process's logs, and its reports behind the status page
    and metrics, are in the evidence too."""
    with SlackStandIn(tokens=[BOT_TOKEN]) as slack:
        secrets = secrets_for(slack, free_port())
        scenario = Scenario(tmp_path, slack, secrets, "own_process = true\n" if own_process else "")
        with serving(scenario.config, scenario.log, scenario.env, scenario.url):
            deliveries_that_succeed_retry_and_die(scenario)
            refused_callbacks(scenario)
            refused_reloads(scenario)
            every_command(scenario)
            admin_surface(scenario)
    log = scenario.evidence.add("serve log", scenario.log.read_bytes())
    check_the_scenario_ran(log, deliveries(scenario.db), scenario.evidence)
    # Delivered by the delivery process, whose lines are in the same log.
    assert ("delivery process: reloaded" in log) is own_process
    assert scenario.evidence.leaks(secrets) == []
    assert len(scenario.signs) == 2
    told = [where for where, text in scenario.evidence.texts for valid in scenario.signs
            if valid in text.lower()]  # fmt: skip
    assert told == []


class Scenario:
    """One config (every secret from the environment), its server, and what was seen."""

    def __init__(
        self, tmp_path: Path, slack: SlackStandIn, secrets: tuple[Secret, ...], delivery: str = ""
    ) -> None:
        self.slack = slack
        self.dir = tmp_path
        self.env = {**os.environ, **{s.env: s.value for s in secrets}}
        self.env.pop("LB_TEST_NEVER_SET", None)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.good = config_text(slack, port, tmp_path, delivery)
        self.config = tmp_path / "config.toml"
        self.db = tmp_path / "bridge.db"
        self.log = tmp_path / "serve.log"
        self.evidence = Evidence()
        self.callbacks = 0  # accepted, each with one delivery per channel (four)
        self.signs: list[str] = []  # the valid Signs of refused callbacks (refused_callbacks)

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bridge", *args, "--config", str(config or self.config)],
            capture_output=True, text=True, timeout=60, env=self.env, cwd=self.dir,
        )  # fmt: skip
        self.evidence.add(f"`{' '.join(args)}` stdout", result.stdout)
        self.evidence.add(f"`{' '.join(args)}` stderr", result.stderr)
        return result

    def exit_codes(self, *commands: tuple[str, ...], config: Path | None = None) -> list[int]:
        """Run independent commands at once (each is a Python start-up, about half a second)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            done = pool.map(lambda args: self.cli(*args, config=config).returncode, commands)
            return list(done)

    def settle(self) -> None:
        """Every delivery of every callback so far delivered or dead."""
        assert wait_until(
            lambda: len(deliveries(self.db)) == 4 * self.callbacks and quiet(self.db), timeout=30
        ), deliveries(self.db)

    def deliver(self, name: str, *answers: dict[str, Any]) -> None:
        """A signed callback for room `name`, the far ends first set to give `answers`."""
        for answer in answers:
            self.slack.fail_next(1, **answer)
        assert post_callback(self.url, room(name), query=signed_query(TOKEN)) == (200, OK_PACKET)
        self.callbacks += 1
        self.settle()

    def reload(self) -> tuple[int, str]:
        status, headers, body = request(self.url + "/-/reload", "POST", b"")
        return status, headers + body.decode()


def deliveries_that_succeed_retry_and_die(scenario: Scenario) -> None:
    # The "down" channel never connects: retried, then a dead letter, every time.
    scenario.deliver("all-well")
    scenario.deliver(
        "retried",
        {"status": 500, "error": "rollup_error", "kind": "webhook"},
        {"error": "internal_error", "kind": "api"},
        {"status": 503, "error": "<h1>503: upstream down for {url}</h1>", "kind": "sink"},
    )
    scenario.deliver(
        "rate-limited",
        {"status": 429, "retry_after": 1, "kind": "webhook"},
        {"status": 429, "error": "ratelimited", "retry_after": 1, "kind": "api"},
        {"status": 429, "retry_after": 1, "kind": "sink"},
    )
    scenario.deliver(
        "refused",
        {"status": 404, "error": "channel_not_found", "kind": "webhook"},
        {"error": "channel_not_found", "kind": "api"},
        {"status": 401, "error": "<h1>401: no access to {url}</h1>", "kind": "sink"},
    )


def refused_callbacks(scenario: Scenario) -> None:
    """A wrong Sign, a stale RequestTime, no Sign at all. The Sign each refused one should have
    carried is made from the token: telling it would let anyone sign (kept to look for)."""
    for query in (
        signed_query(TOKEN, bad_sign=True),
        signed_query(TOKEN, offset=-3600),
        f"SdkAppid={APP_ID}",
    ):
        status, reply = post_callback(scenario.url, room("refused-callback"), query=query)
        assert status == 401
        scenario.evidence.add("refused callback reply", reply)
        if "RequestTime=" in query:
            at = query.split("RequestTime=")[1].split("&")[0]
            scenario.signs.append(sign(TOKEN, at))


def refused_reloads(scenario: Scenario) -> None:
    """Each broken config is refused by /-/reload and by `check`, naming the key only."""
    broken = []
    for number, (name, old, new) in enumerate(BROKEN_EDITS):
        assert old in scenario.good, name
        text = scenario.good.replace(old, new, 1)
        scenario.config.write_text(text)
        status, answer = scenario.reload()
        assert status == 400, (name, answer)
        scenario.evidence.add(f"reload refused ({name})", answer)
        broken.append(scenario.dir / f"broken-{number}.toml")
        broken[-1].write_text(text)
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda path: scenario.cli("check", config=path).returncode, broken))
    assert codes == [2] * len(broken)
    scenario.config.write_text(scenario.good)
    status, answer = scenario.reload()
    assert status == 200, answer
    scenario.evidence.add("reload", answer)


def every_command(scenario: Scenario) -> None:
    """Every command that reads the config, against the running bridge and the stand-in."""
    channels = ("hook", "bot", "audit", "down")
    renders = [("render", "--channel", channel) for channel in channels]
    tests = [("send-test", "--channel", channel) for channel in channels]
    assert scenario.exit_codes(("check",), *renders, *tests) == [0] * 8 + [1]  # down: refused
    scenario.slack.fail_next(1, error="invalid_auth", kind="api")
    assert scenario.cli("send-test", "--channel", "bot").returncode == 1
    scenario.slack.fail_next(1, status=500, kind="webhook")
    assert scenario.cli("send-test", "--channel", "hook").returncode == 1
    assert scenario.cli("simulate").returncode == 0
    scenario.callbacks += 1
    scenario.settle()
    listings = [("outbox", "list", "--json"), ("outbox", "list", "--dead"),
                ("outbox", "stats", "--json"), ("outbox", "stats")]  # fmt: skip
    assert scenario.exit_codes(*listings) == [0] * len(listings)


def admin_surface(scenario: Scenario) -> None:
    """The admin endpoints with the token, what a visitor without it sees, and the store."""
    for path in ("/metrics", "/status", "/healthz", "/readyz"):
        status, headers, body = request(scenario.url + path)
        assert status == 200, path
        scenario.evidence.add(f"GET {path}", headers + body.decode())
    for path in ("/metrics", "/status"):
        status, headers, body = request(scenario.url + path, token=None)
        assert status == 401
        scenario.evidence.add(f"GET {path} without the token", headers + body.decode())
    for token in (ADMIN, "adm-wrong"):
        scenario.evidence.add("status page login", login(scenario.url, token))
    scenario.evidence.add("store", dump(scenario.db))


def login(url: str, token: str) -> str:
    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(  # noqa: S310
        url + "/status/login", data=f"token={token}".encode(), method="POST"
    )
    try:
        with opener.open(req, timeout=10) as response:
            body: bytes = response.read()
            return str(response.headers) + body.decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return str(exc.headers) + exc.read().decode()


def check_the_scenario_ran(
    log: str, rows: list[tuple[str, str, str | None]], evidence: Evidence
) -> None:
    """A scenario that silently skipped its failures would prove nothing."""
    seen = ("delivered event=", "retry event=", "rate limited event=", "dead letter",
            "refused callback: HTTP 401", "reload refused", "reloaded:")  # fmt: skip
    for expected in seen:
        assert expected in log, expected
    errors = " | ".join(sorted({e for _, _, e in rows if e}))
    for expected in ("channel_not_found", "HTTP 401", "cannot connect"):
        assert expected in errors, errors
    assert {state for _, state, _ in rows} == {"delivered", "dead"}
    status_page = next(text for where, text in evidence.texts if where == "GET /status")
    assert "channel_not_found" in status_page


# -- the same refusals, one by one: what a reload answers and logs -------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        *[pytest.param(old, new, id=name) for name, old, new in BROKEN_EDITS],
        pytest.param('[templates]\n', '[templates]\ntimezone = "${LB_TEST_TENCENT_TOKEN}"\n',
                     id="secret as the time zone"),
        pytest.param('[templates]\n', '[templates]\nroom_url = "${LB_TEST_AUDIT_URL}{x}"\n',
                     id="secret in room_url"),
        pytest.param('name = "all"', 'name = "all"\nroom_regex = "${LB_TEST_ADMIN_TOKEN}("',
                     id="secret in a bad regex"),
    ],
)  # fmt: skip
def test_a_refused_reload_names_the_key_never_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    old: str, new: str,
) -> None:  # fmt: skip
    with SlackStandIn(tokens=[BOT_TOKEN]) as slack:
        secrets = secrets_for(slack, free_port())
        for secret in secrets:
            monkeypatch.setenv(secret.env, secret.value)
        monkeypatch.delenv("LB_TEST_NEVER_SET", raising=False)
        good = config_text(slack, 0, tmp_path)
        config = tmp_path / "config.toml"
        assert old in good
        with InThread(config) as running:
            config.write_text(good.replace(old, new, 1))
            status, headers, body = request(running.url + "/-/reload", "POST", b"")
            reply = post_callback(running.url, room("after"), query=signed_query(secrets[0].value))
    assert status == 400 and json.loads(body)["status"] == "refused", body
    assert reply == (200, OK_PACKET)  # the running config still serves
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "reload refused" in logged
    evidence = Evidence()
    evidence.add("reload answer", headers + body.decode())
    evidence.add("log", logged)
    assert evidence.leaks(secrets) == []
