"""The statements the SQLite store runs on its schema (bridge/store/schema.py): claims, the
channels' leases, stats, ids handed out once, retention and the outbox's list."""

from __future__ import annotations

from bridge.store import CLOCK_STEP_S

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
