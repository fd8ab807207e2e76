"""Synchronized load: the plan, the lean caller that keeps it, and the burst's arithmetic;
the generator's CPU bookkeeping. Pure: no sockets, the caller driven tick by tick."""

from __future__ import annotations

import pytest

from bench.burst import BurstPlan, caller_turn_overheads, summarize_burst
from bench.generator import cpu_percent, threads_ms_per_call_second
from bench.lab import CallOutcome, call_script, script_from_json, script_json
from voice_trio.sim.caller import HangUp, Say, WaitForBot
from voice_trio.sim.lean_caller import LeanCaller, speech_payloads
from voice_trio.sim.speech import encode_speech

TICK = 0.02
BOT = encode_speech("Dígame", 25)


def outcome(
    started: float, ends: list[float], latencies: list[float], ccid: str = ""
) -> CallOutcome:
    return CallOutcome(
        ok=True,
        reason="",
        latencies_ms=latencies,
        turn_starts=[(e + ms / 1000, ms) for e, ms in zip(ends, latencies, strict=False)],
        late_resyncs=0,
        started_at=started,
        ended_at=ends[-1] + 5,
        call_control_id=ccid,
        utterance_ends=ends,
    )


def test_the_plan_is_one_call_alone_plus_a_margin_per_turn() -> None:
    alone = outcome(100.0, [106.0, 115.5, 123.0], [800, 800, 800])
    plan = BurstPlan.from_call(alone, margin_s=1.5)
    assert plan.first_end_s == pytest.approx(7.5)
    assert plan.gaps_s == pytest.approx((11.0, 9.0))
    assert plan.turns == 3
    assert plan.ends_at(50.0) == pytest.approx([57.5, 68.5, 77.5])


class Clock:
    """Drives a lean caller as the carrier's clock would, with the bot talking on cue."""

    def __init__(self, caller: LeanCaller) -> None:
        self.caller = caller
        self.now = 0.0
        self.bot: list[bytes] = []  # audio queued for the caller, 160 bytes a tick
        self.sent: list[tuple[float, bytes | None]] = []

    def run_until(self, end: float) -> None:
        while self.now < end and not self.caller.finished:
            self.sent.append((self.now, self.caller.next_payload(self.now)))
            if self.bot:
                self.caller.bot_audio(self.bot.pop(0), self.now)
            self.now = round(self.now + TICK, 6)

    def bot_says(self, audio: bytes) -> None:
        self.bot += [audio[i : i + 160] for i in range(0, len(audio), 160)]


def test_a_lean_caller_ends_each_utterance_at_its_planned_instant() -> None:
    script = [WaitForBot(300), Say("Hola.", 300), WaitForBot(300), Say("Adiós.", 300)]
    caller = LeanCaller(script, ms_per_char=25, say_ends_at=[3.0, 6.0], timeout_s=60)
    done: list[bool] = []
    caller.on_done = done.append
    clock = Clock(caller)
    clock.bot_says(BOT)  # the greeting
    clock.run_until(3.5)
    clock.bot_says(BOT)  # the reply
    clock.run_until(10.0)
    ends = [u.ended_at for u in caller.results.utterances]
    assert ends == [pytest.approx(3.0, abs=TICK), pytest.approx(6.0, abs=TICK)]
    frames = len(speech_payloads("Hola.", 25))
    spoken = [p for _, p in clock.sent if p is not None]
    assert len(spoken) == frames + len(speech_payloads("Adiós.", 25))
    assert caller.missed_plan == 0 and done == [True]  # hangs up when the script is over


def test_a_caller_whose_bot_is_still_talking_misses_the_plan_and_speaks_after() -> None:
    script = [WaitForBot(300), Say("Hola.", 300)]
    caller = LeanCaller(script, ms_per_char=25, say_ends_at=[1.0], timeout_s=60)
    clock = Clock(caller)
    clock.bot_says(encode_speech("Un saludo muy largo", 100))  # 1.9 s of greeting
    clock.run_until(5.0)
    assert caller.missed_plan == 1
    utterance = caller.results.utterances[0]
    assert utterance.started_at is not None and utterance.started_at > 1.9 + 0.3


def test_a_lean_caller_times_the_reply_like_the_reference() -> None:
    caller = LeanCaller(call_script(1), ms_per_char=25, timeout_s=60)
    clock = Clock(caller)
    clock.bot_says(BOT)
    clock.run_until(4.0)
    said = caller.results.utterances[0].ended_at
    assert said is not None and said < 4.0
    clock.bot_says(b"\xff" * 320 + BOT)  # 40 ms of silence, then the reply
    clock.run_until(8.0)
    reply = caller.results.bot_turns[-1]
    assert reply.latency_ms == pytest.approx((reply.started_at - said) * 1000)
    assert reply.started_at == pytest.approx(4.0 + 0.04)


def test_burst_summary_per_turn() -> None:
    outcomes = [
        outcome(0.0, [10.0, 20.01], [800, 900], "a"),
        outcome(0.0, [10.02, 20.0], [820, 1000], "b"),
    ]
    records = {
        "a": {
            "turns": [{"user_text": "", "latency": {"overhead_ms": None}}]
            + [{"user_text": "x", "latency": {"overhead_ms": v}} for v in (2.0, 4.0)]
        },
        "b": {"turns": [{"user_text": "y", "latency": {"overhead_ms": v}} for v in (3.0, 8.0)]},
    }
    assert caller_turn_overheads(records["a"]) == [2.0, 4.0]
    summary = summarize_burst(2, outcomes, [10.0, 20.0], records)
    first, second = summary["turns"]
    assert first["end_spread_ms"] == pytest.approx(20.0)
    assert first["end_after_plan_ms_max"] == pytest.approx(20.0)
    assert first["server_overhead_ms"]["p50"] == pytest.approx(2.5)
    assert second["voice_to_voice_ms"]["max"] == 1000
    assert summary["server_overhead_ms"]["count"] == 4
    assert summary["calls"]["completed"] == 2 and summary["missed_plan"] == 0


def test_scripts_cross_processes_as_json() -> None:
    script = [WaitForBot(500), Say("Hola", 300), HangUp()]
    assert script_from_json(script_json(script)) == script
    shifted = outcome(1.0, [2.0], [700]).shifted(10.0)
    assert shifted.started_at == 11.0 and shifted.utterance_ends == [12.0]
    assert shifted.turn_starts == [(12.7, 700)]


def test_generator_cpu_by_process_and_thread() -> None:
    before = {"load test": 1.0, "carrier": 2.0, "providers": None}
    after = {"load test": 1.5, "carrier": 4.0, "providers": 3.0}
    assert cpu_percent(before, after, 10.0) == pytest.approx(
        {"load test": 5.0, "carrier": 20.0, "total": 25.0}
    )
    threads = threads_ms_per_call_second(
        {"carrier": {"main": 1.0, "reactor": 2.0}},
        {"carrier": {"main": 1.2, "reactor": 3.0}},
        call_seconds=100.0,
    )
    assert threads == {"carrier": {"main": 2.0, "reactor": 10.0}}
