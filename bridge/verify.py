"""Is this request really from Tencent, for one of our apps? SdkAppid, then Sign and RequestTime.

Tencent's callback authentication: `Sign = sha256(token + RequestTime)` as lowercase hex (plain
concatenation, not HMAC), with RequestTime in Unix seconds and at most a minute or so from now.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Collection, Mapping

from pydantic import SecretStr


class Refused(Exception):
    """A request we answer with a FAIL packet; `info` is short and safe to send back."""

    def __init__(self, status: int, info: str) -> None:
        super().__init__(info)
        self.status = status
        self.info = info


def query_keys(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Query parameters by lower-cased name, first occurrence wins."""
    keys: dict[str, str] = {}
    for name, value in pairs:
        keys.setdefault(name.lower(), value)
    return keys


def check_app_id(query: Mapping[str, str], allowed: Collection[int]) -> int:
    """The request's SDKAppID (query `SdkAppid` or `SdkAppId`), or Refused(403)."""
    raw = query.get("sdkappid", "").strip()
    # Length first: int() refuses more than 4300 digits with an error of its own.
    if len(raw) > 20 or not raw.isascii() or not raw.isdigit() or int(raw) not in allowed:
        raise Refused(403, "unknown SdkAppid")
    return int(raw)


def sign(token: str, request_time: str) -> str:
    return hashlib.sha256((token + request_time).encode()).hexdigest()


def check_signature(
    query: Mapping[str, str], token: SecretStr | None, max_age_s: float, now: float
) -> None:
    """With a callback token configured: a valid, fresh Sign, or Refused(401)."""
    if token is None:
        return
    given = query.get("sign", "")
    request_time = query.get("requesttime", "")
    if not given or not request_time:
        raise Refused(401, "Sign and RequestTime are required")
    if len(request_time) > 20 or not request_time.isascii() or not request_time.isdigit():
        raise Refused(401, "bad RequestTime")
    # In whole seconds, as RequestTime is: against a now of x.3, one 60 s old was 60.3 s old
    # and refused, while one 60 s ahead was 59.7 s away and taken.
    if abs(math.floor(now) - int(request_time)) > max_age_s:
        raise Refused(401, "RequestTime too far from now")
    expected = sign(token.get_secret_value(), request_time)
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
        raise Refused(401, "bad Sign")
