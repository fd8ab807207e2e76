"""The call store, both backends against real servers: a SQLite file, and PostgreSQL on
127.0.0.1:5432 (a database made for each test and dropped after). Without a reachable
PostgreSQL server the PostgreSQL cases skip, saying so."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from conftest import make_settings

from voice_trio.config import ConfigError, Settings
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.store import (
    CallRecord,
    CallStore,
    PostgresStore,
    SqliteStore,
    StaleState,
    StoreError,
    ToolCallEntry,
    TurnEntry,
    open_store,
)
from voice_trio.store.schema import LATEST

# The admin connection that makes and drops test databases; override for another server.
PG_ADMIN = os.environ.get(
    "VOICE_TRIO_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)

StoreFactory = Callable[..., CallStore]


def _admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        pytest.skip(
            f"PostgreSQL not reachable ({PG_ADMIN}): PostgreSQL store tests skipped: {reason}"
        )


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh, uniquely named database; dropped (sessions forced out) afterwards."""
    name = f"voice_trio_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
        params = admin.info.get_parameters()
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    user = params.get("user", "postgres")
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes unopened stores on one database: each is "another server instance"."""
    if request.param == "sqlite":
        return partial(SqliteStore, tmp_path / "calls.sqlite3")
    dsn = request.getfixturevalue("pg_dsn")
    return partial(PostgresStore, dsn, 3)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[CallStore]:
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


def record(ccid: str = "v3:call-1", **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "direction": "outbound",
        "from_number": "+5716000000",
        "to_number": "+573001234567",
        "call_session_id": "sess-" + ccid,
        "nombre": "Ana María",
        "contexto": "Cita el martes 🦷",
        "created_at": 1_795_000_000.25,
    }
    values.update(fields)
    return CallRecord(ccid, **values)


def ended(rec: CallRecord, reason: str = "caller_hangup") -> CallRecord:
    rec.answered_at = rec.created_at + 2.5
    rec.ended_at = rec.created_at + 61.125
    rec.end_reason = reason
    rec.status = "ended"
    rec.stt_audio_seconds = 55.4
    rec.llm_input_tokens = 3120
    rec.llm_output_tokens = 210
    rec.tts_characters = 640
    return rec


def turns() -> list[TurnEntry]:
    origin = 1000.0
    greeting = TurnRecord(user_text="", kind="greeting", bot_text="Hola, ¿con quién hablo?")
    greeting.heard_text = greeting.bot_text
    greeting.t1, greeting.t3, greeting.t4, greeting.t5 = 1000.1, 1000.1, 1000.3, 1000.31
    reply = TurnRecord(user_text="Quiero mover mi cita", bot_text="Claro. ¿Para qué día?")
    reply.heard_text, reply.interrupted = "Claro.", True
    reply.t0, reply.t1, reply.t2, reply.t2s = 1005.0, 1005.002, 1005.4, 1005.55
    reply.t3, reply.t4, reply.t5 = 1005.551, 1005.7, 1005.703
    reply.tool_calls = ["end_call"]
    return [TurnEntry.from_turn(i, t, origin) for i, t in enumerate((greeting, reply))]


async def test_save_and_get_round_trip_with_turns(store: CallStore) -> None:
    assert await store.get_call("v3:nope") is None
    rec = record()
    await store.start_call(rec)
    got = await store.get_call(rec.call_control_id)
    assert got == (rec, [])
    ledger = turns()
    await store.save_call(ended(rec), ledger)
    got = await store.get_call(rec.call_control_id)
    assert got is not None
    assert got[0] == rec and got[0].status == "ended"
    assert got[1] == ledger
    reply = got[1][1]
    assert reply.interrupted and reply.heard_text == "Claro." and reply.tool_calls == ["end_call"]
    assert reply.t0 == 5000.0 and reply.t5 == 5703.0  # ms since the call's origin
    assert reply.overhead_ms == pytest.approx(2 + 1 + 3)
    assert reply.stages_ms()["t0-t5"] == 703.0


async def test_save_is_an_idempotent_upsert(store: CallStore) -> None:
    rec = ended(record())
    for _ in range(3):
        await store.save_call(rec, turns())
    got = await store.get_call(rec.call_control_id)
    assert got is not None and len(got[1]) == 2
    # A later save replaces the turns and the row; a late start_call keeps what is there.
    rec.end_reason = "bot_goodbye"
    await store.save_call(rec, turns()[:1])
    await store.start_call(record())
    got = await store.get_call(rec.call_control_id)
    assert got is not None
    assert got[0].end_reason == "bot_goodbye" and got[0].status == "ended"
    assert [t.kind for t in got[1]] == ["greeting"]
    assert (await store.list_calls()).calls == [rec]


async def test_list_pages_newest_first_without_gaps(store: CallStore) -> None:
    base = 1_795_000_000.0
    expected = []
    for i in range(23):
        rec = record(f"v3:call-{i:02}", created_at=base + i * 0.5)
        expected.append(rec)
        await store.start_call(rec)
    # Two calls created in the same microsecond: the id breaks the tie, none is skipped.
    for ccid in ("v3:tie-a", "v3:tie-b"):
        rec = record(ccid, created_at=base + 3.0)
        expected.append(rec)
        await store.start_call(rec)
    expected.sort(key=lambda r: (r.created_at, r.call_control_id), reverse=True)
    seen: list[CallRecord] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_calls(limit=7, cursor=cursor)
        pages += 1
        seen.extend(page.calls)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 4 and seen == expected
    assert (await store.list_calls()).calls == expected[:20]  # the default page


async def test_list_filters(store: CallStore) -> None:
    t = 1_795_000_000.0
    calls = [
        record("a", created_at=t, to_number="+573001111111"),
        ended(record("b", created_at=t + 60, to_number="+573002222222")),
        record("c", created_at=t + 120, direction="inbound", from_number="+573001111111"),
        ended(record("d", created_at=t + 180, to_number="+573001111111")),
    ]
    for rec in calls:
        await store.save_call(rec, [])

    async def ids(**filters: Any) -> list[str]:
        return [r.call_control_id for r in (await store.list_calls(**filters)).calls]

    assert await ids() == ["d", "c", "b", "a"]
    assert await ids(status="ended") == ["d", "b"]
    assert await ids(status="active") == ["c", "a"]
    assert await ids(phone="+573001111111") == ["d", "c", "a"]  # either party
    assert await ids(phone="+573009999999") == []
    assert await ids(since=t + 60) == ["d", "c", "b"]  # inclusive
    assert await ids(until=t + 120) == ["b", "a"]  # exclusive
    assert await ids(since=t + 30, until=t + 150, phone="+573001111111") == ["c"]
    page = await store.list_calls(limit=1, status="ended")
    assert [r.call_control_id for r in page.calls] == ["d"]
    rest = await store.list_calls(limit=1, status="ended", cursor=page.next_cursor)
    assert [r.call_control_id for r in rest.calls] == ["b"] and rest.next_cursor is None


async def test_calls_are_counted_across_instances(make_store: StoreFactory) -> None:
    """``/api/sessions/stats`` reads these: every instance's calls, active and all."""
    one, two = make_store(), make_store()
    await one.open()
    await two.open()
    try:
        assert await one.count_calls() == (0, 0)
        await one.start_call(record("v3:a"))
        await two.start_call(record("v3:b"))
        await two.save_call(ended(record("v3:c")), [])
        assert await one.count_calls() == (2, 3)
        await one.save_call(ended(record("v3:a")), [])
        counts = await two.count_calls()
        assert (counts.active, counts.total) == (1, 3)
    finally:
        await one.aclose()
        await two.aclose()


async def test_list_refuses_bad_arguments(store: CallStore) -> None:
    for bad in ({"limit": 0}, {"limit": 101}, {"status": "done"}, {"cursor": "garbage!"}):
        with pytest.raises(ValueError):
            await store.list_calls(**bad)


async def test_claim_event_once_across_instances(
    store: CallStore, make_store: StoreFactory
) -> None:
    other = make_store()
    await other.open()
    try:
        assert await store.claim_event("evt-1") is True
        assert await store.claim_event("evt-1") is False
        assert await other.claim_event("evt-1") is False  # a retry landing on another instance
        assert await other.claim_event("evt-2") is True
        assert await store.claim_event("evt-2") is False
        # Many deliveries of one id racing on two instances: exactly one wins.
        wins: list[bool] = []

        async def claim(s: CallStore) -> None:
            wins.append(await s.claim_event("evt-race"))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(claim, (store, other)[i % 2])
        assert wins.count(True) == 1 and len(wins) == 20
    finally:
        await other.aclose()


async def test_a_media_stream_is_claimed_once_across_instances(
    store: CallStore, make_store: StoreFactory
) -> None:
    """The first socket (or the decision that none will come) claims a call's stream; a
    second socket or a replay, on any instance, finds it claimed."""
    other = make_store()
    await other.open()
    try:
        assert await store.claim_event("v3:call-1") is True  # webhook ids are another kind
        assert await store.claim_stream("v3:call-1") is True
        assert await store.claim_stream("v3:call-1") is False
        assert await other.claim_stream("v3:call-1") is False
        assert await other.claim_stream("v3:call-2") is True
        wins: list[bool] = []

        async def claim(s: CallStore) -> None:
            wins.append(await s.claim_stream("v3:race"))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(claim, (store, other)[i % 2])
        assert wins.count(True) == 1 and len(wins) == 20
    finally:
        await other.aclose()


async def test_claimed_event_ids_expire(make_store: StoreFactory) -> None:
    s = make_store(event_ttl=0.2)
    await s.open()
    try:
        assert await s.claim_event("evt-old") is True
        assert await s.claim_event("evt-old") is False
        await trio.sleep(0.35)
        assert await s.claim_event("evt-old") is True  # remembered no longer than the TTL
        assert await s.claim_event("evt-old") is False
    finally:
        await s.aclose()


async def test_state_versions_refuse_stale_writes(
    store: CallStore, make_store: StoreFactory
) -> None:
    ccid = "v3:fallback-1"
    assert await store.load_state(ccid) is None
    with pytest.raises(StaleState) as missing:
        await store.save_state(ccid, {"x": 1}, expected_version=3)
    assert missing.value.actual is None
    v1 = await store.save_state(ccid, {"history": [], "turn": None}, expected_version=None)
    assert v1 == 1
    with pytest.raises(StaleState):
        await store.save_state(ccid, {"again": True}, expected_version=None)
    state = await store.load_state(ccid)
    assert state is not None and state.version == 1 and state.data["history"] == []
    v2 = await store.save_state(ccid, {"history": ["hola"], "ñ": "sí"}, expected_version=1)
    assert v2 == 2
    with pytest.raises(StaleState) as stale:
        await store.save_state(ccid, {"history": ["lost"]}, expected_version=1)
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    # Two instances read version 2 and both write: one wins, the other must re-read.
    other = make_store()
    await other.open()
    try:
        outcomes: list[str] = []

        async def write(s: CallStore, text: str) -> None:
            try:
                await s.save_state(ccid, {"history": ["hola", text]}, expected_version=2)
                outcomes.append("saved")
            except StaleState:
                outcomes.append("stale")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, store, "a")
            nursery.start_soon(write, other, "b")
        assert sorted(outcomes) == ["saved", "stale"]
        final = await other.load_state(ccid)
        assert final is not None and final.version == 3 and len(final.data["history"]) == 2
        await other.delete_state(ccid)
        assert await store.load_state(ccid) is None
        await store.delete_state(ccid)  # deleting nothing is fine
    finally:
        await other.aclose()


async def test_webhooks_alternating_between_instances_keep_one_history(
    store: CallStore, make_store: StoreFactory
) -> None:
    """The fallback mode's pattern: claim the event, read-modify-write the state, retry on
    a stale version. Deliveries alternate between two instances and some are repeated."""
    other = make_store()
    await other.open()
    ccid = "v3:fallback-2"

    async def on_webhook(s: CallStore, event_id: str, said: str) -> None:
        if not await s.claim_event(event_id):
            return
        while True:
            state = await s.load_state(ccid)
            data = {"history": []} if state is None else state.data
            data["history"].append(said)
            try:
                await s.save_state(
                    ccid, data, expected_version=None if state is None else state.version
                )
                return
            except StaleState:
                continue

    try:
        events = [(f"evt-{i}", f"frase {i}") for i in range(12)]
        async with trio.open_nursery() as nursery:
            for i, (event_id, said) in enumerate(events + events[::3]):
                nursery.start_soon(on_webhook, (store, other)[i % 2], event_id, said)
        state = await store.load_state(ccid)
        assert state is not None
        assert sorted(state.data["history"]) == sorted(said for _, said in events)
        assert state.version == 12
    finally:
        await other.aclose()


async def test_shielded_save_finishes_inside_a_cancelled_scope(store: CallStore) -> None:
    rec = ended(record("v3:cancelled"), reason="shutdown")
    with trio.CancelScope() as call_scope:
        call_scope.cancel()
        with trio.move_on_after(5) as save_scope:
            save_scope.shield = True
            await store.save_call(rec, turns())
        await trio.sleep(1)  # the call's own work stops here
    assert call_scope.cancelled_caught and not save_scope.cancelled_caught
    got = await store.get_call(rec.call_control_id)
    assert got is not None and got[0].end_reason == "shutdown" and len(got[1]) == 2


async def test_shielded_save_lands_when_queued_behind_a_busy_store(store: CallStore) -> None:
    """Cancelled while every worker slot is busy, the shielded save waits its turn."""
    rec = ended(record("v3:queued"))
    release = trio.Event()
    saved = trio.Event()

    async def busy(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with store.limiter:
            task_status.started()
            await release.wait()

    async def end_of_call(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as call_scope:
            task_status.started(call_scope)
            with trio.move_on_after(5) as save_scope:
                save_scope.shield = True
                await store.save_call(rec, [])
            saved.set()

    async with trio.open_nursery() as nursery:
        for _ in range(int(store.limiter.total_tokens)):
            await nursery.start(busy)
        call_scope = await nursery.start(end_of_call)
        call_scope.cancel()
        await trio.sleep(0.1)
        assert not saved.is_set()
        release.set()
    assert saved.is_set()
    assert await store.get_call(rec.call_control_id) is not None


async def test_migrations_are_idempotent_and_safe_to_race(make_store: StoreFactory) -> None:
    first = make_store()
    await first.open()
    await first.aclose()
    racers = [make_store() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for s in racers:
            nursery.start_soon(s.open)
    for s in racers:
        assert await s.claim_event(f"evt-{id(s)}") is True
        await s.aclose()
    assert _applied_versions(racers[0]) == list(range(1, LATEST + 1))


async def test_racing_first_start_on_an_empty_database(make_store: StoreFactory) -> None:
    racers = [make_store() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for s in racers:
            nursery.start_soon(s.open)
    await racers[0].save_call(record(), turns())
    assert await racers[3].get_call(record().call_control_id) is not None
    for s in racers:
        await s.aclose()
    assert _applied_versions(racers[0]) == list(range(1, LATEST + 1))


async def test_a_newer_schema_is_refused(make_store: StoreFactory) -> None:
    s = make_store()
    await s.open()
    await s.aclose()
    _execute(s, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'x', 0)")
    with pytest.raises(StoreError, match=r"\[999\]"):
        await make_store().open()


def _applied_versions(s: CallStore) -> list[int]:
    rows = _execute(s, "SELECT version FROM schema_migrations ORDER BY version")
    return [r[0] for r in rows]


def _execute(s: CallStore, sql: str) -> list[Any]:
    """Run SQL on the store's database behind its back, as an operator would."""
    if isinstance(s, SqliteStore):
        with sqlite3.connect(s.path) as conn:
            return conn.execute(sql).fetchall()
    assert isinstance(s, PostgresStore)
    sql = sql.replace("VALUES (999, 'x', 0)", "VALUES (999, 'x', now())")
    with psycopg.connect(s.pool.conninfo, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


async def test_open_store_picks_sqlite_by_default(tmp_path: Path) -> None:
    path = tmp_path / "default.sqlite3"
    async with open_store(make_settings(SQLITE_PATH=str(path))) as s:
        assert isinstance(s, SqliteStore) and s.backend == "sqlite"
        await s.start_call(record())
    assert path.is_file()
    async with open_store(make_settings(SQLITE_PATH=str(path))) as s:
        assert await s.get_call(record().call_control_id) is not None


async def test_open_store_picks_postgres_when_database_url_is_set(pg_dsn: str) -> None:
    with trio.CancelScope() as scope:
        async with open_store(make_settings(DATABASE_URL=pg_dsn)) as s:
            assert isinstance(s, PostgresStore) and s.backend == "postgres"
            await s.start_call(record())
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught
    assert s.pool.closed  # closed on the way out, even when cancelled


async def test_unreachable_postgres_is_a_clear_error_without_the_password() -> None:
    s = PostgresStore("postgresql://bob:hunter2@127.0.0.1:1/calls", 1, connect_timeout=0.5)
    with pytest.raises(StoreError) as err:
        await s.open()
    assert "127.0.0.1:1/calls" in str(err.value) and "hunter2" not in str(err.value)


def test_database_url_setting() -> None:
    url = "postgresql://voice:pa55word@db.internal:5432/voice"
    s = Settings.from_env({"DATABASE_URL": url}, None)
    assert s.database_url == url and url in s.secrets()
    assert "pa55word" not in str(s.describe())
    assert Settings.from_env({}, None).sqlite_path == "voice_trio.sqlite3"
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": "mysql://root:pw@db/voice"}, None)
    assert err.value.name == "DATABASE_URL" and "pw" not in str(err.value)


def test_records_refuse_unknown_values() -> None:
    with pytest.raises(ValueError, match="direction"):
        record(direction="sideways")
    with pytest.raises(ValueError, match="mode"):
        record(mode="telepathy")
    with pytest.raises(ValueError, match="kind"):
        TurnEntry(0, kind="monologue")


async def test_postgres_store_reconnects_after_the_server_drops_it(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn, 2)
    await s.open()
    try:
        await s.start_call(record())
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_dsn.rsplit("/", 1)[1],),
            )
        assert await s.get_call(record().call_control_id) is not None
    finally:
        await s.aclose()


async def test_calls_of_an_instance_that_died_are_ended_and_a_live_ones_are_kept(
    make_store: StoreFactory,
) -> None:
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        await first.register_instance("dead", "host-a:3000")
        await second.register_instance("alive", "host-b:3000")
        await first.start_call(record("v3:held-by-dead", holder="dead"))
        await first.start_call(record("v3:held-by-alive", holder="alive"))
        await first.start_call(record("v3:held-by-unknown", holder="never-registered"))
        await first.start_call(record("v3:shared-busy"))  # fallback mode: state is the truth
        await first.save_state("v3:shared-busy", {"n": 1}, expected_version=None)
        await first.start_call(record("v3:shared-gone"))
        await first.save_call(ended(record("v3:over", holder="dead")), [])

        # A restart on the same host and port: the earlier process is gone at once.
        await first.register_instance("dead-restarted", "host-a:3000")
        assert await second.end_orphaned_calls(stale_after=30, idle_after=900) == [
            "v3:held-by-dead",
            "v3:held-by-unknown",
            "v3:shared-gone",
        ]
        for ccid in ("v3:held-by-dead", "v3:held-by-unknown", "v3:shared-gone"):
            found = await second.get_call(ccid)
            assert found is not None
            rec = found[0]
            assert (rec.status, rec.end_reason) == ("ended", "server_lost")
            assert rec.ended_at is not None
        for ccid in ("v3:held-by-alive", "v3:shared-busy"):
            found = await second.get_call(ccid)
            assert found is not None and found[0].status == "active"
        over = await second.get_call("v3:over")
        assert over is not None and over[0].end_reason == "caller_hangup"  # untouched
        # Nothing left to end, until an instance stops being seen.
        assert await second.end_orphaned_calls(stale_after=30, idle_after=900) == []
        await trio.sleep(0.3)
        await first.heartbeat("dead-restarted", "host-a:3000")
        assert await second.end_orphaned_calls(stale_after=0.2, idle_after=900) == [
            "v3:held-by-alive"
        ]
        await second.forget_instance("alive")
    finally:
        await first.aclose()
        await second.aclose()


async def test_tool_calls_are_kept_with_or_without_the_call_row(store: CallStore) -> None:
    """A tool request is kept as it ended, even after (or without) the call's own row:
    a hang-up mid-request still leaves its record, and a repeated save keeps the first."""
    first = ToolCallEntry(
        call_control_id="v3:tools-1",
        tool_use_id="toolu_01",
        tool="free_slots",
        input={"fecha": "2026-12-07", "ñ": "sí"},
        status="ok",
        http_status=200,
        result='{"slots": []}',
        latency_ms=123.45,
        started_at=1_700_000_000.5,
    )
    late = ToolCallEntry(
        call_control_id="v3:tools-1",
        tool_use_id="toolu_02",
        tool="book_appointment",
        input={"slot_id": "x"},
        status="timeout",
        http_status=None,
        result="x" * 5000,
        latency_ms=3000.0,
        started_at=1_700_000_001.0,
        caller_on_line=False,
    )
    await store.save_tool_call(late)
    await store.save_tool_call(first)
    await store.save_tool_call(ToolCallEntry(**{**asdict(first), "status": "error"}))
    got = await store.get_tool_calls("v3:tools-1")
    assert [t.tool_use_id for t in got] == ["toolu_01", "toolu_02"]
    assert got[0] == first and got[0].input == {"fecha": "2026-12-07", "ñ": "sí"}
    assert got[1].status == "timeout" and got[1].http_status is None
    assert len(got[1].result) == ToolCallEntry.RESULT_CHARS and not got[1].caller_on_line
    assert await store.get_tool_calls("v3:other") == []
    with pytest.raises(ValueError, match="status"):
        ToolCallEntry("v3:x", "t", "tool", {}, "maybe", None, "", 1.0)
