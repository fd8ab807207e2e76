"""Deepgram lost for good in the middle of a call, end to end through the lab: the socket
drops, the reconnect is refused (401), so ``SttLost``; the call is handed over to fallback
mode with its history and goes on through Telnyx speak and transcription, and it leaves
one call record, mode ``degraded``, with the turns of both parts."""

from __future__ import annotations

import trio
from conftest import start_lab_server
from test_fallback import (
    PATIENT,
    caller,
    claude_messages,
    commands,
    heard_reply_to,
    settle,
    wait_for,
)
from test_fallback import lab as lab  # fast speak and transcription

from voice_trio.sim.caller import Say, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

FIRST = "Quiero una cita para el lunes."
SECOND = "A las tres de la tarde."


async def test_deepgram_lost_for_good_hands_the_call_over_to_fallback_mode(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say(FIRST, 100),
            WaitForBot(min_ms_silence=300),
            Wait(800),  # Deepgram is lost here
            WaitForBot(min_ms_silence=300),  # "¿me decía?" through Telnyx speak
            Say(SECOND, 100),
            WaitForBot(min_ms_silence=300),
            Say("Eso es todo, gracias. Adiós.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1500),
        ],
        hang_up_when_done=False,
    )
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(lambda: len(party.results.bot_turns) == 2)
        await wait_for(lambda: party.results.bot_turns[1].ended_at is not None)
        [stream] = lab.deepgram.stt_streams
        lab.deepgram.reject_next_stt = 401  # the reconnect is refused: lost for good
        stream.drop_after_s = stream.transcriber.seconds + 0.1
        await wait_for(lambda: [c.mode for c in server.app.center.registry] == ["degraded"])
    results = party.results
    await settle(server)

    assert not results.errors and not results.timed_out
    assert stream.close_code == 1011 and lab.deepgram.stt_rejected == 1
    assert len(lab.deepgram.stt_streams) == 1  # no second Deepgram connection
    # After the hand-over: Telnyx speak and transcription, no second greeting.
    call_spoken = sim_call.spoken
    assert call_spoken[0] == "Disculpe, ¿me decía?"
    assert not any("Le habla Sofía" in s for s in call_spoken)
    assert len(commands(lab, "transcription_start")) == 1
    # Claude got the media part of the conversation as history, then the new words.
    after = claude_messages(lab)[1]
    assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant", "user"]
    assert after[2]["content"] == FIRST and after[4]["content"] == SECOND
    assert heard_reply_to(results, FIRST) and heard_reply_to(results, SECOND)
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    # One record for the whole call, mode degraded, the media part's turns first.
    record, turns = await server.app.center.store.get_call(sim_call.call_control_id)
    assert record.mode == "degraded" and record.end_reason == "agent_ended"
    assert record.status == "ended" and record.stt_audio_seconds > 0
    kinds = [t.kind for t in turns]
    assert kinds[:2] == ["greeting", "reply"] and "continuation" in kinds
    assert [t.index for t in turns] == list(range(len(turns)))
    assert turns[1].user_text == FIRST
    assert any(t.user_text == SECOND for t in turns[2:])
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="degraded"} 1.0' in metrics
    assert 'mode="media"' not in metrics.split("voice_calls_total", 1)[1].split("# HELP")[0]
    assert (await server.client.get("/api/sessions/stats")).json()["total_calls"] == 1
    server.stop.set()
