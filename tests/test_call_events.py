"""The call-event bus between two instances on one PostgreSQL, without the simulators: a
call "held" on A (registered, with a session's signal sink and controls) gets the facts
and orders sent to B; B answers the API with what A said. And losing the bus connection
is survived, counted and said in /health; with SQLite there is no bus at all."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest
import trio
from conftest import LiveServer, start_server, webhook_body
from test_store import PG_ADMIN, pg_dsn  # noqa: F401  (fixture: a fresh PostgreSQL database)

from voice_trio.calls import bus as bus_module
from voice_trio.calls.ends import CallMode
from voice_trio.calls.orders import MAX_SAY_CHARS, Order, Outcome, accepted, refused
from voice_trio.calls.registry import ActiveCall
from voice_trio.store import CallRecord, StoreError
from voice_trio.store.notify import Listener

SECRET = "a-secret-both-instances-share-0123456789"


class FakeControls:
    """What a media session offers for orders: here, a scripted answer."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.orders: list[Order] = []

    def obey(self, order: Order) -> Outcome:
        self.orders.append(order)
        return self.outcome


async def two_instances(nursery, dsn: str) -> tuple[LiveServer, LiveServer]:
    env = {"DATABASE_URL": dsn, "SERVER_SECRET": SECRET, "TRANSFER_NUMBER": "+573009998877"}
    return await start_server(nursery, env), await start_server(nursery, env)


async def hold_media_call(server: LiveServer, ccid: str) -> tuple[ActiveCall, list, FakeControls]:
    """A media call as ``server`` holds it: registered, its record written, its session's
    signal sink attached and its controls taking orders."""
    center = server.app.center
    call = ActiveCall(ccid, mode=CallMode.MEDIA)
    center.registry.add(call)
    await center.store.start_call(
        CallRecord(ccid, "inbound", "+573001234567", "+5716000000", holder=center.instance_id)
    )
    facts: list[tuple[str, dict[str, Any]]] = []
    center.signals.attach(ccid, lambda kind, payload: facts.append((kind, payload)))
    controls = FakeControls(accepted(status="queued", waiting=1))
    call.obey = controls.obey
    return call, facts, controls


async def post_webhook(server: LiveServer, event_type: str, ccid: str, **payload: Any) -> None:
    r = await server.client.post(
        "/webhook/telnyx", content=webhook_body(event_type, ccid, **payload)
    )
    assert r.status_code == 200, r.text


async def until(condition, within: float = 3.0) -> float:
    start = trio.current_time()
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)
    return trio.current_time() - start


async def test_facts_sent_to_b_reach_the_call_held_on_a(nursery, pg_dsn) -> None:  # noqa: F811
    a, b = await two_instances(nursery, pg_dsn)
    for server in (a, b):
        assert (await server.client.get("/health")).json()["events"] == "connected"
    ccid = "v3:held-on-a"
    call, facts, _ = await hold_media_call(a, ccid)

    # (One at a time: webhook reactions run side by side, and Telnyx keeps no order either.)
    await post_webhook(b, "call.dtmf.received", ccid, digit="5", **{"from": "+57300", "to": "+57"})
    await until(lambda: len(facts) == 1)
    await post_webhook(b, "call.machine.detection.ended", ccid, result="machine")
    await until(lambda: len(facts) == 2)
    assert facts == [
        ("call.dtmf.received", {"digit": "5"}),
        ("call.machine.detection.ended", {"result": "machine"}),
    ]

    # A fact that comes before its call's session is kept on every instance, and handed
    # over when the session attaches (machine detection often beats the socket).
    await post_webhook(b, "call.machine.detection.ended", "v3:early", result="human")
    early: list[tuple[str, dict[str, Any]]] = []
    await until(lambda: len(a.app.center.signals._early) == 1)
    a.app.center.signals.attach("v3:early", lambda kind, p: early.append((kind, p)))
    assert early == [("call.machine.detection.ended", {"result": "human"})]

    await post_webhook(b, "call.hangup", ccid, hangup_cause="normal_clearing")
    await until(lambda: call.end_reason is not None)
    assert call.end_reason == "hangup" and call.cancel_scope.cancel_called
    assert b.app.center.registry.total_calls == 0
    metrics = (await a.client.get("/metrics")).text
    assert 'voice_call_events_total{kind="fact",outcome="received"} 4.0' in metrics
    a.stop.set()
    b.stop.set()


async def test_facts_reach_the_holder_in_milliseconds(nursery, pg_dsn) -> None:  # noqa: F811
    """scripts/event_latency.py measures it properly (two processes, hundreds of events);
    this guards against delivery that waits for a poll to time out (POLL_SECONDS)."""
    a, b = await two_instances(nursery, pg_dsn)
    ccid = "v3:timed"
    _, facts, _ = await hold_media_call(a, ccid)
    took = []
    for n in range(60):
        took.append(await _passed_on(b, facts, ccid, str(n % 10)))
    took.sort()
    assert took[len(took) // 2] < 0.05, took  # the median; p99 on a quiet machine: ~15 ms
    a.stop.set()
    b.stop.set()


async def _passed_on(sender: LiveServer, facts: list, ccid: str, digit: str) -> float:
    facts.clear()
    start = trio.current_time()
    await sender.app.center.live.pass_on(ccid, "call.dtmf.received", {"digit": digit})
    await until(lambda: bool(facts))
    assert facts == [("call.dtmf.received", {"digit": digit})]
    return trio.current_time() - start


async def test_streaming_failed_at_b_hands_over_the_call_on_a_and_b_starts_nothing(
    nursery,
    pg_dsn,  # noqa: F811
) -> None:
    a, b = await two_instances(nursery, pg_dsn)
    ccid = "v3:streaming-on-a"
    assert await a.app.center.claim_stream(ccid)  # A's socket proved the call
    call, _, _ = await hold_media_call(a, ccid)
    await post_webhook(b, "streaming.failed", ccid, failure_reason="connection lost")
    await until(lambda: call.end_reason is not None)
    assert call.end_reason == "stream_failed"  # A's session hands the call over as it ends
    await trio.sleep(0.2)
    assert b.app.center.registry.total_calls == 0 and len(b.app.center.fallback) == 0

    # No socket claimed this one anywhere: the instance that got the webhook carries it.
    await post_webhook(b, "streaming.failed", "v3:never-streamed", failure_reason="refused")
    await until(lambda: b.app.center.registry.get("v3:never-streamed") is not None)
    assert b.app.center.registry.get("v3:never-streamed").mode == "degraded"
    assert a.app.center.registry.get("v3:never-streamed") is None
    a.stop.set()
    b.stop.set()


async def test_orders_sent_to_b_are_carried_out_and_answered_by_a(nursery, pg_dsn) -> None:  # noqa: F811
    a, b = await two_instances(nursery, pg_dsn)
    ccid = "v3:ordered-on-a"
    _, _, controls = await hold_media_call(a, ccid)

    r = await b.client.post(f"/api/calls/{ccid}/say", json={"text": "Su cita\x1b es\n mañana."})
    assert r.status_code == 200
    assert r.json() == {"call_control_id": ccid, "status": "queued", "waiting": 1}
    r = await b.client.post(f"/api/calls/{ccid}/transfer")
    assert r.status_code == 200
    assert controls.orders == [
        Order("say", text="Su cita es mañana."),
        Order("transfer", to="+573009998877"),  # TRANSFER_NUMBER, as B read it
    ]
    controls.outcome = refused("the call is being transferred")
    r = await b.client.post(f"/api/calls/{ccid}/transfer", json={"to": "+573001112233"})
    assert r.status_code == 409
    assert r.json() == {
        "call_control_id": ccid,
        "error": "conflict",
        "reason": "the call is being transferred",
    }
    assert controls.orders[-1] == Order("transfer", to="+573001112233")

    # Unknown: 404 at once. Recorded as live, but nobody holds it: 504 after the wait.
    with trio.fail_after(1):
        r = await b.client.post("/api/calls/v3:unknown/hangup")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    store = b.app.center.store
    await store.start_call(CallRecord("v3:orphan", "inbound", "+5730", "+57", holder="gone"))
    started = trio.current_time()
    r = await b.client.post("/api/calls/v3:orphan/hangup")
    assert r.status_code == 504 and r.json()["error"] == "no_answer"
    assert 1.9 <= trio.current_time() - started < 4
    a.stop.set()
    b.stop.set()


@pytest.mark.parametrize(
    ("action", "body", "field", "reason"),
    [
        ("say", {}, "text", "is required: the words for the agent to say"),
        ("say", {"text": " \n\t"}, "text", "is required: the words for the agent to say"),
        ("say", {"text": "x" * (MAX_SAY_CHARS + 1)}, "text", "must be at most 500 characters"),
        ("say", {"text": "hola", "voice": "x"}, "voice", "unknown field; say takes text"),
        ("transfer", {"to": "3001234567"}, "to", "must be an E.164 phone number"),
        ("transfer", {"to": 5}, "to", "must be an E.164 phone number"),
        ("hangup", {"now": True}, "now", "unknown field; hangup takes no fields"),
        ("hangup", [], "body", "must be a JSON object"),
    ],
)
async def test_a_bad_order_is_422_naming_the_field(nursery, action, body, field, reason) -> None:
    server = await start_server(nursery, {})
    r = await server.client.post(f"/api/calls/v3:any/{action}", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert r.json()["reason"].startswith(reason)
    r = await server.client.post("/api/calls/v3:any/say", content=b"{not json")
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = await server.client.post("/api/calls/v3:any/transfer")  # no TRANSFER_NUMBER
    assert r.status_code == 422 and r.json()["reason"] == "is required: TRANSFER_NUMBER is not set"
    server.stop.set()


async def test_with_sqlite_there_is_no_bus_and_orders_act_on_this_process(nursery) -> None:
    server = await start_server(nursery, {})
    assert (await server.client.get("/health")).json()["events"] == "local"
    call = ActiveCall("v3:here", mode=CallMode.MEDIA)
    server.app.center.registry.add(call)
    controls = FakeControls(accepted(status="hanging_up"))
    call.obey = controls.obey
    r = await server.client.post("/api/calls/v3:here/hangup")
    assert (r.status_code, r.json()["status"]) == (200, "hanging_up")
    assert controls.orders == [Order("hangup")]
    with trio.fail_after(1):
        r = await server.client.post("/api/calls/v3:elsewhere/hangup")
    assert r.status_code == 404
    long_id = "v3:" + "x" * 300
    assert (await server.client.post(f"/api/calls/{long_id}/hangup")).status_code == 404
    server.stop.set()


async def test_losing_the_bus_connection_is_survived_counted_and_said_in_health(
    nursery,
    pg_dsn,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = await two_instances(nursery, pg_dsn)
    ccid = "v3:held-through-an-outage"
    _, facts, _ = await hold_media_call(a, ccid)
    refusals = 3
    real_connect = Listener.connect

    def flaky_connect(self: Listener) -> None:
        nonlocal refusals
        if refusals and self is a.app.center.bus._listener:
            refusals -= 1
            raise StoreError("connection refused (test)")
        real_connect(self)

    monkeypatch.setattr(Listener, "connect", flaky_connect)
    listener = a.app.center.bus._listener
    assert listener is not None and listener.backend_pid is not None
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await until(lambda: a.app.center.bus.state == "reconnecting")
    health = (await a.client.get("/health")).json()
    assert health["status"] == "ok" and health["events"] == "reconnecting"
    await until(lambda: a.app.center.bus.state == "connected", within=10)
    assert refusals == 0
    assert (await a.client.get("/health")).json()["events"] == "connected"
    metrics = (await a.client.get("/metrics")).text
    assert re.search(r"^voice_call_event_reconnects_total 1\.0$", metrics, re.M)

    await post_webhook(b, "call.dtmf.received", ccid, digit="7")  # it works again
    await until(lambda: facts == [("call.dtmf.received", {"digit": "7"})])
    a.stop.set()
    b.stop.set()


async def test_malformed_events_on_the_channel_are_dropped_and_counted(nursery, pg_dsn) -> None:  # noqa: F811
    a, _ = await two_instances(nursery, pg_dsn)
    ccid = "v3:still-fine"
    _, facts, _ = await hold_media_call(a, ccid)
    junk = [
        "not json",
        "[1, 2]",
        json.dumps({"k": "fact"}),  # no sender
        json.dumps({"o": "x", "k": "fact", "c": ccid, "t": "call.answered", "p": {}}),
        json.dumps({"o": "x", "k": "do", "c": ccid, "r": "1", "a": "explode"}),
        "[" * 5000 + "]" * 2000,
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for payload in junk:
            conn.execute("SELECT pg_notify(%s, %s)", (bus_module.CHANNEL, payload))
        good = {"o": "x", "k": "fact", "c": ccid, "t": "call.dtmf.received", "p": {"digit": "1"}}
        conn.execute("SELECT pg_notify(%s, %s)", (bus_module.CHANNEL, json.dumps(good)))
    await until(lambda: facts == [("call.dtmf.received", {"digit": "1"})])
    metrics = (await a.client.get("/metrics")).text
    dropped = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("voice_call_events_total{") and 'outcome="dropped"' in line
    )
    assert dropped == len(junk)
    a.stop.set()
