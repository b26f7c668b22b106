"""Wrong admin tokens counted by address and network, each window on its own (through the
endpoints: tests/test_admin.py)."""

from __future__ import annotations

import pytest

from bridge.admin_guesses import (
    GUESS_WINDOW_S,
    GUESSERS_KEPT,
    GUESSES,
    GUESSES_PER_48,
    Guesses,
    guessers,
)


@pytest.mark.parametrize(
    ("host", "counted_as"),
    [
        ("203.0.113.9", ["203.0.113.9"]),
        ("2001:db8:1:2:aaaa::1", ["2001:db8:1:2::/64", "2001:db8:1::/48"]),
        # the same host's, still; another's /64 of the same /48
        ("2001:db8:1:2:ffff:ffff:ffff:fffe", ["2001:db8:1:2::/64", "2001:db8:1::/48"]),
        ("2001:db8:1:3::1", ["2001:db8:1:3::/64", "2001:db8:1::/48"]),
        ("fe80::1%eth0", ["fe80::/64", "fe80::/48"]),
        ("::ffff:203.0.113.9", ["203.0.113.9"]),  # IPv4 through a dual-stack socket
        ("-", ["-"]),
        ("testclient", ["testclient"]),
    ],
)
def test_guesses_from_one_ipv6_host_count_together(host: str, counted_as: list[str]) -> None:
    assert [key for key, _ in guessers(host)] == counted_as


def test_guesses_from_many_64s_of_one_48_are_refused_too() -> None:
    clock = [0.0]
    guesses = Guesses(lambda: clock[0])
    for n in range(GUESSES_PER_48):  # ten from each of ten /64s: none refused on its own
        host = f"2001:db8:7:{n // GUESSES:x}::{n % GUESSES + 1:x}"
        assert guesses.wait(host) == 0
        guesses.wrong(host)
    assert guesses.wait("2001:db8:7:ffff::1") == GUESS_WINDOW_S  # a new /64 of that /48
    assert guesses.wait("2001:db8:8::1") == 0  # another /48
    clock[0] += GUESS_WINDOW_S
    assert guesses.wait("2001:db8:7:ffff::1") == 0


def test_guesses_are_counted_in_a_window_per_address() -> None:
    clock = [0.0]
    guesses = Guesses(lambda: clock[0])
    for _ in range(GUESSES - 1):
        guesses.wrong("a")
    assert guesses.wait("a") == 0
    guesses.wrong("a")
    assert guesses.wait("a") == GUESS_WINDOW_S and guesses.wait("b") == 0
    clock[0] += GUESS_WINDOW_S
    assert guesses.wait("a") == 0
    guesses.wrong("a")  # a new window, counted from one
    assert guesses.wait("a") == 0
    for n in range(GUESSERS_KEPT + 1):  # the memory is bounded; the oldest window goes first
        guesses.wrong(f"other-{n}")
    assert len(guesses._wrong) == GUESSERS_KEPT
