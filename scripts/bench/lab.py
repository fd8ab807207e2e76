"""The simulators (carrier, callers, Deepgram, Anthropic) as the scripts run them: the lab
trimmed for long runs, scripted inbound calls and their outcome, and this process's own
event-loop lag (late here means late caller audio)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import trio

# What the callers say, one sentence per turn (no farewell: the caller hangs up at the end).
UTTERANCES = (
    "Hola, quisiera pedir una cita para el martes.",
    "¿Tienen horario disponible en la tarde?",
    "Mi nombre es Carlos Gómez, para medicina general.",
    "Prefiero con la doctora Martínez, si se puede.",
    "¿Cuánto cuesta la consulta particular?",
    "Perfecto, quedo pendiente de la confirmación.",
)


def call_script(turns: int, *, pause_ms: int = 300, silence_ms: int = 500) -> list[Any]:
    """Greeting, then ``turns`` exchanges (say a sentence, wait for the whole reply)."""
    from voice_trio.sim.caller import Say, WaitForBot

    steps: list[Any] = [WaitForBot(min_ms_silence=silence_ms)]
    for turn in range(turns):
        steps.append(Say(UTTERANCES[turn % len(UTTERANCES)], pause_ms))
        steps.append(WaitForBot(min_ms_silence=silence_ms))
    return steps


async def open_bench_lab(
    nursery: trio.Nursery,
    *,
    ms_per_char: int,
    llm_ttft: float,
    tts_ttfb_ms: float,
    webhook_url: str,
    keep_alive_s: float = 5.0,
) -> Any:
    """The lab, trimmed so that thousands of calls keep this process's memory flat."""
    import voice_trio.sim._serve as sim_serve
    from voice_trio.sim.lab import open_lab

    sim_serve.KEEP_ALIVE_SECONDS = keep_alive_s
    lab = await open_lab(
        nursery,
        ms_per_char=ms_per_char,
        llm_ttft=llm_ttft,
        tts_ttfb_ms=tts_ttfb_ms,
        webhook_url=webhook_url,
    )
    lab.telnyx.record_audio_s = 0.0
    lab.telnyx.max_ended_calls = 500
    return lab


def prune_lab(lab: Any) -> None:
    """Forget finished Deepgram streams (the simulator keeps them for tests)."""
    streams = lab.deepgram.stt_streams
    if len(streams) > 200:
        streams[:] = [s for s in streams if not s.closed]


def lab_ports(lab: Any) -> dict[int, str]:
    """Simulator ports by name, to say where a server's socket goes."""
    ports: dict[int, str] = {}
    for name in ("telnyx", "deepgram", "anthropic", "elevenlabs"):
        url = getattr(lab, f"{name}_url", None)
        if url:
            ports[int(url.rsplit(":", 1)[1].split("/", 1)[0])] = name
    return ports


@dataclass
class CallOutcome:
    ok: bool
    reason: str
    latencies_ms: list[float]
    turn_starts: list[tuple[float, float]]  # (trio time a timed bot turn started, latency)
    late_resyncs: int
    started_at: float
    ended_at: float
    call_control_id: str = ""
    utterance_ends: list[float] = field(default_factory=list)  # trio time, caller's turns
    missed_plan: int = 0  # synchronized calls: utterances that could not end as planned

    def shifted(self, by: float) -> CallOutcome:
        """The same outcome with every time moved by ``by`` (to another process's clock)."""
        return dataclasses.replace(
            self,
            turn_starts=[(at + by, ms) for at, ms in self.turn_starts],
            started_at=self.started_at + by,
            ended_at=self.ended_at + by,
            utterance_ends=[at + by for at in self.utterance_ends],
        )


def script_json(steps: list[Any]) -> list[list[Any]]:
    """A caller's script as JSON (Say, WaitForBot and HangUp steps), for another process."""
    from voice_trio.sim.caller import HangUp, Say, WaitForBot

    out: list[list[Any]] = []
    for step in steps:
        if isinstance(step, Say):
            out.append(["say", step.text, step.pause_before_ms])
        elif isinstance(step, WaitForBot):
            out.append(["wait", step.min_ms_silence, step.timeout_ms])
        elif isinstance(step, HangUp):
            out.append(["hangup"])
        else:
            raise ValueError(f"cannot send a {type(step).__name__} step to another process")
    return out


def script_from_json(document: list[list[Any]]) -> list[Any]:
    from voice_trio.sim.caller import HangUp, Say, WaitForBot

    kinds = {"say": Say, "wait": WaitForBot, "hangup": HangUp}
    return [kinds[kind](*args) for kind, *args in document]


async def run_inbound_call(
    lab: Any,
    *,
    number: str,
    script: list[Any],
    turns: int,
    ms_per_char: int,
    timeout_s: float,
    turn_gap_ms: int = 500,
) -> CallOutcome:
    """One inbound call by a scripted caller; ok if every reply was heard and timed and the
    caller hung up at the end."""
    from voice_trio.sim.caller import ScriptedCaller
    from voice_trio.sim.lab import OUR_NUMBER

    started = trio.current_time()
    caller = ScriptedCaller(
        script, ms_per_char=ms_per_char, turn_gap_ms=turn_gap_ms, timeout_s=timeout_s, name=number
    )
    call = lab.telnyx.place_inbound_call(number, OUR_NUMBER, caller)
    results = await caller.run()
    outcome = call_outcome(results, turns, call.line.late_resyncs, started, trio.current_time())
    outcome.call_control_id = call.call_control_id
    return outcome


def call_outcome(
    results: Any, turns: int, late_resyncs: int, started_at: float, ended_at: float
) -> CallOutcome:
    """A caller's :class:`~voice_trio.sim.caller.CallerResults` judged: ok if every reply was
    heard and timed and the caller hung up at the end."""
    timed = [(t.started_at, t.latency_ms) for t in results.bot_turns if t.latency_ms is not None]
    reason = ""
    if results.timed_out:
        reason = "timed out"
    elif results.errors:
        reason = results.errors[0].split(": ", 1)[-1]
    elif results.hangup_by not in (None, "caller"):
        reason = f"hung up by {results.hangup_by}"
    elif len(timed) < turns:
        reason = f"{len(timed)} of {turns} replies timed"
    return CallOutcome(
        ok=not reason,
        reason=reason,
        latencies_ms=[ms for _, ms in timed],
        turn_starts=timed,
        late_resyncs=late_resyncs,
        started_at=started_at,
        ended_at=ended_at,
        utterance_ends=[u.ended_at for u in results.utterances if u.ended_at is not None],
    )


@dataclass
class LagProbe:
    """The simulators' own event-loop lag (same probe as the server's): if this process is
    late, caller audio is late and the server's numbers mean little."""

    interval: float = 0.05
    samples: list[float] = field(default_factory=list)

    async def run(self) -> None:
        deadline = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(deadline)
            now = trio.current_time()
            self.samples.append(max(0.0, now - deadline))
            if len(self.samples) > 200_000:
                del self.samples[:100_000]
            deadline = now + self.interval

    def mark(self) -> int:
        return len(self.samples)

    def since(self, mark: int) -> list[float]:
        return self.samples[mark:] if mark <= len(self.samples) else list(self.samples)
