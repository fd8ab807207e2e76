"""The media stream proves its call the way Telnyx documents it (docs/protocols/telnyx.md):
``stream_auth_token`` comes back as the ``x-telnyx-streaming-auth-token`` upgrade header and
in the ``connected`` frame, so a carrier that drops the URL's query string still gets its
calls through; and a token opens one stream only, on one instance."""

import json
import logging

import pytest
import trio
import trio_websocket
from conftest import Signer, make_settings, start_lab_server, start_server, webhook_body
from prometheus_client import generate_latest

from voice_trio.instance.center import CallCenter
from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER
from voice_trio.store import StoreError

PATIENT = "+573001234567"
AUTH_HEADER = b"x-telnyx-streaming-auth-token"


def start_frame(ccid: str) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequence_number": "1",
            "stream_id": f"stream-{ccid}",
            "start": {
                "call_control_id": ccid,
                "client_state": None,
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            },
        }
    )


def rejected(metrics: str, reason: str) -> float:
    prefix = f'voice_stream_rejected_total{{reason="{reason}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


async def refused_with(ws: trio_websocket.WebSocketConnection) -> int | None:
    """The close code once the server closes the socket; it must send nothing first."""
    try:
        with trio.fail_after(5):
            await ws.get_message()
    except trio_websocket.ConnectionClosed as closed:
        return closed.reason.code if closed.reason else None
    raise AssertionError("the server sent something")


@pytest.mark.parametrize(
    ("header", "connected"), [(True, True), (True, False), (False, True)], ids=str
)
async def test_calls_stream_when_the_carrier_drops_the_query_string(
    nursery, lab, caplog, header, connected
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    lab.telnyx.strip_stream_query = True
    lab.telnyx.stream_auth_header = header
    lab.telnyx.stream_auth_in_connected = connected
    server = await start_lab_server(nursery, lab)
    party = ScriptedCaller(
        [WaitForBot(300), Say("Quiero una cita para el lunes.", 100), WaitForBot(300), HangUp()],
        ms_per_char=25,
        turn_gap_ms=300,
        timeout_s=30,
    )
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    assert not results.errors
    # The whole conversation went over the media stream: Deepgram heard the caller, and
    # nothing was said through Telnyx speak (fallback mode).
    assert lab.deepgram.stt_connections_opened == 1
    assert "Quiero una cita para el lunes." in str(lab.anthropic.requests[0].body["messages"])
    assert "Le habla Sofía" in results.bot_turns[0].text
    assert not [r for r in lab.telnyx.requests if r.path.endswith("/speak")]
    metrics = (await server.client.get("/metrics")).text
    assert "voice_stream_rejected_total{" not in metrics
    channel = "header" if header else "connected"
    assert any(f"token by {channel}" in m for m in caplog.messages)
    server.stop.set()


async def test_without_a_documented_channel_a_stripped_query_costs_the_stream(nursery, lab) -> None:
    """What the simulator's knobs make visible: a carrier that keeps neither the header nor
    the connected-frame token, and drops the query string, is refused (1008, counted): the
    call survives only in fallback mode."""
    lab.telnyx.strip_stream_query = True
    lab.telnyx.stream_auth_header = lab.telnyx.stream_auth_in_connected = False
    lab.telnyx.speak_ms_per_char = 10
    server = await start_lab_server(nursery, lab, STREAM_CONNECT_TIMEOUT_MS=400)
    party = ScriptedCaller([WaitForBot(300), HangUp()], ms_per_char=25, timeout_s=20)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    assert call.streams[0].close_code == 1008
    assert lab.deepgram.stt_connections_opened == 0
    assert any("Le habla Sofía" in s for s in call.spoken)
    assert rejected((await server.client.get("/metrics")).text, "bad_token") == 1
    server.stop.set()


async def test_a_second_socket_or_a_replayed_token_is_refused_before_any_provider(
    nursery, lab
) -> None:
    server = await start_lab_server(nursery, lab)
    ccid = "v3:replayed"
    headers = server.media_headers(ccid)
    base = server.ws_base + "/stream/media"
    async with trio_websocket.open_websocket_url(base, extra_headers=headers) as first:
        await first.send_message(start_frame(ccid))
        assert json.loads(await first.get_message())["event"] == "media"  # the call is up
        async with trio_websocket.open_websocket_url(base, extra_headers=headers) as second:
            await second.send_message(start_frame(ccid))
            assert await refused_with(second) == 1008
        await first.send_message(json.dumps({"event": "stop", "stop": {}}))
        with trio.fail_after(5):
            await server.app.center.registry.wait_until_empty()
    # The call is over; its token is still within its lifetime. Replayed, by any channel:
    for channel_headers, url in ((headers, base), ([], server.media_url(ccid))):
        async with trio_websocket.open_websocket_url(url, extra_headers=channel_headers) as ws:
            await ws.send_message(start_frame(ccid))
            assert await refused_with(ws) == 1008
    assert lab.deepgram.stt_connections_opened == 1  # the first socket's only
    metrics = (await server.client.get("/metrics")).text
    assert rejected(metrics, "replayed") == 3
    assert (await server.client.get("/api/sessions/stats")).json()["total_calls"] == 1
    server.stop.set()


async def test_a_socket_for_a_stream_given_up_elsewhere_is_refused(
    nursery, lab, telnyx_peer, tmp_path
) -> None:
    """Two instances share a store. Instance A sent streaming_start, waited, and carried the
    call on in fallback mode; the socket then turns up, late, at instance B. B must refuse it
    before any provider, or the call would run twice (DESIGN.md §4)."""
    peer, peer_base = telnyx_peer
    signer = Signer()
    shared = {
        **lab.server_env(),
        "TELNYX_API_BASE": peer_base + "/v2",
        "TELNYX_PUBLIC_KEY": signer.public_b64,
        "SQLITE_PATH": str(tmp_path / "calls.sqlite3"),
        "SERVER_SECRET": "a-secret-every-instance-shares-0123456789",
        "STREAM_CONNECT_TIMEOUT_MS": "300",
    }
    a = await start_server(nursery, shared)
    b = await start_server(nursery, shared)
    ccid = "v3:late-socket"
    body = webhook_body("call.answered", ccid, state="answered")
    r = await a.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.status_code == 200
    [command] = await peer.wait_for("streaming_start")
    token = command.body["stream_auth_token"].encode()
    await peer.wait_for("streaming_stop")  # A gave the stream up: fallback mode
    url = b.ws_base + "/stream/media"
    async with trio_websocket.open_websocket_url(url, extra_headers=[(AUTH_HEADER, token)]) as ws:
        await ws.send_message(start_frame(ccid))
        assert await refused_with(ws) == 1008
    assert lab.deepgram.stt_connections_opened == 0
    assert rejected((await b.client.get("/metrics")).text, "replayed") == 1
    a.stop.set()
    b.stop.set()


async def test_while_the_store_is_down_this_instance_remembers_its_claims() -> None:
    """A store outage must not cost calls their streams: the claim falls back to this
    instance's memory (logged, counted) and a replay here is still refused."""

    class DownStore:
        async def claim_stream(self, call_control_id: str) -> bool:
            raise StoreError("sqlite store x: disk I/O error")

    center = CallCenter(make_settings())
    center.store = DownStore()  # type: ignore[assignment]
    assert await center.claim_stream("v3:outage") is True
    assert await center.claim_stream("v3:outage") is False
    assert await center.claim_stream("v3:another") is True
    metrics = generate_latest(center.metrics.registry).decode()
    assert 'voice_store_errors_total{operation="claim_stream"} 2.0' in metrics
