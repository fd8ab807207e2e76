"""PostgreSQL backend: one store shared by many server instances (DESIGN.md §4).

psycopg 3's async API needs asyncio, so this uses the sync driver and its
``ConnectionPool`` from Trio's worker threads, with a ``CapacityLimiter`` as wide as the pool:
a Trio task never holds a thread that is only waiting for a free connection.

Shared state needs no instance clock: webhook ids and call states are stamped with the
server's ``now()``. Races between instances resolve in the database: a webhook id is claimed
by a single ``INSERT ... ON CONFLICT``, and a state update only applies to the version it
was read at (``UPDATE ... WHERE version = %s``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from voice_trio.store.errors import StaleState, StoreError
from voice_trio.store.notify import MAX_PAYLOAD_BYTES, Listener
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
)
from voice_trio.store.schema import (
    CALL_COLUMNS,
    CALL_TIMES,
    COUNT_CALLS,
    CREATE_MIGRATIONS_TABLE,
    END_ORPHANED_CALLS,
    MIGRATION_LOCK,
    TURN_COLUMNS,
    pending,
)

DEFAULT_POOL_SIZE = 5
CONNECT_TIMEOUT = 10.0  # seconds open() waits for the first connection

_UPSERT_CALL = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in CALL_COLUMNS[1:])
)
_INSERT_CALL = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO NOTHING"
)
_INSERT_TURN = (
    f"INSERT INTO call_turns ({', '.join(TURN_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in TURN_COLUMNS)})"
)
_SELECT_CALLS = f"SELECT {', '.join(CALL_COLUMNS)} FROM calls"


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresStore(CallStore):
    backend = "postgres"
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
            with self.pool.connection() as conn, conn.transaction():
                # Held until commit: a second instance starting now waits here, then finds
                # every migration applied.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(CREATE_MIGRATIONS_TABLE["postgres"])
                applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                for migration in pending(applied):
                    for statement in migration.postgres:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
        except BaseException:
            self.pool.close()
            raise

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.pool.close)

    async def start_call(self, record: CallRecord) -> None:
        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute(_INSERT_CALL, _call_params(record))

        await self._run(write)

    async def save_call(self, record: CallRecord, turns: list[TurnEntry]) -> None:
        rows = [_turn_params(record.call_control_id, t) for t in turns]

        def write() -> None:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute(_UPSERT_CALL, _call_params(record))
                conn.execute(
                    "DELETE FROM call_turns WHERE call_control_id = %s", (record.call_control_id,)
                )
                if rows:
                    conn.cursor().executemany(_INSERT_TURN, rows)

        await self._run(write)

    async def get_call(self, call_control_id: str) -> tuple[CallRecord, list[TurnEntry]] | None:
        def read() -> tuple[CallRecord, list[TurnEntry]] | None:
            with self.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                row = cur.execute(
                    f"{_SELECT_CALLS} WHERE call_control_id = %s", (call_control_id,)
                ).fetchone()
                if row is None:
                    return None
                turns = cur.execute(
                    f"SELECT {', '.join(TURN_COLUMNS)} FROM call_turns "
                    "WHERE call_control_id = %s ORDER BY idx",
                    (call_control_id,),
                ).fetchall()
            return _record(row), [_turn(t) for t in turns]

        return await self._run(read)

    async def count_calls(self) -> CallCounts:
        def read() -> CallCounts:
            with self.pool.connection() as conn:
                active, total = conn.execute(COUNT_CALLS).fetchone()  # type: ignore[misc]
            return CallCounts(int(active), int(total))

        return await self._run(read)

    async def _list(self, query: CallQuery) -> list[CallRecord]:
        where: list[str] = []
        params: list[Any] = []
        if query.after is not None:
            where.append("(created_at, call_control_id) < (%s, %s)")
            params.extend((_time(query.after[0]), query.after[1]))
        if query.since is not None:
            where.append("created_at >= %s")
            params.append(_time(query.since))
        if query.until is not None:
            where.append("created_at < %s")
            params.append(_time(query.until))
        if query.status is not None:
            where.append("status = %s")
            params.append(query.status)
        if query.phone is not None:
            where.append("(from_number = %s OR to_number = %s)")
            params.extend((query.phone, query.phone))
        sql = _SELECT_CALLS
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, call_control_id DESC LIMIT %s"
        params.append(query.limit + 1)

        def read() -> list[CallRecord]:
            with self.pool.connection() as conn:
                rows = conn.cursor(row_factory=dict_row).execute(sql, params).fetchall()
            return [_record(r) for r in rows]

        return await self._run(read)

    async def _claim(self, event_id: str) -> bool:
        def write() -> bool:
            with self.pool.connection() as conn:
                cur = conn.execute(
                    "INSERT INTO webhook_events (event_id, seen_at) VALUES (%s, now()) "
                    "ON CONFLICT (event_id) DO UPDATE SET seen_at = excluded.seen_at "
                    "WHERE webhook_events.seen_at < now() - make_interval(secs => %s)",
                    (event_id, self.event_ttl),
                )
                return cur.rowcount == 1

        return await self._run(write)

    async def _sweep(self) -> None:
        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute(
                    "DELETE FROM webhook_events WHERE seen_at < now() - make_interval(secs => %s)",
                    (self.event_ttl,),
                )
                conn.execute(
                    "DELETE FROM call_states WHERE updated_at < now() - make_interval(secs => %s)",
                    (STATE_TTL,),
                )

        await self._run(write)

    async def load_state(self, call_control_id: str) -> CallState | None:
        def read() -> CallState | None:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT data, version FROM call_states WHERE call_control_id = %s",
                    (call_control_id,),
                ).fetchone()
            return None if row is None else CallState(row[0], row[1])

        return await self._run(read)

    async def save_state(
        self, call_control_id: str, state: dict[str, Any], *, expected_version: int | None
    ) -> int:
        if not isinstance(state, dict):
            raise TypeError("call state must be a dict")
        data = Jsonb(state)

        def write() -> int:
            with self.pool.connection() as conn, conn.transaction():
                if expected_version is None:
                    cur = conn.execute(
                        "INSERT INTO call_states (call_control_id, version, data, updated_at) "
                        "VALUES (%s, 1, %s, now()) ON CONFLICT (call_control_id) DO NOTHING",
                        (call_control_id, data),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE call_states SET data = %s, version = version + 1, "
                        "updated_at = now() WHERE call_control_id = %s AND version = %s",
                        (data, call_control_id, expected_version),
                    )
                if cur.rowcount == 1:
                    return 1 if expected_version is None else expected_version + 1
                row = conn.execute(
                    "SELECT version FROM call_states WHERE call_control_id = %s",
                    (call_control_id,),
                ).fetchone()
            raise StaleState(call_control_id, expected_version, None if row is None else row[0])

        return await self._run(write)

    async def delete_state(self, call_control_id: str) -> None:
        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute(
                    "DELETE FROM call_states WHERE call_control_id = %s", (call_control_id,)
                )

        await self._run(write)

    def listener(self, channel: str) -> Listener:
        return Listener(self._dsn, channel, self.where)

    async def notify(self, channel: str, payload: str) -> None:
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a notification carries at most {MAX_PAYLOAD_BYTES} bytes")

        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

        await self._run(write)

    async def register_instance(self, instance_id: str, name: str) -> None:
        def write() -> None:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("DELETE FROM instances WHERE name = %s", (name,))
                conn.execute(
                    "INSERT INTO instances (instance_id, name, started_at, seen_at) "
                    "VALUES (%s, %s, now(), now())",
                    (instance_id, name),
                )

        await self._run(write)

    async def heartbeat(self, instance_id: str, name: str) -> None:
        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute(
                    "INSERT INTO instances (instance_id, name, started_at, seen_at) "
                    "VALUES (%s, %s, now(), now()) "
                    "ON CONFLICT (instance_id) DO UPDATE SET seen_at = excluded.seen_at",
                    (instance_id, name),
                )

        await self._run(write)

    async def forget_instance(self, instance_id: str) -> None:
        def write() -> None:
            with self.pool.connection() as conn:
                conn.execute("DELETE FROM instances WHERE instance_id = %s", (instance_id,))

        await self._run(write)

    async def end_orphaned_calls(self, stale_after: float, idle_after: float) -> list[str]:
        def write() -> list[str]:
            with self.pool.connection() as conn, conn.transaction():
                # One clock for the whole deployment: the database's.
                (now,) = conn.execute("SELECT now()").fetchone()  # type: ignore[misc]
                rows = conn.execute(
                    END_ORPHANED_CALLS.format(p="%s"),
                    (
                        SERVER_LOST,
                        now,
                        now - timedelta(seconds=stale_after),
                        now - timedelta(seconds=idle_after),
                    ),
                ).fetchall()
                conn.execute(
                    "DELETE FROM instances WHERE seen_at < %s",
                    (now - timedelta(seconds=STATE_TTL),),
                )
            return sorted(row[0] for row in rows)

        return await self._run(write)


def _time(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _call_params(record: CallRecord) -> dict[str, Any]:
    params = {c: getattr(record, c) for c in CALL_COLUMNS}
    for c in CALL_TIMES:
        params[c] = _time(params[c])
    return params


def _turn_params(call_control_id: str, turn: TurnEntry) -> dict[str, Any]:
    return {
        "call_control_id": call_control_id,
        "idx": turn.index,
        **{c: getattr(turn, c) for c in TURN_COLUMNS[2:-1]},
        "tool_calls": Jsonb(turn.tool_calls),
    }


def _record(row: dict[str, Any]) -> CallRecord:
    values = dict(row)
    for c in CALL_TIMES:
        values[c] = _epoch(values[c])
    return CallRecord(**values)


def _turn(row: dict[str, Any]) -> TurnEntry:
    values = {c: row[c] for c in TURN_COLUMNS[2:]}
    return TurnEntry(index=row["idx"], **values)
