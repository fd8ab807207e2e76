"""Telnyx simulator: REST shapes and errors, webhook flows, signatures, retries, emulations."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from voice_trio.sim._serve import serve_asgi
from voice_trio.sim.caller import Dtmf, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.telnyx import TelnyxSim, serve

API_KEY = "KEY_sim_test"
OUR_NUMBER = "+13125550100"
PERSON = "+13125550199"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.body)["data"]


@dataclass
class WebhookReceiver:
    """A tiny raw ASGI app standing in for our server's webhook endpoint."""

    fail_first: int = 0
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _changed: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = 500 if self.fail_first > 0 else 200
        self.fail_first -= 1
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(Received(headers, body, status))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        self._changed.set()
        self._changed = trio.Event()

    def events(self, call_control_id: str | None = None) -> list[dict[str, Any]]:
        """Accepted deliveries (2xx), one per event id, in arrival order."""
        seen: set[str] = set()
        out = []
        for item in self.received:
            data = item.data
            if item.status != 200 or data["id"] in seen:
                continue
            if call_control_id and data["payload"]["call_control_id"] != call_control_id:
                continue
            seen.add(data["id"])
            out.append(data)
        return out

    def types(self, call_control_id: str | None = None) -> list[str]:
        return [e["event_type"] for e in self.events(call_control_id)]

    async def wait_for(
        self, event_type: str, count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        with trio.fail_after(timeout):
            while True:
                found = [e for e in self.events() if e["event_type"] == event_type]
                if len(found) >= count:
                    return found
                await self._changed.wait()


def verify(public_key_b64: str, item: Received) -> bool:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    message = item.headers["telnyx-timestamp"].encode() + b"|" + item.body
    try:
        key.verify(base64.b64decode(item.headers["telnyx-signature-ed25519"]), message)
    except InvalidSignature:
        return False
    return True


async def start_receiver(nursery: trio.Nursery, **kwargs: Any) -> WebhookReceiver:
    receiver = WebhookReceiver(**kwargs)
    base = await nursery.start(partial(serve_asgi, receiver))
    receiver.url = base + "/telnyx/webhook"
    return receiver


async def start_sim(
    nursery: trio.Nursery, receiver: WebhookReceiver | None = None, **knobs: Any
) -> tuple[TelnyxSim, httpx.AsyncClient]:
    knobs = {"ring_ms": 30, "webhook_backoff_ms": 20, "speak_ms_per_char": 10, **knobs}
    sim = TelnyxSim(
        api_key=API_KEY, default_webhook_url=receiver.url if receiver else None, **knobs
    )
    base = await nursery.start(serve, sim)
    client = httpx.AsyncClient(
        base_url=base + "/v2",
        headers={"Authorization": f"Bearer {API_KEY}"},
        trust_env=False,
        timeout=5,
    )
    return sim, client


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> WebhookReceiver:
    return await start_receiver(nursery)


@pytest.fixture
async def api(
    nursery: trio.Nursery, receiver: WebhookReceiver
) -> AsyncIterator[tuple[TelnyxSim, httpx.AsyncClient]]:
    sim, client = await start_sim(nursery, receiver)
    async with client:
        yield sim, client


def dial_body(**overrides: Any) -> dict[str, Any]:
    body = {"connection_id": "1684641123236054244", "to": PERSON, "from": OUR_NUMBER}
    body.update(overrides)
    return body


async def answered_inbound(
    sim: TelnyxSim, client: httpx.AsyncClient, receiver: WebhookReceiver, caller=None, **answer
):
    call = sim.place_inbound_call(PERSON, OUR_NUMBER, caller)
    await receiver.wait_for("call.initiated")
    r = await client.post(f"/calls/{call.call_control_id}/actions/answer", json=answer)
    assert r.status_code == 200, r.text
    await receiver.wait_for("call.answered")
    return call


async def test_auth_required(api) -> None:
    sim, client = api
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        r = await client.post("/calls", json=dial_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["errors"][0]["code"] == "10009"
    assert [req.status for req in sim.requests] == [401, 401]
    assert sim.requests[0].path == "/v2/calls" and sim.requests[0].json == dial_body()


async def test_dial_validation_points_at_each_bad_field(api) -> None:
    sim, client = api
    body = dial_body(
        to="5550199",
        stream_url="https://x.example/media",
        stream_track="inbound",
        stream_codec="mulaw",
        stream_bidirectional_mode="RTP",
        client_state="not base64!",
        timeout_secs=2,
        answering_machine_detection="yes",
        audio={"track": "inbound"},
    )
    del body["from"]
    r = await client.post("/calls", json=body)
    assert r.status_code == 422
    errors = r.json()["errors"]
    pointers = {e["source"]["pointer"]: e["code"] for e in errors}
    assert pointers == {
        "/to": "10015",
        "/from": "10004",
        "/stream_url": "10015",
        "/stream_track": "10015",
        "/stream_codec": "10015",
        "/stream_bidirectional_mode": "10015",
        "/client_state": "10015",
        "/timeout_secs": "10015",
        "/answering_machine_detection": "10015",
    }
    assert all(e["title"] and e["detail"] for e in errors)
    assert any("'audio'" in w for w in sim.warnings)
    assert not sim.calls


async def test_outbound_call_webhooks_in_order_and_signed(api, receiver) -> None:
    sim, client = api
    r = await client.post("/calls", json=dial_body(client_state="eyJzIjoxfQ=="))
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["call_control_id"].startswith("v3:")
    assert data["is_alive"] is False and data["record_type"] == "call"
    assert data["call_leg_id"] and data["call_session_id"]
    ccid = data["call_control_id"]

    await receiver.wait_for("call.answered")
    assert (await client.get(f"/calls/{ccid}")).json()["data"]["is_alive"] is True
    r = await client.post(f"/calls/{ccid}/actions/hangup")
    assert r.json() == {"data": {"result": "ok"}}
    await receiver.wait_for("call.hangup")

    assert receiver.types(ccid) == ["call.initiated", "call.answered", "call.hangup"]
    initiated, answered, hangup = receiver.events(ccid)
    assert initiated["payload"]["direction"] == "outgoing"
    assert initiated["payload"]["state"] == "bridging"
    assert answered["payload"]["state"] == "answered"
    for item in (initiated, answered, hangup):
        assert item["record_type"] == "event" and item["occurred_at"].endswith("Z")
        payload = item["payload"]
        assert payload["client_state"] == "eyJzIjoxfQ=="
        assert payload["call_leg_id"] == data["call_leg_id"]
        assert payload["connection_id"] == "1684641123236054244"
    assert hangup["payload"]["hangup_cause"] == "normal_clearing"
    assert hangup["payload"]["hangup_source"] == "caller"  # we placed the call and hung up
    assert hangup["payload"]["sip_hangup_cause"] == "200"
    assert set(hangup["payload"]["call_quality_stats"]) == {"inbound", "outbound"}
    for item in receiver.received:
        assert verify(sim.public_key_b64, item)
        assert abs(int(item.headers["telnyx-timestamp"]) - time.time()) < 60
        assert json.loads(item.body)["meta"] == {"attempt": 1, "delivered_to": receiver.url}

    r = await client.post(f"/calls/{ccid}/actions/speak", json={"payload": "hi", "voice": "female"})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "90018"
    r = await client.post(f"/calls/{ccid}/actions/hangup")
    assert r.status_code == 422 and r.json()["errors"][0]["title"] == "Call has already ended"
    r = await client.post("/calls/v3:nope/actions/hangup")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "90015"


async def test_inbound_call_flow_and_caller_hangup(api, receiver) -> None:
    sim, client = api
    caller = ScriptedCaller([Wait(50), Dtmf("7"), Wait(50)], ms_per_char=10, timeout_s=5)
    call = sim.place_inbound_call(PERSON, OUR_NUMBER, caller)
    first = (await receiver.wait_for("call.initiated"))[0]
    assert first["payload"]["direction"] == "incoming"
    assert first["payload"]["state"] == "parked"
    assert first["payload"]["from"] == PERSON and first["payload"]["to"] == OUR_NUMBER
    r = await client.post(
        f"/calls/{call.call_control_id}/actions/speak", json={"payload": "x", "voice": "female"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "90053"  # not answered yet

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller.run)
        await client.post(f"/calls/{call.call_control_id}/actions/answer", json={})
    await receiver.wait_for("call.hangup")
    types = receiver.types(call.call_control_id)
    assert types == ["call.initiated", "call.answered", "call.dtmf.received", "call.hangup"]
    dtmf, hangup = receiver.events(call.call_control_id)[2:]
    assert dtmf["payload"]["digit"] == "7"
    assert hangup["payload"]["hangup_source"] == "caller"
    assert caller.results.hangup_by == "caller"


async def test_command_id_is_deduplicated(api, receiver) -> None:
    sim, client = api
    call = await answered_inbound(sim, client, receiver)
    body = {"payload": "hello", "voice": "AWS.Polly.Joanna-Neural", "command_id": "speak-1"}
    for _ in range(3):
        r = await client.post(f"/calls/{call.call_control_id}/actions/speak", json=body)
        assert r.json() == {"data": {"result": "ok"}}
    assert call.spoken == ["hello"]
    dial = dial_body(command_id="dial-1")
    first = (await client.post("/calls", json=dial)).json()["data"]
    again = (await client.post("/calls", json=dial)).json()["data"]
    assert first["call_control_id"] == again["call_control_id"]
    assert sum(1 for c in sim.calls.values() if c.direction == "outgoing") == 1


async def test_webhook_retried_after_500(nursery) -> None:
    receiver = await start_receiver(nursery, fail_first=2)
    sim, client = await start_sim(nursery, receiver)
    sim.place_inbound_call(PERSON, OUR_NUMBER)
    await receiver.wait_for("call.initiated")
    assert [item.status for item in receiver.received] == [500, 500, 200]
    assert [json.loads(i.body)["meta"]["attempt"] for i in receiver.received] == [1, 2, 3]
    assert len({i.data["id"] for i in receiver.received}) == 1
    assert all(verify(sim.public_key_b64, item) for item in receiver.received)
    assert [d.status for d in sim.webhooks.log] == [500, 500, 200]
    await client.aclose()


async def test_webhook_faults(api, receiver) -> None:
    sim, client = api
    sim.webhooks.faults.duplicate = 1
    sim.webhooks.faults.bad_signature = 1
    sim.webhooks.faults.stale_timestamp = 1
    sim.webhooks.faults.reorder = 1
    call = sim.place_inbound_call(PERSON, OUR_NUMBER)
    await client.post(f"/calls/{call.call_control_id}/actions/answer", json={})
    await receiver.wait_for("call.answered")
    await receiver.wait_for("call.initiated")
    bodies = receiver.received
    # The forged and the replayed copy come first, then the genuine one twice (duplicate).
    assert not verify(sim.public_key_b64, bodies[1])
    assert int(bodies[0].headers["telnyx-timestamp"]) < time.time() - 300
    ids = [b.data["id"] for b in bodies]
    assert ids[2] == ids[3]
    # call.initiated was held back and delivered after call.answered.
    assert [b.data["event_type"] for b in bodies][-2:] == ["call.answered", "call.initiated"]


async def test_rest_fault_injection(api) -> None:
    sim, client = api
    sim.fail_next(1, 429, retry_after=2)
    sim.fail_next(1, 503)
    r = await client.post("/calls", json=dial_body())
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["errors"][0]["code"]
    assert (await client.post("/calls", json=dial_body())).status_code == 503
    assert (await client.post("/calls", json=dial_body())).status_code == 200


async def test_callee_busy_and_no_answer(api, receiver) -> None:
    sim, client = api
    sim.no_answer_timeout_s = 0.05
    sim.answer_with("+13125550111", None, behaviour="busy")
    sim.answer_with("+13125550112", None)
    busy = (await client.post("/calls", json=dial_body(to="+13125550111"))).json()["data"]
    silent = (await client.post("/calls", json=dial_body(to="+13125550112"))).json()["data"]
    await receiver.wait_for("call.hangup", count=2)
    causes = {
        e["payload"]["call_control_id"]: e["payload"]["hangup_cause"]
        for e in receiver.events()
        if e["event_type"] == "call.hangup"
    }
    assert causes == {busy["call_control_id"]: "user_busy", silent["call_control_id"]: "timeout"}
    assert "call.answered" not in receiver.types()


async def test_streaming_start_validation_and_failure(api, receiver) -> None:
    sim, client = api
    call = await answered_inbound(sim, client, receiver)
    url = f"/calls/{call.call_control_id}/actions/streaming_start"
    cases = [
        ({}, "/stream_url"),
        ({"stream_url": "https://127.0.0.1/media"}, "/stream_url"),
        (
            {"stream_url": "ws://127.0.0.1:1/m", "stream_bidirectional_codec": "pcmu"},
            "/stream_bidirectional_codec",
        ),
        (
            {"stream_url": "ws://127.0.0.1:1/m", "stream_bidirectional_sampling_rate": 8001},
            "/stream_bidirectional_sampling_rate",
        ),
        ({"stream_url": "ws://127.0.0.1:1/m", "custom_parameters": {"a": 1}}, "/custom_parameters"),
    ]
    for body, pointer in cases:
        r = await client.post(url, json=body)
        assert r.status_code == 422, body
        assert r.json()["errors"][0]["source"]["pointer"] == pointer
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = await client.post(
        url, json={"stream_url": f"ws://127.0.0.1:{port}/stream", "stream_track": "both_tracks"}
    )
    assert r.status_code == 200
    failed = (await receiver.wait_for("streaming.failed"))[0]["payload"]
    assert failed["failure_reason"] and failed["stream_id"]
    assert failed["stream_type"] == "websocket"
    assert failed["stream_params"] == {
        "stream_url": f"ws://127.0.0.1:{port}/stream",
        "track": "both_tracks",
    }


async def test_speak_and_transcription_emulation(api, receiver) -> None:
    sim, client = api
    caller = ScriptedCaller(
        [WaitForBot(min_ms_silence=150), Say("book a table"), Wait(700)],
        ms_per_char=10,
        timeout_s=5,
    )
    call = await answered_inbound(sim, client, receiver, caller)
    base = f"/calls/{call.call_control_id}/actions"
    r = await client.post(
        f"{base}/transcription_start",
        json={
            "transcription_engine": "Google",
            "transcription_engine_config": {"language": "en", "interim_results": True},
        },
    )
    assert r.status_code == 200
    r = await client.post(f"{base}/speak", json={"payload": "Hello there", "voice": "female"})
    assert r.status_code == 200
    results = await caller.run()
    await receiver.wait_for("call.hangup")
    types = receiver.types(call.call_control_id)
    assert types.index("call.speak.started") < types.index("call.speak.ended")
    ended = next(e for e in receiver.events() if e["event_type"] == "call.speak.ended")
    assert ended["payload"]["status"] == "completed"
    assert [t.text for t in results.bot_turns] == ["Hello there"]
    transcripts = [
        e["payload"]["transcription_data"]
        for e in receiver.events()
        if e["event_type"] == "call.transcription"
    ]
    finals = [t for t in transcripts if t["is_final"]]
    assert [t["transcript"] for t in finals] == ["book a table"]
    assert finals[0]["transcription_track"] == "inbound" and 0 < finals[0]["confidence"] <= 1
    assert any(not t["is_final"] for t in transcripts)  # interim results were asked for


async def test_speak_interrupted_by_hangup(api, receiver) -> None:
    sim, client = api
    call = await answered_inbound(sim, client, receiver)
    base = f"/calls/{call.call_control_id}/actions"
    await client.post(f"{base}/speak", json={"payload": "a long sentence " * 20, "voice": "female"})
    await receiver.wait_for("call.speak.started")
    await client.post(f"{base}/hangup", json={})
    await receiver.wait_for("call.hangup")
    types = receiver.types(call.call_control_id)
    assert types[-2:] == ["call.speak.ended", "call.hangup"]
    assert receiver.events(call.call_control_id)[-2]["payload"]["status"] == "call_hangup"
    hangup = receiver.events(call.call_control_id)[-1]["payload"]
    assert hangup["hangup_source"] == "callee"  # the server answered an inbound call


async def test_other_commands_and_call_status(api, receiver) -> None:
    sim, client = api
    callee = ScriptedCaller([Wait(2000)], timeout_s=5)
    sim.answer_with(PERSON, callee, machine=True)
    sim.amd_ms = 10
    body = dial_body(answering_machine_detection="detect", client_state="eyJhIjoxfQ==")
    ccid = (await client.post("/calls", json=body)).json()["data"]["call_control_id"]
    detected = (await receiver.wait_for("call.machine.detection.ended"))[0]["payload"]
    assert detected["result"] == "machine"
    base = f"/calls/{ccid}/actions"
    assert (await client.post(f"{base}/send_dtmf", json={"digits": "12#"})).status_code == 200
    bad = await client.post(f"{base}/send_dtmf", json={"digits": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["source"]["pointer"] == "/digits"
    r = await client.post(f"{base}/client_state_update", json={"client_state": "eyJiIjoyfQ=="})
    assert r.status_code == 200
    assert (await client.post(f"{base}/transfer", json={"to": "+13125550177"})).status_code == 200
    bridged = (await receiver.wait_for("call.bridged"))[0]["payload"]
    assert bridged["to"] == "+13125550177" and bridged["client_state"] == "eyJiIjoyfQ=="
    assert (await client.post(f"{base}/record_start", json={})).status_code == 200
    assert any("record_start" in w for w in sim.warnings)
    assert (await client.post(f"{base}/nonsense", json={})).status_code == 404
    status = (await client.get(f"/calls/{ccid}")).json()["data"]
    assert status["is_alive"] is True and status["client_state"] == "eyJiIjoyfQ=="
    kinds = [e.kind for e in callee.results.events]
    assert "dtmf" in kinds and "transferred" in kinds
    assert [e.detail for e in callee.results.events if e.kind == "dtmf"] == ["12#"]


async def test_machine_greeting_end_and_transfer_legs(api, receiver) -> None:
    sim, client = api
    sim.amd_ms, sim.amd_greeting_silence_ms = 10, 200
    machine = ScriptedCaller([Say("leave a message"), Wait(3000)], ms_per_char=20, timeout_s=5)
    sim.answer_with(PERSON, machine, machine=True)
    ccid = await client.post("/calls", json=dial_body(answering_machine_detection="greeting_end"))
    ccid = ccid.json()["data"]["call_control_id"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(machine.run)
        [ended] = await receiver.wait_for("call.machine.greeting.ended")
        assert ended["payload"]["result"] == "ended"
        # Reported once the greeting had played and then 200 ms of silence.
        said = machine.results.utterances[0]
        assert said.ended_at is not None and trio.current_time() - said.ended_at >= 0.2
        # A transfer to a busy number: leg B says so, this leg stays up for another try.
        busy = "+13125550111"
        sim.answer_with(busy, None, behaviour="busy")
        base = f"/calls/{ccid}/actions"
        assert (await client.post(f"{base}/transfer", json={"to": busy})).status_code == 200
        [hangup] = [e for e in await receiver.wait_for("call.hangup") if e["payload"]["to"] == busy]
        assert hangup["payload"]["hangup_cause"] == "user_busy"
        assert hangup["payload"]["call_control_id"] != ccid
        assert hangup["payload"]["call_session_id"] == sim.calls[ccid].call_session_id
        assert sim.calls[ccid].state == "answered"
        assert sim.calls[ccid].transfer_legs[0].events == ["call.initiated", "call.hangup"]
        nursery.cancel_scope.cancel()
