"""What a hostile or careless client sends, against a running server: every answer is a
clear 4xx or a bounded, counted drop, never a 500, a traceback, a forged log line or a
metric that grows without bound."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from conftest import Signer, start_server, webhook_body
from telnyx_peer import TelnyxPeer

from voice_trio.observability import ContextFilter, HumanFormatter
from voice_trio.sim._serve import serve_asgi

DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.fixture
def server_log():
    """The server's log lines exactly as the human format writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(HumanFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("voice_trio")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _peer(nursery) -> str:
    from functools import partial

    return await nursery.start(partial(serve_asgi, TelnyxPeer()))


async def test_event_types_from_the_wire_are_a_closed_set_of_metric_labels(nursery) -> None:
    server = await start_server(nursery, {"TELNYX_API_BASE": (await _peer(nursery)) + "/v2"})
    before = len((await server.client.get("/metrics")).content)
    for i in range(5):
        body = webhook_body(f"x{i}" * 10_000, "v3:odd")  # 20 KB event types
        assert (await server.client.post("/webhook/telnyx", content=body)).status_code == 200
    body = webhook_body("call.speak.ended", "v3:odd")
    assert (await server.client.post("/webhook/telnyx", content=body)).status_code == 200
    metrics = (await server.client.get("/metrics")).text
    assert len(metrics.encode()) - before < 2_000  # was +200 KB per odd event type
    assert 'voice_webhooks_total{event_type="other",outcome="accepted"} 5.0' in metrics
    assert 'voice_webhooks_total{event_type="call.speak.ended",outcome="accepted"} 1.0' in metrics
    server.stop.set()


async def test_unsigned_webhooks_are_refused_unless_the_operator_allows_them(
    nursery, server_log
) -> None:
    server = await start_server(nursery, {"ALLOW_UNSIGNED_WEBHOOKS": "false"})
    body = webhook_body("call.hangup", "v3:anyone")
    r = await server.client.post("/webhook/telnyx", content=body)
    assert r.status_code == 401
    assert r.json()["error"] == "signature_not_configured"
    assert "TELNYX_PUBLIC_KEY" in r.json()["reason"]
    assert "ERROR [-] ⚠️ TELNYX_PUBLIC_KEY is not set: every webhook is refused" in (
        server_log.getvalue()
    )
    server.stop.set()

    allowing = await start_server(nursery, {"ALLOW_UNSIGNED_WEBHOOKS": "true"})
    assert (await allowing.client.post("/webhook/telnyx", content=body)).status_code == 200
    assert "webhooks are accepted WITHOUT a signature" in server_log.getvalue()
    allowing.stop.set()


async def test_outside_strings_reach_the_log_escaped_and_bounded(nursery, server_log) -> None:
    peer = await _peer(nursery)
    server = await start_server(nursery, {"TELNYX_API_BASE": peer + "/v2"})
    forged = "\n[12:00:00.000] INFO  [-] 📴 forged line"
    r = await server.client.post(
        "/api/call/initiate", json={"telefono": "+573001234567", "nombre": "Ana" + forged}
    )
    assert r.status_code == 201, r.text
    huge = "v3:" + "A" * 200_000
    body = webhook_body("call.hangup" + forged, huge + forged)
    assert (await server.client.post("/webhook/telnyx", content=body)).status_code == 200
    server.stop.set()
    lines = server_log.getvalue().splitlines()
    assert not [line for line in lines if "forged line" in line and line.startswith("[12:")]
    assert all(len(line) < 2_000 for line in lines), max(map(len, lines))
    assert any("Ana\\x0a[12:00:00.000]" in line for line in lines), lines
    assert any("…(+" in line for line in lines)  # the 200 KB id, cut


async def test_deeply_nested_json_is_a_4xx_with_a_reason_everywhere(nursery) -> None:
    signer = Signer()
    server = await start_server(nursery, {"TELNYX_PUBLIC_KEY": signer.public_b64})
    r = await server.client.post("/webhook/telnyx", content=DEEP, headers=signer.headers(DEEP))
    assert r.status_code == 400
    assert r.json() == {
        "error": "invalid_webhook",
        "reason": "body is not JSON (or is nested too deeply)",
    }
    for path in ("/api/call/initiate", "/api/call/batch"):
        r = await server.client.post(path, content=DEEP)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["field"] == "body" and r.json()["reason"] == "is nested too deeply"
    # A URL must fit in Hypercorn's 16 KB request head: nesting 3 000 deep still recurses.
    deep_json = b"[" * 3_000 + b"]" * 3_000
    for cursor in (deep_json.decode(), base64.urlsafe_b64encode(deep_json).decode()):
        r = await server.client.get("/api/calls", params={"cursor": cursor})
        assert r.status_code == 422 and r.json()["field"] == "cursor", r.text
    # A client_state nested too deeply is just not ours: the webhook is acted on as usual.
    state = base64.b64encode(DEEP).decode()
    body = webhook_body("call.answered", "v3:deep", client_state=state)
    r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.status_code == 200
    assert json.loads((await server.client.get("/health")).content)["status"] == "ok"
    server.stop.set()
