"""The PostgreSQL store's announcements (pg_presence.py): a channel another instance has announced
recently enough is spared, a withdrawn or old announcement no longer spares anything. When to
announce and how old is too old is bridge/presence.py's, tested in test_presence.py."""

from __future__ import annotations

import time

import pytest

from bridge.store import NewDelivery, State
from bridge.store.pg_schema import SCHEMA_VERSION
from bridge.store.postgres import PostgresStore
from tests.store_rows import new_event, old_postgres, postgres_opener
from tests.test_store_postgres import OpenStore, PostgresSQL

pytestmark = pytest.mark.anyio

open_store = pytest.fixture(postgres_opener)


async def record(store: PostgresStore, *channels: str) -> None:
    await store.record(new_event(), [NewDelivery(c, "{}") for c in channels], time.time(), 0)


async def undelivered(store: PostgresStore) -> dict[str, State]:
    return {d.channel: d.state for d in await store.list_deliveries(False, None, 100)}


async def test_channels_another_instance_announced_are_spared(open_store: OpenStore) -> None:
    this, other, stale = await open_store(), await open_store(), await open_store()
    now = time.time()
    await record(this, "mine", "theirs", "stale", "nobody's")
    await this.announce(["theirs"], now)  # its own announcement counts for nothing: `known` does
    await other.announce(["theirs"], now)
    await stale.announce(["stale"], now - 100)
    # Every announcement counts, however old: only what no instance has is buried.
    assert await this.bury_unknown_channels(["mine"], now, "gone") == 1
    assert await undelivered(this) == {
        "mine": State.PENDING, "theirs": State.PENDING, "stale": State.PENDING,
        "nobody's": State.DEAD,
    }  # fmt: skip
    # Announcements before `announced_since` count no more, and are forgotten.
    assert await this.bury_unknown_channels(["mine"], now, "gone", now - 50) == 1
    assert (await undelivered(this))["stale"] is State.DEAD
    await this.announce(["mine"], now)  # the two that remain
    assert await this.bury_unknown_channels(["mine"], now, "gone", float("-inf")) == 0
    # A new set replaces the old one; withdrawn, nothing is spared for that instance.
    await other.announce(["elsewhere"], now + 1)
    assert await this.bury_unknown_channels(["mine"], now + 1, "gone") == 1
    await record(this, "elsewhere")
    await other.withdraw()
    assert await this.bury_unknown_channels(["mine"], now + 2, "gone") == 1
    assert set((await undelivered(this)).values()) == {State.PENDING, State.DEAD}
    assert (await undelivered(this))["mine"] is State.PENDING


async def test_a_database_of_the_version_before_gets_the_replicas_table(
    open_store: OpenStore, postgres_url: str, postgres_sql: PostgresSQL
) -> None:
    old_postgres(postgres_url, 3)
    store = await open_store()
    await store.announce(["a"], time.time())
    assert postgres_sql("SELECT owner, channels FROM replicas") == [(store.owner, ["a"])]
    assert postgres_sql("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
