"""A bridge at its limit of open files (`nofile`): a leak elsewhere, a crowd of connections, a
container's low limit. Each case lowers the limit of a running `live-bridge serve` (or of its
delivery process) to the descriptors it holds, so that the next socket or file it opens fails
with EMFILE, and checks what it does meanwhile and once descriptors are free again."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    SEED_BODY,
    SINK_ROUTE,
    Samples,
    Subprocess,
    children,
    cpu_seconds,
    db_rows,
    delivery_states,
    free_port,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn
from tests.test_protocol import one_response

ROOMS = ["fd-1", "fd-2", "fd-3"]
DELIVERY_FAST = "initial_backoff_s = 0.2\nmax_backoff_s = 1.0\nmax_attempts = 3\n"
MODES = [False, True]
MODE_IDS = ["one-process", "own-process"]


def owner_change(room: str) -> bytes:
    return SEED_BODY.replace(b'"room_id"', json.dumps(room).encode())


def open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def lowest_free(pid: int) -> int:
    """The descriptor the process would be given next, once what it holds has settled (a
    connection accepted, another one closed): the same for half a second."""
    used = open_fds(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if (now := open_fds(pid)) == used:
            break
        used = now
    return next(n for n in range(len(used) + 1) if n not in used)


@contextlib.contextmanager
def at_limit(pid: int, spare: int = 0) -> Iterator[int]:
    """The process's soft limit lowered to the descriptors it holds, plus `spare`; given back
    after. (A limit below descriptors already open leaves them open: only new ones fail.)"""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = lowest_free(pid) + spare
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def callback_bytes(room: str) -> bytes:
    body = owner_change(room)
    return (
        b"POST /tencent/callback?SdkAppid=%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % (APP_ID, len(body))
        + body
    )


def no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(autouse=True)
def linux_proc() -> None:
    if not Path(f"/proc/{os.getpid()}/fd").exists():
        pytest.skip("lowering a process's limit to what it holds needs Linux /proc")


# -- senders: a connect that finds no descriptor --------------------------------------------------

CONSOLE = '[channels.console]\ntype = "console"\n'
WARM_ROUTE = '[[routes]]\nname = "warm"\nrooms = ["warm"]\nchannels = ["console"]\n'


def channel_toml(kind: str, stand_in: SlackStandIn) -> str:
    if kind == "webhook":
        return f'[channels.sink]\ntype = "webhook"\nurl = "{stand_in.sink_url()}"\n'
    if kind == "slack-token":
        auth = 'token = "xoxb-test-token"\nchannel = "C0123456789"\n'
        auth += f'api_url = "{stand_in.api_url}"\n'
    else:
        auth = f'webhook_url = "{stand_in.add_webhook()}"\n'
    return f'[channels.sink]\ntype = "slack"\n{auth}rate_per_s = 50\nburst = 10\n'


def delivered_rooms(stand_in: SlackStandIn, kind: str) -> list[str]:
    if kind == "webhook":
        return [json.loads(r.body)["event"]["RoomId"] for r in stand_in.sink_requests]
    return [room for p in stand_in.posted for room in ROOMS if room in json.dumps(p.payload)]


@pytest.mark.parametrize("own_process", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", ["webhook", "slack-token", "slack-webhook"])
def test_a_send_that_finds_no_descriptor_waits_at_no_cost_and_delivers_once_one_is_free(
    tmp_path: Path, slack: SlackStandIn, kind: str, own_process: bool
) -> None:
    """Not the channel's fault: no attempt counted (max_attempts = 3 would bury all three in a
    second), no busy loop while it lasts, each message delivered once after."""
    port = free_port()
    delivery = f"{DELIVERY_FAST}own_process = {str(own_process).lower()}\n"
    channels = channel_toml(kind, slack) + CONSOLE
    config = write_config(tmp_path, port, channels=channels, routes=WARM_ROUTE + SINK_ROUTE,
                          delivery=delivery, server="request_timeout_s = 60\n")  # fmt: skip
    log = tmp_path / "bridge.log"
    db = tmp_path / "bridge.db"
    with Subprocess(config, port, log) as bridge, contextlib.ExitStack() as stack:
        assert bridge.process is not None
        server = bridge.process.pid
        # Its worker running (the delivery process's too), with no connection to the sink yet.
        assert post_callback(bridge.url, owner_change("warm")) == (200, OK_PACKET)
        assert wait_until(lambda: delivery_states(db) == {"delivered": 1}, timeout=20)
        processes = [server, *children(server)]
        sender = processes[-1]  # the delivery process, if there is one
        if own_process:
            stack.enter_context(at_limit(sender))
            for room in ROOMS:
                assert post_callback(bridge.url, owner_change(room)) == (200, OK_PACKET)
        else:
            # The callbacks come on a connection opened before, which stays open: the sender,
            # woken by their commits, finds no descriptor.
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            stack.enter_context(at_limit(sender))
            for room in ROOMS:
                sock.sendall(callback_bytes(room))
                assert one_response(sock).endswith(OK_PACKET)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # held open: a head still arriving
        assert wait_until(lambda: "paused for" in log.read_text(), timeout=10), log.read_text()
        cpu_before, wall_before = cpu_seconds(*processes), time.monotonic()
        time.sleep(3.0)
        cpu = cpu_seconds(*processes) - cpu_before
        wall = time.monotonic() - wall_before
        assert delivery_states(db) == {"delivered": 1, "pending": len(ROOMS)}
        stack.close()  # the descriptors are free again
        assert wait_until(lambda: delivery_states(db) == {"delivered": 1 + len(ROOMS)}, 20), (
            log.read_text()[-4000:]
        )
    assert cpu / wall < 0.15, f"the bridge used {cpu:.2f}s of CPU in {wall:.2f}s at its limit"
    assert sorted(delivered_rooms(slack, kind)) == ROOMS
    text = log.read_text()
    assert "in live-bridge (not the channel)" in text and "dead letter" not in text
    no_traceback(log)


# -- the server: callbacks, probes, admin pages and a reload, one descriptor spare ----------------


def postgres_or_sqlite(engine: str, request: pytest.FixtureRequest) -> str:
    """The [store] table's body for `engine`."""
    if engine == "sqlite":
        return 'path = "bridge.db"\n'
    url: str = request.getfixturevalue("postgres_url")
    return f'url = "{url}"\npool_size = 2\n'


@pytest.mark.parametrize("own_process", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_callbacks_probes_pages_and_reloads_are_answered_at_the_limit(
    tmp_path: Path, request: pytest.FixtureRequest, engine: str, own_process: bool
) -> None:
    """Room for one connection and nothing else: every request gets its answer (a reload a
    refusal that says why, the running config kept), never a 500 or a traceback; once
    descriptors are free, everything acknowledged is delivered and the pages count it."""
    port = free_port()
    delivery = f"{DELIVERY_FAST}own_process = {str(own_process).lower()}\n"
    store = postgres_or_sqlite(engine, request)
    config = write_config(tmp_path, port, delivery=delivery, store=store)
    log = tmp_path / "bridge.log"
    with Subprocess(config, port, log) as bridge:
        assert bridge.process is not None
        pid = bridge.process.pid
        answers: dict[str, tuple[int, bytes]] = {}
        with at_limit(pid, spare=1) as limit:

            def one_slot() -> bool:
                used = open_fds(pid)
                return any(n not in used for n in range(limit))

            for n, what in enumerate(["callback", "/readyz", "/metrics", "/status", "reload"]):
                assert wait_until(one_slot), "the last request's connection is still open"
                if what == "callback":
                    answers[what] = post_callback(bridge.url, owner_change(f"limit-{n}"))
                elif what == "reload":
                    status, _, body = http_request(bridge.url + "/-/reload", "POST")
                    answers[what] = status, body
                else:
                    status, _, body = http_request(bridge.url + what)
                    answers[what] = status, body
        assert answers["callback"] == (200, OK_PACKET)
        assert {k: v[0] for k, v in answers.items()} == {
            "callback": 200, "/readyz": 200, "/metrics": 200, "/status": 200, "reload": 400,
        }, answers  # fmt: skip
        assert b"Too many open files" in answers["reload"][1]
        assert wait_until(lambda: "reload refused, the running config stays" in log.read_text())
        # Free again: the callback is delivered, the page and the metrics count it.
        assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
        assert post_callback(bridge.url, owner_change("after")) == (200, OK_PACKET)
        console = (("channel", "console"),)

        def delivered(metrics: Samples) -> bool:
            return (
                metrics[("live_bridge_pending", console)] == 0
                and metrics[("live_bridge_in_flight", console)] == 0
                and metrics[("live_bridge_dead", console)] == 0
            )

        assert wait_until(lambda: delivered(samples(bridge.url)), timeout=20)
        accepted = (("command", "Live.CallbackAfterChangeOwner"), ("result", "accepted"))
        assert samples(bridge.url)[("live_bridge_callbacks_total", accepted)] == 2
        status, _, page = http_request(bridge.url + "/status")
        assert status == 200 and b"limit-0" in page and b"after" in page
    no_traceback(log)


# -- the delivery process: killed while the server is at its limit --------------------------------


OWN_PROCESS = f"{DELIVERY_FAST}own_process = true\n"


def own_process_config(tmp_path: Path) -> tuple[Path, int, Path, Path]:
    """A config with the delivery process, on a free port: the config, the port, the log the
    bridge is to write and its database."""
    port = free_port()
    config = write_config(tmp_path, port, delivery=OWN_PROCESS)
    return config, port, tmp_path / "bridge.log", tmp_path / "bridge.db"


def test_a_delivery_process_that_dies_at_the_limit_is_started_again_once_descriptors_are_free(
    tmp_path: Path,
) -> None:
    """Starting it needs pipes: while there are none, the server says why and tries again; then
    it starts, and what was acknowledged meanwhile is delivered."""
    config, port, log, db = own_process_config(tmp_path)
    with Subprocess(config, port, log) as bridge:
        assert bridge.process is not None
        pid = bridge.process.pid
        [child] = children(pid)
        with at_limit(pid, spare=1):
            os.kill(child, signal.SIGKILL)
            assert wait_until(lambda: "cannot start the delivery process" in log.read_text(), 15)
            assert post_callback(bridge.url, owner_change("while-down")) == (200, OK_PACKET)
        line = next(
            line for line in log.read_text().splitlines() if "cannot start the delivery" in line
        )
        assert "open files" in line, line
        assert wait_until(lambda: delivery_states(db) == {"delivered": 1}, timeout=40)
        [restarted] = children(pid)
        assert restarted != child
    no_traceback(log)


def test_a_reload_the_delivery_process_could_not_read_is_taken_once_it_can(
    tmp_path: Path,
) -> None:
    """The server reloads (a new channel) while the delivery process has no descriptor to read
    the file: it keeps its config, says why, and takes the new one once it can, so the new
    channel's message goes out without another reload."""
    config, port, log, db = own_process_config(tmp_path)
    with Subprocess(config, port, log) as bridge:
        assert bridge.process is not None
        assert post_callback(bridge.url, owner_change("warm")) == (200, OK_PACKET)
        assert wait_until(lambda: delivery_states(db) == {"delivered": 1}, timeout=20)
        [child] = children(bridge.process.pid)
        with at_limit(child):
            channels = f'{CONSOLE}[channels.other]\ntype = "console"\n'
            routes = '[[routes]]\nname = "all"\nchannels = ["other"]\n'
            write_config(tmp_path, port, delivery=OWN_PROCESS, channels=channels, routes=routes)
            assert http_request(bridge.url + "/-/reload", "POST")[0] == 200
            assert wait_until(lambda: "delivery process: reload refused" in log.read_text())
            assert post_callback(bridge.url, owner_change("new")) == (200, OK_PACKET)
            time.sleep(1.0)
            assert delivery_states(db) == {"delivered": 1, "pending": 1}
        assert wait_until(lambda: delivery_states(db) == {"delivered": 2}, timeout=30), (
            log.read_text()[-3000:]
        )
        assert db_rows(db, "SELECT channel FROM deliveries WHERE id = 2") == [("other",)]
    no_traceback(log)
