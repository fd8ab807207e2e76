"""Speculative replies: started on a stable transcript, kept when the turn ends the same
way, cancelled (leaving no task and no lost usage) when it does not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.media.speculation import (
    ENDPOINT,
    QUIET,
    Speculator,
    SpeechEndWatch,
    is_voiced,
    normalize,
)
from voice_trio.media.turns import TurnDetector, UserTurn
from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER
from voice_trio.sim.speech import encode_speech, silence


@dataclass
class Usage:
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0


def test_normalize_ignores_case_punctuation_and_spacing() -> None:
    assert normalize("¿Tienen  disponibilidad el Jueves?") == "tienen disponibilidad el jueves"
    assert normalize("Hola, buenos días.") == normalize("hola buenos   días")
    assert normalize("Hola, buenos días.") != normalize("Hola, buenas tardes.")


def test_watch_reports_quiet_then_endpoint_once_per_silence() -> None:
    watch = SpeechEndWatch(quiet_s=0.15, endpoint_s=0.3)
    audio = silence(200) + encode_speech("Hola.", 65) + silence(400)
    edges = []
    for i in range(0, len(audio), 160):
        edge = watch.feed(audio[i : i + 160])
        if edge is not None:
            edges.append((round(watch.position / 8000, 2), edge))
    voiced_end = 0.2 + 5 * 0.065
    assert abs(watch.voiced_until - voiced_end) <= 0.02
    assert [edge for _, edge in edges] == [QUIET, ENDPOINT]
    assert edges[0][0] == pytest.approx(watch.voiced_until + 0.15, abs=0.021)
    assert edges[1][0] == pytest.approx(watch.voiced_until + 0.3, abs=0.021)
    assert watch.quiet
    assert not is_voiced(silence(20)) and is_voiced(encode_speech("a", 20))


def test_detector_ends_a_flushed_turn_once_its_finals_cover_the_voice() -> None:
    d = TurnDetector()
    d.on_transcript("quiero una", 0.9, False, False, end=1.0)
    assert d.candidate == "quiero una" and d.covered_until == 1.0
    # Our Finalize: a plain final, even if it says speech_final.
    assert d.on_transcript("Quiero una cita.", 0.9, True, True, from_finalize=True, end=1.6) is None
    assert d.candidate == "Quiero una cita."
    assert d.end_if_covered(voiced_until=1.7) is None  # voice after what was transcribed
    assert d.end_if_covered(voiced_until=1.45) == UserTurn("Quiero una cita.")
    assert d.candidate == "" and d.end_if_covered(voiced_until=1.45) is None


async def _think(
    sentences: list[str], first_token_s: float, usage: tuple[int, int] = (120, 30)
) -> Any:
    async def think(send: trio.MemorySendChannel[str], messages: Any, record: Usage) -> None:
        async with send:
            record.llm_input_tokens += usage[0]
            await trio.sleep(first_token_s)
            record.llm_output_tokens += usage[1]
            for sentence in sentences:
                await send.send(sentence)

    return think


async def test_a_cancelled_speculation_leaves_no_task_and_keeps_its_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes: list[str] = []
    speculator = Speculator(outcomes.append)
    messages = [{"role": "user", "content": "Quiero una cita"}]
    async with trio.open_nursery() as nursery:
        speculator.attach(nursery)
        think = await _think(["Claro."], first_token_s=0.4)
        spec = speculator.start("Quiero una cita", messages, Usage(), think)
        assert spec is not None
        await trio.sleep(0.1)  # the request is out, no token yet
        assert len(nursery.child_tasks) == 1
        # The turn ended with more words: the speculation is dropped, not played.
        assert speculator.take("Quiero una cita para el lunes", messages) is None
        await trio.testing.wait_all_tasks_blocked()
        assert spec.scope.cancel_called and spec.done.is_set()
        assert len(nursery.child_tasks) == 0  # nothing left behind
        assert outcomes == ["started", "cancelled"]
        assert speculator.take_unclaimed() == (120, 0)  # billed input, counted once
        assert speculator.take_unclaimed() == (0, 0)
        # One that finished before the turn ended, then did not match: counted as well.
        spec = speculator.start("Hola", messages, Usage(), think)
        await trio.sleep(1)
        assert spec is not None and spec.done.is_set()
        speculator.cancel()
        assert outcomes[-2:] == ["started", "cancelled"]
        assert speculator.take_unclaimed() == (120, 30)
        nursery.cancel_scope.cancel()


async def test_a_kept_speculation_hands_over_its_sentences(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes: list[str] = []
    speculator = Speculator(outcomes.append)
    messages = [{"role": "user", "content": "¿Tienen cita el jueves?"}]
    async with trio.open_nursery() as nursery:
        speculator.attach(nursery)
        think = await _think(["Sí, el jueves.", "¿A qué hora?"], first_token_s=0.4)
        started = trio.current_time()
        spec = speculator.start("¿Tienen cita el jueves?", messages, Usage(), think)
        await trio.sleep(0.15)  # the turn ends 150 ms later, with the same words
        kept = speculator.take("tienen cita el Jueves", messages)
        assert kept is spec and kept.adopted
        async with kept.sentences:
            heard = [s async for s in kept.sentences]
        # The reply is ready 400 ms after the speculation began: 250 ms after the turn
        # ended instead of the 400 ms a reply asked at the turn end would need.
        assert trio.current_time() - started == pytest.approx(0.4)
        assert heard == ["Sí, el jueves.", "¿A qué hora?"]
        await kept.done.wait()
        assert outcomes == ["started", "kept"]
        assert speculator.take_unclaimed() == (0, 0)  # its usage stays in its record
        assert kept.record.llm_output_tokens == 30
        # A different history (the bot said something meanwhile) is no match either.
        spec = speculator.start("Gracias", messages, Usage(), think)
        assert speculator.take("Gracias", [*messages, {"role": "user", "content": "x"}]) is None
        nursery.cancel_scope.cancel()
    speculator.detach()
    assert outcomes[-2:] == ["started", "cancelled"]


async def test_hang_up_cancels_the_speculation_in_the_calls_nursery_and_counts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outcomes: list[str] = []
    speculator = Speculator(outcomes.append)
    messages = [{"role": "user", "content": "Hola"}]
    async with trio.open_nursery() as call:
        speculator.attach(call)
        spec = speculator.start("Hola", messages, Usage(), await _think(["Hola."], 0.4))
        await trio.sleep(0.1)
        call.cancel_scope.cancel()  # hang-up: the call's nursery and all in it
    speculator.detach()
    assert spec is not None and spec.done.is_set()
    assert outcomes == ["started", "cancelled"]
    assert speculator.take_unclaimed() == (120, 0)
    assert speculator.start("Hola", messages, Usage(), await _think([], 0)) is None


def caller(script: list[Any]) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30)


async def test_a_speculative_reply_is_asked_before_the_turn_ends(nursery, lab) -> None:
    """One reply with speculation, one without, with the demo's 400 ms LLM: with it, the
    reply's Claude request leaves before the turn has ended (its ledger's t1 < t0)."""
    lab.anthropic.ttft = 0.4
    script = [WaitForBot(300), Say("Quiero una cita para el lunes.", 100), WaitForBot(300)]
    asked_before_turn_end = {}
    # The process's first Claude request pays one-time costs (lazy imports): the first
    # call only warms up, the last two are compared.
    for enabled in ("true", "false", "true"):
        server = await start_lab_server(nursery, lab, SPECULATIVE_REPLIES=enabled)
        lab.anthropic.requests.clear()
        party = caller([*script, HangUp()])
        sim_call = lab.telnyx.place_inbound_call("+573001234567", OUR_NUMBER, party)
        results = await party.run()
        with trio.fail_after(5):
            await server.app.center.registry.wait_until_empty()
        assert not results.errors and len(results.latencies_ms) == 1
        assert 'usted dijo: "Quiero una cita para el lunes."' in results.bot_turns[1].text
        found = await server.app.center.store.get_call(sim_call.call_control_id)
        assert found is not None
        reply = next(t for t in found[1] if t.user_text)
        assert reply.t0 is not None and reply.t1 is not None
        asked_before_turn_end[enabled] = reply.t1 < reply.t0
        metrics = (await server.client.get("/metrics")).text
        # Exactly one Claude request for the reply: a kept speculation is not asked twice.
        (request,) = lab.anthropic.requests
        # Tools + persona are far below Haiku 4.5's minimum cacheable prefix (4 096 tokens):
        # no breakpoint is claimed, and none could have made a cache entry.
        assert not any("cache_control" in block for block in request.body["system"])
        assert request.body["tools"] == tool_specs(offered_tools(can_transfer=False))
        assert not lab.anthropic.prompt_cache
        if enabled == "true":
            assert 'voice_speculations_total{outcome="started"} 1.0' in metrics
            assert 'voice_speculations_total{outcome="kept"} 1.0' in metrics
        else:
            assert 'voice_speculations_total{outcome="started"}' not in metrics
        server.stop.set()
    # The speculation was asked ~150 ms (endpointing 300 - Finalize silence 150) before the
    # turn ended; what that gains in voice-to-voice is measured by `voice-trio demo` and
    # the load test, not here (a loaded test machine makes wall-clock margins noise).
    assert asked_before_turn_end == {"true": True, "false": False}
