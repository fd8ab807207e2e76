"""The SQL of every store operation, written once for SQLite and PostgreSQL, and the mapping
between their rows and the store's records.

The statements are templates (``dialect``): where the two databases differ, a slot stands
(``{name}`` a parameter, ``{now}`` the current time, ``{name:seconds}`` a span to take from
it). Everything else is the same text in both: ``ON CONFLICT ... DO NOTHING / DO UPDATE``,
``excluded.``, row-value comparisons, ``RETURNING``.

Rows are read by position, in the order of the columns selected (``schema``). Values kept
differently are converted by the dialect: times (epoch REAL or ``timestamptz``) and JSON
(TEXT or JSONB). Booleans need nothing: SQLite keeps 1/0, which ``sqlite3`` binds for a
Python bool and ``bool()`` reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from voice_trio.store.dialect import Dialect
from voice_trio.store.records import CallQuery, CallRecord, ToolCallEntry, TurnEntry
from voice_trio.store.schema import CALL_COLUMNS, CALL_TIMES, TOOL_CALL_COLUMNS, TURN_COLUMNS


def _slots(columns: Sequence[str]) -> str:
    return ", ".join("{" + c + "}" for c in columns)


_CALLS = ", ".join(CALL_COLUMNS)
_TURNS = ", ".join(TURN_COLUMNS)

INSERT_CALL = (
    f"INSERT INTO calls ({_CALLS}) VALUES ({_slots(CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO NOTHING"
)
UPSERT_CALL = (
    f"INSERT INTO calls ({_CALLS}) VALUES ({_slots(CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in CALL_COLUMNS[1:])
)
DELETE_TURNS = "DELETE FROM call_turns WHERE call_control_id = {call_control_id}"
DELETE_TOOL_CALLS = "DELETE FROM call_tool_calls WHERE call_control_id = {call_control_id}"
DELETE_CALL = "DELETE FROM calls WHERE call_control_id = {call_control_id}"
INSERT_TURN = f"INSERT INTO call_turns ({_TURNS}) VALUES ({_slots(TURN_COLUMNS)})"
_TOOL_CALLS = ", ".join(TOOL_CALL_COLUMNS)
# A request kept twice (a retried save) keeps its first row.
INSERT_TOOL_CALL = (
    f"INSERT INTO call_tool_calls ({_TOOL_CALLS}) VALUES ({_slots(TOOL_CALL_COLUMNS)}) "
    "ON CONFLICT (call_control_id, tool_use_id) DO NOTHING"
)
SELECT_TOOL_CALLS = (
    f"SELECT {_TOOL_CALLS} FROM call_tool_calls "
    + "WHERE call_control_id = {call_control_id} ORDER BY started_at, tool_use_id"
)
SELECT_CALLS = f"SELECT {_CALLS} FROM calls"
SELECT_CALL = SELECT_CALLS + " WHERE call_control_id = {call_control_id}"
SELECT_TURNS = (
    f"SELECT {_TURNS} FROM call_turns " + "WHERE call_control_id = {call_control_id} ORDER BY idx"
)
# One pass over the table (the status index does not cover the total), fine for the stats
# route's occasional reads.
COUNT_CALLS = (
    "SELECT COALESCE(SUM(CASE WHEN status = 'active' THEN 1 ELSE 0 END), 0), count(*) FROM calls"
)

# ``list_calls``: the filters that are set, in this order, joined by AND.
LIST_FILTERS = {
    "after": "(created_at, call_control_id) < ({after_created_at}, {after_call_control_id})",
    "since": "created_at >= {since}",
    "until": "created_at < {until}",
    "status": "status = {status}",
    "phone": "(from_number = {phone} OR to_number = {phone})",
    "end_reason": "end_reason = {end_reason}",
}
LIST_ORDER = " ORDER BY created_at DESC, call_control_id DESC LIMIT {limit}"

CLAIM_EVENT = (
    "INSERT INTO webhook_events (event_id, seen_at) VALUES ({event_id}, {now}) "
    "ON CONFLICT (event_id) DO UPDATE SET seen_at = excluded.seen_at "
    "WHERE webhook_events.seen_at < {now} - {event_ttl:seconds}"
)
FORGET_EVENTS = "DELETE FROM webhook_events WHERE seen_at < {now} - {event_ttl:seconds}"
FORGET_STATES = "DELETE FROM call_states WHERE updated_at < {now} - {state_ttl:seconds}"

SELECT_STATE = "SELECT data, version FROM call_states WHERE call_control_id = {call_control_id}"
SELECT_STATE_VERSION = "SELECT version FROM call_states WHERE call_control_id = {call_control_id}"
INSERT_STATE = (
    "INSERT INTO call_states (call_control_id, version, data, updated_at) "
    "VALUES ({call_control_id}, 1, {data}, {now}) ON CONFLICT (call_control_id) DO NOTHING"
)
UPDATE_STATE = (
    "UPDATE call_states SET data = {data}, version = version + 1, updated_at = {now} "
    "WHERE call_control_id = {call_control_id} AND version = {expected_version}"
)
DELETE_STATE = "DELETE FROM call_states WHERE call_control_id = {call_control_id}"

DELETE_INSTANCES_NAMED = "DELETE FROM instances WHERE name = {name}"
INSERT_INSTANCE = (
    "INSERT INTO instances (instance_id, name, started_at, seen_at) "
    "VALUES ({instance_id}, {name}, {now}, {now})"
)
HEARTBEAT = INSERT_INSTANCE + (
    " ON CONFLICT (instance_id) DO UPDATE SET seen_at = excluded.seen_at"
)
DELETE_INSTANCE = "DELETE FROM instances WHERE instance_id = {instance_id}"
FORGET_INSTANCES = "DELETE FROM instances WHERE seen_at < {now} - {state_ttl:seconds}"

# ``CallStore.end_orphaned_calls``: one ``now`` for the whole transaction (PostgreSQL's
# ``now()`` is the transaction's start; SQLite's is bound once).
END_ORPHANED_CALLS = """
UPDATE calls SET status = 'ended', end_reason = {end_reason}, ended_at = {now}
WHERE status = 'active' AND (
    (holder IS NOT NULL AND holder NOT IN (
        SELECT instance_id FROM instances WHERE seen_at >= {now} - {stale_after:seconds}))
    OR (holder IS NULL AND NOT EXISTS (
        SELECT 1 FROM call_states s
        WHERE s.call_control_id = calls.call_control_id
        AND s.updated_at >= {now} - {idle_after:seconds})))
RETURNING call_control_id"""

SELECT_MIGRATIONS = "SELECT version FROM schema_migrations"
RECORD_MIGRATION = (
    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({version}, {name}, {now})"
)


def list_calls(query: CallQuery, dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """The template and parameters of one ``list_calls`` page (``query.limit + 1`` rows)."""
    where = [sql for name, sql in LIST_FILTERS.items() if getattr(query, name) is not None]
    template = SELECT_CALLS + (" WHERE " + " AND ".join(where) if where else "") + LIST_ORDER
    params: dict[str, Any] = {
        "status": query.status,
        "phone": query.phone,
        "end_reason": query.end_reason,
        "limit": query.limit + 1,
    }
    if query.after is not None:
        params["after_created_at"] = dialect.dump_time(query.after[0])
        params["after_call_control_id"] = query.after[1]
    for name in ("since", "until"):
        moment = getattr(query, name)
        params[name] = None if moment is None else dialect.dump_time(moment)
    return template, params


def call_params(record: CallRecord, dialect: Dialect) -> dict[str, Any]:
    params = {c: getattr(record, c) for c in CALL_COLUMNS}
    for c in CALL_TIMES:
        if params[c] is not None:
            params[c] = dialect.dump_time(params[c])
    return params


def call_record(row: Sequence[Any], dialect: Dialect) -> CallRecord:
    """The record of a row of ``SELECT_CALLS``."""
    values = dict(zip(CALL_COLUMNS, row, strict=True))
    for c in CALL_TIMES:
        if values[c] is not None:
            values[c] = dialect.load_time(values[c])
    return CallRecord(**values)


def turn_params(call_control_id: str, turn: TurnEntry, dialect: Dialect) -> dict[str, Any]:
    return {
        "call_control_id": call_control_id,
        "idx": turn.index,
        **{c: getattr(turn, c) for c in TURN_COLUMNS[2:-1]},
        "tool_calls": dialect.dump_json(turn.tool_calls),
    }


def turn_entry(row: Sequence[Any], dialect: Dialect) -> TurnEntry:
    """The entry of a row of ``SELECT_TURNS``."""
    values = dict(zip(TURN_COLUMNS, row, strict=True))
    del values["call_control_id"]
    values["interrupted"] = bool(values["interrupted"])
    values["tool_calls"] = dialect.load_json(values["tool_calls"])
    return TurnEntry(index=values.pop("idx"), **values)


def tool_call_params(entry: ToolCallEntry, dialect: Dialect) -> dict[str, Any]:
    params = {c: getattr(entry, c) for c in TOOL_CALL_COLUMNS}
    params["input"] = dialect.dump_json(entry.input)
    params["started_at"] = dialect.dump_time(entry.started_at)
    return params


def tool_call_entry(row: Sequence[Any], dialect: Dialect) -> ToolCallEntry:
    """The entry of a row of ``SELECT_TOOL_CALLS``."""
    values = dict(zip(TOOL_CALL_COLUMNS, row, strict=True))
    values["input"] = dialect.load_json(values["input"])
    values["started_at"] = dialect.load_time(values["started_at"])
    values["caller_on_line"] = bool(values["caller_on_line"])
    return ToolCallEntry(**values)
