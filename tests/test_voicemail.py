"""Outbound calls with answering machine detection: a machine gets a message after its
greeting and a hang-up; a person gets the conversation."""

import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.conversation.phrases import SPANISH, local_now
from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot, answering_machine

PATIENT = "+573001234567"
MACHINE_GREETING = "Hola, soy Ana. No puedo contestar, deje su mensaje."


def commands(lab, action: str) -> list:
    return [r for r in lab.telnyx.requests if r.path.endswith(f"/actions/{action}")]


async def place_call(server, **fields) -> str:
    body = {"telefono": PATIENT, "nombre": "Ana", **fields}
    r = await server.client.post("/api/call/initiate", json=body)
    assert r.status_code == 201, r.text
    return r.json()["call_control_id"]


async def record_of(server, ccid: str):
    with trio.fail_after(10):
        await server.app.center.registry.wait_until_empty()
    found = await server.app.center.store.get_call(ccid)
    assert found is not None
    return found


async def test_a_machine_gets_a_message_after_its_greeting(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, ANSWERING_MACHINE_DETECTION="greeting_end")
    machine = answering_machine(MACHINE_GREETING, ms_per_char=FAST_SPEECH_MS, timeout_s=30)
    lab.telnyx.answer_with(PATIENT, machine, machine=True)
    ccid = await place_call(server, contexto="recordatorio de su cita del lunes")
    results = await machine.run()
    record, turns = await record_of(server, ccid)
    [dial] = [r for r in lab.telnyx.requests if r.path == "/v2/calls"]
    assert dial.json["answering_machine_detection"] == "greeting_end"
    sim_call = lab.telnyx.calls[ccid]
    assert sim_call.events.index("call.machine.detection.ended") < sim_call.events.index(
        "call.machine.greeting.ended"
    )
    message = SPANISH.voicemail(
        nombre="Ana", contexto="recordatorio de su cita del lunes", now=local_now("America/Bogota")
    )
    recorded = results.bot_turns[-1]
    assert "Le llamábamos por lo siguiente: recordatorio de su cita del lunes." in recorded.text
    assert "devuélvanos la llamada" in recorded.text and "Ana" in recorded.text
    # Recorded after the greeting was over, whole, and nothing else was said to the machine.
    assert recorded.started_at > results.utterances[0].ended_at and not recorded.cut
    assert lab.anthropic.request_count == 0
    assert results.hangup_by == "bot" and len(commands(lab, "hangup")) == 1
    assert record.end_reason == "voicemail"
    assert turns[-1].bot_text == message and turns[-1].heard_text == message
    assert turns[-1].kind == "voicemail"
    server.stop.set()


async def test_a_person_gets_the_conversation(nursery, lab) -> None:
    server = await start_lab_server(
        nursery, lab, ANSWERING_MACHINE_DETECTION="greeting_end", AMD_WAIT_MS=2000
    )
    person = ScriptedCaller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Sí, quisiera confirmar mi cita.", 100),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ],
        ms_per_char=FAST_SPEECH_MS,
        turn_gap_ms=300,
        timeout_s=30,
    )
    lab.telnyx.answer_with(PATIENT, person, machine=False)
    ccid = await place_call(server)
    results = await person.run()
    record, _ = await record_of(server, ccid)
    heard = results.bot_text
    assert "Ana." in results.bot_turns[0].text  # the greeting, held for the verdict only
    assert 'usted dijo: "Sí, quisiera confirmar mi cita."' in heard
    assert "devuélvanos la llamada" not in heard
    assert "call.machine.greeting.ended" not in lab.telnyx.calls[ccid].events
    assert commands(lab, "hangup") == [] and record.end_reason == "caller_hangup"
    server.stop.set()
