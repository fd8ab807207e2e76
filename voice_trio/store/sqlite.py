"""SQLite backend: the default, one file per server (or per machine, if instances share it).

One connection, opened with ``check_same_thread=False`` and used from Trio's worker
threads one statement batch at a time (a ``CapacityLimiter(1)``): SQLite has one writer
anyway, and WAL lets other processes read meanwhile. Transactions are explicit
(``isolation_level=None``); writes use ``BEGIN IMMEDIATE`` so a second process waits on the
busy timeout instead of failing half-way.

The statements are the shared ones (``queries``, ``sql_store``); this dialect keeps times as
epoch seconds (REAL) and JSON as TEXT, and reads ``now`` from this instance's clock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import trio

from voice_trio.store.dialect import Dialect
from voice_trio.store.errors import StoreError
from voice_trio.store.records import EVENT_TTL
from voice_trio.store.sql_store import SqlStore, Transaction, migrate

BUSY_TIMEOUT = 10.0  # seconds a write waits for another process's write to finish


class SqliteDialect(Dialect):
    name = "sqlite"
    placeholder = ":{}"
    now = ":now"
    seconds = "{}"

    def clock(self) -> dict[str, Any]:
        return {"now": time.time()}

    def dump_time(self, epoch: float) -> float:
        return epoch

    def load_time(self, value: Any) -> float:
        return value  # REAL: already a float

    def dump_json(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def load_json(self, value: Any) -> Any:
        return json.loads(value)


SQLITE = SqliteDialect()


class SqliteStore(SqlStore):
    backend = "sqlite"
    dialect = SQLITE
    outage_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path, *, event_ttl: float = EVENT_TTL) -> None:
        super().__init__(trio.CapacityLimiter(1), event_ttl)
        self.path = str(path)
        self.where = self.path
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the SQLite store is not open")
        return self._conn

    async def open(self) -> None:
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            with _transaction(conn, "BEGIN IMMEDIATE") as cursor:  # the migration lock
                migrate(Transaction(cursor, SQLITE))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with trio.CancelScope(shield=True):
                await self._run(conn.close)

    def _transaction(self, write: bool) -> AbstractContextManager[sqlite3.Cursor]:
        return _transaction(self.conn, "BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Cursor]:
    conn.execute(begin)
    try:
        yield conn.cursor()
    except BaseException:
        if conn.in_transaction:  # SQLite has already rolled back after some errors
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting out other processes doing the same.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database is
    locked" at once, without its busy handler, when several connections race to make the
    switch on a fresh file. WAL is persistent, so whoever wins does it for everyone: retry
    until the file says ``wal`` or the busy timeout has passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.005
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
            continue
        if str(mode).lower() not in ("wal", "memory"):  # ":memory:" databases have no file
            raise StoreError(f"SQLite refused WAL mode (journal_mode is {mode!r})")
        return
