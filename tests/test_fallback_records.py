"""Call records of fallback-mode calls (SQLite store), at every way such a call can end;
and LLM token usage in the records of both modes."""

import pytest
import trio
from conftest import start_lab_server
from test_fallback import PATIENT, caller, commands, wait_for

from voice_trio.sim.caller import HangUp, Say, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

FALLBACK = {"USE_MEDIA_STREAMS": "false"}


@pytest.fixture
async def lab(lab):
    lab.telnyx.speak_ms_per_char = lab.deepgram.ms_per_char = 10
    lab.telnyx.transcription_silence_ms = 250
    return lab


async def call_and_record(lab, server, script, **kw):
    party = caller(script, **kw)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    center = server.app.center
    with trio.fail_after(5):
        await center.registry.wait_until_empty()
    found = await center.store.get_call(sim_call.call_control_id)
    assert found is not None, "no call record"
    assert await center.fallback.shared.load(sim_call.call_control_id) is None
    return results, sim_call, *found


async def test_hang_up_during_the_greeting(nursery, lab) -> None:
    lab.telnyx.speak_ms_per_char = 40  # the greeting takes seconds to say
    server = await start_lab_server(nursery, lab, **FALLBACK)
    _, _, record, turns = await call_and_record(lab, server, [Wait(400), HangUp()])
    assert record.mode == "fallback" and record.status == "ended"
    assert record.end_reason == "hangup" and record.ended_at >= record.answered_at
    assert (record.direction, record.from_number, record.to_number) == (
        "inbound",
        PATIENT,
        OUR_NUMBER,
    )
    [greeting] = turns
    assert greeting.kind == "greeting" and "Le habla Sofía" in greeting.heard_text
    assert record.tts_characters == len(greeting.heard_text)
    assert record.llm_input_tokens == 0
    assert commands(lab, "hangup") == []
    server.stop.set()


async def test_hang_up_while_the_reply_is_being_thought(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, **FALLBACK)
    lab.anthropic.ttft = 3.0
    script = [WaitForBot(300), Say("Hola.", 100), Wait(1200), HangUp()]
    _, _, record, turns = await call_and_record(lab, server, script)
    assert record.end_reason == "hangup" and record.status == "ended"
    assert [t.kind for t in turns] == ["greeting", "reply"]
    cut = turns[1]
    assert cut.user_text == "Hola." and cut.interrupted and cut.heard_text == ""
    assert cut.t0 is not None and cut.t1 is not None and cut.t3 is None
    assert commands(lab, "hangup") == []
    server.stop.set()


async def test_hang_up_while_the_reply_is_being_spoken(nursery, lab) -> None:
    lab.telnyx.speak_ms_per_char = 30
    server = await start_lab_server(nursery, lab, **FALLBACK)
    script = [WaitForBot(300), Say("Hola.", 100), Wait(1200), HangUp()]  # while it plays
    _, _, record, turns = await call_and_record(lab, server, script)
    assert record.end_reason == "hangup"
    reply = turns[-1]
    assert reply.kind == "reply" and reply.user_text == "Hola."
    assert reply.heard_text.startswith("Entendido")  # the sentences Telnyx was given
    assert None not in (reply.t0, reply.t1, reply.t2, reply.t3)
    assert reply.t4 is None and reply.t5 is None  # Telnyx makes and plays the audio
    assert record.llm_input_tokens > 0 and record.llm_output_tokens > 0
    server.stop.set()


async def test_max_duration_says_goodbye_and_hangs_up_once(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, MAX_CALL_SECONDS=3, **FALLBACK)
    script = [WaitForBot(300), Say("Quiero una cita.", 100), WaitForBot(300), Wait(6000)]
    results, _, record, turns = await call_and_record(lab, server, script, hang_up_when_done=False)
    assert record.end_reason == "max_duration" and record.status == "ended"
    assert [t.kind for t in turns][-1] == "goodbye"
    assert "Gracias por llamar" in turns[-1].heard_text
    assert turns[1].kind == "reply" and turns[1].user_text == "Quiero una cita."
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    # Characters sent to speak: what was heard, without the spaces joining sentences.
    assert 0 < record.tts_characters <= sum(len(t.heard_text) for t in turns)
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="max_duration",mode="fallback"} 1.0' in metrics
    server.stop.set()


async def test_a_degraded_call_keeps_one_record_of_both_parts(nursery, lab) -> None:
    from conftest import start_lab_server

    server = await start_lab_server(nursery, lab, STREAM_LOST_GRACE_MS=300)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1200),  # the stream drops here
            Say("A las tres de la tarde.", 100),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ]
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(
            lambda: lab.anthropic.request_count == 1 and len(party.results.bot_turns) == 2
        )
        await wait_for(lambda: party.results.bot_turns[1].ended_at is not None)
        call.drop_stream()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    record, turns = await server.app.center.store.get_call(call.call_control_id)
    assert record.mode == "degraded" and record.status == "ended"
    assert record.end_reason == "hangup"
    assert [t.kind for t in turns] == ["greeting", "reply", "continuation", "reply"]
    assert [t.index for t in turns] == [0, 1, 2, 3]
    assert turns[3].user_text == "A las tres de la tarde."
    assert record.stt_audio_seconds > 0  # from the media part
    assert record.llm_input_tokens > 0 and record.llm_output_tokens > 0
    server.stop.set()


async def test_media_calls_record_llm_tokens(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    script = [WaitForBot(300), Say("Quiero una cita.", 100), WaitForBot(300), HangUp()]
    _, _, record, _ = await call_and_record(lab, server, script)
    assert record.mode == "media"
    assert record.llm_input_tokens > 0 and record.llm_output_tokens > 0
    server.stop.set()
