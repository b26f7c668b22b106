"""Which store a config selects: `[store] url` is PostgreSQL, otherwise SQLite at `[store] path`."""

from __future__ import annotations

from bridge.config_tables import StoreConfig
from bridge.store import Store
from bridge.store.sqlite import SQLiteStore


def make_store(
    config: StoreConfig, serving: bool, gather_s: float = 0.0, create: bool = True,
    lock_wait_s: float | None = None,
) -> Store:  # fmt: skip
    """The store for `config`; `serving` is `live-bridge serve`, which alone holds SQLite's lock
    (any number of processes serve from one PostgreSQL database). `gather_s`: how long SQLite's
    writer waits for more operations before each transaction (the delivery process's).
    `create`: a database without live-bridge's tables gets them, else it is unavailable
    (SQLite's callers check that the file exists first). `lock_wait_s`: how long a SQLite write
    waits for another process's before it fails (None: as long as it takes)."""
    if config.url is not None:
        # Imported only when chosen: psycopg adds an eighth of a second to every start.
        from bridge.store.postgres import PostgresStore

        url = config.url.get_secret_value()
        return PostgresStore(url, max_size=config.pool_size, create=create)
    return SQLiteStore(
        config.path, exclusive=serving, sync=config.sync, gather_s=gather_s, create=create,
        lock_wait_s=lock_wait_s,
    )  # fmt: skip


def describe(config: StoreConfig) -> str:
    """The store for logs and pages: never the URL, which may hold a password."""
    return "PostgreSQL" if config.url is not None else f"SQLite {config.path}"
