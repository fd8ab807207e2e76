"""Claude failing mid-call: retried within a latency budget, else a short apology; the call
goes on either way."""

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.conversation.sentences import SentenceChunker
from voice_trio.sim.anthropic import Fault
from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

SCRIPT = [
    WaitForBot(300),
    Say("Quiero una cita.", 100),
    WaitForBot(300),
    Say("Para el lunes.", 100),
    WaitForBot(300),
    HangUp(),
]


async def talk(lab, server) -> list[str]:
    party = ScriptedCaller(SCRIPT, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30)
    lab.telnyx.place_inbound_call("+573001234567", OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    return [t.text for t in results.bot_turns]


@pytest.mark.parametrize(
    "fault",
    [
        Fault.rate_limited(retry_after=0.1),
        Fault.overloaded(),
        Fault.server_error(),
        Fault.cut(after_deltas=0),
        Fault.stream_error(after_deltas=0),
    ],
    ids=["429", "529", "500", "stream-cut", "error-event"],
)
async def test_a_failed_request_is_retried_and_the_caller_hears_the_answer(
    nursery, lab, fault
) -> None:
    server = await start_lab_server(nursery, lab)
    lab.anthropic.inject(fault)
    heard = await talk(lab, server)
    assert 'usted dijo: "Quiero una cita."' in heard[1]
    assert 'usted dijo: "Para el lunes."' in heard[2]
    assert lab.anthropic.request_count == 3  # one failed, retried once, then the next turn
    server.stop.set()


async def test_when_retries_run_out_the_caller_hears_an_apology_and_the_call_goes_on(
    nursery, lab
) -> None:
    server = await start_lab_server(nursery, lab)
    lab.anthropic.inject(Fault.overloaded(), times=20)
    lab.anthropic.ttft = 0.05
    party_heard = await _first_turn_fails_then_recovers(lab, server)
    assert "tuve un problema técnico" in party_heard[1]
    assert 'usted dijo: "Para el lunes."' in party_heard[2]
    server.stop.set()


async def _first_turn_fails_then_recovers(lab, server) -> list[str]:
    async def clear_faults_after_first_turn() -> None:
        with trio.fail_after(20):
            while lab.anthropic.request_count < 2:  # noqa: ASYNC110
                await trio.sleep(0.02)
        await trio.sleep(2.6)  # past the retry budget of the first turn
        lab.anthropic.clear_faults()

    async with trio.open_nursery() as n:
        n.start_soon(clear_faults_after_first_turn)
        heard = await talk(lab, server)
    return heard


async def test_deepgram_refusing_at_start_degrades_the_call_to_fallback_mode(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    lab.deepgram.reject_next_stt = 401
    heard = await talk(lab, server)
    said = "".join(heard).replace(" ", "")  # speak plays sentences back to back
    assert 'usteddijo:"Quierounacita."' in said  # via Telnyx transcription and speak
    assert any(r.path.endswith("/actions/transcription_start") for r in lab.telnyx.requests)
    metrics = (await server.client.get("/metrics")).text
    assert 'mode="degraded"' in metrics
    server.stop.set()


async def test_a_sentence_whose_tts_fails_goes_out_through_telnyx_speak(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    cache = server.app.center.phrase_cache
    fixed = []  # cached per sentence, as PhraseCache.warm splits them
    for text in server.app.center.phrases.fixed():
        chunker = SentenceChunker()
        fixed += chunker.push(text) + chunker.flush()
    with trio.fail_after(10):
        while any(cache.get(text) is None for text in fixed):  # noqa: ASYNC110
            await trio.sleep(0.02)  # fixed phrases cached: the next TTS request is the reply's
    lab.deepgram.tts_fail_next = 503
    heard = await talk(lab, server)
    speaks = [r.json["payload"] for r in lab.telnyx.requests if r.path.endswith("/actions/speak")]
    assert speaks == ["Entendido, usted dijo:"]
    # In its turn: after what was streamed before it, before what follows, never
    # interleaved word for word with the streamed voice.
    assert heard[1].startswith("Entendido, usted dijo:"), heard[1]
    assert heard[1].endswith('"Quiero una cita.". ¿En qué más le puedo ayudar?'), heard[1]
    server.stop.set()
