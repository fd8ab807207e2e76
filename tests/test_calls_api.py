"""``GET /api/calls`` and ``GET /api/calls/<id>`` on a live server over a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import LiveServer, start_server

from voice_trio.store import CallRecord, SqliteStore, TurnEntry
from voice_trio.web.calls_api import InvalidQuery, parse_list_query

TOKEN = "calls-api-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2026, 11, 19, 8, 0, tzinfo=UTC).timestamp()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "api.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def serve(nursery: trio.Nursery, store: SqliteStore | None, tmp_path: Path) -> LiveServer:
    server = await start_server(
        nursery, {"API_TOKEN": TOKEN, "SQLITE_PATH": str(tmp_path / "unused.sqlite3")}
    )
    server.app.center.store = store  # type: ignore[attr-defined]
    server.client.headers.update(AUTH)
    return server


async def seed(store: SqliteStore, count: int) -> list[CallRecord]:
    records = []
    for i in range(count):
        rec = CallRecord(
            f"v3:call-{i:02}",
            direction="inbound" if i % 3 == 0 else "outbound",
            from_number="+573001111111" if i % 2 else "+5716000000",
            to_number="+5716000000" if i % 2 else "+573002222222",
            nombre=f"Cliente {i}",
            created_at=T0 + i * 60,
        )
        if i % 2:
            rec.answered_at = rec.created_at + 3
            rec.ended_at = rec.created_at + 33.5
            rec.status, rec.end_reason = "ended", "caller_hangup"
        await store.save_call(rec, [])
        records.append(rec)
    return records


async def test_calls_need_the_api_token(
    nursery: trio.Nursery, store: SqliteStore, tmp_path: Path
) -> None:
    server = await serve(nursery, store, tmp_path)
    await seed(store, 1)
    for path in ("/api/calls", "/api/calls/v3:call-00"):
        r = await server.client.get(path, headers={"Authorization": ""})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = await server.client.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await server.client.get(path)).status_code == 200
    server.stop.set()


async def test_list_pages_newest_first(
    nursery: trio.Nursery, store: SqliteStore, tmp_path: Path
) -> None:
    server = await serve(nursery, store, tmp_path)
    records = await seed(store, 7)
    first = (await server.client.get("/api/calls", params={"limit": 3})).json()
    assert [c["call_control_id"] for c in first["calls"]] == [
        "v3:call-06",
        "v3:call-05",
        "v3:call-04",
    ]
    call = first["calls"][1]
    assert call == {
        "call_control_id": "v3:call-05",
        "call_session_id": "",
        "direction": "outbound",
        "from": "+573001111111",
        "to": "+5716000000",
        "nombre": "Cliente 5",
        "contexto": "",
        "status": "ended",
        "mode": "media",
        "created_at": "2026-11-19T08:05:00.000Z",
        "answered_at": "2026-11-19T08:05:03.000Z",
        "ended_at": "2026-11-19T08:05:33.500Z",
        "duration_seconds": 30.5,
        "end_reason": "caller_hangup",
        "usage": {
            "stt_audio_seconds": 0.0,
            "llm_input_tokens": 0,
            "llm_output_tokens": 0,
            "tts_characters": 0,
        },
    }
    seen = [c["call_control_id"] for c in first["calls"]]
    cursor = first["next_cursor"]
    while cursor:
        page = (await server.client.get("/api/calls", params={"limit": 3, "cursor": cursor})).json()
        seen += [c["call_control_id"] for c in page["calls"]]
        cursor = page["next_cursor"]
    assert seen == [r.call_control_id for r in reversed(records)]
    everything = (await server.client.get("/api/calls")).json()
    assert len(everything["calls"]) == 7 and everything["next_cursor"] is None
    server.stop.set()


async def test_list_filters(nursery: trio.Nursery, store: SqliteStore, tmp_path: Path) -> None:
    server = await serve(nursery, store, tmp_path)
    await seed(store, 6)

    async def ids(**params: Any) -> list[str]:
        r = await server.client.get("/api/calls", params=params)
        assert r.status_code == 200, r.text
        return [c["call_control_id"][-2:] for c in r.json()["calls"]]

    assert await ids(status="ended") == ["05", "03", "01"]
    assert await ids(status="ACTIVE") == ["04", "02", "00"]
    assert await ids(phone="+573002222222") == ["04", "02", "00"]
    assert await ids(phone="573001111111") == ["05", "03", "01"]
    # An unescaped "+" arrives as a space; it still means the E.164 number.
    r = await server.client.get("/api/calls?phone=+573001111111")
    assert [c["call_control_id"][-2:] for c in r.json()["calls"]] == ["05", "03", "01"]
    assert await ids(since="2026-11-19T08:03:00Z") == ["05", "04", "03"]
    assert await ids(until=str(T0 + 120)) == ["01", "00"]
    # Without an offset a time is read in TIMEZONE (America/Bogota, UTC-5).
    assert await ids(since="2026-11-19T03:01:00", until="2026-11-19T08:04:00+00:00") == [
        "03",
        "02",
        "01",
    ]
    assert await ids(since=str(T0 + 3600)) == []
    assert await ids(end_reason="caller_hangup") == ["05", "03", "01"]
    assert await ids(end_reason="operator_hangup") == []
    server.stop.set()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"status": "finished"}, "status"),
        ({"phone": "12"}, "phone"),
        ({"end_reason": "bored"}, "end_reason"),
        ({"since": "yesterday"}, "since"),
        ({"until": "nan"}, "until"),
        ({"since": str(T0), "until": str(T0)}, "until"),
        ({"sort": "oldest"}, "sort"),
    ],
)
async def test_bad_list_parameters_are_422(
    nursery: trio.Nursery,
    store: SqliteStore,
    tmp_path: Path,
    params: dict[str, str],
    field: str,
) -> None:
    server = await serve(nursery, store, tmp_path)
    r = await server.client.get("/api/calls", params=params)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "validation_failed" and body["field"] == field and body["reason"]
    server.stop.set()


async def test_one_call_with_transcript_and_latency_ledger(
    nursery: trio.Nursery, store: SqliteStore, tmp_path: Path
) -> None:
    server = await serve(nursery, store, tmp_path)
    rec = CallRecord(
        "v3:abc_DEF-123",
        "outbound",
        "+5716000000",
        "+573001234567",
        nombre="Ana",
        contexto="cita",
        created_at=T0,
        mode="media",
    )
    rec.status, rec.ended_at, rec.end_reason = "ended", T0 + 20, "bot_goodbye"
    rec.llm_input_tokens, rec.tts_characters = 900, 120
    turns = [
        TurnEntry(0, "greeting", bot_text="Hola", heard_text="Hola", t1=10.0, t4=250.0, t5=252.0),
        TurnEntry(
            1,
            "reply",
            user_text="¿Puedo cambiar la cita?",
            bot_text="Claro que sí. ¿Qué día?",
            heard_text="Claro que sí.",
            interrupted=True,
            t0=5000.0,
            t1=5002.0,
            t2=5400.0,
            t2s=5550.0,
            t3=5551.0,
            t4=5700.0,
            t5=5703.0,
            overhead_ms=6.0,
        ),
    ]
    await store.save_call(rec, turns)
    r = await server.client.get("/api/calls/v3:abc_DEF-123")
    assert r.status_code == 200
    body = r.json()
    assert body["call"]["contexto"] == "cita" and body["call"]["usage"]["llm_input_tokens"] == 900
    assert [t["kind"] for t in body["turns"]] == ["greeting", "reply"]
    reply = body["turns"][1]
    assert reply["user_text"] == "¿Puedo cambiar la cita?"
    assert reply["heard_text"] == "Claro que sí." and reply["interrupted"] is True
    assert reply["latency"]["t0"] == 5000.0 and reply["latency"]["overhead_ms"] == 6.0
    assert reply["latency"]["stages_ms"] == {
        "t0-t1": 2.0,
        "t1-t2": 398.0,
        "t2-t3": 151.0,
        "t3-t4": 149.0,
        "t4-t5": 3.0,
        "t0-t5": 703.0,
    }
    assert body["latency"]["turns_measured"] == 1
    assert body["latency"]["t0_t5_ms"] == {"median": 703.0, "max": 703.0}
    assert body["latency"]["overhead_ms"] == {"median": 6.0, "max": 6.0}
    server.stop.set()


async def test_unknown_call_is_404_json(
    nursery: trio.Nursery, store: SqliteStore, tmp_path: Path
) -> None:
    server = await serve(nursery, store, tmp_path)
    r = await server.client.get("/api/calls/v3:never-seen")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "reason": "no call with this call_control_id"}
    server.stop.set()


async def test_without_a_store_the_api_says_so(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await serve(nursery, None, tmp_path)
    for path in ("/api/calls", "/api/calls/v3:x"):
        r = await server.client.get(path)
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
    server.stop.set()


def test_parse_list_query() -> None:
    assert parse_list_query({}, "UTC") == {"limit": 20}
    query = parse_list_query(
        {"limit": "5", "since": "2026-11-19", "status": "Ended", "phone": " 573001234567"},
        "America/Bogota",
    )
    assert query == {
        "limit": 5,
        "since": T0 - 3 * 3600,  # midnight in Bogotá is 05:00 UTC
        "status": "ended",
        "phone": "+573001234567",
    }
    with pytest.raises(InvalidQuery) as err:
        parse_list_query({"since": "1e300"}, "UTC")
    assert err.value.field == "since"


async def test_a_store_that_fails_is_503(
    nursery: trio.Nursery, store: SqliteStore, tmp_path: Path
) -> None:
    server = await serve(nursery, store, tmp_path)
    await store.aclose()  # the database went away under the running server
    for path in ("/api/calls", "/api/calls/v3:x"):
        r = await server.client.get(path)
        assert r.status_code == 503 and r.json()["reason"] == "the call store is not reachable"
    server.stop.set()
