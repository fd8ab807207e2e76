"""Call records written by real calls, at every stage a call can end; and the second voice."""

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


async def call_and_settle(lab, server, script):
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party := caller(script))
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    found = await server.app.center.store.get_call(sim_call.call_control_id)
    assert found is not None, "no call record"
    return results, found[0], found[1]


async def test_a_finished_call_has_its_transcript_and_ledger(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    _, record, turns = await call_and_settle(
        lab,
        server,
        [
            WaitForBot(300),
            Say("Quiero una cita.", 100),
            WaitForBot(300),
            HangUp(),
        ],
    )
    assert (record.direction, record.from_number, record.to_number) == (
        "inbound",
        PATIENT,
        OUR_NUMBER,
    )
    assert record.status == "ended" and record.end_reason == "caller_hangup"
    assert record.mode == "media" and record.ended_at >= record.answered_at
    assert record.stt_audio_seconds > 0 and record.tts_characters > 0
    assert [t.kind for t in turns] == ["greeting", "reply"]
    reply = turns[1]
    assert reply.user_text == "Quiero una cita."
    assert reply.heard_text.startswith('Entendido, usted dijo: "Quiero una cita."')
    assert None not in (reply.t0, reply.t1, reply.t2, reply.t3, reply.t4, reply.t5)
    # A speculative reply (SPECULATIVE_REPLIES) was asked before the turn ended: t1 < t0.
    assert reply.t1 <= reply.t2 <= reply.t3 <= reply.t4 <= reply.t5 and reply.t0 <= reply.t3
    api = (await server.client.get(f"/api/calls/{record.call_control_id}")).json()
    assert api["turns"][1]["user_text"] == "Quiero una cita."
    server.stop.set()


@pytest.mark.parametrize(
    ("stage", "knobs", "script"),
    [
        ("greeting", {}, [Wait(400), HangUp()]),
        ("llm", {"ttft": 3.0}, [WaitForBot(300), Say("Hola.", 100), Wait(900), HangUp()]),
        ("tts", {"tts_ttfb_ms": 3000}, [WaitForBot(300), Say("Hola.", 100), Wait(900), HangUp()]),
    ],
)
async def test_hang_up_at_each_stage_keeps_the_record_and_leaves_nothing(
    nursery, lab, stage, knobs, script
) -> None:
    server = await start_lab_server(nursery, lab)
    await trio.sleep(0.3)  # fixed phrases cached
    if "ttft" in knobs:
        lab.anthropic.ttft = knobs["ttft"]
    if "tts_ttfb_ms" in knobs:
        lab.deepgram.tts_ttfb_ms = knobs["tts_ttfb_ms"]
    _, record, turns = await call_and_settle(lab, server, script)
    assert record.status == "ended" and record.end_reason == "caller_hangup", stage
    assert turns and turns[0].kind == "greeting"
    if stage != "greeting":
        assert turns[-1].user_text == "Hola." and turns[-1].t5 is None, stage
    assert [r for r in lab.telnyx.requests if r.path.endswith("/hangup")] == []
    assert len(server.app.center.registry) == 0
    server.stop.set()


async def test_elevenlabs_and_deepgram_voices_give_the_same_conversation(nursery, lab) -> None:
    heard = {}
    for provider in ("deepgram", "elevenlabs"):
        server = await start_lab_server(nursery, lab, TTS_PROVIDER=provider)
        results, _, _ = await call_and_settle(
            lab,
            server,
            [
                WaitForBot(300),
                Say("Necesito cambiar mi cita.", 100),
                WaitForBot(300),
                HangUp(),
            ],
        )
        heard[provider] = [t.text for t in results.bot_turns][1:]  # greeting aside
        server.stop.set()
    assert heard["elevenlabs"] == heard["deepgram"]
    assert 'usted dijo: "Necesito cambiar mi cita."' in heard["elevenlabs"][0]
    assert lab.elevenlabs.characters > 0
