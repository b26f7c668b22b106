"""Wrong admin tokens counted by client address, and by network for IPv6 (`guessers`): past
the limit in a window, that address or network is refused (429) until its window ends.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable

from starlette.responses import JSONResponse, Response

log = logging.getLogger("bridge.admin")  # the admin's log lines, under its name

GUESSES = 10  # wrong admin tokens one client address may give in GUESS_WINDOW_S
GUESSES_PER_48 = 100  # and the IPv6 /48 it is in (guessers)
GUESS_WINDOW_S = 60.0
GUESSERS_KEPT = 10_000  # addresses remembered at most; the oldest windows let go first


def guessers(host: str) -> tuple[tuple[str, int], ...]:
    """Whom a wrong token from `host` counts against, each with the guesses it may give in a
    window: its address; for IPv6 its /64, and its /48 at GUESSES_PER_48. A host is given a /64
    to pick addresses from at will, and may be routed a /56 or a /48 (256 or 65,536 /64s): by
    address, it could guess on from a new one every tenth guess, by /64 alone 655,000 times a
    minute from a /48."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ((host, GUESSES),)  # not an address ("-", a test client's name): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return ((str(ip.ipv4_mapped), GUESSES),)
        return (
            (str(ipaddress.IPv6Network((ip, 64), strict=False)), GUESSES),
            (str(ipaddress.IPv6Network((ip, 48), strict=False)), GUESSES_PER_48),
        )
    return ((str(ip), GUESSES),)


class Guesses:
    """Wrong admin tokens by client address (`guessers`). Past its limit in a window, that
    address (or network) is refused (429), the right token too, until its window ends: the
    login form took 3,400 guesses a second, and a short token falls to that in minutes. Behind
    a proxy every client is the proxy's address, and one guesser locks them all out for a
    minute: no worse than guessing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wrong: dict[str, tuple[float, int]] = {}  # address -> (window's start, count)

    def wait(self, host: str) -> float:
        """Seconds until `host` may try again; 0 when it may now."""
        waits = [0.0]
        for key, limit in guessers(host):
            start, count = self._wrong.get(key, (0.0, 0))
            left = start + GUESS_WINDOW_S - self._clock()
            if count >= limit and left > 0:
                waits.append(left)
        return max(waits)

    def wrong(self, host: str) -> None:
        now = self._clock()
        for key, limit in guessers(host):
            start, count = self._wrong.pop(key, (now, 0))
            if now - start >= GUESS_WINDOW_S:
                start, count = now, 0
            self._wrong[key] = (start, count + 1)  # last in the dict: the newest window
            if len(self._wrong) > GUESSERS_KEPT:
                del self._wrong[next(iter(self._wrong))]
            if count + 1 == limit:
                log.warning(
                    "%d wrong admin tokens from %s within %gs: refused until %gs have passed",
                    limit, key, GUESS_WINDOW_S, GUESS_WINDOW_S,
                )  # fmt: skip


def too_many_guesses(wait: float) -> Response:
    return JSONResponse(
        {"error": "too many wrong admin tokens from this address: try again later"}, 429,
        headers={"Retry-After": str(math.ceil(wait))},
    )  # fmt: skip
