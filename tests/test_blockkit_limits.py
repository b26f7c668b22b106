from __future__ import annotations

import pytest

from bridge.blockkit_limits import cut


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("abcdefghij", 10, "abcdefghij"),
        ("abcdefghijk", 10, "abcdefghi…"),
        ("abcdef&amp;xyz", 9, "abcdef…"),
        ("ab <!date^1|x> tail", 8, "ab …"),
        ("ab <!date^1|x> tail", 16, "ab <!date^1|x> …"),
        # A link token of any length is dropped whole, never left open.
        ("go <https://c.example/" + "%E6" * 300 + "|Open room> now", 400, "go …"),
        ("a &lt; <b", 8, "a &lt; …"),
        # Counted in UTF-16 units: a character past U+FFFF is two.
        ("😀" * 10, 11, "😀" * 5 + "…"),
        ("😀" * 5, 10, "😀" * 5),
        ("😀" * 5, 9, "😀" * 4 + "…"),
        # Never half a grapheme before the ellipsis: a flag, a ZWJ family, an accent, a keycap.
        ("a" * 8 + "🇨🇳🇺🇸", 13, "a" * 8 + "🇨🇳…"),
        ("a" * 9 + "🇨🇳🇺🇸", 12, "a" * 9 + "…"),
        ("a" * 8 + "👨\u200d👩\u200d👧", 11, "a" * 8 + "…"),
        ("a" * 9 + "e\u0301\u0301x", 11, "a" * 9 + "…"),
        ("a" * 9 + "1\ufe0f\u20e3", 11, "a" * 9 + "…"),
        ("a" * 9 + "👍🏽x", 11, "a" * 9 + "…"),
    ],
)
def test_cut(text: str, limit: int, expected: str) -> None:
    assert cut(text, limit) == expected
    assert len(cut(text, limit).encode("utf-16-le")) // 2 <= limit
