"""The SQLite schema, created on first open and migrated by version number (as pg_schema.py
holds PostgreSQL's); the statements the store runs on it are in sqlite_statements.py."""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3

from bridge.events import SECONDS_BELOW
from bridge.store import dedup_digest

log = logging.getLogger(__name__)

SCHEMA_VERSION = 11

# Each entry brings the schema from version i to i + 1; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        sdk_app_id INTEGER NOT NULL,
        command TEXT NOT NULL,
        room_id TEXT,
        event_time INTEGER,
        body TEXT NOT NULL,
        query TEXT NOT NULL
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        event_id INTEGER NOT NULL REFERENCES events(id),
        channel TEXT NOT NULL,
        state TEXT NOT NULL,
        payload TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        lease_until REAL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE TABLE dedup (
        key TEXT PRIMARY KEY,
        seen_at REAL NOT NULL,
        event_id INTEGER NOT NULL
    );
    CREATE INDEX dedup_seen ON dedup (seen_at);
    """,
    # 2: per-room order (room and Tencent's time on each delivery), Slack threads per room.
    """
    ALTER TABLE deliveries ADD COLUMN room_id TEXT;
    ALTER TABLE deliveries ADD COLUMN order_ts INTEGER NOT NULL DEFAULT 0;
    UPDATE deliveries SET
        room_id = (SELECT room_id FROM events WHERE events.id = deliveries.event_id),
        order_ts = (SELECT COALESCE(event_time, CAST(received_at * 1000 AS INTEGER))
                    FROM events WHERE events.id = deliveries.event_id);
    CREATE INDEX deliveries_room ON deliveries (channel, room_id, order_ts, id);
    CREATE INDEX deliveries_channel ON deliveries (channel, state, next_attempt_at);
    CREATE INDEX deliveries_done ON deliveries (state, delivered_at);
    CREATE TABLE threads (
        channel TEXT NOT NULL,
        room_id TEXT NOT NULL,
        ts TEXT NOT NULL,
        started_at REAL NOT NULL,
        PRIMARY KEY (channel, room_id)
    );
    """,
    # 3: the store instance holding each claim, and channels leased to one process at a time
    # with the pacing state the next holder takes over.
    """
    ALTER TABLE deliveries ADD COLUMN owner TEXT;
    CREATE TABLE channels (
        channel TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        lease_until REAL NOT NULL,
        tat REAL NOT NULL DEFAULT 0,
        blocked_until REAL NOT NULL DEFAULT 0
    );
    """,
    # 4: claims walk each channel's pending deliveries in order (deliveries_claim) instead of
    # sorting them all; deliveries_channel served only the query that did.
    """
    DROP INDEX deliveries_channel;
    CREATE INDEX deliveries_claim ON deliveries (channel, state, order_ts, id);
    """,
    # 5: dedup keys lead with the event's time (receive.dedup_key), so that they are written in
    # about the order they sort; keys written before get the same prefix, so that a retry of a
    # callback stored before the upgrade is still found.
    """
    UPDATE dedup SET key = COALESCE(
        (SELECT printf('%016x', e.event_time) FROM events e
         WHERE e.id = dedup.event_id AND e.event_time IS NOT NULL), ''
    ) || ':' || key
    """,
    # 6: ids are never handed out again (HIGH_WATER_SQL, NEXT_IDS_SQL). What was deleted before is
    # gone, except the event ids that live dedup keys still name; a live-bridge from before
    # would give ids from MAX(id) + 1 again, so it must refuse the file.
    """
    INSERT OR REPLACE INTO meta (key, value)
    SELECT 'events_high_water', MAX(COALESCE((SELECT MAX(id) FROM events), 0),
                                    COALESCE((SELECT MAX(event_id) FROM dedup), 0))
    UNION ALL
    SELECT 'deliveries_high_water', COALESCE((SELECT MAX(id) FROM deliveries), 0)
    """,
    # 7: the prune walks the events older than the retention in order of receipt, not every
    # event the retention keeps (sqlite.py, OLD_EVENTS_SQL).
    """
    CREATE INDEX events_received ON events (received_at)
    """,
    # 8: dedup keys name the SDKAppID too (store.dedup_digest): two apps sending the same bytes
    # are two events. Keys written before are made again from their events, so that a retry
    # that spans the upgrade is still found; a key whose event is gone keeps its form and ages.
    """
    UPDATE dedup SET key = substr(key, 1, instr(key, ':')) || (
        SELECT live_bridge_dedup_digest(e.command, e.sdk_app_id, e.body)
        FROM events e WHERE e.id = dedup.event_id
    )
    WHERE EXISTS (SELECT 1 FROM events e WHERE e.id = dedup.event_id)
    """,
    # 9: what earlier versions stored as they read it then. An EventTime in seconds is read as
    # milliseconds since 4c7022a (events.SECONDS_BELOW), and the dedup keys lead with it: a key
    # that led with the seconds would miss a retry across the upgrade. And a message rendered
    # at receipt by an earlier version, with its escaping (a line break in a value forged a
    # line of the message before 3260f56), is rendered again from its event when it is sent.
    """
    UPDATE dedup SET key = live_bridge_key_in_millis(key)
    WHERE substr(key, 1, 6) = '000000' AND instr(key, ':') = 17;
    UPDATE events SET event_time = event_time * 1000
    WHERE event_time > 0 AND event_time < 100000000000;
    UPDATE deliveries SET payload = NULL WHERE state != 'delivered' AND payload IS NOT NULL
    """,
    # 10: a room's deliveries still to send, for ROOM_FREE: through deliveries_room, each claim
    # walked every earlier delivery of each row's room, the delivered ones the retention keeps
    # included: 60 ms a claim (in the writer's transaction) for a room with 19,000 delivered,
    # a backlog in one room drained at 150 deliveries a second instead of 1,200.
    """
    CREATE INDEX deliveries_room_open ON deliveries (channel, room_id, order_ts, id)
    WHERE state IN ('pending', 'in_flight')
    """,
    # 11: a delivery's room, and a thread's, is its room within its app (store.room_key,
    # "SDKAppID:RoomId"): two apps' rooms of one name were ordered and threaded as one. A
    # thread takes the app of the message that started it: the first delivery marked delivered
    # once the thread was kept (its started_at, written just before), else, none being left, its
    # room's latest delivery to its channel. A thread none is left for (its deliveries pruned)
    # is forgotten, and the room's next message starts another. events.room_id stays the room
    # as Tencent named it.
    """
    DELETE FROM threads WHERE NOT EXISTS (
        SELECT 1 FROM deliveries d WHERE d.channel = threads.channel AND d.room_id = threads.room_id
    );
    UPDATE threads SET room_id = COALESCE((
        SELECT e.sdk_app_id FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.channel = threads.channel AND d.room_id = threads.room_id
          AND d.state = 'delivered' AND d.delivered_at >= threads.started_at
        ORDER BY d.delivered_at, d.id LIMIT 1
    ), (
        SELECT e.sdk_app_id FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.channel = threads.channel AND d.room_id = threads.room_id
        ORDER BY d.id DESC LIMIT 1
    )) || ':' || room_id;
    UPDATE deliveries SET room_id = (
        SELECT e.sdk_app_id FROM events e WHERE e.id = deliveries.event_id
    ) || ':' || room_id
    WHERE room_id IS NOT NULL
    """,
)

assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection) -> str:
    """Bring the database to SCHEMA_VERSION; refuse one written by a newer live-bridge. Several
    processes may open one file at once (the server, its delivery process, an outbox command):
    each migration is applied once, by whichever takes the write lock first. Returns the
    database's identity (Store.identity)."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.create_function("live_bridge_dedup_digest", 3, _dedup_digest, deterministic=True)
    conn.create_function("live_bridge_key_in_millis", 1, _key_in_millis, deterministic=True)
    version = _version(conn)
    if 0 < version < SCHEMA_VERSION:  # a large store takes seconds: said, not a silent start
        log.info("store schema %d is older: migrating it to %d", version, SCHEMA_VERSION)
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have applied this migration
            # since, and a second run would add a column twice or re-key dedup twice.
            version = _version(conn)
            if version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )
            conn.execute("COMMIT")
        except BaseException:
            # SQLite has rolled back itself after some errors (a full disk): a ROLLBACK then
            # failed with "no transaction is active", in place of what went wrong.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this live-bridge ({SCHEMA_VERSION})"
        )
    return _identity(conn)


def _dedup_digest(command: str, sdk_app_id: int, body: str) -> str:
    # The body as received: stored as its UTF-8 text (receive.py decodes it), read back alike.
    return dedup_digest(command, sdk_app_id, body.encode())


def _key_in_millis(key: str) -> str:
    """A dedup key that leads with an EventTime in seconds, as it leads since: in milliseconds."""
    front, _, digest = key.partition(":")
    try:
        at = int(front, 16)
    except ValueError:
        return key  # not a key this live-bridge wrote
    return f"{at * 1000:016x}:{digest}" if 0 < at < SECONDS_BELOW else key


def _identity(conn: sqlite3.Connection) -> str:
    """The database's random identity, made the first time it is opened. Not a migration: an
    older live-bridge, which has none, may still open the file."""
    select = "SELECT value FROM meta WHERE key = 'store_id'"
    if (row := conn.execute(select).fetchone()) is None:
        # OR IGNORE: of two processes opening a new file at once, the first one's stays.
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
            (secrets.token_hex(16),),
        )
        row = conn.execute(select).fetchone()
    return str(row[0])


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    written = str(row[0]) if row else "0"
    if not written.isdecimal():  # a raw ValueError and a traceback at start, not one line
        raise sqlite3.DatabaseError(
            f"schema version {written[:40]!r} is not a number: not live-bridge's meta table"
        )
    return int(written)
