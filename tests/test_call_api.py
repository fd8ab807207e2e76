import uuid

import trio
import trio.lowlevel
from conftest import make_settings, start_server

from voice_trio.providers.telnyx.control import decode_client_state


async def test_initiate_sends_exactly_the_documented_dial(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    r = await server.client.post(
        "/api/call/initiate",
        json={
            "telefono": "+573001234567",
            "nombre": "Ana",
            "contexto": "cita de control",
            "saludo": "Hola Ana",
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    [dial] = peer.commands("dial")
    assert body["call_control_id"].startswith("v3:")
    assert dial.method == "POST" and dial.path == "/v2/calls"
    assert dial.headers["authorization"] == "Bearer KEY_telnyx_secret_123"
    assert dial.headers["content-type"] == "application/json"
    sent = dict(dial.body)
    uuid.UUID(sent.pop("command_id"))
    state = decode_client_state(sent.pop("client_state"))
    assert state == {
        "dir": "outbound",
        "nombre": "Ana",
        "contexto": "cita de control",
        "saludo": "Hola Ana",
    }
    assert sent == {
        "connection_id": "1684641123236054244",
        "to": "+573001234567",
        "from": "+5716000000",
        "webhook_url": "https://agent.example.com/webhook/telnyx",
    }
    server.stop.set()


async def test_initiate_validation(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    c = server.client
    cases = [
        ({"telefono": "3001234567", "nombre": "Ana"}, "telefono"),
        ({"telefono": "+57 300 123", "nombre": "Ana"}, "telefono"),
        ({"nombre": "Ana"}, "telefono"),
        ({"telefono": "+573001234567"}, "nombre"),
        ({"telefono": "+573001234567", "nombre": 7}, "nombre"),
        ({"telefono": "+573001234567", "nombre": "A", "contexto": "x" * 2001}, "contexto"),
        ([1, 2], "body"),
    ]
    for payload, field in cases:
        r = await c.post("/api/call/initiate", json=payload)
        assert r.status_code == 422, payload
        assert r.json()["error"] == "validation_failed" and r.json()["field"] == field
        assert r.json()["reason"]
    r = await c.post(
        "/api/call/initiate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert peer.commands("dial") == []
    server.stop.set()


async def test_telnyx_errors_are_surfaced(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    peer.fail_next(422, "10015", "Invalid 'to' number", "The 'to' number is not dialable")
    r = await server.client.post(
        "/api/call/initiate", json={"telefono": "+573001234567", "nombre": "A"}
    )
    assert r.status_code == 502
    assert r.json() == {
        "error": "telnyx_error",
        "reason": "Invalid 'to' number",
        "telnyx_status": 422,
        "code": "10015",
        "detail": "The 'to' number is not dialable",
    }
    server.stop.set()


async def test_429_and_5xx_are_retried_with_the_same_command_id(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    peer.fail_next(429, "10011", "Too many requests", headers={"retry-after": "0"})
    peer.fail_next(503, "90000", "Service unavailable")
    r = await server.client.post(
        "/api/call/initiate", json={"telefono": "+573001234567", "nombre": "A"}
    )
    assert r.status_code == 201
    dials = peer.commands("dial")
    assert len(dials) == 3
    assert len({d.body["command_id"] for d in dials}) == 1
    server.stop.set()


async def test_not_configured_is_503(nursery) -> None:
    server = await start_server(nursery, make_settings(TELNYX_API_KEY="", TELNYX_CONNECTION_ID=""))
    r = await server.client.post(
        "/api/call/initiate", json={"telefono": "+573001234567", "nombre": "A"}
    )
    assert r.status_code == 503
    assert r.json()["missing"] == ["TELNYX_API_KEY", "TELNYX_CONNECTION_ID"]
    server.stop.set()


async def test_batch_reports_one_result_per_item(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    peer.fail_next(403, "10010", "Number not permitted")
    calls = [
        {"telefono": "+573001111111", "nombre": "Uno"},
        {"telefono": "bad", "nombre": "Dos"},
        {"telefono": "+573003333333", "nombre": "Tres"},
        {"telefono": "+573004444444", "nombre": "Cuatro"},
    ]
    r = await server.client.post("/api/call/batch", json={"calls": calls})
    assert r.status_code == 200
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert results[1] == {
        "index": 1,
        "status": "invalid",
        "field": "telefono",
        "reason": "must be an E.164 phone number such as +573001234567",
    }
    statuses = sorted(x["status"] for x in results)
    assert statuses == ["failed", "initiated", "initiated", "invalid"]
    assert body["initiated"] == 2 and body["failed"] == 2
    failed = next(x for x in results if x["status"] == "failed")
    assert failed["code"] == "10010"
    assert len(peer.commands("dial")) == 3
    for bad in ({}, {"calls": []}, {"calls": "x"}, {"calls": [{}] * 101}):
        assert (await server.client.post("/api/call/batch", json=bad)).status_code == 422
    server.stop.set()


async def test_batch_dials_with_bounded_concurrency(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    calls = [{"telefono": f"+5730012345{i:02d}", "nombre": f"N{i}"} for i in range(20)]
    r = await server.client.post("/api/call/batch", json={"calls": calls})
    assert r.json()["initiated"] == 20
    assert sorted(d.body["to"] for d in peer.commands("dial")) == sorted(
        c["telefono"] for c in calls
    )
    await trio.lowlevel.checkpoint()
    server.stop.set()
