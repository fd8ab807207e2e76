"""Bad input and hostile peers: every other call stays healthy."""

import base64
import json

import trio
import trio_websocket
from conftest import Signer, make_settings, start_lab_server, start_server, webhook_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voice_trio.providers.telnyx.webhooks import (
    WebhookInvalid,
    WebhookRejected,
    WebhookVerifier,
    parse_webhook,
)
from voice_trio.sim.speech import encode_speech, silence


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


def media_frame(chunk: int, audio: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequence_number": str(chunk + 1),
            "stream_id": "s",
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(chunk * 20),
                "payload": base64.b64encode(audio).decode(),
            },
        }
    )


async def test_malformed_frames_are_dropped_and_counted_while_the_call_goes_on(
    nursery, lab
) -> None:
    server = await start_lab_server(nursery, lab)
    audio = silence(300) + encode_speech("Quiero una cita.", 20) + silence(900)
    garbage = [
        "not json",
        "[1, 2]",
        '{"event": "media"}',
        '{"event":"media","media":{"payload":"@@"}}',
        b"\x00\x01binary",
    ]
    async with trio_websocket.open_websocket_url(server.media_url("v3:garbled")) as ws:
        await ws.send_message(start_frame("v3:garbled"))
        deadline = trio.current_time()
        for chunk, start in enumerate(range(0, len(audio), 160), start=1):
            if chunk % 10 == 0 and garbage:
                await ws.send_message(garbage.pop())
            await ws.send_message(media_frame(chunk, audio[start : start + 160]))
            deadline += 0.02
            await trio.sleep_until(deadline)
        with trio.fail_after(5):
            while not lab.anthropic.requests:  # noqa: ASYNC110
                await trio.sleep(0.02)
    assert "Quiero una cita." in lab.anthropic.requests[0].body["messages"][-1]["content"]
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_frames_dropped_total{reason="malformed"} 5.0' in metrics
    server.stop.set()


async def test_a_start_with_odd_fields_the_server_does_not_use_still_opens_the_call(
    nursery, lab
) -> None:
    """Fields the server does not rely on never fail the ``start`` frame: the call is up
    (greeting audio on the socket), not refused or left to fall back after seconds."""
    server = await start_lab_server(nursery, lab)
    frame = json.loads(start_frame("v3:odd-start"))
    frame.pop("stream_id")
    frame["start"].update(custom_parameters="customer_123", tags="TAG1", user_id=7)
    frame["start"]["media_format"].update(sample_rate="8 kHz", channels="mono")
    async with trio_websocket.open_websocket_url(server.media_url("v3:odd-start")) as ws:
        await ws.send_message(json.dumps({"event": "connected", "version": 1}))
        await ws.send_message(json.dumps(frame))
        with trio.fail_after(5):
            assert json.loads(await ws.get_message())["event"] == "media"
    metrics = (await server.client.get("/metrics")).text
    assert "voice_frames_dropped_total{" not in metrics
    server.stop.set()


async def test_a_call_that_fails_unexpectedly_ends_alone(nursery, lab, monkeypatch) -> None:
    from voice_trio.media import session as session_module

    original = session_module.CallSession.converse

    async def converse(self):  # type: ignore[no-untyped-def]
        if self.call.call_control_id == "v3:doomed":
            raise RuntimeError("a bug in one call")
        await original(self)

    monkeypatch.setattr(session_module.CallSession, "converse", converse)
    server = await start_lab_server(nursery, lab)
    greeted: list[str] = []

    async def carrier(ccid: str) -> None:
        async with trio_websocket.open_websocket_url(server.media_url(ccid)) as ws:
            await ws.send_message(start_frame(ccid))
            try:
                with trio.fail_after(10):
                    while True:
                        message = json.loads(await ws.get_message())
                        if message["event"] == "mark":
                            greeted.append(ccid)  # a whole sentence of the greeting arrived
                            return
            except trio_websocket.ConnectionClosed:
                return

    async with trio.open_nursery() as calls:
        for i in range(12):
            calls.start_soon(carrier, f"v3:call-{i}")
        calls.start_soon(carrier, "v3:doomed")
    assert sorted(greeted) == sorted(f"v3:call-{i}" for i in range(12))
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="error",mode="media"} 1.0' in metrics
    hangups = [r.path for r in lab.telnyx.requests if r.path.endswith("/hangup")]
    assert hangups == ["/v2/calls/v3:doomed/actions/hangup"]
    server.stop.set()


async def test_close_storm_does_not_take_the_server_down(nursery, lab) -> None:
    """Many carriers close at the moment the server closes the same sockets (hang-up
    webhooks for every call at once): a survival guard. This natural storm does not hit the
    Hypercorn close race (gotcha 11) on its own; test_close_storm.py forces that one."""
    signer = Signer()
    server = await start_lab_server(nursery, lab, TELNYX_PUBLIC_KEY=signer.public_b64)
    count = 60
    sockets: list[trio_websocket.WebSocketConnection] = []
    async with trio.open_nursery() as opening:

        async def open_one(i: int) -> None:
            ws = await trio_websocket.connect_websocket_url(
                opening, server.media_url(f"v3:storm-{i}")
            )
            await ws.send_message(start_frame(f"v3:storm-{i}"))
            await ws.get_message()  # greeting audio: the call is up
            sockets.append(ws)

        for i in range(count):
            opening.start_soon(open_one, i)
        with trio.fail_after(20):
            while len(sockets) < count:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert (await server.client.get("/health")).json()["active_calls"] == count

        async def hang_up(i: int) -> None:
            body = webhook_body("call.hangup", f"v3:storm-{i}", hangup_cause="normal_clearing")
            await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))

        async with trio.open_nursery() as storm:
            for i, ws in enumerate(sockets):
                storm.start_soon(hang_up, i)
                storm.start_soon(ws.aclose)
    with trio.fail_after(10):
        await server.app.center.registry.wait_until_empty()
    # The process and its other work are fine: a new call runs normally.
    r = await server.client.get("/health")
    assert r.status_code == 200 and r.json()["active_calls"] == 0
    async with trio_websocket.open_websocket_url(server.media_url("v3:after-the-storm")) as ws:
        await ws.send_message(start_frame("v3:after-the-storm"))
        assert json.loads(await ws.get_message())["event"] == "media"
    server.stop.set()


async def test_secrets_never_appear_in_error_bodies(nursery, caplog) -> None:
    server = await start_server(nursery, make_settings(API_TOKEN="tok-secret-123456"))
    c = server.client
    bodies = [
        (await c.get("/api/sessions/stats", headers={"Authorization": "Bearer nope"})).text,
        (
            await c.post(
                "/api/call/initiate",
                json={"telefono": "x"},
                headers={"Authorization": "Bearer tok-secret-123456"},
            )
        ).text,
        (await c.post("/webhook/telnyx", content=b"{}")).text,
        (await c.get("/metrics")).text,
        (await c.get("/")).text,
    ]
    for secret in (
        "tok-secret-123456",
        "KEY_telnyx_secret_123",
        "sk-ant-test-secret",
        "dg-test-secret",
    ):
        assert not any(secret in body for body in bodies), secret
        assert secret not in caplog.text
    server.stop.set()


_SIGNER = Signer()
_VERIFIER = WebhookVerifier(_SIGNER.public_b64)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    body=st.binary(max_size=400),
    signature=st.one_of(st.none(), st.text(max_size=120)),
    timestamp=st.one_of(st.none(), st.text(max_size=20)),
)
def test_webhook_verification_never_crashes_and_never_accepts_a_forgery(
    body: bytes, signature: str | None, timestamp: str | None
) -> None:
    try:
        _VERIFIER.verify(body, signature, timestamp, now=1_700_000_000)
    except WebhookRejected:
        return
    raise AssertionError("an unsigned body was accepted")


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=4),
                st.dictionaries(
                    st.sampled_from(["data", "id", "event_type", "payload", "x"]), inner, max_size=5
                ),
            ),
            max_leaves=12,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_webhook_parser_returns_an_event_or_a_clear_error(body: bytes) -> None:
    try:
        event = parse_webhook(body)
    except WebhookInvalid as exc:
        assert str(exc)
        return
    assert event.id and event.event_type and isinstance(event.payload, dict)


async def test_a_stream_without_a_valid_token_is_refused_before_any_provider(
    nursery, lab, caplog
) -> None:
    server = await start_lab_server(nursery, lab)
    base = server.ws_base + "/stream/media"
    forged = [(b"x-telnyx-streaming-auth-token", b"v1.1700000000.AAAA")]
    cases = {
        "no token": (base, [], None),
        "forged": (base + "?token=v1.1700000000.AAAA", [], None),
        "another call's": (server.media_url("v3:someone-else"), [], None),
        "forged header": (base, forged, None),
        "another call's header": (base, server.media_headers("v3:someone-else"), None),
        "another call's, in connected": (base, [], "v3:someone-else"),
    }
    intruder = "v3:intruder-" + "x" * 500
    for why, (url, headers, connected_for) in cases.items():
        # The upgrade is accepted.
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            if connected_for is not None:
                token = server.media_headers(connected_for)[0][1].decode()
                connected = {"event": "connected", "x-telnyx-streaming-auth-token": token}
                await ws.send_message(json.dumps(connected))
            await ws.send_message(start_frame(intruder))
            try:
                with trio.fail_after(5):
                    await ws.get_message()
                raise AssertionError(f"{why}: the server sent something")
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason.code == 1008, why
    assert lab.deepgram.stt_connections_opened == 0
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_stream_rejected_total{reason="bad_token"} 6.0' in metrics
    # Nothing an unauthenticated peer sent reaches the log: a summary by kind only.
    assert "v3:intruder" not in caplog.text
    assert "refused before any provider" in caplog.text
    server.stop.set()
