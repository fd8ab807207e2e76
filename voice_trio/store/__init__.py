"""Call records, transcripts, the latency ledger, and fallback-mode shared state.

SQLite by default (``SQLITE_PATH``); PostgreSQL when ``DATABASE_URL`` is set, so that several
server instances share one store. ``open_store(settings)`` picks the backend, brings the
schema up to date and closes the store on exit::

    async with open_store(settings) as store:
        await store.start_call(record)
        ...
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await store.save_call(record, turns)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from voice_trio.config import Settings
from voice_trio.store.errors import StaleState, StoreError
from voice_trio.store.postgres import DEFAULT_POOL_SIZE, PostgresStore
from voice_trio.store.records import (
    MAX_PAGE,
    CallCounts,
    CallPage,
    CallRecord,
    CallState,
    CallStore,
    ToolCallEntry,
    TurnEntry,
)
from voice_trio.store.schema import LATEST
from voice_trio.store.sqlite import SqliteStore

__all__ = [
    "MAX_PAGE",
    "CallCounts",
    "CallPage",
    "CallRecord",
    "CallState",
    "CallStore",
    "PostgresStore",
    "SqliteStore",
    "StaleState",
    "StoreError",
    "ToolCallEntry",
    "TurnEntry",
    "open_store",
    "store_for",
]

log = logging.getLogger("voice_trio.store")


def store_for(settings: Settings, pool_size: int = DEFAULT_POOL_SIZE) -> CallStore:
    """The store the settings ask for, not yet opened."""
    if settings.database_url:
        return PostgresStore(settings.database_url, pool_size)
    return SqliteStore(settings.sqlite_path)


@asynccontextmanager
async def open_store(
    settings: Settings, pool_size: int = DEFAULT_POOL_SIZE
) -> AsyncIterator[CallStore]:
    """An open store with its schema at the latest version; closed on exit, even when
    the block is cancelled."""
    store = store_for(settings, pool_size)
    await store.open()
    log.info("Store: %s %s (schema v%d)", store.backend, store.where, LATEST)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
