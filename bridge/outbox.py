"""`live-bridge outbox …`: inspect and repair deliveries in the store, also while a server runs.

    live-bridge outbox stats
    live-bridge outbox list [--dead] [--channel NAME] [--limit N]
    live-bridge outbox retry ID [ID ...] | --dead [--channel NAME]
    live-bridge outbox drop ID [ID ...]

`--config PATH` and `--json` go before or after the subcommand. `list` shows undelivered rows,
newest first; `retry` puts dead (or pending) deliveries back to pending, due now, attempts reset;
`drop` deletes dead or pending deliveries, never one in flight or delivered. Exit status: 0 done;
1 no database at `store.path` (no live-bridge tables at `store.url`), store unavailable, or an ID
not found or not in a state to act on (named on stderr); 2 bad config or usage. Control
characters from the store are shown escaped: one row, one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Config, load_for_command
from bridge.store import ChannelStats, DeliveryRow, State, Store, StoreUnavailable
from bridge.store.engines import make_store

# How long a write waits for another process's (the server's commit, another outbox command)
# before the command fails: as SQLite's own busy timeout. One stopped with Ctrl-Z held the
# next without a word for as long as it stayed stopped.
LOCK_WAIT_S = 10.0
ERROR_WIDTH = 60  # LAST ERROR in a table; JSON has it whole
# ROOM and COMMAND in a table (Tencent's room IDs are at most 48 bytes, its commands about 35
# characters): a callback's 100 KB room padded every row of the table to its width.
NAME_WIDTH = 50

Command = Callable[[Store, Config, argparse.Namespace], Awaitable[int]]


def register(commands: Any) -> None:
    """Add `outbox` and its subcommands to the top-level parser's subparsers."""
    # SUPPRESS: given after the subcommand, an option overrides the one before it; absent, it
    # leaves that one alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML config")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as JSON")
    outbox = commands.add_parser("outbox", help="inspect and repair deliveries")
    outbox.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config (default: $LIVE_BRIDGE_CONFIG, else config.toml)",
    )
    outbox.add_argument("--json", action="store_true", help="print JSON instead of a table")
    actions = outbox.add_subparsers(dest="outbox_command", required=True)
    actions.add_parser("stats", parents=[common], help="counts and oldest pending, per channel")
    listing = actions.add_parser("list", parents=[common], help="undelivered, newest first")
    listing.add_argument("--dead", action="store_true", help="dead letters only")
    listing.add_argument("--channel", metavar="NAME")
    listing.add_argument("--limit", type=_positive, default=50, metavar="N", help="default 50")
    retry = actions.add_parser("retry", parents=[common], help="back to pending, attempts reset")
    retry.add_argument("ids", nargs="*", type=_positive, metavar="ID")
    retry.add_argument("--dead", action="store_true", help="every dead letter")
    retry.add_argument("--channel", metavar="NAME", help="with --dead: only this channel's")
    # argparse cannot say "IDs or --dead"; main() checks and reports through this parser.
    retry.set_defaults(usage_error=retry.error)
    drop = actions.add_parser("drop", parents=[common], help="delete deliveries")
    drop.add_argument("ids", nargs="+", type=_positive, metavar="ID")


def main(args: argparse.Namespace) -> int:
    """Run one outbox subcommand; the return value is the exit status."""
    if args.outbox_command == "retry":
        if bool(args.ids) == args.dead:
            args.usage_error("give delivery IDs, or --dead" + (", not both" if args.dead else ""))
        if args.channel is not None and not args.dead:
            args.usage_error("--channel goes with --dead")
    path, config = load_for_command(args.config)
    if config.store.url is None and (problem := _no_database(config.store.path)):
        # Opening would create an empty database, and a wrong store.path would look all clear.
        print(
            f"live-bridge: {config.store.path}: {problem} (store.path in {path})", file=sys.stderr
        )
        return 1
    channel = getattr(args, "channel", None)
    if channel is not None and channel not in config.channels:
        if args.outbox_command == "retry":
            # Pending again, with no lane to send them: they would wait until a start or a
            # reload buries them once more.
            print(
                f"live-bridge: no channel {channel!r} in {path}: nothing would send its dead"
                " letters; they stay dead",
                file=sys.stderr,
            )
            return 1
        print(f"live-bridge: note: no channel {channel!r} in {path}", file=sys.stderr)
    try:
        return asyncio.run(_run(COMMANDS[args.outbox_command], config, args))
    except StoreUnavailable as exc:
        print(f"live-bridge: {exc}", file=sys.stderr)
        return 1


async def _run(command: Command, config: Config, args: argparse.Namespace) -> int:
    # SQLite's lock is the server's. A PostgreSQL database no live-bridge has served is a wrong
    # URL, as a missing SQLite file is a wrong path: nothing is created in it.
    store = make_store(config.store, serving=False, create=False, lock_wait_s=LOCK_WAIT_S)
    await store.open()
    try:
        return await command(store, config, args)
    finally:
        await store.close()


async def _stats(store: Store, config: Config, args: argparse.Namespace) -> int:
    by_channel = {s.channel: s for s in await store.stats()}
    for name in config.channels:
        by_channel.setdefault(name, ChannelStats(name, 0, 0, 0, 0, None))
    stats = [by_channel[name] for name in sorted(by_channel)]
    now = time.time()
    if args.json:
        _print_json([
            {"channel": s.channel, "pending": s.pending, "in_flight": s.in_flight, "dead": s.dead,
             "delivered": s.delivered, "oldest_pending_age_s": _age_s(s.oldest_pending_at, now)}
            for s in stats
        ])  # fmt: skip
        return 0
    counts = [(s.pending, s.in_flight, s.dead, s.delivered) for s in stats]
    rows: list[list[object]] = [
        [s.channel, *c, _age(s.oldest_pending_at, now)] for s, c in zip(stats, counts, strict=True)
    ]
    if len(stats) > 1:
        pending = [s.oldest_pending_at for s in stats if s.oldest_pending_at is not None]
        totals = [sum(column) for column in zip(*counts, strict=True)]
        rows.append(["TOTAL", *totals, _age(min(pending, default=None), now)])
    _print_table(["CHANNEL", "PENDING", "IN FLIGHT", "DEAD", "DELIVERED", "OLDEST PENDING"], rows)
    return 0


async def _list(store: Store, config: Config, args: argparse.Namespace) -> int:
    found = await store.list_deliveries(args.dead, args.channel, args.limit)
    if args.json:
        _print_json([_row_json(d) for d in found])
    elif not found:
        print("no deliveries")
    else:
        _print_table(
            ["ID", "CHANNEL", "APP", "ROOM", "COMMAND", "STATE", "ATTEMPTS", "LAST ERROR",
             "CREATED", "UPDATED", "NEXT ATTEMPT"],
            [[d.id, d.channel, d.sdk_app_id,
              "-" if d.room_id is None else _cut(_visible(d.room_id), NAME_WIDTH),
              _cut(_visible(d.command), NAME_WIDTH), d.state.value, d.attempts,
              _cut(_visible(d.last_error or "-")), _time(d.created_at), _time(d.updated_at),
              _time(d.next_attempt_at) if d.state == State.PENDING else "-"]
             for d in found],
        )  # fmt: skip
    return 0


async def _retry(store: Store, config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    if args.dead:
        # The config's channels only: a channel it no longer has has no lane to send them.
        names = [args.channel] if args.channel is not None else list(config.channels)
        count = sum([await store.retry_dead(name, now) for name in names])
        if args.channel is None:
            for stats in await store.stats():
                if stats.dead and stats.channel not in config.channels:
                    print(
                        f"live-bridge: note: channel {stats.channel!r} is not in the config:"
                        f" its {stats.dead} dead letters stay dead",
                        file=sys.stderr,
                    )
        return _report(args, "retried", count, "back to pending", [], "")
    # Nor by id: pending again, a removed channel's deliveries waited with nothing to send them
    # (and counted as pending on /metrics) until a reload or a start buried them once more.
    owners = await store.channels_of(args.ids)
    orphans = {i: channel for i, channel in owners.items() if channel not in config.channels}
    asked = [i for i in dict.fromkeys(args.ids) if i not in orphans]
    status = await _each_id(
        args, lambda ids: store.retry(ids, now), "retried", "back to pending",
        "not found, or delivered or in flight", asked,
    )  # fmt: skip
    for delivery_id in (i for i in dict.fromkeys(args.ids) if i in orphans):
        channel = orphans[delivery_id]
        print(f"live-bridge: delivery {delivery_id}: channel {channel!r} is not in the config:"
              " nothing would send it", file=sys.stderr)  # fmt: skip
        status = 1
    return status


async def _drop(store: Store, config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    return await _each_id(
        args, lambda ids: store.drop(ids, now), "dropped", "dropped",
        "not found, or delivered or in flight",
    )  # fmt: skip


COMMANDS: dict[str, Command] = {"stats": _stats, "list": _list, "retry": _retry, "drop": _drop}


async def _each_id(
    args: argparse.Namespace,
    act: Callable[[list[int]], Awaitable[list[int]]],
    key: str,
    done: str,
    why: str,
    ids: list[int] | None = None,
) -> int:
    """Every ID (of `ids`, else the command line's) in one operation, which says which it acted
    on, so the missed ones can be named. One operation per ID took a pooled PostgreSQL
    connection each: thousands of IDs waited past the pool's timeout and failed partway."""
    if ids is None:
        ids = list(dict.fromkeys(args.ids))  # a repeated ID is not a missed one
    acted = set(await act(ids))
    missed = [i for i in ids if i not in acted]
    return _report(args, key, len(acted), done, missed, why)


def _report(
    args: argparse.Namespace, key: str, count: int, done: str, missed: Sequence[int], why: str
) -> int:
    if args.json:
        _print_json({key: count})
    else:
        print(f"{count} {'delivery' if count == 1 else 'deliveries'} {done}")
    for delivery_id in missed:
        print(f"live-bridge: delivery {delivery_id}: {why}", file=sys.stderr)
    return 1 if missed else 0


def _row_json(d: DeliveryRow) -> dict[str, object]:
    return {
        "id": d.id, "event_id": d.event_id, "channel": d.channel, "sdk_app_id": d.sdk_app_id,
        "room_id": d.room_id,
        "command": d.command, "state": d.state.value, "attempts": d.attempts,
        "last_error": d.last_error, "created_at": _time(d.created_at),
        "updated_at": _time(d.updated_at),
        "next_attempt_at": _time(d.next_attempt_at) if d.state == State.PENDING else None,
    }  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 2**63:  # SQLite's INTEGER
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _time(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        # Past any date (year 9999, infinity): a far end's Retry-After set such next attempts
        # before it was capped at an hour, and one such row must not stop the listing.
        return "never"


def _age_s(since: float | None, now: float) -> float | None:
    return None if since is None else round(max(0.0, now - since), 3)


def _age(since: float | None, now: float) -> str:
    """`3s`, `4m10s`, `2h03m`, `3d07h`; `-` when nothing is pending."""
    if since is None:
        return "-"
    seconds = int(max(0.0, now - since))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


def _visible(text: str) -> str:
    # Line breaks, escape sequences and bidi overrides from a callback must not reshape the table.
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        else ch
        for ch in text
    )


def _cut(text: str, width: int = ERROR_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _width(text: str) -> int:
    # CJK room names take two terminal columns per character.
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header), *([_visible(str(cell)) for cell in row] for row in rows)]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        padded = (
            cell + " " * (width - _width(cell)) for cell, width in zip(row, widths, strict=True)
        )
        print("  ".join(padded).rstrip())


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _no_database(path: Path) -> str | None:
    """Why no database can be at `path`, or None. A name too long for the system raised
    (a traceback) rather than answer that no such file is there."""
    try:
        path.stat()
    except FileNotFoundError:
        return "no such database"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None
