"""The admin surface on the real app under uvicorn: metrics, status page, who may ask (reloads:
test_reload.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bridge.admin_guesses import GUESS_WINDOW_S, GUESSES
from tests.bridge_server import (
    OK_PACKET,
    SEED_BODY,
    InThread,
    NoRedirect,
    db_rows,
    http_request,
    post_callback,
    samples,
    wait_until,
    write_config,
)
from tests.pg_proxy import PgProxy
from tests.slack_standin import SlackStandIn

TOKEN = "admin-Zq9-token"
CHANNEL = '[channels.{name}]\ntype = "webhook"\nurl = "{url}"\n'
HOOK = CHANNEL.replace("{name}", "hook")
ROUTE = '[[routes]]\nname = "all"\nchannels = ["hook"]\n'


def room(n: int) -> bytes:
    return SEED_BODY.replace(b'"room_id"', f'"room-{n}"'.encode())


def with_admin_token(tmp_path: Path, slack: SlackStandIn) -> Path:
    """A config whose admin endpoints take TOKEN, routing everything to the stand-in's sink."""
    return write_config(
        tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        extra=f'[admin]\ntoken = "{TOKEN}"\n',
    )  # fmt: skip


@pytest.fixture
def bridge(tmp_path: Path, slack: SlackStandIn) -> Iterator[InThread]:
    channels = HOOK.format(url=slack.sink_url())
    with InThread(write_config(tmp_path, channels=channels, routes=ROUTE)) as running:
        yield running


def test_metrics_are_prometheus_text(bridge: InThread, slack: SlackStandIn) -> None:
    for n in range(3):
        assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
    assert post_callback(bridge.url, query="SdkAppid=1")[0] == 403
    assert slack.wait_for(lambda s: len(s.sink_requests) == 3)
    assert wait_until(
        lambda: b'outcome="delivered"} 3.0' in http_request(bridge.url + "/metrics")[2]
    )
    status, headers, _ = http_request(bridge.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert headers["cache-control"] == "no-store"
    values = samples(bridge.url)
    owner = "Live.CallbackAfterChangeOwner"
    assert (
        values[("live_bridge_callbacks_total", (("command", owner), ("result", "accepted")))] == 3
    )
    assert (
        values[("live_bridge_callbacks_total", (("command", "other"), ("result", "refused_403")))]
        == 1
    )
    assert values[("live_bridge_ack_latency_seconds_count", ())] == 4
    assert (
        values[("live_bridge_deliveries_total", (("channel", "hook"), ("outcome", "delivered")))]
        == 3
    )
    assert values[("live_bridge_delivery_latency_seconds_count", (("channel", "hook"),))] == 3
    assert values[("live_bridge_pending", (("channel", "hook"),))] == 0
    assert values[("live_bridge_dead", (("channel", "hook"),))] == 0
    assert ("live_bridge_oldest_pending_age_seconds", (("channel", "hook"),)) in values


def test_without_a_token_only_loopback_clients_are_admitted(bridge: InThread) -> None:
    # uvicorn takes X-Forwarded-For from a trusted local proxy as the client's address.
    remote = {"X-Forwarded-For": "203.0.113.9"}
    for path, method in [("/metrics", "GET"), ("/status", "GET"), ("/-/reload", "POST")]:
        assert http_request(bridge.url + path, method)[0] != 403
        status, _, body = http_request(bridge.url + path, method, remote)
        assert status == 403 and b"loopback" in body
    assert http_request(bridge.url + "/healthz", headers=remote)[0] == 200
    assert http_request(bridge.url + "/readyz", headers=remote)[0] == 200
    assert post_callback(bridge.url, headers=remote) == (200, OK_PACKET)  # Tencent is unaffected


def asgi_get(
    bridge: InThread, path: str, client: str, headers: list[tuple[bytes, bytes]] | None = None
) -> int:
    """The status of a GET straight to the bridge's app, as if from `client`'s address."""
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        scope = {
            "type": "http", "http_version": "1.1", "method": "GET", "path": path,
            "raw_path": path.encode(), "query_string": b"", "headers": headers or [],
            "scheme": "http", "client": (client, 40000), "server": ("127.0.0.1", bridge.port),
            "root_path": "", "app": bridge.app,
        }  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await bridge.app(scope, receive, send)

    asyncio.run(call())
    status: int = sent[0]["status"]
    return status


def test_raw_asgi_request_from_a_remote_address_is_refused(bridge: InThread) -> None:
    assert asgi_get(bridge, "/metrics", "198.51.100.7") == 403


def test_a_host_guessing_from_many_ipv6_addresses_of_its_64_is_refused(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    config = with_admin_token(tmp_path, slack)
    with InThread(config) as bridge:
        for n in range(GUESSES):  # each guess from an address of its own, all of one /64
            wrong = [(b"authorization", f"Bearer guess-{n}".encode())]
            assert asgi_get(bridge, "/metrics", f"2001:db8:7:7::{n + 1:x}", wrong) == 401
        right = [(b"authorization", f"Bearer {TOKEN}".encode())]
        assert asgi_get(bridge, "/metrics", "2001:db8:7:7:ffff::1", right) == 429
        assert asgi_get(bridge, "/metrics", "2001:db8:7:8::1", [(b"authorization", b"x")]) == 401


def test_with_a_token_bearer_or_cookie_from_anywhere(tmp_path: Path, slack: SlackStandIn) -> None:
    config = with_admin_token(tmp_path, slack)
    with InThread(config) as bridge:
        url = bridge.url
        status, headers, _ = http_request(url + "/metrics")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert http_request(url + "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        remote_with_token = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.9"}
        assert http_request(url + "/metrics", headers=remote_with_token)[0] == 200
        status, headers, page = http_request(url + "/status")
        assert status == 401 and b'action="/status/login"' in page
        assert headers["x-frame-options"] == "DENY"  # no other site may frame the form
        opener = urllib.request.build_opener(NoRedirect)
        form = f"token={TOKEN}".encode()
        try:
            login = urllib.request.Request(url + "/status/login", data=form)  # noqa: S310
            opener.open(login, timeout=5)
            raise AssertionError("expected a redirect")
        except urllib.error.HTTPError as exc:
            with exc:
                assert exc.code == 303
                cookie = exc.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        session = cookie.split(";", 1)[0]
        status, headers, _ = http_request(url + "/status", headers={"Cookie": session})
        assert status == 200
        assert headers["x-frame-options"] == "DENY"
        assert headers["content-security-policy"] == "frame-ancestors 'none'"
        assert http_request(url + "/status/login", "POST", data=b"token=nope")[0] == 401


def test_an_address_that_guesses_tokens_is_refused_for_a_minute(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    # The login form took 3,400 wrong tokens a second, answering each; a short token falls so.
    config = with_admin_token(tmp_path, slack)
    right = {"Authorization": f"Bearer {TOKEN}"}
    with InThread(config) as bridge:
        url = bridge.url
        assert http_request(url + "/metrics", headers=right)[0] == 200  # right ones don't count
        for n in range(GUESSES):
            if n % 2:
                assert http_request(url + "/status/login", "POST", data=b"token=nope")[0] == 401
            else:
                wrong = {"Authorization": f"Bearer guess-{n}"}
                assert http_request(url + "/metrics", headers=wrong)[0] == 401
        # Refused now, the right token too (or the answer would tell which guess was right).
        status, headers, _ = http_request(url + "/metrics", headers=right)
        assert status == 429 and 0 < int(headers["retry-after"]) <= GUESS_WINDOW_S
        assert http_request(url + "/status/login", "POST", data=f"token={TOKEN}".encode())[0] == 429
        assert post_callback(url) == (200, OK_PACKET)  # callbacks are no admin's business


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    return browser, driver


def test_status_page_in_a_real_browser(tmp_path: Path, slack: SlackStandIn) -> None:
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support import expected_conditions as loaded
    from selenium.webdriver.support.ui import WebDriverWait

    def submit(button: WebElement, selector: str) -> WebElement:
        """Click a form's button and wait for the next page: a click does not wait for it."""
        page = web.find_element(By.TAG_NAME, "html")
        button.click()
        wait = WebDriverWait(web, 10)

        def left(_: object) -> bool:
            # Gone once the next page is in. Chromium says so with a stale element, or, caught
            # mid-way (seen with 156), "Node with given id does not belong to the document".
            try:
                page.is_enabled()
            except WebDriverException:
                return True
            return False

        wait.until(left)
        found: WebElement = wait.until(
            loaded.presence_of_element_located((By.CSS_SELECTOR, selector))
        )
        return found

    slack.set_sink_status("sink", 500)
    config = write_config(
        tmp_path, channels=HOOK.format(url=slack.sink_url()), routes=ROUTE,
        extra=f'[admin]\ntoken = "{TOKEN}"\n', delivery="max_attempts = 1\n",
    )  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=390,844",
    ):  # fmt: skip
        options.add_argument(flag)
    with InThread(config) as bridge:
        for n in range(2):
            assert post_callback(bridge.url, room(n)) == (200, OK_PACKET)
        db = bridge.config.store.path
        assert wait_until(lambda: db_rows(db, "SELECT state FROM deliveries") == [("dead",)] * 2)
        web = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            web.get(bridge.url + "/status")
            web.find_element(By.ID, "token").send_keys(TOKEN)
            sign_in = web.find_element(By.CSS_SELECTOR, "form button")
            row = submit(sign_in, 'tr[data-channel="hook"]')
            assert row.find_element(By.CSS_SELECTOR, ".dead-count").text == "2"
            assert "HTTP 500" in row.text
            events = web.find_elements(By.CSS_SELECTOR, "#events tbody tr")
            rooms = [e.find_element(By.CSS_SELECTOR, "td[data-label=Room]").text for e in events]
            assert rooms == ["room-1", "room-0"]
            assert "hook: dead" in events[0].text
            slack.set_sink_status("sink", 200)
            notice = submit(row.find_element(By.CSS_SELECTOR, "button"), ".notice").text
            assert notice == "2 dead letters of hook are pending again."
            assert slack.wait_for(lambda s: len([r for r in s.sink_requests]) == 4)
            assert wait_until(
                lambda: db_rows(db, "SELECT state FROM deliveries") == [("delivered",)] * 2
            )
            web.refresh()
            row = web.find_element(By.CSS_SELECTOR, 'tr[data-channel="hook"]')
            assert row.find_element(By.CSS_SELECTOR, ".dead-count").text == "0"
            assert row.find_elements(By.CSS_SELECTOR, "button") == []
        finally:
            web.quit()


def test_retry_needs_the_pages_form_token(bridge: InThread) -> None:
    status, _, _ = http_request(
        bridge.url + "/status/retry", "POST", data=b"channel=hook&csrf=forged"
    )
    assert status == 403


def form_answer(bridge: InThread, path: str, framing: bytes, body: bytes) -> bytes:
    """The first bytes the bridge answers to a form POST whose body it is given `body` of (and
    never the rest), or b"" if it answers nothing within 3 s."""
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=3) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n".encode()
            + b"Content-Type: application/x-www-form-urlencoded\r\n" + framing + body
        )  # fmt: skip
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while not answer.endswith(b"}") and (chunk := conn.recv(65536)):
                answer += chunk
        return answer


@pytest.mark.parametrize("path", ["/status/login", "/status/retry"])
@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 1000000000\r\n\r\n", b"token=" + b"a" * 65536),
        (
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"".join([b"10000\r\n" + b"a" * 65536 + b"\r\n"] * 4),
        ),
    ],
    ids=["content-length", "chunked"],
)
def test_an_admin_form_over_16_kib_is_refused_without_reading_it(
    bridge: InThread, path: str, framing: bytes, body: bytes
) -> None:
    """Anyone may post the login form: Starlette's form parser would hold 1,000 fields of 1 MB
    each in memory (or spool a file of any size to disk) before the token is even looked at."""
    answer = form_answer(bridge, path, framing, body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert answer.endswith(b'{"error":"form over 16384 bytes"}')


def test_without_a_token_the_host_must_name_loopback(bridge: InThread) -> None:
    # A DNS-rebound name reaches 127.0.0.1 from an operator's browser, but says so in its Host.
    port = bridge.port
    for host, status in [
        (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"[::1]:{port}", 200),
        (f"rebind.evil.example:{port}", 403), ("", 403),
    ]:  # fmt: skip
        assert http_request(bridge.url + "/status", headers={"Host": host})[0] == status, host


@pytest.mark.parametrize(
    "headers",
    [{"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-For": "::1, 127.0.0.1"},
     {"Forwarded": "for=127.0.0.1"}],
)  # fmt: skip
def test_without_a_token_a_forwarded_loopback_address_is_refused(
    bridge: InThread, headers: dict[str, str]
) -> None:
    # uvicorn believes X-Forwarded-For from the addresses in FORWARDED_ALLOW_IPS (loopback by
    # default, as this test's client is; anyone with "*"): a client could name 127.0.0.1 there.
    assert http_request(bridge.url + "/status")[0] == 200
    for path, method in [("/metrics", "GET"), ("/status", "GET"), ("/-/reload", "POST")]:
        assert http_request(bridge.url + path, method, headers)[0] == 403, (path, headers)


@pytest.mark.parametrize(
    ("fetch_site", "status"),
    [(None, 200), ("none", 200), ("same-origin", 200), ("same-site", 403), ("cross-site", 403)],
)
def test_a_post_a_browser_sent_from_another_site_is_refused(
    bridge: InThread, fetch_site: str | None, status: int
) -> None:
    headers = {"Sec-Fetch-Site": fetch_site} if fetch_site else {}
    assert http_request(bridge.url + "/-/reload", "POST", headers)[0] == status
    retry = post_form(
        bridge.url + "/status/retry", {"channel": "hook", "csrf": form_token(bridge)}, headers
    )
    assert retry[0] == (303 if status == 200 else 403)


def post_form(url: str, body: dict[str, str], headers: dict[str, str]) -> tuple[int, str]:
    """A form POST, redirects not followed: the status and any Location."""
    data = urllib.parse.urlencode(body).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    request = urllib.request.Request(url, data=data, headers=form)  # noqa: S310
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=5) as reply:
            return reply.status, ""
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("location", "")


def form_token(running: InThread) -> str:
    """The retry form's token, as the status page writes it beside a channel's dead letters."""
    token: str = running.app.state.bridge.admin._form_token()
    return token


def test_replicas_with_one_admin_token_take_each_others_retry_form(
    tmp_path: Path, slack: SlackStandIn
) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    hook = HOOK.format(url=slack.sink_url())
    admin = f'[admin]\ntoken = "{TOKEN}"\n'
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(write_config(tmp_path / name, channels=hook, routes=ROUTE, extra=admin))
    with InThread(configs[0]) as first, InThread(configs[1]) as second:
        csrf = form_token(first)
        answer = post_form(second.url + "/status/retry", {"channel": "hook", "csrf": csrf}, bearer)
        assert answer == (303, "/status?retried=0&channel=hook")


def test_pages_the_store_cannot_give_are_503_not_500(tmp_path: Path, postgres_url: str) -> None:
    """The database away (or no descriptor left for a connection to it): /metrics, /status and
    the retry button say so with a 503, as /readyz does, never a 500 with a traceback."""
    server = urlsplit(postgres_url)
    with PgProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        url = server._replace(netloc=f"{server.username or 'postgres'}@127.0.0.1:{proxy.port}")
        config = write_config(tmp_path, store=f'url = "{url.geturl()}"\n')
        with InThread(config) as bridge:
            assert http_request(bridge.url + "/metrics")[0] == 200
            proxy.cut()
            form = urllib.parse.urlencode({"csrf": bridge.app.bridge.admin._form_token(),
                                           "channel": "console"}).encode()  # fmt: skip
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            answers = {
                path: http_request(bridge.url + path) for path in ("/metrics", "/status")
            } | {"/status/retry": http_request(bridge.url + "/status/retry", "POST", headers, form)}
            for path, (status, _, body) in answers.items():
                assert status == 503, (path, status, body)
                assert b"store unavailable" in body, (path, body)
            proxy.restore()
            assert wait_until(lambda: http_request(bridge.url + "/metrics")[0] == 200, 15)
            assert http_request(bridge.url + "/status")[0] == 200
