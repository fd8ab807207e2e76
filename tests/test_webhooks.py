import base64
import json
import logging
import time
import uuid

import trio
import trio_websocket
from conftest import make_settings, start_lab_server, start_server, webhook_body

from voice_trio.calls import stream_token

START = {
    "event": "start",
    "sequence_number": "1",
    "stream_id": "32DE0DEA-53CB-4B21",
    "start": {
        "user_id": "u",
        "call_control_id": "v3:call-1",
        "call_session_id": "s",
        "from": "+13122010094",
        "to": "+13122123456",
        "tags": [],
        "client_state": None,
        "custom_parameters": {},
        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
    },
}


async def _server(nursery, peer_base, signer, **extra):
    settings = make_settings(
        TELNYX_API_BASE=peer_base + "/v2", TELNYX_PUBLIC_KEY=signer.public_b64, **extra
    )
    return await start_server(nursery, settings)


async def test_signed_call_answered_starts_exactly_one_stream(
    nursery, telnyx_peer, signer, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    peer, base = telnyx_peer
    server = await _server(nursery, base, signer)
    state = base64.b64encode(b'{"nombre":"Ana"}').decode()
    body = webhook_body("call.answered", "v3:abc", client_state=state, state="answered")
    r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.status_code == 200 and r.json() == {"status": "received"}
    # Telnyx retries the same event: acknowledged, not acted on twice.
    r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.json() == {"status": "duplicate"}
    [cmd] = await peer.wait_for("streaming_start")
    await trio.sleep(0.1)
    assert len(peer.commands("streaming_start")) == 1
    assert cmd.path == "/v2/calls/v3:abc/actions/streaming_start"
    sent = dict(cmd.body)
    uuid.UUID(sent.pop("command_id"))
    # The stream token rides in the channel Telnyx documents (it comes back as the
    # x-telnyx-streaming-auth-token header and in the connected frame), not in the URL,
    # whose query string nothing promises to keep.
    stream_token.verify(server.app.center.stream_secret, sent.pop("stream_auth_token"), "v3:abc")
    assert sent == {
        "stream_url": "wss://agent.example.com/stream/media",
        "stream_track": "inbound_track",
        "stream_codec": "PCMU",
        "stream_bidirectional_mode": "rtp",
        "stream_bidirectional_codec": "PCMU",
        "stream_bidirectional_sampling_rate": 8000,
        "client_state": state,
    }
    assert any("Streaming Start requested" in m for m in caplog.messages)
    assert any("📨 Webhook recibido: call.answered" in m for m in caplog.messages)
    server.stop.set()


async def test_forged_stale_and_missing_signatures_are_refused(
    nursery, telnyx_peer, signer
) -> None:
    from conftest import Signer

    peer, base = telnyx_peer
    server = await _server(nursery, base, signer)
    c = server.client
    body = webhook_body("call.answered", "v3:abc")
    stranger = Signer()
    good = signer.headers(body)
    cases = {
        "signature does not match": stranger.headers(body),
        "timestamp outside the 300 s window": signer.headers(body, ts=int(time.time()) - 301),
        "missing signature headers": {"content-type": "application/json"},
        "signature is not base64": {**good, "telnyx-signature-ed25519": "***not-base64***"},
        "signature is not 64 bytes": {
            **good,
            "telnyx-signature-ed25519": base64.b64encode(b"x" * 10).decode(),
        },
        "timestamp is not a number": {**good, "telnyx-timestamp": "yesterday"},
    }
    for reason, headers in cases.items():
        r = await c.post("/webhook/telnyx", content=body, headers=headers)
        assert r.status_code == 401, reason
        assert r.json() == {"error": "invalid_signature", "reason": reason}
    future = signer.headers(body, ts=int(time.time()) + 301)
    assert (await c.post("/webhook/telnyx", content=body, headers=future)).status_code == 401
    altered = body.replace(b"v3:abc", b"v3:xyz")
    assert (await c.post("/webhook/telnyx", content=altered, headers=good)).status_code == 401
    await trio.sleep(0.1)
    assert peer.requests == []
    server.stop.set()


async def test_inbound_call_is_answered_and_unknown_events_are_ok(
    nursery, telnyx_peer, signer
) -> None:
    peer, base = telnyx_peer
    server = await _server(nursery, base, signer)
    body = webhook_body(
        "call.initiated",
        "v3:in-1",
        direction="incoming",
        state="parked",
        **{"from": "+573001234567", "to": "+5716000000"},
    )
    assert (
        await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    ).status_code == 200
    [answer] = await peer.wait_for("answer")
    assert answer.path == "/v2/calls/v3:in-1/actions/answer"
    body = webhook_body("call.recording.saved", "v3:in-1")
    r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.status_code == 200
    for bad in (b"not json", b'{"event_type":"call.answered"}', b'{"data":{"id":"x"}}'):
        r = await server.client.post("/webhook/telnyx", content=bad, headers=signer.headers(bad))
        assert r.status_code == 400 and r.json()["error"] == "invalid_webhook"
    server.stop.set()


async def test_outbound_initiated_is_not_answered(nursery, telnyx_peer, signer) -> None:
    peer, base = telnyx_peer
    server = await _server(nursery, base, signer)
    body = webhook_body("call.initiated", "v3:out-1", direction="outgoing", state="bridging")
    await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    await trio.sleep(0.2)
    assert peer.requests == []
    server.stop.set()


async def test_without_public_key_webhooks_are_accepted_unsigned(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(nursery, make_settings(TELNYX_API_BASE=base + "/v2"))
    body = webhook_body("call.answered", "v3:abc")
    r = await server.client.post("/webhook/telnyx", content=body)
    assert r.status_code == 200
    await peer.wait_for("streaming_start")
    server.stop.set()


async def test_fallback_mode_does_not_start_streaming(nursery, telnyx_peer) -> None:
    peer, base = telnyx_peer
    server = await start_server(
        nursery, make_settings(TELNYX_API_BASE=base + "/v2", USE_MEDIA_STREAMS="false")
    )
    body = webhook_body("call.answered", "v3:abc")
    await server.client.post("/webhook/telnyx", content=body)
    await trio.sleep(0.2)
    assert peer.commands("streaming_start") == []
    server.stop.set()


async def test_hangup_webhook_ends_the_call_running_here(nursery, lab, signer) -> None:
    server = await start_lab_server(nursery, lab, TELNYX_PUBLIC_KEY=signer.public_b64)
    async with trio_websocket.open_websocket_url(server.media_url("v3:call-1")) as ws:
        await ws.send_message(json.dumps({"event": "connected", "version": "1.0.0"}))
        await ws.send_message(json.dumps(START))
        greeting = await ws.get_message()  # the greeting's first audio: the call is up
        assert json.loads(greeting)["event"] == "media"
        assert (await server.client.get("/health")).json()["active_calls"] == 1
        body = webhook_body("call.hangup", "v3:call-1", hangup_cause="normal_clearing")
        await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
        with trio.fail_after(5):
            try:
                while True:
                    await ws.get_message()
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason.code == 1000
    assert (await server.client.get("/health")).json()["active_calls"] == 0

    # The deployment's count (the store) follows once the call's record is written.
    async def stats() -> dict:
        return (await server.client.get("/api/sessions/stats")).json()

    with trio.fail_after(5):
        while (await stats())["active_sessions"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert (await stats())["total_calls"] == 1 and (await stats())["source"] == "store"
    # The caller's side hung up: the server sends no hangup of its own.
    assert not [r for r in lab.telnyx.requests if r.path.endswith("/hangup")]
    server.stop.set()
