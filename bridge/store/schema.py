"""The SQLite schema, created on first open and migrated by version number, and the statements
the store runs on it (as pg_schema.py holds PostgreSQL's)."""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3

from bridge.events import SECONDS_BELOW
from bridge.store import CLOCK_STEP_S, dedup_digest

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


# --- the statements the store runs ---------------------------------------------------------------

# An event without Tencent's EventTime is ordered by its arrival, and after everything its room
# has already: by the clock alone, one that came after a step back would go before its room's
# earlier events still waiting (one at a time: the events of one batch are counted too).
ORDER_AFTER_ROOM = "SELECT MAX(order_ts) FROM deliveries WHERE channel = ? AND room_id = ?"

# A delivery waits while an earlier delivery (Tencent's time, then arrival) for its room is still
# pending or in flight and not itself due, so each room's messages go out in order. The state
# term first, as deliveries_room_open's own: SQLite uses a partial index only for a query that
# says its condition, and that index holds no delivered row.
ROOM_FREE = """
  NOT EXISTS (
    SELECT 1 FROM deliveries b
    WHERE b.state IN ('pending', 'in_flight')
      AND b.channel = d.channel AND b.room_id = d.room_id
      AND (b.order_ts < d.order_ts OR (b.order_ts = d.order_ts AND b.id < d.id))
      AND ((b.state = 'pending' AND b.next_attempt_at > :now AND b.updated_at <= :now + {step})
        OR (b.state = 'in_flight' AND b.lease_until > :leases)))
""".replace("{step}", repr(CLOCK_STEP_S))
# A delivery is due when pending and its time has come, or in flight with an expired lease.
# The two are asked apart, each walking deliveries_claim (channel, state, order_ts, id) in order
# and stopping at the first rows it needs. One condition with OR had SQLite sort every claimable
# row of the channel at each claim: 30 ms a claim with 20,000 waiting, in the writer's
# transaction, so every callback waited too. The index is named: the planner would rather take
# deliveries_due for the time and sort.
# Or written before the clock went back (bridge.store.CLOCK_STEP_S).
PENDING_DUE = (
    "d.state = 'pending'"
    f" AND (d.next_attempt_at <= :now OR d.updated_at > :now + {CLOCK_STEP_S!r}) AND {ROOM_FREE}"
)
LEASE_OVER = f"d.state = 'in_flight' AND d.lease_until <= :leases AND {ROOM_FREE}"

_CLAIM_PART = """
SELECT * FROM (
  SELECT d.id, d.event_id, d.channel, d.payload, d.attempts, d.room_id, e.command, e.body,
         e.query, e.received_at, e.sdk_app_id, d.order_ts
  FROM deliveries d INDEXED BY deliveries_claim JOIN events e ON e.id = d.event_id
  WHERE d.channel = :channel AND {due}
  ORDER BY d.order_ts, d.id LIMIT :limit)
"""
CLAIM_SQL = (
    _CLAIM_PART.format(due=PENDING_DUE)
    + "UNION ALL"
    + _CLAIM_PART.format(due=LEASE_OVER)
    + "ORDER BY 12, 1 LIMIT :limit"  # order_ts, id
)

# Every channel name in deliveries, one index seek each (a skip scan): `names(channel)`, the
# last row NULL.
CHANNEL_NAMES = """
WITH RECURSIVE names(channel) AS (
  SELECT MIN(channel) FROM deliveries
  UNION ALL
  SELECT (SELECT MIN(d.channel) FROM deliveries d WHERE d.channel > names.channel) FROM names
  WHERE names.channel IS NOT NULL)"""

# The channels with something due, one index seek per channel (a skip scan over the channel
# names), and none held by another process.
DUE_SQL = f"""{CHANNEL_NAMES}
SELECT n.channel FROM names n
WHERE n.channel IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM channels c WHERE c.channel = n.channel
                  AND c.owner != :owner AND c.lease_until > :leases)
  AND (EXISTS (SELECT 1 FROM deliveries d INDEXED BY deliveries_claim
               WHERE d.channel = n.channel AND {PENDING_DUE})
    OR EXISTS (SELECT 1 FROM deliveries d INDEXED BY deliveries_claim
               WHERE d.channel = n.channel AND {LEASE_OVER}))
"""  # noqa: S608  # constant text, no values

# A channel is free when never taken, left (lease_until 0) or its holder's lease has run out. A
# holder that never left it (killed) saved its pacing only when it last left: UNKNOWN_TAT (-1).
TAKE_SQL = """
INSERT INTO channels (channel, owner, lease_until, tat, blocked_until) VALUES (?, ?, ?, 0, 0)
ON CONFLICT (channel) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until,
  tat = CASE WHEN channels.owner <> excluded.owner AND channels.lease_until > 0 THEN -1
        ELSE channels.tat END
WHERE channels.owner = excluded.owner OR channels.lease_until <= ?
RETURNING tat, blocked_until
"""

STATS_SQL = """
WITH RECURSIVE channels (channel) AS (
    SELECT MIN(channel) FROM deliveries
    UNION ALL
    SELECT (SELECT MIN(channel) FROM deliveries WHERE channel > c.channel)
    FROM channels c WHERE c.channel IS NOT NULL
)
SELECT channel,
       (SELECT COUNT(*) FROM deliveries WHERE channel = c.channel AND state = 'pending'),
       (SELECT COUNT(*) FROM deliveries WHERE channel = c.channel AND state = 'in_flight'),
       (SELECT COUNT(*) FROM deliveries WHERE channel = c.channel AND state = 'dead'),
       (SELECT COUNT(*) FROM deliveries WHERE channel = c.channel AND state = 'delivered'),
       (SELECT MIN(created_at) FROM deliveries WHERE channel = c.channel AND state = 'pending')
FROM channels c WHERE channel IS NOT NULL ORDER BY channel
"""

# {values}: one (id, delivered_at) row per delivery, all marked in one statement.
MARK_DELIVERED_SQL = """
UPDATE deliveries SET state = 'delivered', delivered_at = v.column2, updated_at = v.column2,
       lease_until = NULL, owner = NULL
FROM (VALUES {values}) AS v
WHERE deliveries.id = v.column1 AND deliveries.owner = ?
  AND deliveries.state IN ('in_flight', 'dead')
RETURNING deliveries.id
"""


# Ids are the largest so far plus one, and the largest is kept in `meta` before rows are deleted
# (pruned, dropped): no id is handed out twice. A webhook's webhook-id is derived from its
# delivery's id, and a receiver drops a message whose id it has seen. Kept when deleting, which is
# rare, not when recording: a batch of callbacks reads the marks in the one statement that read
# MAX(id) already, and writes nothing more.
def _high_water(table: str) -> str:
    """The largest id `table` has handed out: its rows' largest, or a larger one deleted."""
    return (
        "MAX(COALESCE((SELECT MAX(id) FROM {table}), 0), COALESCE((SELECT CAST(value AS INTEGER)"
        " FROM meta WHERE key = '{table}_high_water'), 0))"
    ).replace("{table}", table)


NEXT_IDS_SQL = f"SELECT {_high_water('events')} + 1, {_high_water('deliveries')} + 1"
HIGH_WATER_SQL = f"""
INSERT OR REPLACE INTO meta (key, value)
SELECT 'events_high_water', {_high_water("events")}
UNION ALL SELECT 'deliveries_high_water', {_high_water("deliveries")}
"""

# What retention deletes, a batch at a time (each with its cutoff and the batch's size): delivered
# deliveries, dedup keys and room threads. Events go afterwards (OLD_EVENTS_SQL).
PRUNE_SQL = (
    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
    " WHERE state = 'delivered' AND delivered_at < ? LIMIT ?)",
    "DELETE FROM dedup WHERE rowid IN (SELECT rowid FROM dedup WHERE seen_at < ? LIMIT ?)",
    "DELETE FROM threads WHERE rowid IN (SELECT rowid FROM threads WHERE started_at < ? LIMIT ?)",
)

# The next events received before the cutoff, after (received_at, id), each with whether no
# delivery refers to it any more. Walked on from where each batch stopped: the events a prune
# keeps (those of dead letters) are read once a prune, not once a batch, and the events the
# retention keeps, most of the file, not at all (events_received).
OLD_EVENTS_SQL = """
SELECT id, received_at, NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
FROM events WHERE (received_at, id) > (?, ?) AND received_at < ?
ORDER BY received_at, id LIMIT ?
"""

LIST_SQL = """
SELECT d.id, d.event_id, d.channel, e.room_id, e.command, d.state, d.attempts, d.last_error,
       d.created_at, d.updated_at, d.next_attempt_at, e.sdk_app_id
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE (:dead = 0 OR d.state = 'dead') AND (:channel IS NULL OR d.channel = :channel)
  AND d.state != 'delivered'
ORDER BY d.id DESC LIMIT :limit
"""
