"""SQLite backend: the default, one file per server (or per machine, if instances share it).

One connection, opened with ``check_same_thread=False`` and used from Trio's worker
threads one statement batch at a time (a ``CapacityLimiter(1)``): SQLite has one writer
anyway, and WAL lets other processes read meanwhile. Transactions are explicit
(``isolation_level=None``); writes use ``BEGIN IMMEDIATE`` so a second process waits on the
busy timeout instead of failing half-way.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from voice_trio.store.errors import StaleState, StoreError
from voice_trio.store.records import (
    EVENT_TTL,
    SERVER_LOST,
    STATE_TTL,
    CallCounts,
    CallQuery,
    CallRecord,
    CallState,
    CallStore,
    TurnEntry,
    state_json,
)
from voice_trio.store.schema import (
    CALL_COLUMNS,
    COUNT_CALLS,
    CREATE_MIGRATIONS_TABLE,
    END_ORPHANED_CALLS,
    TURN_COLUMNS,
    pending,
)

BUSY_TIMEOUT = 10.0  # seconds a write waits for another process's write to finish

_UPSERT_CALL = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in CALL_COLUMNS[1:])
)
_INSERT_CALL = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO NOTHING"
)
_INSERT_TURN = (
    f"INSERT INTO call_turns ({', '.join(TURN_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in TURN_COLUMNS)})"
)
_SELECT_CALLS = f"SELECT {', '.join(CALL_COLUMNS)} FROM calls"


class SqliteStore(CallStore):
    backend = "sqlite"
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
            conn.row_factory = sqlite3.Row
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with trio.CancelScope(shield=True):
                await self._run(conn.close)

    async def start_call(self, record: CallRecord) -> None:
        def write() -> None:
            with _transaction(self.conn):
                self.conn.execute(_INSERT_CALL, _call_params(record))

        await self._run(write)

    async def save_call(self, record: CallRecord, turns: list[TurnEntry]) -> None:
        rows = [_turn_params(record.call_control_id, t) for t in turns]

        def write() -> None:
            with _transaction(self.conn) as conn:
                conn.execute(_UPSERT_CALL, _call_params(record))
                conn.execute(
                    "DELETE FROM call_turns WHERE call_control_id = ?", (record.call_control_id,)
                )
                conn.executemany(_INSERT_TURN, rows)

        await self._run(write)

    async def get_call(self, call_control_id: str) -> tuple[CallRecord, list[TurnEntry]] | None:
        def read() -> tuple[CallRecord, list[TurnEntry]] | None:
            with _transaction(self.conn, "BEGIN") as conn:
                row = conn.execute(
                    f"{_SELECT_CALLS} WHERE call_control_id = ?", (call_control_id,)
                ).fetchone()
                if row is None:
                    return None
                turns = conn.execute(
                    f"SELECT {', '.join(TURN_COLUMNS)} FROM call_turns "
                    "WHERE call_control_id = ? ORDER BY idx",
                    (call_control_id,),
                ).fetchall()
            return _record(row), [_turn(t) for t in turns]

        return await self._run(read)

    async def count_calls(self) -> CallCounts:
        def read() -> CallCounts:
            active, total = self.conn.execute(COUNT_CALLS).fetchone()
            return CallCounts(int(active), int(total))

        return await self._run(read)

    async def _list(self, query: CallQuery) -> list[CallRecord]:
        where: list[str] = []
        params: list[Any] = []
        if query.after is not None:
            where.append("(created_at, call_control_id) < (?, ?)")
            params.extend(query.after)
        if query.since is not None:
            where.append("created_at >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("created_at < ?")
            params.append(query.until)
        if query.status is not None:
            where.append("status = ?")
            params.append(query.status)
        if query.phone is not None:
            where.append("(from_number = ? OR to_number = ?)")
            params.extend((query.phone, query.phone))
        sql = _SELECT_CALLS
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, call_control_id DESC LIMIT ?"
        params.append(query.limit + 1)

        def read() -> list[CallRecord]:
            return [_record(r) for r in self.conn.execute(sql, params).fetchall()]

        return await self._run(read)

    async def _claim(self, event_id: str) -> bool:
        def write() -> bool:
            now = time.time()
            with _transaction(self.conn) as conn:
                cur = conn.execute(
                    "INSERT INTO webhook_events (event_id, seen_at) VALUES (?, ?) "
                    "ON CONFLICT (event_id) DO UPDATE SET seen_at = excluded.seen_at "
                    "WHERE webhook_events.seen_at < ?",
                    (event_id, now, now - self.event_ttl),
                )
                return cur.rowcount == 1

        return await self._run(write)

    async def _sweep(self) -> None:
        def write() -> None:
            now = time.time()
            with _transaction(self.conn) as conn:
                conn.execute(
                    "DELETE FROM webhook_events WHERE seen_at < ?", (now - self.event_ttl,)
                )
                conn.execute("DELETE FROM call_states WHERE updated_at < ?", (now - STATE_TTL,))

        await self._run(write)

    async def load_state(self, call_control_id: str) -> CallState | None:
        def read() -> CallState | None:
            row = self.conn.execute(
                "SELECT data, version FROM call_states WHERE call_control_id = ?",
                (call_control_id,),
            ).fetchone()
            return None if row is None else CallState(json.loads(row[0]), row[1])

        return await self._run(read)

    async def save_state(
        self, call_control_id: str, state: dict[str, Any], *, expected_version: int | None
    ) -> int:
        data = state_json(state)

        def write() -> int:
            now = time.time()
            with _transaction(self.conn) as conn:
                if expected_version is None:
                    cur = conn.execute(
                        "INSERT INTO call_states (call_control_id, version, data, updated_at) "
                        "VALUES (?, 1, ?, ?) ON CONFLICT (call_control_id) DO NOTHING",
                        (call_control_id, data, now),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE call_states SET data = ?, version = version + 1, updated_at = ? "
                        "WHERE call_control_id = ? AND version = ?",
                        (data, now, call_control_id, expected_version),
                    )
                if cur.rowcount == 1:
                    return 1 if expected_version is None else expected_version + 1
                row = conn.execute(
                    "SELECT version FROM call_states WHERE call_control_id = ?",
                    (call_control_id,),
                ).fetchone()
            raise StaleState(call_control_id, expected_version, None if row is None else row[0])

        return await self._run(write)

    async def delete_state(self, call_control_id: str) -> None:
        def write() -> None:
            with _transaction(self.conn) as conn:
                conn.execute(
                    "DELETE FROM call_states WHERE call_control_id = ?", (call_control_id,)
                )

        await self._run(write)

    async def register_instance(self, instance_id: str, name: str) -> None:
        def write() -> None:
            now = time.time()
            with _transaction(self.conn) as conn:
                conn.execute("DELETE FROM instances WHERE name = ?", (name,))
                conn.execute(
                    "INSERT INTO instances (instance_id, name, started_at, seen_at) "
                    "VALUES (?, ?, ?, ?)",
                    (instance_id, name, now, now),
                )

        await self._run(write)

    async def heartbeat(self, instance_id: str, name: str) -> None:
        def write() -> None:
            now = time.time()
            with _transaction(self.conn) as conn:
                conn.execute(
                    "INSERT INTO instances (instance_id, name, started_at, seen_at) "
                    "VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (instance_id) DO UPDATE SET seen_at = excluded.seen_at",
                    (instance_id, name, now, now),
                )

        await self._run(write)

    async def forget_instance(self, instance_id: str) -> None:
        def write() -> None:
            with _transaction(self.conn) as conn:
                conn.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))

        await self._run(write)

    async def end_orphaned_calls(self, stale_after: float, idle_after: float) -> list[str]:
        def write() -> list[str]:
            now = time.time()
            with _transaction(self.conn) as conn:
                rows = conn.execute(
                    END_ORPHANED_CALLS.format(p="?"),
                    (SERVER_LOST, now, now - stale_after, now - idle_after),
                ).fetchall()
                conn.execute("DELETE FROM instances WHERE seen_at < ?", (now - STATE_TTL,))
            return sorted(row[0] for row in rows)

        return await self._run(write)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[Any]:
    conn.execute(begin)
    try:
        yield conn
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


def _migrate(conn: sqlite3.Connection) -> None:
    with _transaction(conn):
        conn.execute(CREATE_MIGRATIONS_TABLE["sqlite"])
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in pending(applied):
            for statement in migration.sqlite:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )


def _call_params(record: CallRecord) -> dict[str, Any]:
    return {c: getattr(record, c) for c in CALL_COLUMNS}


def _turn_params(call_control_id: str, turn: TurnEntry) -> dict[str, Any]:
    return {
        "call_control_id": call_control_id,
        "idx": turn.index,
        **{c: getattr(turn, c) for c in TURN_COLUMNS[2:-1]},
        "interrupted": int(turn.interrupted),
        "tool_calls": json.dumps(turn.tool_calls, ensure_ascii=False),
    }


def _record(row: sqlite3.Row) -> CallRecord:
    return CallRecord(**{c: row[c] for c in CALL_COLUMNS})


def _turn(row: sqlite3.Row) -> TurnEntry:
    values = {c: row[c] for c in TURN_COLUMNS[2:-1]}
    values["interrupted"] = bool(values["interrupted"])
    return TurnEntry(index=row["idx"], tool_calls=json.loads(row["tool_calls"]), **values)
