"""What a hostile or careless client sends, against a running server: every answer is a
clear 4xx or a bounded, counted drop, never a 500, a traceback, a forged log line or a
metric that grows without bound."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import time
from urllib.parse import quote

import pytest
import trio
import trio_websocket
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


async def _raw_request(port: int, head: bytes, *, source: str = "127.0.0.1"):
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    if head:
        await stream.send_all(head)
    return stream


async def _read_all(stream, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    received = b""
    with trio.fail_after(within):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def _reply_to_trickle(stream, byte: bytes) -> bytes:
    """Send ``byte`` every 0.2 s until the server closes; what it answered meanwhile."""

    async def trickle() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await trio.sleep(0.2)
                await stream.send_all(byte)

    async with trio.open_nursery() as sending:
        sending.start_soon(trickle)
        reply = await _read_all(stream, within=5)
        sending.cancel_scope.cancel()
    return reply


def _port(server) -> int:
    return int(server.base.rsplit(":", 1)[1])


async def test_a_body_sent_a_byte_at_a_time_gets_408_and_loses_its_connection(nursery) -> None:
    server = await start_server(nursery, {"REQUEST_TIMEOUT": "1"})
    head = (
        b"POST /webhook/telnyx HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n{"
    )
    stream = await _raw_request(_port(server), head)
    started = trio.current_time()
    reply = await _reply_to_trickle(stream, b" ")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b'"error":"request_timeout"' in reply.replace(b" ", b"")
    assert trio.current_time() - started < 4
    server.stop.set()


async def test_a_request_head_sent_a_byte_at_a_time_loses_its_connection(
    nursery, monkeypatch
) -> None:
    monkeypatch.setattr("voice_trio.server.KEEP_ALIVE_SECONDS", 1.0)
    server = await start_server(nursery, {})
    stream = await _raw_request(_port(server), b"GET /health HTTP/1.1\r\n")
    started = trio.current_time()
    assert await _reply_to_trickle(stream, b"X") == b""  # closed, nothing served
    assert trio.current_time() - started < 3
    server.stop.set()


async def _kept_alive(port: int, source: str = "127.0.0.1"):
    """A connection that made one request and stays open (keep-alive)."""
    stream = await _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source=source)
    with trio.fail_after(5):
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    return stream


async def test_connections_over_the_limits_get_503_and_are_closed(nursery) -> None:
    server = await start_server(
        nursery, {"MAX_CONNECTIONS": "4", "MAX_CONNECTIONS_PER_CLIENT": "3"}
    )
    port = _port(server)
    held = [await _kept_alive(port) for _ in range(3)]
    refused = await _read_all(await _raw_request(port, b""), within=3)
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused
    assert b'"error": "too_many_connections_from_client"' in refused
    held.append(await _kept_alive(port, source="127.0.0.2"))
    refused = await _read_all(await _raw_request(port, b"", source="127.0.0.2"), within=3)
    assert b'"error": "too_many_connections"' in refused
    # A connection that ends frees its place.
    await held.pop(0).aclose()
    await held.pop().aclose()
    await trio.sleep(0.2)
    r = await server.client.get("/health")
    assert r.status_code == 200, r.text
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_connections_refused_total{reason="too_many_connections_from_client"} 1.0' in (
        metrics
    )
    assert 'voice_connections_refused_total{reason="too_many_connections"} 1.0' in metrics
    for stream in held:
        await stream.aclose()
    server.stop.set()


async def test_strangers_media_sockets_are_refused_1008_counted_and_never_flood_the_log(
    nursery, server_log
) -> None:
    """A non-ASCII stream token crashed the handler (close 1000, a traceback each); any bad
    socket logged what it sent. Now: 1008, counted, and one summary line, nothing of theirs."""
    server = await start_server(nursery, {})
    forged = "v3:x\n[12:00:00.000] INFO  [-] forged"
    now = str(int(time.time()))  # fresh, so the check reaches the signature itself
    arabic_now = now.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))  # int() reads it
    tokens = [f"v1.{now}.%C3%A9", f"v1.{now}.abc", "%00%0a", quote(f"v1.{arabic_now}.x")]
    for i in range(40):
        url = f"{server.ws_base}/stream/media?token={tokens[i % len(tokens)]}"
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"event": "connected", "version": "1.0.0"}))
            start = {
                "event": "start",
                "start": {
                    "call_control_id": forged + str(i),
                    "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                },
            }
            await ws.send_message(json.dumps(start))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(5):
                    await ws.get_message()
            assert closed.value.reason.code == 1008
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_stream_rejected_total{reason="bad_token"} 40.0' in metrics
    server.stop.set()
    log = server_log.getvalue()
    assert "Traceback" not in log and "forged" not in log
    refusals = [line for line in log.splitlines() if "refused before any provider" in line]
    assert 1 <= len(refusals) <= 2, refusals
