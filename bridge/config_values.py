"""What the config's tables share: `Strict`, the model each table is (unknown keys refused,
numbers finite), the largest count, and the rules for local paths, URLs and host names. As every
rule of a table, each refuses a value with a message that never repeats it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict


class Strict(BaseModel):
    # inf is TOML and a float, but no duration: an infinite timeout_s stopped start-up with
    # a traceback, an infinite drain_s the process at SIGTERM.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _no_nul(value: Path) -> Path:
    # No file can have one in its name: opening it raised ValueError, a traceback at start-up.
    if "\0" in str(value):
        raise ValueError("a path cannot hold a NUL character")
    return value


LocalPath = Annotated[Path, AfterValidator(_no_nul)]


def check_http_url(url: str) -> None:
    """ValueError unless `url` is an http(s) URL with a host and, if any, a numeric port. The
    message never quotes the URL: urlsplit's own (for `[…]` in a password, or a port that is
    no number) does, and a webhook's URL is a secret."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number or over 65535 raises here
    except ValueError:
        raise ValueError(
            "is not a URL that can be sent to (its host or port cannot be read)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("cannot hold spaces or control characters")
    if not host_can_be_looked_up(parts.hostname):
        raise ValueError(f"is not a URL that can be sent to ({HOST_PROBLEM})")


HOST_PROBLEM = "its host name has an empty label, as in a..b, or one over 63 characters"


def host_can_be_looked_up(host: str) -> bool:
    """Whether `host` is a name (or address) a lookup can take: accepted, `a..b` or a label over
    63 characters failed every send with a traceback ("encoding with 'idna' codec failed"),
    and stopped the commands that send or connect. Only those are refused: Python's codec
    also refuses names IDNA 2008 allows, which aiohttp sends to (as `xn--` labels)."""
    if ":" in host or unquote(host).startswith("/"):
        return True  # an IPv6 address; a PostgreSQL URL's Unix socket folder, %2F-encoded
    for label in host.removesuffix(".").split(".") if host else []:
        size = len(label) if label.isascii() else len(label.encode("punycode")) + len("xn--")
        if not 0 < size <= 63:
            return False
    return True


# Counts reach SQL (a claim's LIMIT is digest_after + 1, or 4 x max_in_flight) and the stores'
# integer columns: past this, SQLite's 64 bits overflowed and every lane died with nothing
# delivered. No count means anything this large.
MAX_COUNT = 2**31 - 1
