"""Faults in the middle of real calls, end to end through the lab: Deepgram dropping while
the caller speaks, and the caller hanging up at every stage of a bot turn."""

from __future__ import annotations

from collections import Counter

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server, task_names

from voice_trio.sim.caller import BargeIn, HangUp, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"
LONG = "Quisiera una cita para el martes en la tarde, por favor."


def caller(script) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30)


def user_texts(lab) -> list[str]:
    return [str(r.body["messages"][-1]["content"]) for r in lab.anthropic.requests]


async def test_deepgram_dropping_mid_utterance_loses_nothing_and_the_call_goes_on(
    nursery, lab
) -> None:
    server = await start_lab_server(nursery, lab)
    party = caller(
        [
            WaitForBot(300),
            Say(LONG, 200),
            WaitForBot(300),
            Say("Gracias.", 100),
            WaitForBot(300),
            HangUp(),
        ]
    )
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    dropped_at: list[float] = []

    async def drop_mid_utterance() -> None:
        with trio.fail_after(15):
            while not party.results.utterances or not lab.deepgram.stt_streams:  # noqa: ASYNC110
                await trio.sleep(0.01)
            stream = lab.deepgram.stt_streams[0]
            # A third of the way into the sentence (about 1.4 s of speech).
            stream.drop_after_s = stream.transcriber.seconds + 0.45
            while not stream.closed:  # noqa: ASYNC110
                await trio.sleep(0.01)
        dropped_at.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(drop_mid_utterance)
        results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()

    first = lab.deepgram.stt_streams[0]
    assert first.close_code == 1011  # the simulator dropped it
    said = results.utterances[0]
    assert said.started_at < dropped_at[0] < said.ended_at, "the drop was not mid-utterance"
    assert len(lab.deepgram.stt_streams) == 2  # one reconnect, no more
    # The whole sentence reached Claude as one turn, and the caller heard the answer to it.
    assert user_texts(lab)[0] == LONG
    heard = [t.text for t in results.bot_turns]
    assert f'usted dijo: "{LONG}"' in heard[1]
    assert 'usted dijo: "Gracias."' in heard[2]  # and the call went on
    assert results.hangup_by == "caller"
    record, _ = await server.app.center.store.get_call(sim_call.call_control_id)
    assert record.mode == "media" and record.end_reason == "caller_hangup"
    metrics = (await server.client.get("/metrics")).text
    assert "voice_stt_reconnects_total 1.0" in metrics
    server.stop.set()


STAGES = {
    "greeting": ({}, [Wait(400), HangUp()]),
    "llm": ({"ttft": 3.0}, [WaitForBot(300), Say("Hola.", 100), Wait(900), HangUp()]),
    "tts": ({"tts_ttfb_ms": 3000}, [WaitForBot(300), Say("Hola.", 100), Wait(900), HangUp()]),
    # The caller talks over the reply and hangs up as soon as they have said it.
    "barge-in": (
        {},
        [
            WaitForBot(300),
            Say("Necesito información sobre los horarios de atención.", 100),
            BargeIn(after_bot_ms=400, text="Espere."),
            HangUp(),
        ],
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_hanging_up_at_any_stage_ends_once_keeps_the_record_and_leaves_nothing(
    nursery, lab, stage
) -> None:
    knobs, script = STAGES[stage]
    server = await start_lab_server(nursery, lab)
    # A first call warms the phrase cache and opens the pooled connections every later call
    # reuses; the baseline is taken after it.
    warm_up = caller([WaitForBot(300), HangUp()])
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, warm_up)
    await warm_up.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    await trio.sleep(0.3)
    tasks_before = task_names()
    lab.telnyx.requests.clear()
    if "ttft" in knobs:
        lab.anthropic.ttft = knobs["ttft"]
    if "tts_ttfb_ms" in knobs:
        lab.deepgram.tts_ttfb_ms = knobs["tts_ttfb_ms"]

    party = caller(script)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()

    assert results.hangup_by == "caller" and not results.errors
    # One hang-up, the caller's: the server sent none of its own.
    assert [r.path for r in lab.telnyx.requests if r.path.endswith("/hangup")] == []
    found = await server.app.center.store.get_call(sim_call.call_control_id)
    assert found is not None, "no call record"
    record, turns = found
    assert record.status == "ended" and record.end_reason == "caller_hangup"
    assert turns and turns[0].kind == "greeting"
    if stage in ("llm", "tts"):
        assert turns[-1].user_text == "Hola." and turns[-1].t5 is None
    if stage == "barge-in":
        assert results.clears >= 1
        cut = [t for t in turns if t.interrupted]
        assert cut and cut[0].heard_text, "the interrupted reply is on file as heard"
        reply = turns[-1]
        assert reply.interrupted and reply.heard_text, "the cut reply is on file as heard"
    with trio.move_on_after(5):  # a simulator may sit out its delay before it sees the close
        while len(task_names()) > len(tasks_before):  # noqa: ASYNC110
            await trio.sleep(0.05)  # sockets close asynchronously after the call ends
    left = Counter(task_names()) - Counter(tasks_before)
    assert not left, f"tasks left behind: {left}"
    assert len(server.app.center.registry) == 0
    server.stop.set()
