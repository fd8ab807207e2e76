"""Whole calls through the whole audio path: scripted caller <-> fake carrier <-> server <->
fake Deepgram, fake Anthropic, fake TTS. Assertions are on what crossed the wire."""

import re
from collections import Counter

import trio
from conftest import FAST_SPEECH_MS, count_fds, start_lab_server, task_names

from voice_trio.sim.caller import BargeIn, HangUp, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


async def inbound(lab, party: ScriptedCaller):
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    return await party.run()


async def settle(server) -> None:
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()


def user_texts(lab) -> list[str]:
    """What reached Claude as the caller's words, request by request."""
    out = []
    for req in lab.anthropic.requests:
        last = req.body["messages"][-1]
        out.append(last["content"] if isinstance(last["content"], str) else str(last["content"]))
    return out


def commands(lab, action: str) -> list:
    return [r for r in lab.telnyx.requests if r.path.endswith(f"/actions/{action}")]


async def test_a_conversation_end_to_end_leaves_nothing_behind(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    # A first call opens the keep-alive connection pools (Telnyx REST, TTS, Claude) that
    # every later call reuses; the counts are taken after it.
    warm_up = [WaitForBot(300), Say("Hola.", 100), WaitForBot(300), HangUp()]
    await inbound(lab, caller(warm_up))
    await settle(server)
    await trio.sleep(0.5)
    tasks_before, fds_before = task_names(), count_fds()
    lab.anthropic.requests.clear()
    results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say("Quiero una cita para el lunes.", 200),
                WaitForBot(min_ms_silence=300),
                Say("A las tres de la tarde.", 200),
                WaitForBot(min_ms_silence=300),
                HangUp(),
            ]
        ),
    )
    await settle(server)
    assert not results.errors and not results.timed_out
    heard = [t.text for t in results.bot_turns]
    assert re.search(r"Buen(os días|as tardes|as noches)\.", heard[0])
    assert "Le habla Sofía, de la Clínica Santa Lucía." in heard[0]
    # What the caller said went through STT into Claude, and Claude's answer came back as speech.
    assert "Quiero una cita para el lunes." in user_texts(lab)[0]
    assert 'usted dijo: "Quiero una cita para el lunes."' in heard[1]
    assert 'usted dijo: "A las tres de la tarde."' in heard[2]
    latencies = results.latencies_ms
    assert len(latencies) == 2 and all(100 < ms < 3000 for ms in latencies)
    # The caller hung up: the server sent no hangup of its own.
    assert commands(lab, "hangup") == []
    assert len(commands(lab, "streaming_start")) == 2
    assert {c.json["stream_bidirectional_mode"] for c in commands(lab, "streaming_start")} == {
        "rtp"
    }
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_turn_stage_seconds_count{stage="t0-t5"} 3.0' in metrics
    assert 'voice_calls_total{end_reason="caller_hangup",mode="media"} 2.0' in metrics
    with trio.move_on_after(3):
        while len(task_names()) > len(tasks_before) or count_fds() > fds_before:  # noqa: ASYNC110
            await trio.sleep(0.05)  # sockets close asynchronously after the call ends
    left = Counter(task_names()) - Counter(tasks_before)
    assert not left, f"tasks left behind: {left}"
    assert count_fds() <= fds_before  # idle keep-alive connections may have closed meanwhile
    assert len(server.app.center.registry) == 0
    server.stop.set()


async def test_barge_in_stops_the_bot_and_history_keeps_what_was_heard(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say("Necesito información sobre los horarios de atención de la clínica.", 100),
                BargeIn(after_bot_ms=500, text="Espere, otra cosa."),
                WaitForBot(min_ms_silence=300),
                HangUp(),
            ]
        ),
    )
    await settle(server)
    assert results.clears >= 1
    cut = [t for t in results.bot_turns if t.cut]
    assert cut and cut[0].text  # the caller heard the beginning, then it stopped
    full = 'Entendido, usted dijo: "Necesito información sobre los horarios de atención de la clínica."'
    assert full not in cut[0].text
    # The next request to Claude carries the reply as heard, marked as interrupted.
    history = lab.anthropic.requests[-1].body["messages"]
    assistant = [m["content"] for m in history if m["role"] == "assistant"][-1]
    assert assistant.endswith(" —") and len(assistant) < len(full)
    assert history[-1]["content"].endswith("Espere, otra cosa.")
    stream = next(s for c in lab.telnyx.calls.values() for s in c.streams)
    assert stream.clears >= 1
    server.stop.set()


async def test_end_call_tool_says_goodbye_then_hangs_up_once(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say("Eso es todo, gracias. Adiós.", 100),
                WaitForBot(min_ms_silence=300),
                Wait(2000),
            ],
            hang_up_when_done=False,
        ),
    )
    await settle(server)
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1
    assert results.hangup_by == "bot"
    server.stop.set()


async def test_silence_gets_one_reprompt_then_a_goodbye(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, SILENCE_TIMEOUT_MS=1000)
    results = await inbound(
        lab, caller([WaitForBot(min_ms_silence=300), Wait(8000)], hang_up_when_done=False)
    )
    await settle(server)
    heard = " ".join(t.text for t in results.bot_turns)
    assert "¿Sigue ahí?" in heard
    assert "voy a terminar la llamada" in heard
    assert len(commands(lab, "hangup")) == 1
    assert lab.anthropic.request_count == 0  # nothing was said, nothing was asked of Claude
    server.stop.set()


async def test_maximum_call_length_ends_the_call_politely(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, MAX_CALL_SECONDS=2)
    results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=200),
                Say("Tengo una pregunta muy larga sobre las citas de la próxima semana.", 0),
                Wait(6000),
            ],
            hang_up_when_done=False,
        ),
    )
    await settle(server)
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1
    server.stop.set()


async def test_pcma_and_out_of_order_frames_are_understood(nursery, lab) -> None:
    """A Telnyx that streams A-law although PCMU was asked for (on a PCMA call it could
    transcode, so the knob forces it): the caller's words reach Claude, and the bot's
    replies (PCMU, as the bidirectional codec was declared) reach the caller."""
    lab.telnyx.call_codec = lab.telnyx.stream_codec = "PCMA"
    lab.telnyx.out_of_order_share = 0.2
    server = await start_lab_server(nursery, lab)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Buenas tardes, quiero cancelar mi cita.", 100),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ]
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(server)
    assert [s.params.codec for s in call.streams] == ["PCMA"]
    assert "Buenas tardes, quiero cancelar mi cita." in user_texts(lab)[0]
    assert "Le habla Sofía" in results.bot_turns[0].text
    assert "cancelar mi cita" in results.bot_turns[1].text  # the reply went back over the stream
    assert not [r for r in lab.telnyx.requests if r.path.endswith("/speak")]
    server.stop.set()


async def test_shutdown_drains_calls_politely(nursery, lab) -> None:
    """On shutdown a call still running after DRAIN_TIMEOUT hears a goodbye and is hung up
    once; meanwhile the API refuses new calls with a reason."""
    server = await start_lab_server(nursery, lab, DRAIN_TIMEOUT="1")
    party = caller([WaitForBot(min_ms_silence=300), Wait(15_000)], hang_up_when_done=False)
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        with trio.fail_after(10):
            while not party.results.bot_turns:  # noqa: ASYNC110
                await trio.sleep(0.05)
            while party.results.bot_turns[-1].ended_at is None:  # noqa: ASYNC110
                await trio.sleep(0.05)  # the greeting has finished
        server.stop.set()
        await trio.sleep(0.3)
        r = await server.client.post(
            "/api/call/initiate", json={"telefono": PATIENT, "nombre": "Ana"}
        )
        assert r.status_code == 503 and r.json()["error"] == "draining"
        with trio.fail_after(15):
            await server.app.center.registry.wait_until_empty()
        with trio.fail_after(5):
            while party.results.hangup_by is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        inner.cancel_scope.cancel()
    assert "Gracias por llamar." in party.results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1
    assert party.results.hangup_by == "bot"
