"""PostgreSQL backend: one store shared by many server instances (DESIGN.md §4).

psycopg 3's async API needs asyncio, so this uses the sync driver and its
``ConnectionPool`` from Trio's worker threads, with a ``CapacityLimiter`` as wide as the pool:
a Trio task never holds a thread that is only waiting for a free connection.

Shared state needs no instance clock: webhook ids and call states are stamped with the
server's ``now()`` (this dialect's ``now``). Races between instances resolve in the
database: a webhook id is claimed by a single ``INSERT ... ON CONFLICT``, and a state update
only applies to the version it was read at (``UPDATE ... WHERE version = ...``). The
statements are the shared ones (``queries``, ``sql_store``); times are ``timestamptz`` and
JSON is JSONB.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from voice_trio.store.dialect import Dialect
from voice_trio.store.errors import StoreError
from voice_trio.store.notify import MAX_PAYLOAD_BYTES, Listener
from voice_trio.store.records import EVENT_TTL
from voice_trio.store.schema import MIGRATION_LOCK
from voice_trio.store.sql_store import SqlStore, Transaction, migrate

DEFAULT_POOL_SIZE = 5
CONNECT_TIMEOUT = 10.0  # seconds open() waits for the first connection


class PostgresDialect(Dialect):
    name = "postgres"
    placeholder = "%({})s"
    now = "now()"  # the transaction's start, on the database's clock: one for all instances
    seconds = "make_interval(secs => {})"

    def dump_time(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, UTC)

    def load_time(self, value: Any) -> float:
        return value.timestamp()

    def dump_json(self, value: Any) -> Jsonb:
        return Jsonb(value)

    def load_json(self, value: Any) -> Any:
        return value  # psycopg has parsed it


POSTGRES = PostgresDialect()


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresStore(SqlStore):
    backend = "postgres"
    dialect = POSTGRES
    outage_errors = (psycopg.OperationalError, psycopg_pool.PoolTimeout)

    def __init__(
        self,
        dsn: str,
        pool_size: int = DEFAULT_POOL_SIZE,
        *,
        event_ttl: float = EVENT_TTL,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(trio.CapacityLimiter(pool_size), event_ttl)
        self.connect_timeout = connect_timeout
        self.where = describe_dsn(dsn)
        self._dsn = dsn
        self.pool = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            name="voice-trio",
            check=psycopg_pool.ConnectionPool.check_connection,
        )

    async def open(self) -> None:
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        try:
            self.pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            self.pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {self.where}") from exc
        try:
            with self._transaction(write=True) as cursor:
                # Held until commit: a second instance starting now waits here, then finds
                # every migration applied.
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                migrate(Transaction(cursor, POSTGRES))
        except BaseException:
            self.pool.close()
            raise

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.pool.close)

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[psycopg.Cursor[Any]]:
        # ``write`` changes nothing here: PostgreSQL locks rows as it writes them.
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield cursor

    def listener(self, channel: str) -> Listener:
        return Listener(self._dsn, channel, self.where)

    async def notify(self, channel: str, payload: str) -> None:
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a notification carries at most {MAX_PAYLOAD_BYTES} bytes")
        await self._write_one(
            "SELECT pg_notify({channel}, {payload})", channel=channel, payload=payload
        )
