from __future__ import annotations

import email.utils
import errno
import socket
import ssl
import time
from collections.abc import Mapping

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bridge.channels import DELIVERED, Outcome, Result
from bridge.channels.http import (
    LOCAL_PAUSE_S,
    RETRY_AFTER_MAX_S,
    classify_status,
    describe_exception,
    parse_retry_after,
    transport_failure,
)

SECRET_URL = "https://hooks.example.com/services/T000/B000/s3cr3tPath?token=s3cr3tQuery"


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "detail", "expected"),
    [
        (200, None, "", DELIVERED),
        (204, None, "", DELIVERED),
        (299, {"Retry-After": "5"}, "", DELIVERED),
        (408, None, "", Outcome(Result.RETRY, "HTTP 408")),
        (500, None, "", Outcome(Result.RETRY, "HTTP 500")),
        (502, None, "bad gateway", Outcome(Result.RETRY, "HTTP 502: bad gateway")),
        (503, {"Retry-After": "7"}, "", Outcome(Result.RETRY, "HTTP 503", retry_after=7.0)),
        (429, {"Retry-After": "3"}, "", Outcome(Result.RETRY, "HTTP 429", 3.0, True)),
        # None: how long is the lane's to say (longer at each such 429 in a row).
        (429, {}, "", Outcome(Result.RETRY, "HTTP 429", None, True)),
        (429, None, "ratelimited", Outcome(Result.RETRY, "HTTP 429: ratelimited", None, True)),
        (429, {"Retry-After": "soon"}, "", Outcome(Result.RETRY, "HTTP 429", None, True)),
        (429, {"Retry-After": "0"}, "", Outcome(Result.RETRY, "HTTP 429", None, True)),
        (199, None, "", Outcome(Result.PERMANENT, "HTTP 199")),
        (300, None, "", Outcome(Result.PERMANENT, "HTTP 300")),
        (301, None, "", Outcome(Result.PERMANENT, "HTTP 301")),
        (400, None, "invalid_payload", Outcome(Result.PERMANENT, "HTTP 400: invalid_payload")),
        (401, None, "", Outcome(Result.PERMANENT, "HTTP 401")),
        (403, None, "", Outcome(Result.PERMANENT, "HTTP 403")),
        (404, None, "", Outcome(Result.PERMANENT, "HTTP 404")),
        (410, {"Retry-After": "3"}, "", Outcome(Result.PERMANENT, "HTTP 410")),
    ],
)
def test_classify_status(
    status: int, headers: Mapping[str, str] | None, detail: str, expected: Outcome
) -> None:
    assert classify_status(status, headers, detail) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ({}, None),
        ({"Content-Type": "text/plain"}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"RETRY-AFTER": " 120 "}, 120.0),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "1.5"}, 1.5),  # not HTTP's, but a wait asked for all the same
        ({"Retry-After": "1."}, None),
        ({"Retry-After": ".5"}, None),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "²"}, None),
        ({"Retry-After": http_date(-3600)}, 0.0),
    ],
)
def test_parse_retry_after(headers: Mapping[str, str] | None, expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_reads_an_http_date() -> None:
    seconds = parse_retry_after({"Retry-After": http_date(30)})
    assert seconds is not None and 28 <= seconds <= 30


@pytest.mark.parametrize(
    "value", ["3601", "99999999999999", "9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"]
)
def test_a_retry_after_past_an_hour_is_an_hour(value: str) -> None:
    # 400 nines is infinity as a float: a channel blocked, or a delivery due, past any date.
    assert parse_retry_after({"Retry-After": value}) == RETRY_AFTER_MAX_S == 3600.0


def connection_key(host: str) -> ConnectionKey:
    return ConnectionKey(
        host=host, port=443, is_ssl=True, ssl=True, proxy=None, proxy_auth=None,
        proxy_headers_hash=None,
    )  # fmt: skip


HOST_MISMATCH = "Hostname mismatch, certificate is not valid for 's3cr3t.example.com'."


def certificate_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code, error.verify_message = code, message
    return error


def request_info() -> aiohttp.RequestInfo:
    return aiohttp.RequestInfo(URL(SECRET_URL), "POST", CIMultiDictProxy(CIMultiDict()))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), "timed out"),
        (aiohttp.ServerTimeoutError(f"Timeout on reading {SECRET_URL}"), "timed out"),
        (
            aiohttp.ClientConnectorError(
                connection_key("hooks.example.com"),
                ConnectionRefusedError(111, "Connection refused"),
            ),
            "cannot connect: Connection refused",
        ),
        (
            aiohttp.ClientConnectorError(
                connection_key("hooks.example.com"), ConnectionResetError()
            ),
            "cannot connect: ConnectionResetError",
        ),
        (
            aiohttp.ClientConnectorError(
                connection_key("s3cr3t.example.com"),
                OSError(111, "Connect call failed ('10.9.8.7', 443)"),
            ),
            "cannot connect: Connection refused",
        ),
        (
            aiohttp.ClientConnectorCertificateError(
                connection_key("s3cr3t.example.com"), certificate_error(62, HOST_MISMATCH)
            ),
            "cannot connect: TLS certificate not accepted (not for this host)",
        ),
        (
            aiohttp.ClientConnectorCertificateError(
                connection_key("s3cr3t.example.com"),
                certificate_error(10, "certificate has expired"),
            ),
            "cannot connect: TLS certificate not accepted (certificate has expired)",
        ),
        (
            aiohttp.ClientConnectorSSLError(
                connection_key("s3cr3t.example.com"),
                ssl.SSLError(1, "[SSL] record layer failure for s3cr3t.example.com"),
            ),
            "cannot connect: TLS failed",
        ),
        (
            aiohttp.ClientConnectorDNSError(
                connection_key("s3cr3t.example.com"),
                socket.gaierror(-2, "Name or service not known: s3cr3t.example.com"),
            ),
            "cannot connect: name not resolved",
        ),
        (aiohttp.ServerDisconnectedError(SECRET_URL), "server disconnected"),
        (aiohttp.InvalidURL(SECRET_URL), "transport error: InvalidURL"),
        (aiohttp.ClientPayloadError(SECRET_URL), "answer cut short"),
        (
            aiohttp.TooManyRedirects(request_info(), (), message=SECRET_URL),
            "too many redirects",
        ),
        (aiohttp.ClientResponseError(request_info(), (), message=SECRET_URL), "malformed answer"),
        (OSError(f"cannot reach {SECRET_URL}"), "transport error: OSError"),
        (ValueError(SECRET_URL), "transport error: ValueError"),
    ],
)
def test_describe_exception_carries_no_url(exc: BaseException, expected: str) -> None:
    described = describe_exception(exc)
    assert described == expected
    assert "://" not in described and "s3cr3t" not in described


@pytest.mark.anyio
async def test_describe_exception_of_a_real_refused_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/T000/B000/s3cr3tPath?token=s3cr3tQuery"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.post(url, data=b"{}")
    described = describe_exception(info.value)
    assert described == "cannot connect: Connection refused"  # asyncio's text names the port


def wrapped(error: OSError) -> BaseException:
    """`error` as aiohttp raises it from a connect, and as the cause of another error."""
    try:
        try:
            raise error
        except OSError as exc:
            raise aiohttp.ClientConnectionError("connection failed") from exc
    except aiohttp.ClientConnectionError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "local"),
    [
        (OSError(errno.EMFILE, "Too many open files"), True),
        (OSError(errno.ENFILE, "Too many open files in system"), True),
        (aiohttp.ClientConnectorError(connection_key("hooks.example.com"),
                                      OSError(errno.EMFILE, "Too many open files")), True),
        (wrapped(OSError(errno.EMFILE, "Too many open files")), True),
        (aiohttp.ClientConnectorError(connection_key("hooks.example.com"),
                                      ConnectionRefusedError(111, "Connection refused")), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (TimeoutError(), False),
    ],
    ids=["EMFILE", "ENFILE", "EMFILE on connect", "EMFILE as a cause", "refused", "ENOSPC",
         "timeout"],
)  # fmt: skip
def test_a_transport_failure_for_want_of_a_descriptor_costs_no_attempt(
    exc: BaseException, local: bool
) -> None:
    """This process's limit, not the channel's fault: a free retry that pauses the channel."""
    outcome = transport_failure(exc)
    assert outcome.result is Result.RETRY
    assert (outcome.local, outcome.free) == (local, local)
    assert outcome.retry_after == (LOCAL_PAUSE_S if local else None)
    if local:
        assert outcome.error.startswith("cannot connect: too many open files")
    else:
        assert outcome.error == describe_exception(exc)
