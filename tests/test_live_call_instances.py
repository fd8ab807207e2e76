"""Media calls whose socket is on one instance while every webhook and API request goes to
the other (two instances of one deployment on one PostgreSQL): the facts and the operator's
orders reach the call over the call-event bus, and the instance without the socket never
degrades or tears the call down. Each instance sends the streams it starts to the other
(``WS_STREAM_URL``), so every call's socket lands where its webhooks do not."""

from __future__ import annotations

import trio
from conftest import FAST_SPEECH_MS, LiveServer, start_lab_server
from test_store import pg_dsn  # noqa: F401  (fixture: a fresh PostgreSQL database)

from voice_trio.conversation.phrases import SPANISH, local_now
from voice_trio.server import reserve_listener
from voice_trio.sim.caller import (
    Dtmf,
    HangUp,
    Say,
    ScriptedCaller,
    Wait,
    WaitForBot,
    answering_machine,
)
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"
DESK = "+573009998877"
SECRET = "a-secret-both-instances-share-0123456789"
MACHINE_GREETING = "Hola, soy Ana. No puedo contestar, deje su mensaje."
NOTE = "Su médico ya revisó los resultados."
HANDOFF = "Un momento, por favor. Le comunico con una persona de nuestro equipo."


async def start_pair(nursery, lab, dsn: str, **env) -> tuple[LiveServer, LiveServer]:
    """Instances A and B of one deployment; the streams each starts go to the other. The
    wait for a stream is short, so that every call here outlives it on the instance that
    sent ``streaming_start`` (where the socket did not come)."""
    listeners = [reserve_listener("127.0.0.1") for _ in range(2)]
    ports = [listener.getsockname()[1] for listener in listeners]
    servers = []
    for me, other in ((0, 1), (1, 0)):
        servers.append(
            await start_lab_server(
                nursery,
                lab,
                listeners[me],
                DATABASE_URL=dsn,
                SERVER_SECRET=SECRET,
                WEBHOOK_BASE_URL=f"http://127.0.0.1:{ports[me]}",
                WS_STREAM_URL=f"ws://127.0.0.1:{ports[other]}/stream/media",
                **{"STREAM_CONNECT_TIMEOUT_MS": 1500, **env},
            )
        )
    for server in servers:
        assert (await server.client.get("/health")).json()["events"] == "connected"
    return servers[0], servers[1]


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


def commands(lab, action: str, ccid: str) -> list:
    return [r for r in lab.telnyx.requests if r.path.endswith(f"{ccid}/actions/{action}")]


async def ended_record(server: LiveServer, ccid: str, within: float = 10):
    store = server.app.center.store
    with trio.fail_after(within):
        while True:
            found = await store.get_call(ccid)
            if found is not None and found[0].status == "ended":
                return found
            await trio.sleep(0.05)


def assert_never_on(server: LiveServer, lab, ccid: str) -> None:
    """The instance without the socket never ran, degraded or tore down the call."""
    center = server.app.center
    assert center.registry.get(ccid) is None and center.registry.total_calls == 0
    for action in ("streaming_stop", "transcription_start", "speak"):
        assert commands(lab, action, ccid) == [], action


async def test_a_machine_verdict_sent_to_b_leaves_the_voicemail_on_a(nursery, lab, pg_dsn):  # noqa: F811
    a, b = await start_pair(nursery, lab, pg_dsn, ANSWERING_MACHINE_DETECTION="greeting_end")
    machine = answering_machine(MACHINE_GREETING, ms_per_char=FAST_SPEECH_MS, timeout_s=30)
    lab.telnyx.answer_with(PATIENT, machine, machine=True)
    r = await b.client.post(
        "/api/call/initiate", json={"telefono": PATIENT, "nombre": "Ana", "contexto": "su cita"}
    )
    assert r.status_code == 201, r.text
    ccid = r.json()["call_control_id"]
    results = await machine.run()
    record, turns = await ended_record(a, ccid)

    deliveries = [d for d in lab.telnyx.webhooks.log if d.call_control_id == ccid]
    assert {d.url for d in deliveries} == {b.app.center.settings.webhook_url}
    assert "call.machine.detection.ended" in lab.telnyx.calls[ccid].events
    message = SPANISH.voicemail(nombre="Ana", contexto="su cita", now=local_now("America/Bogota"))
    assert results.bot_turns[-1].text.strip() and "devuélvanos la llamada" in results.bot_text
    assert lab.anthropic.request_count == 0  # nothing but the message was said to the machine
    assert record.end_reason == "voicemail" and record.mode == "media"
    assert record.holder == a.app.center.instance_id
    assert turns[-1].kind == "voicemail" and turns[-1].bot_text == message
    assert len(commands(lab, "hangup", ccid)) == 1 and results.hangup_by == "bot"
    assert_never_on(b, lab, ccid)
    a.stop.set()
    b.stop.set()


async def wait_for_turns(party: ScriptedCaller, count: int) -> None:
    """Until the caller has heard ``count`` whole bot turns."""
    with trio.fail_after(15):
        while sum(t.ended_at is not None for t in party.results.bot_turns) < count:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_roles_swapped_an_operator_note_and_a_key_press_reach_the_call_on_b(
    nursery,
    lab,
    pg_dsn,  # noqa: F811
) -> None:
    a, b = await start_pair(nursery, lab, pg_dsn, TRANSFER_NUMBER=DESK)
    lab.telnyx.dtmf_frames = False  # the key reaches us as a webhook only, to A
    lab.telnyx.default_webhook_url = a.app.center.settings.webhook_url
    party = caller([WaitForBot(min_ms_silence=300), Wait(3000), Dtmf("0"), Wait(3500)])
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    ccid = sim_call.call_control_id
    async with trio.open_nursery() as calls:
        calls.start_soon(party.run)
        await wait_for_turns(party, 1)  # the greeting
        r = await a.client.post(f"/api/calls/{ccid}/say", json={"text": f"  {NOTE}\n"})
        assert r.status_code == 200, r.text
        assert r.json() == {"call_control_id": ccid, "status": "queued", "waiting": 1}
    record, turns = await ended_record(b, ccid)

    heard = party.results.bot_text
    assert NOTE in heard and HANDOFF in heard and heard.index(NOTE) < heard.index(HANDOFF)
    [transfer] = commands(lab, "transfer", ccid)
    assert transfer.json["to"] == DESK and sim_call.transferred_to == DESK
    assert "dtmf" not in lab.telnyx.calls[ccid].streams[0].frames_in  # no dtmf frame came
    assert record.end_reason == "transferred" and record.mode == "media"
    assert record.holder == b.app.center.instance_id
    assert [t.kind for t in turns] == ["greeting", "note", "handoff"]
    assert turns[1].bot_text == NOTE and turns[1].heard_text == NOTE
    assert_never_on(a, lab, ccid)
    a.stop.set()
    b.stop.set()


async def test_an_inbound_call_on_a_ends_by_operator_or_by_a_hangup_sent_to_b(
    nursery,
    lab,
    pg_dsn,  # noqa: F811
) -> None:
    a, b = await start_pair(nursery, lab, pg_dsn)
    lab.telnyx.default_webhook_url = b.app.center.settings.webhook_url
    assert (await b.client.post("/api/calls/v3:nobody/hangup")).status_code == 404

    # The operator hangs up through B: A says goodbye and hangs up; then it is 409, 404.
    party = caller([WaitForBot(min_ms_silence=300), Wait(8000)], hang_up_when_done=False)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    ccid = sim_call.call_control_id
    async with trio.open_nursery() as calls:
        calls.start_soon(party.run)
        await wait_for_turns(party, 1)
        r = await b.client.post(f"/api/calls/{ccid}/hangup")
        assert (r.status_code, r.json()["status"]) == (200, "hanging_up"), r.text
        r = await b.client.post(f"/api/calls/{ccid}/say", json={"text": "Una cosa más."})
        assert (r.status_code, r.json()["reason"]) == (409, "the call is ending"), r.text
    record, turns = await ended_record(a, ccid)
    assert party.results.hangup_by == "bot" and len(commands(lab, "hangup", ccid)) == 1
    assert SPANISH.goodbye in party.results.bot_text
    assert record.end_reason == "operator_hangup" and [t.kind for t in turns][-1] == "goodbye"
    assert (await b.client.post(f"/api/calls/{ccid}/hangup")).status_code == 404
    assert_never_on(b, lab, ccid)

    # The stop frame is lost and the socket stays open: call.hangup, sent to B, ends it.
    lab.telnyx.stream_lingers_after_hangup_s = 10
    party = caller([WaitForBot(300), Say("Quisiera una cita.", 100), WaitForBot(300), HangUp()])
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    ccid = sim_call.call_control_id
    await party.run()
    hung_up_at = trio.current_time()
    record, _ = await ended_record(a, ccid, within=3)
    with trio.fail_after(3):
        await sim_call.ended.wait()
    assert trio.current_time() - hung_up_at < 1.5  # not a silence timeout: the webhook did it
    assert lab.telnyx.calls[ccid].streams[0].close_reason == "server_closed"
    assert record.end_reason == "hangup" and record.mode == "media"
    assert commands(lab, "hangup", ccid) == []  # it was over already
    assert_never_on(b, lab, ccid)
    a.stop.set()
    b.stop.set()


async def test_a_fallback_call_is_hung_up_from_the_other_instance_through_its_state(
    nursery,
    lab,
    pg_dsn,  # noqa: F811
) -> None:
    a, b = await start_pair(nursery, lab, pg_dsn, USE_MEDIA_STREAMS="false")
    lab.telnyx.speak_ms_per_char = 10
    lab.telnyx.default_webhook_url = a.app.center.settings.webhook_url
    party = caller([WaitForBot(min_ms_silence=300), Wait(8000)], hang_up_when_done=False)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    ccid = sim_call.call_control_id
    async with trio.open_nursery() as calls:
        calls.start_soon(party.run)
        await wait_for_turns(party, 1)
        for action, body in (("say", {"text": "Hola."}), ("transfer", {"to": DESK})):
            r = await b.client.post(f"/api/calls/{ccid}/{action}", json=body)
            assert r.status_code == 409 and "fallback mode" in r.json()["reason"], r.text
        r = await b.client.post(f"/api/calls/{ccid}/hangup")
        assert (r.status_code, r.json()["status"]) == (200, "hanging_up"), r.text
        r = await b.client.post(f"/api/calls/{ccid}/hangup")
        assert r.status_code in (404, 409), r.text  # ending, or gone already
    record, _ = await ended_record(a, ccid)
    assert record.end_reason == "operator_hangup" and record.mode == "fallback"
    assert party.results.hangup_by == "bot" and len(commands(lab, "hangup", ccid)) == 1
    a.stop.set()
    b.stop.set()


async def test_the_console_feed_of_each_instance_shows_the_calls_of_the_other(
    nursery,
    lab,
    pg_dsn,  # noqa: F811
) -> None:
    """A call whose socket is on A: B's console feed holds it live, with its transcript as
    A's publishes it, and lets it go when it ends."""
    a, b = await start_pair(nursery, lab, pg_dsn)
    lab.telnyx.default_webhook_url = b.app.center.settings.webhook_url
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Hola, quisiera una cita.", 200),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ]
    )
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    ccid = sim_call.call_control_id
    seen: list[dict] = []
    with b.app.center.registry.feed.watch() as (events, _):
        async with trio.open_nursery() as calls:
            calls.start_soon(party.run)
            with trio.fail_after(20):
                async for event in events:
                    if event.get("c") == ccid:
                        seen.append(event)
                        if event["k"] == "end":
                            break
    kinds = [e["k"] for e in seen]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert "Hola, quisiera una cita." in [e.get("text") for e in seen if e["k"] == "caller"]
    assert any("Clínica Santa Lucía" in str(e.get("text")) for e in seen if e["k"] == "bot")
    assert b.app.center.registry.get(ccid) is None  # the call itself was never on B
    assert ccid not in b.app.center.registry.feed.calls  # gone from B's live view with its end
    a.stop.set()
    b.stop.set()
