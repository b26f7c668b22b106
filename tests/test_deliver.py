"""The delivery process (`[delivery] own_process = true`): the real server starts a real second
process, which delivers to the stand-in's sink; it is killed, reloaded and stopped for real."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from bridge import supervise
from bridge.app import create_app
from bridge.attempts import ChannelState
from bridge.config import ConfigError, load_config
from bridge.deliver import STATES_MAX, Report
from bridge.events_body import decode_body
from bridge.events_parse import parse_event
from bridge.metrics import Metrics
from bridge.render import Context, Renderer
from bridge.store.engines import make_store
from bridge.supervise import DeliveryProcess
from tests.bridge_server import (
    OK_PACKET,
    ROOT,
    SEED_BODY,
    InThread,
    Subprocess,
    children,
    db_rows,
    free_port,
    gone,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.conftest import PostgresSQL
from tests.slack_standin import SlackStandIn

HOOK = '[channels.hook]\ntype = "webhook"\nurl = "{url}"\n'
ROUTE = '[[routes]]\nname = "all"\nchannels = ["hook"]\n'
OWN = "own_process = true\ninitial_backoff_s = 0.05\nmax_backoff_s = 0.2\nmax_attempts = {n}\n"


def room(n: int) -> bytes:
    return SEED_BODY.replace(b'"room_id"', f'"room-{n}"'.encode())


def own_config(tmp_path: Path, url: str, max_attempts: int = 3) -> Path:
    return write_config(
        tmp_path, channels=HOOK.format(url=url), routes=ROUTE, delivery=OWN.format(n=max_attempts)
    )


def process(bridge: InThread) -> DeliveryProcess:
    delivery = bridge.app.bridge.delivery
    assert delivery is not None
    return delivery


def metric(url: str, name: str, **labels: str) -> float:
    """The first sample named `name` whose labels include `labels`; 0 if there is none."""
    matching = (
        v
        for (n, have), v in samples(url).items()
        if n == name and labels.items() <= dict(have).items()
    )
    return next(matching, 0.0)


def test_the_child_delivers_and_the_server_counts_it(tmp_path: Path, slack: SlackStandIn) -> None:
    with InThread(own_config(tmp_path, slack.sink_url())) as bridge:
        assert bridge.app.bridge.worker is None  # nothing delivers in the serving process
        child = process(bridge).pid
        assert child is not None and child != os.getpid()
        for n in range(20):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 20)
        delivered = "live_bridge_deliveries_total"
        assert wait_until(lambda: metric(bridge.url, delivered, outcome="delivered") == 20)
        assert metric(bridge.url, "live_bridge_delivery_latency_seconds_count") == 20
        state, blocked = bridge.app.bridge.channel_state("hook")
        assert state is not None and state.last_success_at is not None and blocked == 0
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 0
    assert wait_until(lambda: gone(child))  # stopped with the server, not left behind
    db = tmp_path / "bridge.db"
    assert db_rows(db, "SELECT state, COUNT(*) FROM deliveries GROUP BY 1") == [("delivered", 20)]


def test_a_child_that_stops_reporting_is_killed_and_started_again(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped (SIGSTOP, a debugger) or hung, it delivered nothing, and nothing said so.
    monkeypatch.setattr(supervise, "STALL_S", 3.0)  # it says it is alive every second
    monkeypatch.setattr(supervise, "RESTART_S", (0.05, 0.05))
    with InThread(own_config(tmp_path, slack.sink_url())) as bridge:
        first = process(bridge).pid
        assert first is not None and wait_until(lambda: process(bridge).ready)
        time.sleep(5)  # idle with nothing to report, but alive: left alone
        assert process(bridge).pid == first
        os.kill(first, signal.SIGSTOP)
        assert post_callback(bridge.url, room(1)) == (200, OK_PACKET)
        assert wait_until(lambda: process(bridge).pid not in (first, None))
        assert slack.wait_for(lambda s: any(b"room-1" in r.body for r in s.sink_requests))
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 1
    assert wait_until(lambda: gone(first))


def test_failures_reach_the_status_page_and_metrics(tmp_path: Path, slack: SlackStandIn) -> None:
    slack.set_sink_status("sink", 500)
    with InThread(own_config(tmp_path, slack.sink_url(), max_attempts=1)) as bridge:
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert wait_until(lambda: metric(bridge.url, "live_bridge_deliveries_total") == 1)
        assert metric(bridge.url, "live_bridge_deliveries_total", outcome="dead") == 1

        def last_error() -> str | None:
            state, _ = bridge.app.bridge.channel_state("hook")
            return state.last_error if state else None

        assert wait_until(lambda: "HTTP 500" in (last_error() or ""))
        status, _, page = http_request(bridge.url + "/status")
        assert status == 200 and b"HTTP 500" in page


def test_a_killed_child_is_started_again_and_nothing_waits_for_its_leases(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    slack.set_sink_delay("sink", 3.0)  # the kill comes while these are in flight
    with InThread(own_config(tmp_path, slack.sink_url())) as bridge:
        first = process(bridge).pid
        assert first is not None
        for n in range(3):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        db = tmp_path / "bridge.db"
        in_flight = "SELECT COUNT(*) FROM deliveries WHERE state = 'in_flight'"
        assert wait_until(lambda: db_rows(db, in_flight) != [(0,)])
        slack.set_sink_delay("sink", 0.0)
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: process(bridge).pid not in (first, None))
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 1
        # Released at the restart, not held until their 70 s leases end.
        assert wait_until(
            lambda: db_rows(db, "SELECT DISTINCT state FROM deliveries") == [("delivered",)]
        )
        assert post_callback(bridge.url, room(9)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: any(b"room-9" in r.body for r in s.sink_requests))


def test_the_server_stores_no_payload_and_the_child_renders_the_same_message(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    path = own_config(tmp_path, slack.sink_url())
    with InThread(path) as bridge:
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    [(payload, state, body, query, app_id, received_at)] = db_rows(
        tmp_path / "bridge.db",
        "SELECT d.payload, d.state, e.body, e.query, e.sdk_app_id, e.received_at"
        " FROM deliveries d JOIN events e ON e.id = d.event_id",
    )
    assert (payload, state) == (None, "delivered")  # rendered when sent, not at receipt
    # What the serving process would have rendered at receipt, from the same stored event.
    config = load_config(path)
    fields = decode_body(body.encode())
    ctx = Context(sdk_app_id=app_id, received_at=received_at, query=json.loads(query))
    expected = Renderer(config.templates).render("webhook", parse_event(fields), fields, ctx)
    assert slack.sink_requests[0].body == expected.encode()


TRAP = (
    '{% if room_id == "boom" %}{{ no_such_name }}{% endif %}'
    '{"v": 1, "room": {{ room_id | tojson }}}'
)


def test_the_child_renders_with_the_templates_of_the_time_it_sends(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "hook.j2").write_text(TRAP)  # renders the start-up samples, not room "boom"
    config = own_config(tmp_path, slack.sink_url(), max_attempts=1000)
    text = config.read_text().replace(str(ROOT / "templates"), str(templates))
    config.write_text(
        text.replace('type = "webhook"\n', 'type = "webhook"\ntemplate = "hook.j2"\n')
    )
    db = tmp_path / "bridge.db"
    with InThread(config) as bridge:
        # A template that fails for one event: that delivery is a dead letter saying why.
        assert post_callback(bridge.url, room(0).replace(b"room-0", b"boom")) == (200, OK_PACKET)
        dead = "SELECT last_error FROM deliveries WHERE state = 'dead'"
        assert wait_until(lambda: db_rows(db, dead) != [])
        [(error,)] = db_rows(db, dead)
        assert error.startswith("render failed: ") and "hook.j2, line 1" in error
        # A message still waiting when the template changes is sent with the new one.
        slack.set_sink_status("sink", 500)
        assert post_callback(bridge.url, room(1)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) >= 1)
        (templates / "hook.j2").write_text(TRAP.replace('"v": 1', '"v": 2'))
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        # Its retries, rendered again each time, pick up the new template once the child has
        # read the file.
        new = b'{"v":2,"room":"room-1"}'
        assert slack.wait_for(lambda s: s.sink_requests[-1].body == new)
        slack.set_sink_status("sink", 200)
        delivered = "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'"
        assert wait_until(lambda: db_rows(db, delivered) == [(1,)])
        assert slack.sink_requests[0].body == b'{"v":1,"room":"room-1"}'
        assert slack.sink_requests[-1].body == new


@pytest.mark.parametrize("own_first", [True, False])
def test_a_backlog_is_delivered_after_own_process_is_turned_on_or_off(
    tmp_path: Path, slack: SlackStandIn, own_first: bool
) -> None:
    config = own_config(tmp_path, slack.sink_url(), max_attempts=1000)
    own, one = config.read_text(), config.read_text().replace("own_process = true", "")
    slack.set_sink_status("sink", 500)  # nothing gets through while the first one runs
    config.write_text(own if own_first else one)
    with InThread(config) as bridge:
        for n in range(3):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) >= 3)
    stored = db_rows(tmp_path / "bridge.db", "SELECT payload IS NULL FROM deliveries")
    assert stored == [(own_first,)] * 3  # unrendered if the delivery process was to render
    slack.set_sink_status("sink", 200)
    config.write_text(one if own_first else own)
    with InThread(config) as bridge:
        delivered = "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'"
        assert wait_until(lambda: db_rows(tmp_path / "bridge.db", delivered) == [(3,)])
    bodies = {r.body for r in slack.sink_requests}  # the same message, whoever rendered it
    assert {json.loads(b)["event"]["RoomId"] for b in bodies} == {"room-0", "room-1", "room-2"}
    assert len(bodies) == 3


def paths(slack: SlackStandIn) -> list[str]:
    return [r.path for r in slack.sink_requests]


def test_a_reload_reaches_the_child_even_while_it_starts(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    config = own_config(tmp_path, slack.sink_url("first"))
    with InThread(config) as bridge:
        # At once: the child is still importing, and a SIGHUP now would end it.
        text = config.read_text()
        config.write_text(text.replace(slack.sink_url("first"), slack.sink_url("second")))
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        assert wait_until(lambda: process(bridge).ready)
        time.sleep(0.5)  # the child reads the file on the SIGHUP it gets once ready
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: paths(s) == ["/sink/second"])
        text = config.read_text()
        config.write_text(text.replace(slack.sink_url("second"), slack.sink_url("third")))
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        time.sleep(0.5)
        assert post_callback(bridge.url, room(1)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: paths(s) == ["/sink/second", "/sink/third"])
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 0


def test_the_child_prints_to_the_servers_stdout_and_ends_when_the_server_is_killed(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    port = free_port()
    console = '[channels.console]\ntype = "console"\n'
    config = write_config(
        tmp_path, port, channels=HOOK.format(url=slack.sink_url()) + console,
        routes=ROUTE.replace('["hook"]', '["hook", "console"]'), delivery=OWN.format(n=3),
    )  # fmt: skip
    log = tmp_path / "serve.log"
    with Subprocess(config, port, log) as server:
        assert server.process is not None
        assert wait_until(lambda: len(children(server.process.pid)) == 1)
        [child] = children(server.process.pid)
        assert post_callback(server.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
        # The console channel's line, on the stdout the server was started with.
        assert wait_until(lambda: "room owner changed: room room-0" in log.read_text())
        slack.set_sink_delay("sink", 2.0)  # killed while a send is under way
        assert post_callback(server.url, room(1)) == (200, OK_PACKET)
        assert wait_until(lambda: "room-1" in log.read_text())
        server.kill()
        assert wait_until(lambda: gone(child))  # end of its stdin: the server is gone
    # A quiet stop: no traceback of the report pipe the dead server no longer reads.
    assert "Traceback" not in log.read_text()


def test_a_missing_templates_folder_is_reported_once_not_by_both_processes(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    port = free_port()
    config = write_config(
        tmp_path, port, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        delivery=OWN.format(n=3),
    )  # fmt: skip
    text = config.read_text()
    config.write_text(text.replace(f'dir = "{ROOT / "templates"}"', 'dir = "templats"'))
    log = tmp_path / "serve.log"
    said = "[templates] dir: no such folder"
    with Subprocess(config, port, log) as server:
        assert post_callback(server.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)  # the child has loaded it
        assert log.read_text().count(said) == 1
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        assert post_callback(server.url, room(1)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 2)
        assert wait_until(lambda: "reloaded" in log.read_text().split(said)[-1])
        time.sleep(0.5)  # the child's reload, after the server's
    assert log.read_text().count(said) == 2  # start-up and the reload, from the server


RESTARTS = "live_bridge_delivery_process_restarts_total"


@contextlib.contextmanager
def serving_with_child(
    tmp_path: Path, slack: SlackStandIn, server_table: str = ""
) -> Iterator[tuple[Subprocess, int, Path]]:
    """`live-bridge serve` with a delivery process that has delivered one callback to the
    stand-in's sink: the server, its delivery process's pid, and the log."""
    port = free_port()
    config = write_config(
        tmp_path, port, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        delivery=OWN.format(n=3), server=server_table,
    )  # fmt: skip
    log = tmp_path / "serve.log"
    with Subprocess(config, port, log) as server:
        assert server.process is not None
        assert wait_until(lambda: "delivery process started" in log.read_text())
        [child] = children(server.process.pid)
        assert post_callback(server.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)  # the child is ready
        yield server, child, log


@pytest.mark.parametrize("child_first", [False, True])
def test_a_sigterm_to_the_whole_service_starts_no_child_and_counts_no_crash(
    tmp_path: Path, slack: SlackStandIn, child_first: bool
) -> None:
    # systemd stops a unit with a SIGTERM to each of its processes, the delivery process too.
    # The server drains for 3 s: time for a restart 1 s after the child's end, were it to try.
    with serving_with_child(tmp_path, slack, "drain_s = 3\n") as (server, child, log):
        assert server.process is not None
        first, second = (child, server.process.pid) if child_first else (server.process.pid, child)
        os.kill(first, signal.SIGTERM)
        os.kill(second, signal.SIGTERM)
        assert wait_until(lambda: gone(child))
        time.sleep(1.5)  # still draining
        assert children(server.process.pid) == []
        assert metric(server.url, RESTARTS) == 0
        server.process.wait(timeout=15)
    text = log.read_text()
    assert text.count("delivery process started") == 1
    assert " ERROR " not in text and "Traceback" not in text


def test_a_second_signal_stops_a_child_that_does_not_answer_and_the_server_with_it(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # The hurried child (SIGUSR1) was killed only after grace + 5 s, past the server's own 5 s
    # watchdog: the server exited without closing its store, and left the child running (here
    # stopped) with the store open, beside the next server.
    with serving_with_child(tmp_path, slack) as (server, child, log):
        assert server.process is not None
        os.kill(child, signal.SIGSTOP)
        try:
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=15)
            assert wait_until(lambda: gone(child), timeout=5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)  # a test that fails leaves no process behind
    text = log.read_text()
    assert "did not stop at once when told to: killed" in text and "live-bridge stopped" in text


def test_a_sigterm_to_the_child_alone_is_an_end_the_server_did_not_ask_for(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    with InThread(own_config(tmp_path, slack.sink_url())) as bridge:
        assert wait_until(lambda: process(bridge).ready)
        first = process(bridge).pid
        assert first is not None
        os.kill(first, signal.SIGTERM)
        assert wait_until(lambda: process(bridge).pid not in (first, None))
        assert metric(bridge.url, RESTARTS) == 1
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "level"),
    [(143, "INFO"), (-signal.SIGTERM, "INFO"), (-signal.SIGUSR1, "INFO"), (1, "ERROR")],
)
async def test_a_child_that_ends_as_the_server_stops_is_no_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int, level: str
) -> None:
    # A second signal's SIGUSR1 may reach the child before its handler is in place: its default
    # action ends it with -10, which is the server's own stop, not an error.
    config = load_config(write_config(tmp_path, delivery="own_process = true\n"))
    watch = DeliveryProcess(tmp_path / "config.toml", make_store(config.store, serving=False),
                            Metrics(), lambda: config, lambda: True)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="bridge.supervise"):
        assert await watch._ended_with_server(status)
    assert [r.levelname for r in caplog.records] == [level]


def test_own_process_needs_the_config_file(tmp_path: Path) -> None:
    config = load_config(own_config(tmp_path, "http://127.0.0.1:9/"))
    with pytest.raises(ConfigError, match=r"own_process needs a config file"):
        create_app(config)


def test_the_child_delivers_from_postgresql(
    tmp_path: Path, slack: SlackStandIn, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    config = write_config(
        tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        delivery=OWN.format(n=3), store=f'url = "{postgres_url}"\n',
    )  # fmt: skip
    with InThread(config) as bridge:
        for n in range(10):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 10)
        delivered = "live_bridge_deliveries_total"
        assert wait_until(lambda: metric(bridge.url, delivered, outcome="delivered") == 10)
    assert postgres_sql("SELECT state, COUNT(*) FROM deliveries GROUP BY 1") == [("delivered", 10)]


def test_the_child_loads_no_web_server() -> None:
    # It sends from the store and reports its counts to the server: Starlette, uvicorn and
    # the Prometheus registry would be memory and start-up for nothing (the pair's RSS target).
    code = (
        "import sys, bridge.deliver, bridge.channels.build, bridge.channels.http; "
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'starlette', 'uvicorn', 'prometheus_client'}), "
        "'bridge.app' in sys.modules, 'bridge.metrics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False", "False"]


def test_only_the_child_loads_the_http_client(tmp_path: Path, slack: SlackStandIn) -> None:
    # The server sends nothing: aiohttp (its compiled parts, mapped from its package) would be
    # memory and start-up for nothing. The child, which has sent, shows what a load looks like.
    port = free_port()
    config = write_config(
        tmp_path, port, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        delivery=OWN.format(n=3),
    )  # fmt: skip
    with Subprocess(config, port, tmp_path / "serve.log") as server:
        assert server.process is not None
        assert wait_until(lambda: len(children(server.process.pid)) == 1)
        [child] = children(server.process.pid)
        assert post_callback(server.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)

        def mapped(pid: int) -> bool:
            return "/aiohttp/" in Path(f"/proc/{pid}/maps").read_text()

        assert mapped(child)
        assert not mapped(server.process.pid)


def test_when_the_two_read_two_versions_of_the_file_both_end_on_the_same(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # The file changed between the server's read at a reload and the child's (an editor saving
    # twice): the server routed to a channel the child had no lane for, its deliveries pending
    # unseen. Here the child alone reloads a version the server never read.
    config = own_config(tmp_path, slack.sink_url("first"))
    with InThread(config) as bridge:
        assert wait_until(lambda: process(bridge).ready)
        before = bridge.app.bridge.config.digest
        text = config.read_text()
        second = HOOK.replace("channels.hook", "channels.second").format(
            url=slack.sink_url("second")
        )
        config.write_text(
            text.replace('channels = ["hook"]', 'channels = ["hook", "second"]') + second
        )
        pid = process(bridge).pid
        assert pid is not None
        os.kill(pid, signal.SIGHUP)
        assert wait_until(lambda: bridge.app.bridge.config.digest != before)
        assert "second" in bridge.app.bridge.config.channels
        time.sleep(0.5)  # the child's reload, passed on by the server's
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: sorted(paths(s)) == ["/sink/first", "/sink/second"])
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 0


def test_a_child_started_again_never_runs_a_store_the_server_does_not(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    path = own_config(tmp_path, slack.sink_url())
    with InThread(path) as bridge:
        first = process(bridge).pid
        assert first is not None
        # Edited after start; a reload would refuse it. Then the child dies (the OOM killer).
        path.write_text(path.read_text().replace('path = "bridge.db"', 'path = "other.db"'))
        os.kill(first, signal.SIGKILL)
        assert wait_until(
            lambda: metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 1
        )
        time.sleep(1.5)  # the first try, 1 s after the death, is refused
        assert process(bridge).pid == first and not (tmp_path / "other.db").exists()
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)  # acknowledged, stored
        path.write_text(path.read_text().replace('path = "other.db"', 'path = "bridge.db"'))
        assert wait_until(lambda: process(bridge).pid not in (first, None), timeout=10)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    assert not (tmp_path / "other.db").exists()


def test_the_status_page_keeps_what_the_child_before_saw(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    slack.set_sink_status("sink", 500)
    with InThread(own_config(tmp_path, slack.sink_url(), max_attempts=1)) as bridge:
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)

        def last_error() -> str | None:
            state, _ = bridge.app.bridge.channel_state("hook")
            return state.last_error if state else None

        assert wait_until(lambda: "HTTP 500" in (last_error() or ""))
        first = process(bridge).pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: process(bridge).ready and process(bridge).pid != first)
        time.sleep(0.5)  # several reports of the new child, which has seen nothing yet
        assert "HTTP 500" in (last_error() or "")


def test_the_child_is_bridge_from_where_the_servers_came_from(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bridge/ folder in the working directory (another version's checkout, say) is not it.
    fake = tmp_path / "cwd" / "bridge"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "deliver.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(fake.parent)
    with InThread(own_config(tmp_path, slack.sink_url())) as bridge:
        assert post_callback(bridge.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
        assert metric(bridge.url, "live_bridge_delivery_process_restarts_total") == 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def ready_child(delivery: DeliveryProcess, before: int | None = None) -> int:
    """The pid of a ready delivery process other than `before`, within 10 s."""
    for _ in range(500):
        pid = delivery.pid
        if delivery.ready and pid is not None and pid != before:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError("no delivery process became ready")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_started_again_leaves_no_pipe_open(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    # uvicorn serves on uvloop where it is installed, and uvloop keeps a read pipe (and its own
    # copy of the descriptor) open past the end of input: what the server does not close stays
    # open until the garbage collector runs, which this test holds off.
    monkeypatch.setattr(supervise, "RESTART_S", (0.05, 0.05))
    path = own_config(tmp_path, slack.sink_url())
    config = load_config(path)

    async def restarts() -> tuple[int, int]:
        store = make_store(config.store, serving=True)
        await store.open()
        delivery = DeliveryProcess(path, store, Metrics(), lambda: config, lambda: False)
        await delivery.start()
        try:
            counts, pid = [], None
            for _ in range(4):
                pid = await ready_child(delivery, pid)
                counts.append(open_fds())
                os.kill(pid, signal.SIGKILL)
            return counts[1], counts[-1]
        finally:
            await delivery.stop(0.0)
            await store.close()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            first, last = runner.run(restarts())
    finally:
        gc.enable()
    assert last == first


def test_a_child_that_keeps_ending_is_started_again_ever_later(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # 1 s, then 2, 4, … up to 30 s (README); here from 0.05 s, each child living well under
    # the longest wait (one that lived longer starts the count again).
    monkeypatch.setattr(supervise, "RESTART_S", (0.05, 10.0))
    path = own_config(tmp_path, slack.sink_url())
    config = load_config(path)

    async def restarts() -> None:
        store = make_store(config.store, serving=True)
        await store.open()
        delivery = DeliveryProcess(path, store, Metrics(), lambda: config, lambda: False)
        await delivery.start()
        try:
            pid = None
            for _ in range(4):
                pid = await ready_child(delivery, pid)
                os.kill(pid, signal.SIGKILL)
            await ready_child(delivery, pid)
        finally:
            await delivery.stop(0.0)
            await store.close()

    with caplog.at_level(logging.ERROR, logger="bridge.supervise"):
        asyncio.run(restarts())
    waits = [
        r.args[1] for r in caplog.records
        if r.msg.startswith("the delivery process ended with status") and isinstance(r.args, tuple)
    ]  # fmt: skip
    assert waits == [0.05, 0.1, 0.2, 0.4]


def test_a_stopped_child_leaves_no_transport_open(
    tmp_path: Path, slack: SlackStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python's development mode reports what a process leaves open at its end; the child's
    # read of its stdin (the server's wake-ups) was one.
    monkeypatch.setenv("PYTHONDEVMODE", "1")
    port = free_port()
    config = write_config(
        tmp_path, port, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        delivery=OWN.format(n=3),
    )  # fmt: skip
    log = tmp_path / "serve.log"
    with Subprocess(config, port, log) as server:
        assert post_callback(server.url, room(0)) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.sink_requests) == 1)
    assert "unclosed transport" not in log.read_text()


@pytest.mark.anyio
async def test_a_report_line_over_the_limit_is_skipped_not_the_end_of_the_watch() -> None:
    # Raised, it ended the server's watch of the child: no more reports, nor restarts.
    reports = asyncio.StreamReader(limit=64)
    reports.feed_data(b"x" * 200 + b"\n" + b'{"ready":1}\n')
    reports.feed_eof()
    assert await supervise.next_report(reports) == b'{"ready":1}\n'
    assert await supervise.next_report(reports) == b""


class _States:
    """What Report.flush reads of a worker."""

    def __init__(self, count: int) -> None:
        self.states = {
            f"channel-{n:04d}": ChannelState(last_error="e" * 600, last_error_at=1.0)
            for n in range(count)
        }

    def blocked_for(self, name: str) -> float:
        return 0.0


def test_reports_stay_under_the_line_limit_and_carry_dropped_log_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 channels whose errors changed at once made one line over the server's 1 MiB.
    monkeypatch.setattr("bridge.log_writer.dropped_total", lambda: 37)
    lines = reported(lambda report: report.flush(_States(2000)))  # type: ignore[arg-type]
    assert lines[0] == b'{"d":37}'
    states = [json.loads(line)["s"] for line in lines[1:]]
    assert all(len(line) < supervise.REPORT_LIMIT for line in lines)
    assert sum(len(s) for s in states) == 2000 and max(len(s) for s in states) <= STATES_MAX


def test_a_report_line_carries_at_most_1000_outcomes() -> None:
    def act(report: Report) -> None:
        for _ in range(2500):
            report.outcome("hook", "delivered", 1.0)
        report.flush(_States(0))  # type: ignore[arg-type]

    lines = [json.loads(line) for line in reported(act)]
    assert [len(line["o"]) for line in lines] == [1000, 1000, 500]


def reported(act: Callable[[Report], None]) -> list[bytes]:
    """The lines a Report writes to a real pipe while `act` uses it, read as they come."""
    ours, theirs = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(ours, 1 << 16), b""))
    )
    reader.start()
    try:
        with open(theirs, "wb") as out:
            report = Report(out)
            act(report)
            report.close()
    finally:
        reader.join(timeout=30)
        os.close(ours)
    return b"".join(chunks).splitlines()


def test_reports_wait_for_a_server_that_reads_none_and_the_child_goes_on() -> None:
    # Written to a blocking pipe, a server stalled for a 64 KiB pipe's worth of reports stopped
    # the delivery process: no delivery meanwhile, and the sends under way sent again.
    ours, theirs = os.pipe()
    try:
        with open(theirs, "wb") as out:
            report = Report(out)

            def flushes() -> None:
                for _ in range(20):  # 20,000 outcomes: about 600 KB, nine times the pipe
                    for _ in range(1000):
                        report.outcome("hook", "delivered", 1.0)
                    report.flush(_States(0))  # type: ignore[arg-type]

            child = threading.Thread(target=flushes)
            child.start()
            child.join(timeout=30)
            assert not child.is_alive(), "a flush waited for the server to read"
            chunks: list[bytes] = []
            reader = threading.Thread(
                target=lambda: chunks.extend(iter(lambda: os.read(ours, 1 << 16), b""))
            )
            reader.start()  # the server reads again
            report.close()
        reader.join(timeout=30)
    finally:
        os.close(ours)
    lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert sum(len(line["o"]) for line in lines) == 20_000


class _Child:
    """What DeliveryProcess.reload reads of its child: running, and the signals sent to it."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def test_a_reload_asked_while_the_child_starts_reaches_it_once_it_is_ready(
    tmp_path: Path,
) -> None:
    # Before it is ready the child has no SIGHUP handler yet: the reload waits for its "ready"
    # and goes then. Lost, a reload that changed only a template (the file's digest the same)
    # left the child on the old one.
    config = load_config(write_config(tmp_path))
    store = make_store(config.store, serving=False)  # not opened: reports need none
    watcher = DeliveryProcess(
        tmp_path / "config.toml", store, Metrics(), lambda: config, lambda: False
    )
    child = _Child()
    watcher._proc = child  # type: ignore[assignment]
    watcher.reload()
    assert child.signals == []  # not ready: no handler to take it yet
    watcher._take(json.dumps({"ready": 1, "config": config.digest}).encode())
    assert child.signals == [signal.SIGHUP]
    watcher._take(json.dumps({"config": config.digest}).encode())  # its reload: nothing more
    watcher.reload()  # ready now: at once
    assert child.signals == [signal.SIGHUP, signal.SIGHUP]


def test_the_childs_dropped_log_lines_reach_the_servers_metrics(tmp_path: Path) -> None:
    # The child's stderr stalled, it dropped lines and said so in its own log; the server's
    # metric, which counts only its own, stayed at 0.
    config = load_config(write_config(tmp_path))
    metrics = Metrics()
    store = make_store(config.store, serving=False)  # not opened: reports need none
    watcher = DeliveryProcess(
        tmp_path / "config.toml", store, metrics, lambda: config, lambda: False
    )
    for line in (b'{"d":5}', b'{"d":7}', b'{"d":7}'):
        watcher._take(line)
    assert metrics.registry.get_sample_value("live_bridge_log_lines_dropped_total") == 7
