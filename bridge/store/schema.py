"""The SQLite schema, created on first open and migrated by version number."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 6

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
    # 6: ids are never handed out again (sqlite.py, HIGH_WATER_SQL). What was deleted before is
    # gone, except the event ids that live dedup keys still name; a live-bridge from before
    # would give ids from MAX(id) + 1 again, so it must refuse the file.
    """
    INSERT OR REPLACE INTO meta (key, value)
    SELECT 'events_high_water', MAX(COALESCE((SELECT MAX(id) FROM events), 0),
                                    COALESCE((SELECT MAX(event_id) FROM dedup), 0))
    UNION ALL
    SELECT 'deliveries_high_water', COALESCE((SELECT MAX(id) FROM deliveries), 0)
    """,
)

assert len(MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database to SCHEMA_VERSION; refuse one written by a newer live-bridge. Several
    processes may open one file at once (the server, its delivery process, an outbox command):
    each migration is applied once, by whichever takes the write lock first."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    version = _version(conn)
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
            conn.execute("ROLLBACK")
            raise
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this live-bridge ({SCHEMA_VERSION})"
        )


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0
