"""The admin pages (bridge/pages/): the login form and the status page, compiled once, the
headers they are sent with, and what the status page shows (`status_values`), a callback's
values escaped and cut short.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import jinja2
from starlette.requests import Request

from bridge import __version__
from bridge.logs import one_line

if TYPE_CHECKING:
    from bridge.app import Bridge

RECENT_EVENTS = 25
REFRESH_S = 10
PAGES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    auto_reload=False,
)
SHOWN_CHARS = 120  # of a value a callback chose (a room, a command), on the status page
ERROR_CHARS = 500  # of a delivery's or channel's last error, which may quote such a value


def shown(value: object, chars: int = SHOWN_CHARS) -> str:
    """A callback's value as the status page shows it: controls and bidirectional overrides as
    their escapes (`abc\u202egnp.exe` read "abcexe.png"), and cut short (25 rooms of 125 KB
    made a page of 15 MB, reloaded every 10 s, its other columns one character wide)."""
    text = one_line(str(value))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def shown_error(value: object) -> str:
    """A last error as the status page shows it (a template's error may quote a room)."""
    return shown(value, ERROR_CHARS)


PAGES.filters["shown"] = shown
PAGES.filters["shown_error"] = shown_error
# Compiled here, once: read from disk at the first request, a page needed a file descriptor, and
# a process at its limit of open files answered /status with a 500 and a traceback.
BASE_PAGE, LOGIN_PAGE, STATUS_PAGE = (
    PAGES.get_template(f"{name}.html.j2") for name in ("base", "login", "status")
)


# Pages with buttons: never in another site's frame, where a click could be lured onto them
# (a loopback-only bridge trusts the operator's own browser), and never cached.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


GONE_SHOWN = 20  # channels not in the config that the status page lists; the rest counted


async def status_values(
    bridge: Bridge, request: Request, form_token: Callable[[], str]
) -> dict[str, Any]:
    """What the status page shows: each channel's counts and state (with some of those gone
    from the config), the recent events, the notice of a retry and of the last reload.
    `form_token` gives the retry button's form token."""
    config = bridge.config
    zone = ZoneInfo(config.templates.timezone)
    now = time.time()

    def when(ts: float | None) -> str:
        if ts is None:
            return "—"
        return datetime.fromtimestamp(ts, UTC).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")

    stats = {s.channel: s for s in await bridge.store.stats()}
    # Channels gone from the config whose deliveries the store still holds (dead letters a
    # reload buried) are listed too, as /metrics counts them, without a retry button: they
    # would be buried again; `outbox drop` removes them, or the channel can come back.
    gone = sorted(set(stats) - set(config.channels))
    # Only the first of them, the rest counted: 10,000 removed channels made a page of
    # 14 MB that held every callback for 1.5 s to render, again at every refresh.
    shown_gone, unshown = gone[:GONE_SHOWN], gone[GONE_SHOWN:]
    channels = []
    for name in [*config.channels, *shown_gone]:
        s, channel = stats.get(name), config.channels.get(name)
        state, blocked = bridge.channel_state(name) if channel else (None, 0.0)
        channels.append({
            "name": name, "type": channel.type if channel else "not in the config",
            "pending": s.pending if s else 0, "in_flight": s.in_flight if s else 0,
            "dead": s.dead if s else 0, "delivered": s.delivered if s else 0,
            "oldest": f"{now - s.oldest_pending_at:.0f}s" if s and s.oldest_pending_at else "—",
            "last_success": when(state.last_success_at if state else None),
            "last_error": state.last_error if state else None,
            "last_error_at": when(state.last_error_at if state else None),
            "blocked_until": when(now + blocked) if blocked > 0 else None,
            "rate": getattr(channel, "rate_per_s", None), "configured": channel is not None,
        })  # fmt: skip
    recent = await bridge.store.recent_events(RECENT_EVENTS)
    events = [
        {"when": when(e.received_at), "command": e.command, "app": e.sdk_app_id,
         "room": e.room_id or "—", "deliveries": e.deliveries}
        for e in recent
    ]  # fmt: skip
    # Two apps may name a room alike: their app beside it, once there are two to tell apart.
    apps = {e.sdk_app_id for e in recent} | set(config.tencent.sdk_app_id)
    # Said only of a count and a channel there is: the query is anyone's to write, and a
    # link could make the page say "Session expired: sign in again at https://…".
    retried, retried_channel = (
        request.query_params.get("retried"), request.query_params.get("channel")
    )  # fmt: skip
    if not (retried or "").isdigit() or retried_channel not in config.channels:
        retried = retried_channel = None
    return {
        "channels": channels, "events": events, "several_apps": len(apps) > 1, "now": when(now),
        "zone": config.templates.timezone, "version": __version__, "csrf": form_token(),
        "refresh": REFRESH_S,
        "retried": retried, "retried_channel": retried_channel,
        "draining": bridge.draining,
        "unshown": {
            "channels": len(unshown),
            "pending": sum(stats[n].pending + stats[n].in_flight for n in unshown),
            "dead": sum(stats[n].dead for n in unshown),
        },
        "reload": None if bridge.last_reload is None else {
            "when": when(bridge.last_reload[0]), "refused": bridge.last_reload[1],
        },
    }  # fmt: skip
