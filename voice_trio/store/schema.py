"""The tables, and the migrations that build them, in both SQL dialects.

A migration is applied once, in order, inside the transaction that records it in
``schema_migrations``; each backend takes a lock first (PostgreSQL: a transaction-level
advisory lock; SQLite: ``BEGIN IMMEDIATE``), so instances starting together apply each
migration exactly once. Append new migrations; never edit one that has shipped.

Times: SQLite keeps epoch seconds (REAL); PostgreSQL keeps ``timestamptz``. Turn stamps are
milliseconds since the call's origin in both (see ``records``).
"""

from __future__ import annotations

from dataclasses import dataclass

from voice_trio.store.errors import StoreError

CALL_COLUMNS = (
    "call_control_id",
    "call_session_id",
    "direction",
    "from_number",
    "to_number",
    "nombre",
    "contexto",
    "created_at",
    "answered_at",
    "ended_at",
    "end_reason",
    "mode",
    "status",
    "stt_audio_seconds",
    "llm_input_tokens",
    "llm_output_tokens",
    "tts_characters",
    "holder",
)
CALL_TIMES = ("created_at", "answered_at", "ended_at")

TURN_COLUMNS = (
    "call_control_id",
    "idx",
    "kind",
    "user_text",
    "bot_text",
    "heard_text",
    "interrupted",
    "t0",
    "t1",
    "t2",
    "t2s",
    "t3",
    "t4",
    "t5",
    "overhead_ms",
    "tool_calls",
)

TOOL_CALL_COLUMNS = (
    "call_control_id",
    "tool_use_id",
    "tool",
    "input",
    "status",
    "http_status",
    "result",
    "latency_ms",
    "started_at",
    "caller_on_line",
)

# Any 64-bit number both backends agree on; it names the migration lock in pg_locks.
MIGRATION_LOCK = 0x766F_6963_6574_7269  # "voicetri"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, dialect: str) -> tuple[str, ...]:
        """This migration's DDL for ``dialect`` ("sqlite" or "postgres")."""
        return {"sqlite": self.sqlite, "postgres": self.postgres}[dialect]


def _calls(time: str, real: str, integer: str) -> str:
    return f"""
CREATE TABLE calls (
    call_control_id TEXT PRIMARY KEY,
    call_session_id TEXT NOT NULL DEFAULT '',
    direction TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_number TEXT NOT NULL DEFAULT '',
    to_number TEXT NOT NULL DEFAULT '',
    nombre TEXT NOT NULL DEFAULT '',
    contexto TEXT NOT NULL DEFAULT '',
    created_at {time} NOT NULL,
    answered_at {time},
    ended_at {time},
    end_reason TEXT,
    mode TEXT NOT NULL CHECK (mode IN ('media', 'fallback', 'degraded')),
    status TEXT NOT NULL CHECK (status IN ('active', 'ended')),
    stt_audio_seconds {real} NOT NULL DEFAULT 0,
    llm_input_tokens {integer} NOT NULL DEFAULT 0,
    llm_output_tokens {integer} NOT NULL DEFAULT 0,
    tts_characters {integer} NOT NULL DEFAULT 0
)"""


def _turns(real: str, boolean: str, json: str) -> str:
    stamps = ",\n    ".join(
        f"{name} {real}" for name in ("t0", "t1", "t2", "t2s", "t3", "t4", "t5")
    )
    return f"""
CREATE TABLE call_turns (
    call_control_id TEXT NOT NULL REFERENCES calls (call_control_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL CHECK (idx >= 0),
    kind TEXT NOT NULL,
    user_text TEXT NOT NULL DEFAULT '',
    bot_text TEXT NOT NULL DEFAULT '',
    heard_text TEXT NOT NULL DEFAULT '',
    interrupted {boolean} NOT NULL DEFAULT FALSE,
    {stamps},
    overhead_ms {real},
    tool_calls {json} NOT NULL,
    PRIMARY KEY (call_control_id, idx)
)"""


def _shared(time: str, json: str) -> tuple[str, ...]:
    return (
        f"CREATE TABLE webhook_events (event_id TEXT PRIMARY KEY, seen_at {time} NOT NULL)",
        "CREATE INDEX webhook_events_seen_at ON webhook_events (seen_at)",
        f"""
CREATE TABLE call_states (
    call_control_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 1),
    data {json} NOT NULL,
    updated_at {time} NOT NULL
)""",
        "CREATE INDEX call_states_updated_at ON call_states (updated_at)",
    )


_INDEXES = (
    "CREATE INDEX calls_newest ON calls (created_at DESC, call_control_id DESC)",
    "CREATE INDEX calls_from_number ON calls (from_number, created_at DESC)",
    "CREATE INDEX calls_to_number ON calls (to_number, created_at DESC)",
    "CREATE INDEX calls_status ON calls (status, created_at DESC)",
)


def _instances(time: str) -> tuple[str, ...]:
    # ``calls.holder``: the instance whose process runs the call (a media call); NULL when
    # the call's state lives in ``call_states`` (fallback mode) and any instance carries it.
    return (
        "ALTER TABLE calls ADD COLUMN holder TEXT",
        f"""
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    started_at {time} NOT NULL,
    seen_at {time} NOT NULL
)""",
        "CREATE INDEX instances_name ON instances (name)",
    )


def _tool_calls(time: str, real: str, boolean: str, json: str) -> tuple[str, ...]:
    # No foreign key to calls: a request may end after a call whose row the store never got.
    return (
        f"""
CREATE TABLE call_tool_calls (
    call_control_id TEXT NOT NULL,
    tool_use_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    input {json} NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error', 'timeout')),
    http_status INTEGER,
    result TEXT NOT NULL DEFAULT '',
    latency_ms {real} NOT NULL,
    started_at {time} NOT NULL,
    caller_on_line {boolean} NOT NULL DEFAULT TRUE,
    PRIMARY KEY (call_control_id, tool_use_id)
)""",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "calls, turns, webhook events, fallback call state",
        sqlite=(
            _calls("REAL", "REAL", "INTEGER"),
            _turns("REAL", "INTEGER", "TEXT"),
            *_INDEXES,
            *_shared("REAL", "TEXT"),
        ),
        postgres=(
            _calls("TIMESTAMPTZ", "DOUBLE PRECISION", "BIGINT"),
            _turns("DOUBLE PRECISION", "BOOLEAN", "JSONB"),
            *_INDEXES,
            *_shared("TIMESTAMPTZ", "JSONB"),
        ),
    ),
    Migration(
        2,
        "instances and the calls they hold, so a dead instance's calls can be ended",
        sqlite=_instances("REAL"),
        postgres=_instances("TIMESTAMPTZ"),
    ),
    Migration(
        3,
        "the requests calls made to operators' HTTP tools",
        sqlite=_tool_calls("REAL", "REAL", "INTEGER", "TEXT"),
        postgres=_tool_calls("TIMESTAMPTZ", "DOUBLE PRECISION", "BOOLEAN", "JSONB"),
    ),
)

CREATE_MIGRATIONS_TABLE = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)""",
    "postgres": """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)""",
}


def pending(applied: set[int]) -> list[Migration]:
    """Migrations not yet applied, oldest first. A database newer than this code (a
    version we do not know) is refused: running old code on it could corrupt it."""
    known = {m.version for m in MIGRATIONS}
    unknown = sorted(applied - known)
    if unknown:
        raise StoreError(
            f"the database has schema versions {unknown} that this voice-trio does not know; "
            "upgrade voice-trio"
        )
    return [m for m in MIGRATIONS if m.version not in applied]


LATEST = MIGRATIONS[-1].version
