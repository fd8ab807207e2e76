"""The scripted caller: a simulated person who talks, listens, barges in and times the bot.

A :class:`ScriptedCaller` is an :class:`~voice_trio.sim.carrier.AudioPort`: the line's clock
asks it for 20 ms of audio (the current utterance as simulated speech, else silence) and
hands it what the bot's audio that played. It decodes the bot's words with
:class:`SpeechDecoder` and groups them into :class:`BotTurn` s: a turn starts with the first
voiced audio and ends after ``turn_gap_ms`` without any. Voice-to-voice latency of a turn =
start of the first played frame of the turn - the tick at which the caller's last speech frame
of the preceding utterance was sent (DESIGN.md §5); turns that start while the caller talks,
or without a preceding utterance (the greeting), have none.

Usage: give the caller to :meth:`TelnyxSim.place_inbound_call` (or register it with
:meth:`TelnyxSim.answer_with` for an outbound call), then ``results = await caller.run()``:
it waits for the call to be answered (a caller takes part in one call), plays the script, and returns when the script is
done (hanging up, unless ``hang_up_when_done=False``), when the call ends, or after
``timeout_s`` (``results.timed_out``).

Steps: :class:`Say` (after ``pause_before_ms``), :class:`WaitForBot` (until a bot turn that
started after the caller's last utterance has been silent for ``min_ms_silence``),
:class:`BargeIn` (once that turn has played for ``after_bot_ms``, say ``text`` over it),
:class:`Dtmf` (at once, or while the bot talks), :class:`HangUp`, :class:`Wait`. A wait that
times out is noted in ``results.errors`` and the script goes on. :func:`answering_machine`
is a party that plays a greeting and then only listens (what it heard is the message).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from voice_trio.audio import BYTES_PER_MS, FRAME_BYTES
from voice_trio.sim.carrier import AudioPort, Line
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR, SpeechDecoder, encode_speech

SECONDS_PER_BYTE = 1 / (BYTES_PER_MS * 1000)
BOT_SPEAKING_S = 0.06  # voiced bot audio this recent means the bot is talking right now


PAUSE_BYTES = 60 * BYTES_PER_MS  # silence between symbols heard as a word gap


@dataclass(frozen=True, slots=True)
class Say:
    text: str
    pause_before_ms: int = 0


@dataclass(frozen=True, slots=True)
class WaitForBot:
    min_ms_silence: int = 600
    timeout_ms: int = 20_000


@dataclass(frozen=True, slots=True)
class BargeIn:
    after_bot_ms: int
    text: str
    timeout_ms: int = 20_000


@dataclass(frozen=True, slots=True)
class Dtmf:
    """Press a key; with ``during_bot_ms``, once a bot turn has played that long (as
    :class:`BargeIn` does), so the key lands while the bot is talking."""

    digit: str
    during_bot_ms: int | None = None
    timeout_ms: int = 20_000


@dataclass(frozen=True, slots=True)
class HangUp:
    pass


@dataclass(frozen=True, slots=True)
class Wait:
    ms: int


Step = Say | WaitForBot | BargeIn | Dtmf | HangUp | Wait
Script = list[Step]


@dataclass
class Utterance:
    text: str
    started_at: float | None = None  # trio clock, tick of the first frame
    ended_at: float | None = None  # tick of the last frame
    barge_in: bool = False  # spoken while a bot turn was playing


@dataclass
class BotTurn:
    text: str = ""  # what the caller heard, decoded from the played audio
    started_at: float = 0.0
    ended_at: float | None = None  # end of the last voiced audio
    latency_ms: float | None = None  # voice-to-voice
    barged_in: bool = False  # the caller talked over it
    cut: bool = False  # a clear arrived while it played (or just after)


@dataclass(frozen=True, slots=True)
class CallerEvent:
    at: float
    kind: str  # answered, clear, mark, dtmf, dtmf_pressed, transferred, stream_*, hangup
    detail: str = ""


@dataclass
class CallerResults:
    utterances: list[Utterance] = field(default_factory=list)
    bot_turns: list[BotTurn] = field(default_factory=list)
    events: list[CallerEvent] = field(default_factory=list)
    hangup_by: str | None = None  # caller | bot | network; None while the call is up
    timed_out: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def latencies_ms(self) -> list[float]:
        return [t.latency_ms for t in self.bot_turns if t.latency_ms is not None]

    @property
    def bot_text(self) -> str:
        return " ".join(t.text.strip() for t in self.bot_turns if t.text.strip())

    @property
    def clears(self) -> int:
        return sum(1 for e in self.events if e.kind == "clear")

    @property
    def marks(self) -> list[str]:
        return [e.detail for e in self.events if e.kind == "mark"]


class ScriptedCaller(AudioPort):
    """A simulated person following a :data:`Script`; see the module docstring."""

    def __init__(
        self,
        script: Sequence[Step],
        *,
        ms_per_char: int = DEFAULT_MS_PER_CHAR,
        turn_gap_ms: int = 500,
        timeout_s: float = 60.0,
        hang_up_when_done: bool = True,
        name: str = "caller",
    ) -> None:
        self.script = list(script)
        self.ms_per_char = ms_per_char
        self.turn_gap_s = turn_gap_ms / 1000
        self.timeout_s = timeout_s
        self.hang_up_when_done = hang_up_when_done
        self.name = name
        self.results = CallerResults()
        self.line: Line | None = None
        self._attached = trio.Event()
        self._speech = b""
        self._pos = 0
        self._utterance: Utterance | None = None
        self._utterance_done = trio.Event()
        self._last_speech_end: float | None = None  # waiting for a reply since
        self._decoder = SpeechDecoder()
        self._last_symbol_end = 0
        self._voiced_until = 0
        self._last_voiced_at = -math.inf
        self._turn: BotTurn | None = None
        self._waiter: tuple[Callable[[float], bool], trio.Event] | None = None

    def attach(self, line: Line) -> None:
        self.line = line
        self._attached.set()

    def caller_frame(self, now: float) -> bytes | None:
        turn = self._turn
        if turn is not None and now - self._last_voiced_at >= self.turn_gap_s:
            self._close_turn()
        frame = None
        if self._speech:
            start = self._pos
            frame = self._speech[start : start + FRAME_BYTES]
            self._pos = start + FRAME_BYTES
            utterance = self._utterance
            if start == 0 and utterance is not None:
                utterance.started_at = now
            if self._pos >= len(self._speech):
                frame = frame.ljust(FRAME_BYTES, b"\xff")
                self._speech = b""
                if utterance is not None:
                    utterance.ended_at = now
                self._last_speech_end = now
                self._utterance_done.set()
        if self._waiter is not None and self._waiter[0](now):
            self._waiter[1].set()
            self._waiter = None
        return frame

    def bot_audio(self, audio: bytes, now: float) -> None:
        decoder = self._decoder
        symbols = decoder.feed(audio)
        if decoder.voiced_until > self._voiced_until:
            self._voiced_until = decoder.voiced_until
            chunk_start = decoder.offset - len(audio)
            previous = self._last_voiced_at
            self._last_voiced_at = now + (decoder.voiced_until - chunk_start) * SECONDS_PER_BYTE
            spoke_since = self._last_speech_end is not None and self._last_speech_end > previous
            if self._turn is not None and spoke_since:
                self._close_turn(previous)  # the caller spoke in the gap: this is a reply
            if self._turn is None:
                self._open_turn(now)
        if symbols and self._turn is not None:
            text = self._turn.text
            for symbol in symbols:
                # A pause between sentences is a word gap even without a space symbol.
                gap = symbol.start - self._last_symbol_end
                if gap >= PAUSE_BYTES and text and not text.endswith(" ") and symbol.char != " ":
                    text += " "
                text += symbol.char
                self._last_symbol_end = symbol.end
            self._turn.text = text
        elif symbols:
            self._last_symbol_end = symbols[-1].end

    def on_event(self, kind: str, detail: str, now: float) -> None:
        self.results.events.append(CallerEvent(now, kind, detail))
        if kind == "clear":
            turns = self.results.bot_turns
            if self._turn is not None:
                self._turn.cut = True
                self._close_turn()  # whatever plays next is a new turn
            elif turns and turns[-1].ended_at is not None and now - turns[-1].ended_at < 1.0:
                turns[-1].cut = True
        elif kind == "hangup":
            self.results.hangup_by = detail
            self._close_turn()

    def _open_turn(self, now: float) -> None:
        turn = BotTurn(started_at=now)
        if self._last_speech_end is not None and not self._speech:
            turn.latency_ms = (now - self._last_speech_end) * 1000
        self._last_speech_end = None
        if self._speech:
            turn.barged_in = True  # the caller was already talking
        self._turn = turn
        self.results.bot_turns.append(turn)

    def _close_turn(self, last_voiced_at: float | None = None) -> None:
        turn = self._turn
        if turn is not None:
            turn.ended_at = self._last_voiced_at if last_voiced_at is None else last_voiced_at
            turn.text = turn.text.strip()
            self._turn = None

    async def run(self) -> CallerResults:
        """Wait for the call, play the script; returns the results (see the module docstring)."""
        with trio.move_on_after(self.timeout_s) as scope:
            await self._attached.wait()
            line = self.line
            assert line is not None
            if await self._unless_ended(line, line.answered.wait):
                await self._unless_ended(line, self._play)
        if scope.cancelled_caught:
            self.results.timed_out = True
            self.results.errors.append(f"{self.name}: timed out after {self.timeout_s} s")
        line = self.line
        if line is not None and not line.ended.is_set() and line.answered.is_set():
            if self.hang_up_when_done or self.results.timed_out:
                line.hang_up()
        self._close_turn()
        return self.results

    async def _unless_ended(self, line: Line, step: Callable) -> bool:
        """Run ``step`` unless the call ends first; True if it finished."""
        finished = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await line.ended.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await step()
            finished = True
            nursery.cancel_scope.cancel()
        return finished

    async def _play(self) -> None:
        line = self.line
        assert line is not None
        for step in self.script:
            if isinstance(step, Say):
                if step.pause_before_ms:
                    await trio.sleep(step.pause_before_ms / 1000)
                await self._say(step.text)
            elif isinstance(step, WaitForBot):
                await self._wait_for_bot(step)
            elif isinstance(step, BargeIn):
                await self._barge_in(step)
            elif isinstance(step, Dtmf):
                if step.during_bot_ms is not None and not await self._wait_bot_talking(
                    step.during_bot_ms, step.timeout_ms, "Dtmf"
                ):
                    continue
                self.results.events.append(
                    CallerEvent(trio.current_time(), "dtmf_pressed", step.digit)
                )
                line.press(step.digit)
            elif isinstance(step, HangUp):
                self.results.hangup_by = "caller"
                line.hang_up()
                return
            elif isinstance(step, Wait):
                await trio.sleep(step.ms / 1000)

    def _bot_speaking(self, now: float) -> bool:
        return self._turn is not None and now - self._last_voiced_at < BOT_SPEAKING_S

    async def _say(self, text: str) -> None:
        speaking = self._bot_speaking(trio.current_time())
        utterance = Utterance(text, barge_in=speaking)
        if speaking:
            self._turn.barged_in = True  # type: ignore[union-attr]
        self.results.utterances.append(utterance)
        self._utterance = utterance
        self._utterance_done = trio.Event()
        self._pos = 0
        self._speech = encode_speech(text, self.ms_per_char)
        await self._utterance_done.wait()

    async def _wait_until(
        self, condition: Callable[[float], bool], timeout_ms: int, what: str
    ) -> bool:
        done = trio.Event()
        self._waiter = (condition, done)
        with trio.move_on_after(timeout_ms / 1000):
            await done.wait()
            return True
        self._waiter = None
        self.results.errors.append(f"{self.name}: {what} timed out after {timeout_ms} ms")
        return False

    def _bot_turn_since_my_speech(self) -> BotTurn | None:
        """The latest bot turn, if it started after the caller last stopped talking."""
        turns = self.results.bot_turns
        if not turns:
            return None
        last_said = next(
            (u.ended_at for u in reversed(self.results.utterances) if u.ended_at), None
        )
        if last_said is not None and turns[-1].started_at < last_said:
            return None
        return turns[-1]

    async def _wait_for_bot(self, step: WaitForBot) -> None:
        quiet = step.min_ms_silence / 1000

        def bot_done(now: float) -> bool:
            return (
                self._bot_turn_since_my_speech() is not None and now - self._last_voiced_at >= quiet
            )

        await self._wait_until(bot_done, step.timeout_ms, "WaitForBot")

    async def _barge_in(self, step: BargeIn) -> None:
        if await self._wait_bot_talking(step.after_bot_ms, step.timeout_ms, "BargeIn"):
            await self._say(step.text)

    async def _wait_bot_talking(self, after_ms: int, timeout_ms: int, what: str) -> bool:
        """Until a bot turn that started after the caller's last words has played for
        ``after_ms`` and is still playing."""
        after = after_ms / 1000

        def bot_talking_long_enough(now: float) -> bool:
            turn = self._turn
            return (
                self._bot_speaking(now)
                and turn is self._bot_turn_since_my_speech()
                and now - turn.started_at >= after  # type: ignore[union-attr]
            )

        return await self._wait_until(bot_talking_long_enough, timeout_ms, what)


def answering_machine(greeting: str, *, listen_ms: int = 15_000, **kw: object) -> ScriptedCaller:
    """An answering machine: its greeting at once, then it records (listens) for
    ``listen_ms``. Register it with ``TelnyxSim.answer_with(..., machine=True)`` so that
    answering machine detection reports a machine; ``results.bot_turns`` is the message."""
    return ScriptedCaller(
        [Say(greeting), Wait(listen_ms)],
        hang_up_when_done=True,
        name="answering machine",
        **kw,  # type: ignore[arg-type]
    )
