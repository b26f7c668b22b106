"""`live-bridge serve` as a process: SIGHUP reload, JSON logs, access log, secrets kept out."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import cli
from tests.bridge_server import (
    APP_ID,
    OK_PACKET,
    ROOT,
    SEED_BODY,
    delivery_states,
    free_port,
    get,
    post_callback,
    wait_until,
    write_config,
)
from tests.slack_standin import SlackStandIn

SECRET = "xoxb-SECRET-Zq7-never-logged"


def start(config: Path, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config), *flags],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "SLACK_TOKEN": SECRET},
        )  # fmt: skip


@contextlib.contextmanager
def patch_signal(sig: signal.Signals, handler: signal.Handlers) -> Iterator[None]:
    old = signal.signal(sig, handler)
    try:
        yield
    finally:
        signal.signal(sig, old if old is not None else signal.SIG_DFL)


def ready(url: str) -> bool:
    try:
        return get(url + "/readyz")[0] == 200
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=20)


def test_json_logs_access_log_and_sighup_reload(tmp_path: Path) -> None:
    with SlackStandIn(tokens=[SECRET]) as slack:
        run_json_logs_and_reload(tmp_path, slack)


def run_json_logs_and_reload(tmp_path: Path, slack: SlackStandIn) -> None:
    port = free_port()
    bot = (
        '[channels.bot]\ntype = "slack"\ntoken = "${SLACK_TOKEN}"\nchannel = "CNOWHERE"\n'
        f'api_url = "{slack.api_url}"\n'
    )
    routes = '[[routes]]\nname = "all"\nchannels = ["bot"]\n'
    config = write_config(tmp_path, port, channels=bot, routes=routes)
    # What loading the config warns of is a JSON line too: it was printed bare, before logging
    # was set up.
    config.write_text(re.sub(r"(?m)^dir = .*$", 'dir = "nowhere"', config.read_text()))
    log = tmp_path / "bridge.log"
    process = start(config, log, "--log-format", "json")
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=20)
        assert post_callback(url) == (200, OK_PACKET)  # dead letter: channel_not_found
        assert wait_until(lambda: "dead letter" in log.read_text())
        config.write_text(config.read_text().replace('"CNOWHERE"', '"C0123456789"'))
        process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded: 1 channels" in log.read_text())
        assert post_callback(url, SEED_BODY.replace(b"user2", b"user3")) == (200, OK_PACKET)
        assert slack.wait_for(lambda s: len(s.posted) == 1)  # the reloaded channel id is used
    finally:
        stop(process)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    messages = [entry["message"] for entry in lines]
    assert any(
        m.startswith("dead letter event=1 delivery=1 channel=bot attempt=1") for m in messages
    )
    warned = [m for m in messages if "[templates] dir: no such folder" in m]
    assert len(warned) == 2 and lines[0]["level"] == "warning"  # at start-up and at the reload
    access = [m for e, m in zip(lines, messages, strict=True) if e["logger"] == "uvicorn.access"]
    assert any("/readyz" in m for m in access)
    assert not any("/tencent/callback" in m for m in access)  # off for callbacks by default
    assert SECRET not in log.read_text()


def post_one(config: Path, port: int, log: Path, *flags: str, until: str) -> str:
    """Serve `config` with `flags`, post one callback, wait for `until` in the log, stop; the
    log's text."""
    process = start(config, log, *flags)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=20)
        assert post_callback(url) == (200, OK_PACKET)
        assert wait_until(lambda: until in log.read_text())
    finally:
        stop(process)
    return log.read_text()


def test_access_log_callbacks_on_request(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    post_one(config, port, tmp_path / "bridge.log", "--access-log-callbacks",
             until="POST /tencent/callback")  # fmt: skip


def test_bad_config_on_sighup_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    log = tmp_path / "bridge.log"
    process = start(config, log)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=20)
        good = config.read_text()
        config.write_text(good + "\n[nonsense]\nx = 1\n")
        process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused, the running config stays" in log.read_text())
        assert "nonsense: unknown key" in log.read_text()
        assert post_callback(url) == (200, OK_PACKET)
    finally:
        stop(process)


def test_sighups_from_the_first_moment_of_start_up_are_ignored(tmp_path: Path) -> None:
    # serve ignored them once its module was loaded, after the command line's modules: a
    # reload asked in the first half second after a restart ended the process (status 129).
    port = free_port()
    process = start(write_config(tmp_path, port), tmp_path / "bridge.log")
    url = f"http://127.0.0.1:{port}"
    maps = Path(f"/proc/{process.pid}/maps")
    try:
        # From when the command modules load (pydantic-core is among the first), not before:
        # until the interpreter runs the command line, SIGHUP's default action is all there is.
        assert wait_until(lambda: "pydantic_core" in maps.read_text(), timeout=20)
        while process.poll() is None and not ready(url):
            process.send_signal(signal.SIGHUP)
            time.sleep(0.02)
        assert process.poll() is None, (tmp_path / "bridge.log").read_text()
        assert post_callback(url) == (200, OK_PACKET)
    finally:
        stop(process)


@pytest.mark.parametrize("own_process", [False, True], ids=["one process", "own process"])
def test_serve_started_with_its_output_closed_delivers(tmp_path: Path, own_process: bool) -> None:
    # `serve >&- 2>&-`: the listening socket took descriptor 1, and the delivery process, which
    # inherits 0-2, aborted at every start: nothing was ever delivered, and nothing said so.
    port = free_port()
    config = write_config(tmp_path, port, delivery=f"own_process = {str(own_process).lower()}\n")
    command = f"exec {sys.executable} -m bridge serve --config {config} <&- >&- 2>&-"
    process = subprocess.Popen(["sh", "-c", command])
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=20)
        assert post_callback(url) == (200, OK_PACKET)
        db = tmp_path / "bridge.db"
        assert wait_until(lambda: delivery_states(db) == {"delivered": 1})
    finally:
        stop(process)
    assert process.returncode == -signal.SIGTERM  # stopped as asked, by the signal itself


def test_a_store_it_cannot_open_is_one_line_and_status_1(tmp_path: Path) -> None:
    # A second serve on the same SQLite file: the first holds it.
    port = free_port()
    config = write_config(tmp_path, port)
    log = tmp_path / "bridge.log"
    first = start(config, log)
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        other = tmp_path / "other.toml"  # the same file, another port (the port is tried first)
        other.write_text(config.read_text().replace(f"port = {port}", f"port = {free_port()}"))
        second = subprocess.run(
            [sys.executable, "-m", "bridge", "serve", "--config", str(other)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        stop(first)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"live-bridge: cannot open store {tmp_path / 'bridge.db'}:"
        " another live-bridge is serving from this database"
    )
    assert "Traceback" not in second.stderr


def test_the_log_says_where_it_listens(tmp_path: Path) -> None:
    # Bound before start-up (below), the sockets are not uvicorn's: it no longer said so.
    port = free_port()
    log = tmp_path / "bridge.log"
    process = start(write_config(tmp_path, port), log)
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
    finally:
        stop(process)
    assert f"listening on http://127.0.0.1:{port}" in log.read_text()


def test_a_port_already_taken_is_one_line_and_status_1(tmp_path: Path) -> None:
    # uvicorn bound it after the app's start-up: "live-bridge ready" was logged (and a delivery
    # process started), then uvicorn's own error and exit status 3.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port, delivery="own_process = true\n")
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"live-bridge: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "live-bridge ready" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bridge.db").exists()  # no store made for a server that never ran


def test_templates_that_do_not_render_name_the_config_and_status_2(tmp_path: Path) -> None:
    # As `check` does: which file's channels they are, then the template and why.
    channels = '[channels.console]\ntype = "console"\ntemplate = "missing.j2"\n'
    config = write_config(tmp_path, free_port(), channels=channels)
    run = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith(f"live-bridge: {config}: templates do not render:")
    assert "missing.j2" in run.stderr and "Traceback" not in run.stderr


def test_the_delivery_process_logs_say_so(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, delivery="own_process = true\n")  # a console channel
    text = post_one(config, port, tmp_path / "bridge.log", "--log-format", "json",
                    until='"delivered event=1')  # fmt: skip
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    by_logger = {(e["logger"], e.get("process")) for e in entries}
    assert ("bridge.worker", "delivery") in by_logger  # sent by the delivery process
    assert ("bridge.app", None) in by_logger  # the server's lines name no process
    assert ("bridge.worker", None) not in by_logger


@pytest.mark.parametrize("ignored", [False, True])
def test_ctrl_c_stops_cleanly_with_status_130(tmp_path: Path, ignored: bool) -> None:
    # uvicorn stops as for SIGTERM, then raises SIGINT again for the exit status to say why;
    # asyncio's runner made that a KeyboardInterrupt and its traceback after a clean stop. A
    # process whose parent ignores SIGINT (a job a script starts with &) takes the signal all
    # the same, but the one raised again is ignored: it exited 0.
    port = free_port()
    config = write_config(tmp_path, port)
    log = tmp_path / "bridge.log"
    if ignored:
        with patch_signal(signal.SIGINT, signal.SIG_IGN):  # inherited by the child
            process = start(config, log)
    else:
        process = start(config, log)
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 128 + signal.SIGINT
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "live-bridge stopped" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


@contextlib.contextmanager
def one_send_in_flight(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`config` served, one callback posted; yields once its delivery is in flight, and kills
    what is left of the process at the end."""
    process = start(config, log)
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        assert post_callback(f"http://127.0.0.1:{port}") == (200, OK_PACKET)
        db = config.parent / "bridge.db"
        assert wait_until(lambda: delivery_states(db) == {"in_flight": 1})
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def slack_bot_config(tmp_path: Path, port: int, slack: SlackStandIn, delivery: str) -> Path:
    """A config that routes everything to a bot-token Slack channel of the stand-in."""
    bot = (
        '[channels.bot]\ntype = "slack"\ntoken = "${SLACK_TOKEN}"\nchannel = "C0123456789"\n'
        f'api_url = "{slack.api_url}"\n'
    )
    return write_config(
        tmp_path, port, channels=bot, routes='[[routes]]\nname = "all"\nchannels = ["bot"]\n',
        delivery=delivery,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("own_process", "second", "after"),
    [
        (False, signal.SIGTERM, "Waiting for application shutdown."),
        (True, signal.SIGINT, "Waiting for application shutdown."),
        (False, signal.SIGINT, None),  # before the bridge's own stop began
        (True, signal.SIGINT, None),
    ],
)
def test_a_second_signal_stops_at_once(
    tmp_path: Path, own_process: bool, second: signal.Signals, after: str | None
) -> None:
    # Slack answers in 6 s, the grace is 30 s: a second signal must not wait for the answer.
    # uvicorn alone only stops waiting for connections, and only on a second SIGINT. Sent
    # before the app's shutdown began, uvicorn left that shutdown out: the bridge closed
    # nothing and did not say it stopped.
    with SlackStandIn(tokens=[SECRET], latency_s=6.0) as slack:
        port = free_port()
        config = slack_bot_config(
            tmp_path,
            port,
            slack,
            f"shutdown_grace_s = 30\nown_process = {str(own_process).lower()}\n",
        )
        config.write_text(config.read_text().replace("timeout_s = 2.0", "timeout_s = 30.0"))
        log = tmp_path / "bridge.log"
        with one_send_in_flight(config, port, log) as process:
            time.sleep(0.3)  # the request is on its way to Slack
            process.send_signal(signal.SIGTERM)
            if after is not None:  # (two SIGTERMs pending at once would be one)
                assert wait_until(lambda: after in log.read_text(), timeout=20)
            process.send_signal(second)
            asked = time.monotonic()
            process.wait(timeout=20)
            assert time.monotonic() - asked < 3.0
    # Cut short, it stays claimed: sent again at the next start.
    assert delivery_states(tmp_path / "bridge.db") == {"in_flight": 1}
    text = log.read_text()
    assert "live-bridge stopped" in text
    assert "Traceback" not in text and " ERROR " not in text


def test_a_reload_asked_while_stopping_is_ignored(tmp_path: Path) -> None:
    # SIGHUP's default action is to end the process: asyncio gave it back when the bridge
    # stopped taking reloads, and a reload racing a stop (logrotate's postrotate) killed the
    # process mid-shutdown, its store not closed.
    with SlackStandIn(tokens=[SECRET], latency_s=1.0) as slack:
        port = free_port()
        config = slack_bot_config(tmp_path, port, slack, "shutdown_grace_s = 30\n")
        log = tmp_path / "bridge.log"
        with one_send_in_flight(config, port, log) as process:
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: "Waiting for application shutdown." in log.read_text())
            process.send_signal(signal.SIGHUP)  # while the send's answer is awaited
            assert process.wait(timeout=20) == -signal.SIGTERM
    assert delivery_states(tmp_path / "bridge.db") == {
        "delivered": 1
    }  # the send finished within its grace
    assert log.read_text().count("live-bridge stopped") == 1


def test_a_second_signal_stops_even_a_reload_that_does_not_end(tmp_path: Path) -> None:
    # A template that renders for ever (range() and `*` are bounded, but loops over what they
    # give nest, writing nothing) held the reload's thread, and the process waited for it at
    # exit: only kill -9 stopped it.
    port = free_port()
    config = write_config(tmp_path, port, extra=f'[admin]\ntoken = "{SECRET}"\n')
    log = tmp_path / "bridge.log"
    process = start(config, log)
    reloading = threading.Thread(target=reload_by_http, args=(port,), daemon=True)
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        (tmp_path / "console").mkdir()
        (tmp_path / "console" / "default.j2").write_text(
            "{% for a in 'x' * 4000000 %}{% for b in 'x' * 4000000 %}{% endfor %}{% endfor %}x"
        )
        config.write_text(config.read_text().replace(
            f'dir = "{ROOT / "templates"}"', f'dir = "{tmp_path}"'
        ))  # fmt: skip
        reloading.start()
        time.sleep(1.0)  # the reload is rendering
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        # Ended by the signal (a shell's 143), or by the watchdog with that status.
        assert process.wait(timeout=20) in (-signal.SIGTERM, 128 + signal.SIGTERM)
        assert time.monotonic() - asked < 8.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def reload_by_http(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    # Closed however the server ends it: left to the garbage collector, its socket's
    # ResourceWarning failed whichever test was running then.
    with contextlib.closing(conn), contextlib.suppress(OSError, http.client.HTTPException):
        conn.request("POST", "/-/reload", headers={"Authorization": f"Bearer {SECRET}"})
        conn.getresponse().read()


def test_the_descriptor_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Each connection holds a descriptor; started with the soft limit at 256 (systemd's default
    is 1024), 300 idle connections would shut every new one out until request_timeout_s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    port = free_port()
    config = write_config(tmp_path, port)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        process = start(config, tmp_path / "bridge.log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=20)
        with contextlib.ExitStack() as stack:
            for _ in range(300):
                stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            assert post_callback(url) == (200, OK_PACKET)
    finally:
        stop(process)


def test_sigterm_with_a_body_that_never_arrives_stops_after_request_timeout_s(
    tmp_path: Path,
) -> None:
    """uvicorn waits for every request under way before it stops: one client that sent half a
    body held a SIGTERM off for good (the process ran on until killed)."""
    port = free_port()
    config = write_config(tmp_path, port, server="request_timeout_s = 1\n")
    process = start(config, tmp_path / "bridge.log")
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                f"POST /tencent/callback?SdkAppid={APP_ID} HTTP/1.1\r\n"
                "Content-Length: 100\r\n\r\n{".encode()
            )
            time.sleep(0.3)  # the receiver is waiting for the rest
            started = time.monotonic()
            process.terminate()
            assert process.wait(timeout=10) == -signal.SIGTERM
            assert time.monotonic() - started < 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_readers_of_stdout_and_stderr_that_stall_hold_up_no_callback(tmp_path: Path) -> None:
    """A pipe holds 64 KiB: with stdout (the console channel) and stderr (the logs) read by
    nobody for a while (a log driver that hangs, `serve | less` scrolled back), the event loop's
    writes blocked and the bridge answered nothing after some 650 callbacks. Now every callback
    is answered in time, and what was held back is delivered once the pipes are read again."""
    port = free_port()
    delivery = "initial_backoff_s = 0.05\nmax_backoff_s = 0.5\nmax_attempts = 1000\n"
    config = write_config(tmp_path, port, delivery=delivery)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        stdout=out_w, stderr=err_w, cwd=tmp_path,
    )  # fmt: skip
    os.close(out_w)
    os.close(err_w)
    read: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}
    readers: list[threading.Thread] = []
    count = 1500
    try:
        assert wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=20)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)  # Tencent's 2 s
        with contextlib.closing(connection):
            for n in range(count):
                body = SEED_BODY.replace(b'"room_id"', b'"room-%d"' % n)
                connection.request(
                    "POST", f"/tencent/callback?SdkAppid={APP_ID}&CallbackCommand=x", body
                )
                response = connection.getresponse()
                assert (response.status, response.read()) == (200, OK_PACKET), n
        for fd in read:  # read again
            readers.append(threading.Thread(target=drain, args=(fd, read[fd]), daemon=True))
            readers[-1].start()
        db = tmp_path / "bridge.db"
        assert wait_until(lambda: delivery_states(db) == {"delivered": count}, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=20)
        for reader in readers:
            reader.join(10)
        os.close(out_r)
        os.close(err_r)
    rooms = {int(m) for m in re.findall(rb"room room-(\d+)", bytes(read[out_r]))}
    assert rooms == set(range(count))
    assert b"live-bridge stopped" in read[err_r]  # the lines held back went out, in order


def drain(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        into += chunk


def test_serve_refusing_its_config_sets_up_no_logging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its warnings are held back until the config is read: setting logging up first replaced
    # the root logger's handlers and level in a process that called it (a test run: every
    # later test's caplog took INFO lines from every logger).
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    path = tmp_path / "config.toml"
    path.write_text("[server]\nport = 'x'\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--config", str(path)])
    assert exited.value.code == 2 and "port" in capsys.readouterr().err
    assert (root.handlers[:], root.level) == before
