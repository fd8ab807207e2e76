"""The store's operations, written once for both databases.

:class:`SqlStore` does each ``CallStore`` operation as one transaction of ``queries``
statements, in a Trio worker thread (``CallStore._run``). A backend supplies the rest: its
:class:`~voice_trio.store.dialect.Dialect`, and ``_transaction``, a cursor of its driver
inside a transaction. Connecting, pools, WAL, busy waits, locks around migrations and
``LISTEN``/``NOTIFY`` are the backend's own (``sqlite``, ``postgres``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from voice_trio.store import queries as q
from voice_trio.store.dialect import Dialect, render
from voice_trio.store.errors import StaleState
from voice_trio.store.records import (
    SERVER_LOST,
    STATE_TTL,
    CallCounts,
    CallQuery,
    CallRecord,
    CallState,
    CallStore,
    ToolCallEntry,
    TurnEntry,
)
from voice_trio.store.schema import CREATE_MIGRATIONS_TABLE, pending

T = TypeVar("T")


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses; ``sqlite3`` and ``psycopg`` both have it."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: Any, params_seq: Iterable[Any], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction:
    """The statements of one transaction: each template rendered for the dialect, and bound
    with the clock as it was when the transaction began (one ``{now}`` throughout)."""

    def __init__(self, cursor: Cursor, dialect: Dialect) -> None:
        self.cursor = cursor
        self.dialect = dialect
        self._clock = dialect.clock()

    def run(self, template: str, **params: Any) -> Cursor:
        self.cursor.execute(render(template, self.dialect), {**self._clock, **params})
        return self.cursor

    def run_many(self, template: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.cursor.executemany(render(template, self.dialect), rows)

    def run_as_written(self, sql: str) -> None:
        """A statement that is no template and takes no parameters (DDL)."""
        self.cursor.execute(sql)


def migrate(tx: Transaction) -> None:
    """Apply the pending migrations in ``tx``, which the caller has made the only one
    doing so (its lock)."""
    name = tx.dialect.name
    tx.run_as_written(CREATE_MIGRATIONS_TABLE[name])
    applied = {row[0] for row in tx.run(q.SELECT_MIGRATIONS).fetchall()}
    for migration in pending(applied):
        for statement in migration.statements(name):
            tx.run_as_written(statement)
        tx.run(q.RECORD_MIGRATION, version=migration.version, name=migration.name)


class SqlStore(CallStore):
    """A ``CallStore`` on a SQL database: each operation is one transaction of the shared
    statements; the subclass gives the dialect and the transactions."""

    dialect: Dialect

    @abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor inside a transaction that commits on exit, or rolls back on an error.
        Blocking, for a worker thread. ``write``: it will write (SQLite locks up front)."""

    async def _read(self, fn: Callable[[Transaction], T]) -> T:
        return await self._run(self._in_transaction, fn, False)

    async def _write(self, fn: Callable[[Transaction], T]) -> T:
        return await self._run(self._in_transaction, fn, True)

    def _in_transaction(self, fn: Callable[[Transaction], T], write: bool) -> T:
        with self._transaction(write) as cursor:
            return fn(Transaction(cursor, self.dialect))

    async def _write_one(self, template: str, **params: Any) -> None:
        """One statement, as a write transaction of its own."""

        def write(tx: Transaction) -> None:
            tx.run(template, **params)

        await self._write(write)

    async def start_call(self, record: CallRecord) -> None:
        await self._write_one(q.INSERT_CALL, **q.call_params(record, self.dialect))

    async def save_call(self, record: CallRecord, turns: list[TurnEntry]) -> None:
        ccid = record.call_control_id
        params = q.call_params(record, self.dialect)
        rows = [q.turn_params(ccid, t, self.dialect) for t in turns]

        def write(tx: Transaction) -> None:
            tx.run(q.UPSERT_CALL, **params)
            tx.run(q.DELETE_TURNS, call_control_id=ccid)
            tx.run_many(q.INSERT_TURN, rows)

        await self._write(write)

    async def get_call(self, call_control_id: str) -> tuple[CallRecord, list[TurnEntry]] | None:
        def read(tx: Transaction) -> tuple[CallRecord, list[TurnEntry]] | None:
            row = tx.run(q.SELECT_CALL, call_control_id=call_control_id).fetchone()
            if row is None:
                return None
            turns = tx.run(q.SELECT_TURNS, call_control_id=call_control_id).fetchall()
            return (
                q.call_record(row, self.dialect),
                [q.turn_entry(t, self.dialect) for t in turns],
            )

        return await self._read(read)

    async def delete_call(self, call_control_id: str) -> bool:
        def write(tx: Transaction) -> bool:
            tx.run(q.DELETE_TURNS, call_control_id=call_control_id)
            tx.run(q.DELETE_TOOL_CALLS, call_control_id=call_control_id)
            return tx.run(q.DELETE_CALL, call_control_id=call_control_id).rowcount == 1

        return await self._write(write)

    async def save_tool_call(self, entry: ToolCallEntry) -> None:
        await self._write_one(q.INSERT_TOOL_CALL, **q.tool_call_params(entry, self.dialect))

    async def get_tool_calls(self, call_control_id: str) -> list[ToolCallEntry]:
        def read(tx: Transaction) -> list[ToolCallEntry]:
            rows = tx.run(q.SELECT_TOOL_CALLS, call_control_id=call_control_id).fetchall()
            return [q.tool_call_entry(r, self.dialect) for r in rows]

        return await self._read(read)

    async def count_calls(self) -> CallCounts:
        def read(tx: Transaction) -> CallCounts:
            active, total = tx.run(q.COUNT_CALLS).fetchone()
            return CallCounts(int(active), int(total))

        return await self._read(read)

    async def _list(self, query: CallQuery) -> list[CallRecord]:
        template, params = q.list_calls(query, self.dialect)

        def read(tx: Transaction) -> list[CallRecord]:
            rows = tx.run(template, **params).fetchall()
            return [q.call_record(r, self.dialect) for r in rows]

        return await self._read(read)

    async def _claim(self, event_id: str) -> bool:
        def write(tx: Transaction) -> bool:
            cur = tx.run(q.CLAIM_EVENT, event_id=event_id, event_ttl=self.event_ttl)
            return cur.rowcount == 1

        return await self._write(write)

    async def _sweep(self) -> None:
        def write(tx: Transaction) -> None:
            tx.run(q.FORGET_EVENTS, event_ttl=self.event_ttl)
            tx.run(q.FORGET_STATES, state_ttl=STATE_TTL)

        await self._write(write)

    async def load_state(self, call_control_id: str) -> CallState | None:
        def read(tx: Transaction) -> CallState | None:
            row = tx.run(q.SELECT_STATE, call_control_id=call_control_id).fetchone()
            return None if row is None else CallState(self.dialect.load_json(row[0]), row[1])

        return await self._read(read)

    async def save_state(
        self, call_control_id: str, state: dict[str, Any], *, expected_version: int | None
    ) -> int:
        if not isinstance(state, dict):
            raise TypeError("call state must be a dict")
        data = self.dialect.dump_json(state)

        def write(tx: Transaction) -> int:
            if expected_version is None:
                cur = tx.run(q.INSERT_STATE, call_control_id=call_control_id, data=data)
            else:
                cur = tx.run(
                    q.UPDATE_STATE,
                    call_control_id=call_control_id,
                    data=data,
                    expected_version=expected_version,
                )
            if cur.rowcount == 1:
                return 1 if expected_version is None else expected_version + 1
            row = tx.run(q.SELECT_STATE_VERSION, call_control_id=call_control_id).fetchone()
            raise StaleState(call_control_id, expected_version, None if row is None else row[0])

        return await self._write(write)

    async def delete_state(self, call_control_id: str) -> None:
        await self._write_one(q.DELETE_STATE, call_control_id=call_control_id)

    async def register_instance(self, instance_id: str, name: str) -> None:
        def write(tx: Transaction) -> None:
            tx.run(q.DELETE_INSTANCES_NAMED, name=name)
            tx.run(q.INSERT_INSTANCE, instance_id=instance_id, name=name)

        await self._write(write)

    async def heartbeat(self, instance_id: str, name: str) -> None:
        await self._write_one(q.HEARTBEAT, instance_id=instance_id, name=name)

    async def forget_instance(self, instance_id: str) -> None:
        await self._write_one(q.DELETE_INSTANCE, instance_id=instance_id)

    async def end_orphaned_calls(self, stale_after: float, idle_after: float) -> list[str]:
        def write(tx: Transaction) -> list[str]:
            rows = tx.run(
                q.END_ORPHANED_CALLS,
                end_reason=SERVER_LOST,
                stale_after=stale_after,
                idle_after=idle_after,
            ).fetchall()
            tx.run(q.FORGET_INSTANCES, state_ttl=STATE_TTL)
            return sorted(row[0] for row in rows)

        return await self._write(write)
