"""Each table of the configuration tree, with the rules that table owns.

`[server]`, `[store]`, `[delivery]`, `[templates]`, `[admin]` and `[[routes]]`; `[tencent]` is in
bridge/config_tencent.py, the channel types of `[channels.*]` in bridge/config_channels.py, and
what the tables share (the strict base, rules for paths, URLs and hosts) in
bridge/config_values.py. Every table refuses unknown keys; a value that breaks a rule here is
refused with a message that never repeats it (it may be a secret). What spans tables (a route's
channels) is checked at the root, `bridge.config.Config`.
"""

from __future__ import annotations

import contextlib
import re
import string
import zoneinfo
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.config_values import (
    HOST_PROBLEM,
    MAX_COUNT,
    LocalPath,
    Strict,
    host_can_be_looked_up,
)

# Paths the app serves itself: a callback path there would hide them, or they it.
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/status", "/-/")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    callback_path: str = Field("/tencent/callback", pattern=r"^/")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not host_can_be_looked_up(value):
            raise ValueError(HOST_PROBLEM)
        return value

    @field_validator("callback_path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        # Starlette reads {…} as a path parameter: {id:bogus} stopped start-up with a traceback,
        # {x:path} took every POST, the admin's included.
        if any(c in value for c in "{}?#%") or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must be a plain path: no {, }, ?, #, % or spaces")
        bare = value.rstrip("/") or "/"
        # Each reserved path itself, and what lies under it (/status/login, /-/reload).
        taken = (p.rstrip("/") for p in RESERVED_PATHS)
        if bare == "/" or any(bare == p or bare.startswith(p + "/") for p in taken):
            raise ValueError(f"is taken by the bridge itself ({', '.join(RESERVED_PATHS)}, /)")
        return value

    max_body_bytes: int = Field(262_144, gt=0, le=MAX_COUNT)
    # A request (its head and body) must arrive within this long of the connection opening, of
    # its first byte, or of the previous answer on the connection; else the connection closes.
    request_timeout_s: float = Field(10.0, gt=0)
    # On SIGTERM, /readyz answers 503 this long before the listener closes, so a load balancer
    # stops sending; callbacks that still arrive are acknowledged as usual.
    # At most a day: threading.Timer cannot wait past TIMEOUT_MAX (292 years), and no load
    # balancer needs longer than minutes to notice.
    drain_s: float = Field(0.0, ge=0, le=86_400)

    @property
    def callback_paths(self) -> frozenset[str]:
        """The callback path with and without a trailing slash: Tencent follows no redirect, so
        a URL registered either way reaches the receiver (and stays out of the access log)."""
        base = self.callback_path.rstrip("/")
        return frozenset({base or "/", base + "/"})


class StoreConfig(Strict):
    path: LocalPath = Path("live-bridge.db")  # SQLite: one serving process
    url: SecretStr | None = None  # PostgreSQL: any number of serving processes on one database
    # SQLite: "full" syncs each commit to disk before the OK packet, so an acknowledged callback
    # survives power loss; "normal" leaves the last commits to the operating system: they
    # survive the process being killed, not the machine stopping. Full costs a disk flush per
    # commit, and the disk's slowest flushes are the slowest acknowledgements.
    sync: Literal["full", "normal"] = "full"
    pool_size: int = Field(8, ge=1, le=MAX_COUNT)  # PostgreSQL connections per process
    retention_h: float = Field(72.0, gt=0)  # delivered rows and dedup keys; dead letters stay

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The value is not repeated: it holds a password.
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host/db")
        hosts: list[str] = []
        if value is not None:
            with contextlib.suppress(ValueError):  # psycopg says what else it cannot read
                hosts = (urlsplit(value.get_secret_value()).hostname or "").split(",")
        if not all(map(host_can_be_looked_up, hosts)):
            raise ValueError(HOST_PROBLEM)
        return value

    @model_validator(mode="after")
    def _one_engine(self) -> StoreConfig:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError("set path (SQLite) or url (PostgreSQL), not both")
        if self.url is not None and "sync" in self.model_fields_set:
            raise ValueError("sync is SQLite's: PostgreSQL commits as its server is set up to")
        return self


class DeliveryConfig(Strict):
    max_attempts: int = Field(10, ge=1, le=MAX_COUNT)
    initial_backoff_s: float = Field(1.0, gt=0)
    max_backoff_s: float = Field(300.0, gt=0)
    timeout_s: float = Field(10.0, gt=0)
    dedup_window_s: float = Field(600, ge=0)
    shutdown_grace_s: float = Field(10.0, ge=0)  # in-flight sends may finish; the rest stay
    own_process: bool = False  # deliver from a second process, which `serve` starts and watches

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliveryConfig:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must not be below initial_backoff_s")
        return self


class TemplatesConfig(Strict):
    dir: LocalPath = Path("templates")
    timezone: str = "UTC"
    room_url: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            # The value is not repeated: it may have come from ${VAR} (messages never hold one).
            raise ValueError("unknown time zone (an IANA name such as Asia/Shanghai)") from None
        return value

    @field_validator("room_url")
    @classmethod
    def _room_placeholder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            # The bare name only: format() would also follow {room_id.attr} and {room_id[0]}.
            # No conversion or format spec either: {room_id:>999999999} built a gigabyte a
            # message.
            fields = [f for f in string.Formatter().parse(value) if f[1] is not None]
            if any(
                (name, spec, conversion) != ("room_id", "", None)
                for _, name, spec, conversion in fields
            ):
                raise ValueError
            value.format(room_id="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError("room_url may only use the placeholder {room_id}") from None
        return value


_BEARER = re.compile(r"[!-~]([ -~]*[!-~])?")


class AdminConfig(Strict):
    # /metrics, /status and /-/reload: this bearer token, or loopback clients when unset.
    token: SecretStr | None = None

    @field_validator("token")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token (an unset variable's ${VAR:-}) would admit anyone: its cookie is a
        # constant anybody can compute.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: set a token, or leave it out for loopback clients only")
        if value is not None and not _BEARER.fullmatch(value.get_secret_value()):
            # What an Authorization header can carry as it was set: a token with a space at
            # either end or a letter outside ASCII could never be given as a Bearer token.
            raise ValueError("must be printable ASCII, with no space at either end")
        return value


class Route(Strict):
    name: str = Field(min_length=1)
    rooms: tuple[str, ...] | None = None
    room_regex: str | None = None
    commands: tuple[str, ...] | None = None
    operators: tuple[str, ...] | None = None
    channels: tuple[str, ...] = Field(min_length=1)
    continue_: bool = Field(False, alias="continue")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
