"""The PostgreSQL schema, created on first open and migrated by version number, and the store's
statements longer than a line.

The tables are SQLite's at its version 3, in PostgreSQL's types: times are epoch seconds in
DOUBLE PRECISION, as the store's callers pass them; Tencent's EventTime (milliseconds) and the ids
are BIGINT. `replicas` is PostgreSQL's alone: a SQLite file has one serving process. Several
processes may open one database at once: each migrates under one advisory lock, in one
transaction, so the second finds the work done.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from psycopg import AsyncConnection

from bridge.store import CLOCK_STEP_S, StoreUnavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 9

# pg_advisory_xact_lock keys: any two numbers no other user of the database is likely to take.
MIGRATION_LOCK = 0x6C62_6D69  # "lbmi"
CLAIM_LOCK = 0x6C62_636C  # "lbcl", with the channel's hash as the second key

# Each entry brings the schema from version i to i + 1; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        received_at DOUBLE PRECISION NOT NULL,
        sdk_app_id BIGINT NOT NULL,
        command TEXT NOT NULL,
        room_id TEXT,
        event_time BIGINT,
        body TEXT NOT NULL,
        query TEXT NOT NULL
    );
    CREATE TABLE deliveries (
        id BIGSERIAL PRIMARY KEY,
        event_id BIGINT NOT NULL REFERENCES events(id),
        channel TEXT NOT NULL,
        state TEXT NOT NULL,
        payload TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        owner TEXT,
        last_error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        delivered_at DOUBLE PRECISION,
        room_id TEXT,
        order_ts BIGINT NOT NULL
    );
    CREATE INDEX deliveries_channel ON deliveries (channel, state, next_attempt_at);
    CREATE INDEX deliveries_room ON deliveries (channel, room_id, order_ts, id);
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_done ON deliveries (state, delivered_at);
    CREATE TABLE dedup (
        key TEXT PRIMARY KEY,
        seen_at DOUBLE PRECISION NOT NULL,
        event_id BIGINT NOT NULL
    );
    CREATE INDEX dedup_seen ON dedup (seen_at);
    CREATE TABLE threads (
        channel TEXT NOT NULL,
        room_id TEXT NOT NULL,
        ts TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (channel, room_id)
    );
    CREATE TABLE channels (
        channel TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        tat DOUBLE PRECISION NOT NULL DEFAULT 0,
        blocked_until DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    """,
    # 2: claims walk each channel's pending deliveries in order (deliveries_claim), as SQLite's
    # do from its version 4.
    """
    DROP INDEX deliveries_channel;
    CREATE INDEX deliveries_claim ON deliveries (channel, state, order_ts, id);
    """,
    # 3: dedup keys lead with the event's time, as SQLite's do from its version 5.
    """
    UPDATE dedup SET key = COALESCE(
        (SELECT lpad(to_hex(e.event_time), 16, '0') FROM events e WHERE e.id = dedup.event_id),
        ''
    ) || ':' || key;
    """,
    # 4: the channels each replica serves, for burying only what no running replica would send
    # (pg_presence.py). A step of its own: nothing else depends on it.
    """
    CREATE TABLE IF NOT EXISTS replicas (
        owner TEXT PRIMARY KEY,
        channels TEXT[] NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 5: the prune walks the events older than the retention in order of receipt, not every
    # event (pg_outbox.py, OLD_EVENTS_SQL), as SQLite's does from its version 7. With the id:
    # SQLite's index ends with it unasked, and the walk goes on from (received_at, id).
    """
    CREATE INDEX events_received ON events (received_at, id);
    """,
    # 6: dedup keys name the SDKAppID too (store.dedup_digest), as SQLite's do from its version
    # 8; keys whose event is gone keep their form and age.
    """
    UPDATE dedup SET key = split_part(dedup.key, ':', 1) || ':' || encode(sha256(
        convert_to(e.command, 'UTF8') || '\\x00'::bytea || convert_to(e.sdk_app_id::text, 'UTF8')
        || '\\x00'::bytea || convert_to(e.body, 'UTF8')
    ), 'hex')
    FROM events e WHERE e.id = dedup.event_id;
    """,
    # 7: what earlier versions stored as they read it then, as SQLite's version 9 does: dedup
    # keys that led with an EventTime in seconds lead with it in milliseconds, and messages
    # rendered at receipt by an earlier version are rendered again from their events.
    """
    UPDATE dedup SET key = lpad(to_hex(t.at * 1000), 16, '0') || substr(dedup.key, 17)
    FROM (
        SELECT key, ('x' || substr(key, 1, 16))::bit(64)::bigint AS at FROM dedup
        WHERE key ~ '^000000[0-9a-f]{10}:'
    ) t
    WHERE dedup.key = t.key AND t.at > 0 AND t.at < 100000000000;
    UPDATE events SET event_time = event_time * 1000
    WHERE event_time > 0 AND event_time < 100000000000;
    UPDATE deliveries SET payload = NULL WHERE state <> 'delivered' AND payload IS NOT NULL;
    """,
    # 8: a room's deliveries still to send, for ROOM_FREE, as SQLite's version 10: each claim
    # walked every earlier delivery of each row's room, the delivered ones included.
    """
    CREATE INDEX deliveries_room_open ON deliveries (channel, room_id, order_ts, id)
    WHERE state IN ('pending', 'in_flight');
    """,
    # 9: a delivery's room, and a thread's, is its room within its app (store.room_key), as
    # SQLite's version 11.
    """
    DELETE FROM threads t WHERE NOT EXISTS (
        SELECT 1 FROM deliveries d WHERE d.channel = t.channel AND d.room_id = t.room_id
    );
    UPDATE threads t SET room_id = COALESCE((
        SELECT e.sdk_app_id::text FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.channel = t.channel AND d.room_id = t.room_id AND d.state = 'delivered'
          AND d.delivered_at >= t.started_at
        ORDER BY d.delivered_at, d.id LIMIT 1
    ), (
        SELECT e.sdk_app_id::text FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.channel = t.channel AND d.room_id = t.room_id
        ORDER BY d.id DESC LIMIT 1
    )) || ':' || t.room_id;
    UPDATE deliveries d SET room_id = e.sdk_app_id::text || ':' || d.room_id
    FROM events e WHERE e.id = d.event_id AND d.room_id IS NOT NULL;
    """,
)

assert len(MIGRATIONS) == SCHEMA_VERSION


async def migrate(conn: AsyncConnection[Any], create: bool = True) -> str:
    """Bring the database to SCHEMA_VERSION; refuse one written by a newer live-bridge, and,
    unless `create`, one without live-bridge's tables. Returns the database's identity
    (Store.identity)."""
    async with conn.transaction():
        # Each statement's own snapshot, whatever the server's default: a transaction-wide one
        # is taken before the lock is granted and misses the migrations done meanwhile.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        # Before anything else: two processes creating `meta` at once would collide even with
        # IF NOT EXISTS, and the second must see the first one's migrations done.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        if not create:
            cursor = await conn.execute("SELECT to_regclass('meta') IS NOT NULL")
            if not (row := await cursor.fetchone()) or not row[0]:
                raise StoreUnavailable("no live-bridge tables: no live-bridge has served here")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        cursor = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = await cursor.fetchone()
        written = str(row[0]) if row else "0"
        if not written.isdecimal():  # a raw ValueError and a traceback at start, not one line
            raise StoreUnavailable(
                f"schema version {written[:40]!r} is not a number: not live-bridge's meta table"
            )
        version = int(written)
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"schema version {version} is newer than this live-bridge ({SCHEMA_VERSION})"
            )
        if 0 < version < SCHEMA_VERSION:  # a large database takes seconds: said
            log.info("store schema %d is older: migrating it to %d", version, SCHEMA_VERSION)
        for number in range(version, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[number])
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(number + 1),),
            )
        # Made the first time the database is opened, under the lock: every replica reads the
        # same. Not a migration: an older live-bridge, which has none, may still use it.
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING",
            (secrets.token_hex(16),),
        )
        cursor = await conn.execute("SELECT value FROM meta WHERE key = 'store_id'")
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])


# The store's statements longer than a line.

# The same rules as sqlite.py's: due (pending and its time come, or in flight with its lease run
# out), and no earlier delivery of its room holds it back. Asked apart, each part walks
# deliveries_claim in order and stops at the limit; one condition with OR scanned and sorted the
# channel's whole backlog at every claim.
ROOM_FREE = """
  NOT EXISTS (
    SELECT 1 FROM deliveries b
    WHERE b.state IN ('pending', 'in_flight')
      AND b.channel = d.channel AND b.room_id = d.room_id
      AND (b.order_ts < d.order_ts OR (b.order_ts = d.order_ts AND b.id < d.id))
      AND ((b.state = 'pending' AND b.next_attempt_at > %(now)s
             AND b.updated_at <= %(now)s + {step})
        OR (b.state = 'in_flight' AND b.lease_until > %(leases)s)))
""".replace("{step}", repr(CLOCK_STEP_S))
PENDING_DUE = (
    "d.state = 'pending'"
    f" AND (d.next_attempt_at <= %(now)s OR d.updated_at > %(now)s + {CLOCK_STEP_S!r})"
    f" AND {ROOM_FREE}"
)
LEASE_OVER = f"d.state = 'in_flight' AND d.lease_until <= %(leases)s AND {ROOM_FREE}"

_CLAIM_PART = """
  SELECT d.id, d.order_ts, d.room_id FROM deliveries d
  WHERE d.channel = %(channel)s AND {due}
  ORDER BY d.order_ts, d.id
  LIMIT %(limit)s
  FOR UPDATE OF d SKIP LOCKED
"""
# ROOM_FREE lets a room's due deliveries through together, counting on the claim to take the
# earlier ones first; but SKIP LOCKED passes over a row another transaction holds (an outbox
# command, an outcome being written), and the room's later deliveries would go out before it.
# So a row taken goes out only if no row of its room still to be sent comes before it untaken
# (`passed`: locked, or not due or held back, which ROOM_FREE counts already). Those are read
# once (MATERIALIZED) from the range of deliveries_claim the parts walked. Asked per row taken,
# the planner walked each room's history on deliveries_room: about 50 ms a claim instead of 2
# with 200,000 waiting and 200,000 delivered; asked with the due time, generic plans took
# deliveries_due and read every pending row.
CLAIM_SQL = f"""
WITH pending AS ({_CLAIM_PART.format(due=PENDING_DUE)}),
expired AS ({_CLAIM_PART.format(due=LEASE_OVER)}),
taken AS (SELECT * FROM pending UNION ALL SELECT * FROM expired),
passed AS MATERIALIZED (
  SELECT d.room_id, d.order_ts, d.id FROM deliveries d
  WHERE d.channel = %(channel)s AND d.state IN ('pending', 'in_flight')
    AND d.order_ts <= (SELECT MAX(order_ts) FROM taken) AND d.id NOT IN (SELECT id FROM taken)
),
due AS (
  SELECT id FROM taken t
  WHERE NOT EXISTS (SELECT 1 FROM passed p WHERE p.room_id = t.room_id
                    AND (p.order_ts, p.id) < (t.order_ts, t.id))
  ORDER BY order_ts, id LIMIT %(limit)s
)
UPDATE deliveries d SET state = 'in_flight', attempts = d.attempts + 1,
  lease_until = %(lease_until)s, updated_at = %(now)s, owner = %(owner)s
FROM due, events e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.event_id, d.channel, d.payload, d.attempts, d.room_id, e.command, e.body,
  e.query, e.received_at, e.sdk_app_id, d.order_ts
"""  # noqa: S608  # constant text, no values

# The names of the channels with deliveries, as `names(channel)` (and a NULL row at the end): a
# skip scan, one index search each, rather than a read of every delivery.
CHANNEL_NAMES = """
WITH RECURSIVE names(channel) AS (
  (SELECT channel FROM deliveries ORDER BY channel LIMIT 1)
  UNION ALL
  SELECT (SELECT d.channel FROM deliveries d WHERE d.channel > names.channel
          ORDER BY d.channel LIMIT 1)
  FROM names WHERE names.channel IS NOT NULL
)"""

# The channels with something due, none held by another process.
DUE_SQL = f"""{CHANNEL_NAMES}
SELECT n.channel FROM names n
WHERE n.channel IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM channels c WHERE c.channel = n.channel
                  AND c.owner <> %(owner)s AND c.lease_until > %(leases)s)
  AND (EXISTS (SELECT 1 FROM deliveries d WHERE d.channel = n.channel AND {PENDING_DUE})
    OR EXISTS (SELECT 1 FROM deliveries d WHERE d.channel = n.channel AND {LEASE_OVER}))
"""  # noqa: S608

TAKE_CHANNEL_SQL = """
INSERT INTO channels (channel, owner, lease_until, tat, blocked_until)
VALUES (%(channel)s, %(owner)s, %(lease_until)s, 0, 0)
ON CONFLICT (channel) DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until,
  tat = CASE WHEN channels.owner <> EXCLUDED.owner AND channels.lease_until > 0 THEN -1
        ELSE channels.tat END
WHERE channels.owner = EXCLUDED.owner OR channels.lease_until <= %(leases)s
RETURNING tat, blocked_until
"""

# A callback in one statement, so one round trip and one commit. The dedup key is this event's
# unless a live entry holds it; a concurrent record of the same key waits on the unique index for
# the other transaction, then finds the key taken: stored exactly once. No row back: a duplicate.
# An event without Tencent's EventTime goes after what its room has already (as schema.py's
# ORDER_AFTER_ROOM).
RECORD_SQL = """
WITH key AS (
  INSERT INTO dedup (key, seen_at, event_id)
  SELECT %(key)s, %(now)s, nextval(pg_get_serial_sequence('events', 'id')) WHERE %(dedup)s
  ON CONFLICT (key) DO UPDATE SET seen_at = EXCLUDED.seen_at, event_id = EXCLUDED.event_id
  WHERE dedup.seen_at <= %(expired)s
  RETURNING event_id
), event AS (
  INSERT INTO events (id, received_at, sdk_app_id, command, room_id, event_time, body, query)
  SELECT COALESCE((SELECT event_id FROM key), nextval(pg_get_serial_sequence('events', 'id'))),
         %(now)s, %(sdk_app_id)s, %(command)s, %(room_id)s, %(event_time)s, %(body)s, %(query)s
  WHERE NOT %(dedup)s OR EXISTS (SELECT 1 FROM key)
  RETURNING id
), delivery AS (
  INSERT INTO deliveries (event_id, channel, state, payload, next_attempt_at, last_error,
    created_at, updated_at, room_id, order_ts)
  SELECT event.id, d.channel, d.state, d.payload, %(now)s, d.error, %(now)s, %(now)s,
         %(room_key)s, CASE WHEN %(after_room)s THEN GREATEST(%(order_ts)s, (
           SELECT MAX(r.order_ts) FROM deliveries r
           WHERE r.channel = d.channel AND r.room_id = %(room_key)s)) ELSE %(order_ts)s END
  FROM event, unnest(%(channels)s::text[], %(states)s::text[], %(payloads)s::text[],
                     %(errors)s::text[]) WITH ORDINALITY AS d(channel, state, payload, error, n)
  ORDER BY d.n
)
SELECT id FROM event
"""

NEXT_DUE_SQL = """
SELECT LEAST(
  (SELECT MIN(next_attempt_at) FROM deliveries
   WHERE state = 'pending' AND next_attempt_at > %(now)s AND updated_at <= %(now)s + {step}),
  (SELECT MIN(lease_until) FROM deliveries WHERE state = 'in_flight' AND lease_until > %(now)s))
""".replace("{step}", repr(CLOCK_STEP_S))

STATS_SQL = """
SELECT channel,
       COUNT(*) FILTER (WHERE state = 'pending'), COUNT(*) FILTER (WHERE state = 'in_flight'),
       COUNT(*) FILTER (WHERE state = 'dead'), COUNT(*) FILTER (WHERE state = 'delivered'),
       MIN(created_at) FILTER (WHERE state = 'pending')
FROM deliveries GROUP BY channel ORDER BY channel COLLATE "C"
"""

ROW_COLUMNS = """d.id, d.event_id, d.channel, e.room_id, e.command, d.state, d.attempts,
  d.last_error, d.created_at, d.updated_at, d.next_attempt_at, e.sdk_app_id"""

LIST_SQL = f"""
SELECT {ROW_COLUMNS}
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE (NOT %(dead)s OR d.state = 'dead') AND (%(channel)s::text IS NULL OR d.channel = %(channel)s)
  AND d.state <> 'delivered'
ORDER BY d.id DESC LIMIT %(limit)s
"""  # noqa: S608

EVENT_ROWS_SQL = f"""
SELECT {ROW_COLUMNS}
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.event_id = ANY(%s::bigint[]) ORDER BY d.id
"""  # noqa: S608
