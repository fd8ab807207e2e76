"""A scripted caller without a task of its own, for load tests of hundreds of calls.

:class:`LeanCaller` follows the same scripts as :class:`~voice_trio.sim.caller.ScriptedCaller`
(:class:`Say`, :class:`WaitForBot`, :class:`HangUp`; the load test's scripts use nothing else)
and times the bot the same way (DESIGN.md §5: voice-to-voice = the first voiced bot audio
played - the tick of the caller's last speech frame). The differences are in how, not what:

- No script task, no Trio: the lean carrier's clock (:class:`~voice_trio.sim.lean_carrier.MediaEngine`,
  on its own thread) calls :meth:`next_payload` and :meth:`bot_audio` every 20 ms and the
  script advances inside those calls, at the tick where the reference caller's task would
  have woken. When the script is over (or the call ended, or time ran out) the caller calls
  ``on_done(hang_up)`` once; whoever placed the call hangs up if ``hang_up`` is true.
- Its speech is precomputed: each utterance is cut into 20 ms frames and base64-encoded once
  per (text, speech rate) for the whole process (:func:`speech_payloads`).
- It does not decode the bot's words: only whether what played was voiced (a C-level
  ``rstrip`` of the quiet bytes), which is all the timing needs.

Times are whatever clock the ticks come in (the lean carrier's: ``time.monotonic()``).

``say_ends_at`` (synchronized load): the planned instant (same clock) at which each
utterance must end. The caller then starts speaking at that instant minus the utterance's
length instead of ``pause_before_ms`` after the bot's reply; if the bot is still talking by
then, the utterance starts as soon as the reply is over and counts in ``missed_plan``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

from voice_trio.audio import BYTES_PER_MS, FRAME_BYTES, FRAME_MS
from voice_trio.sim.caller import (
    BOT_SPEAKING_S,
    BotTurn,
    CallerEvent,
    CallerResults,
    HangUp,
    Say,
    Step,
    Utterance,
    WaitForBot,
)
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR, QUIET_BYTES, encode_speech

SECONDS_PER_BYTE = 1 / (BYTES_PER_MS * 1000)


@lru_cache(maxsize=256)
def speech_payloads(text: str, ms_per_char: int) -> tuple[bytes, ...]:
    """``text`` as simulated speech, one base64 payload per 20 ms frame (the last one
    padded with mu-law silence, as the reference caller pads it)."""
    audio = encode_speech(text, ms_per_char)
    frames = []
    for at in range(0, len(audio), FRAME_BYTES):
        frame = audio[at : at + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff")
        frames.append(base64.b64encode(frame))
    return tuple(frames)


class LeanCaller:
    """A scripted caller driven by the carrier's clock; see the module docstring."""

    def __init__(
        self,
        script: Sequence[Step],
        *,
        ms_per_char: int = DEFAULT_MS_PER_CHAR,
        turn_gap_ms: int = 500,
        timeout_s: float = 60.0,
        say_ends_at: Sequence[float] = (),
        name: str = "caller",
        on_done: Callable[[bool], None] | None = None,
    ) -> None:
        unknown = [s for s in script if not isinstance(s, Say | WaitForBot | HangUp)]
        if unknown:
            raise ValueError(f"a lean caller cannot play {type(unknown[0]).__name__} steps")
        self.script = list(script)
        self.ms_per_char = ms_per_char
        self.turn_gap_s = turn_gap_ms / 1000
        self.timeout_s = timeout_s
        self.say_ends_at = list(say_ends_at)
        self.name = name
        self.results = CallerResults()
        self.missed_plan = 0  # utterances that could not end at their planned instant
        self.finished = False  # the script is over, the call ended, or time ran out
        self.on_done = on_done
        self._started_at: float | None = None
        self._step = -1
        self._says = 0
        self._wait: WaitForBot | None = None
        self._wait_since = 0.0
        self._pending_say: Say | None = None
        self._speak_after: float | None = None  # start the pending Say after this instant
        self._speech: tuple[bytes, ...] = ()
        self._pos = 0
        self._utterance: Utterance | None = None
        self._last_speech_end: float | None = None  # waiting for a reply since
        self._last_voiced_at = -math.inf
        self._turn: BotTurn | None = None

    def next_payload(self, now: float) -> bytes | None:
        """The base64 payload of the caller's next 20 ms from ``now`` (None: silence)."""
        if self.finished:
            return None
        if self._step < 0:
            self._started_at = now
            self._advance(now)
        turn = self._turn
        if turn is not None and now - self._last_voiced_at >= self.turn_gap_s:
            self._close_turn()
        payload = None
        if self._speak_after is not None and now > self._speak_after:
            self._start_speaking(now)
        if self._speech:
            pos = self._pos
            payload = self._speech[pos]
            self._pos = pos + 1
            utterance = self._utterance
            if pos == 0 and utterance is not None:
                utterance.started_at = now
            if self._pos >= len(self._speech):
                self._speech = ()
                if utterance is not None:
                    utterance.ended_at = now
                self._last_speech_end = now
                self._advance(now)
        wait = self._wait
        if wait is not None:
            if self._bot_done(now, wait.min_ms_silence / 1000):
                self._wait = None
                self._advance(now)
            elif now - self._wait_since >= wait.timeout_ms / 1000:
                self._wait = None
                self.results.errors.append(
                    f"{self.name}: WaitForBot timed out after {wait.timeout_ms} ms"
                )
                self._advance(now)
        if (
            self._started_at is not None
            and now - self._started_at >= self.timeout_s
            and not self.finished
        ):
            self.results.timed_out = True
            self.results.errors.append(f"{self.name}: timed out after {self.timeout_s} s")
            self._finish(hang_up=True)
        return payload

    def bot_audio(self, audio: bytes, now: float) -> None:
        voiced = len(audio.rstrip(QUIET_BYTES))
        if not voiced:
            return
        previous = self._last_voiced_at
        self._last_voiced_at = now + voiced * SECONDS_PER_BYTE
        spoke_since = self._last_speech_end is not None and self._last_speech_end > previous
        if self._turn is not None and spoke_since:
            self._close_turn(previous)  # the caller spoke in the gap: this is a reply
        if self._turn is None:
            turn = BotTurn(started_at=now)
            if self._last_speech_end is not None and not self._speech:
                turn.latency_ms = (now - self._last_speech_end) * 1000
            self._last_speech_end = None
            if self._speech:
                turn.barged_in = True
            self._turn = turn
            self.results.bot_turns.append(turn)

    def on_event(self, kind: str, detail: str, now: float) -> None:
        self.results.events.append(CallerEvent(now, kind, detail))
        if kind == "clear":
            if self._turn is not None:
                self._turn.cut = True
                self._close_turn()
        elif kind == "hangup":
            if self.results.hangup_by is None:
                self.results.hangup_by = detail
            self._close_turn()
            self._finish(hang_up=False)

    def fail(self, reason: str) -> None:
        """End the caller from outside (e.g. its call never got a stream)."""
        self.results.errors.append(f"{self.name}: {reason}")
        self._finish(hang_up=True)

    def _advance(self, now: float) -> None:
        """Start the next step at the tick ``now``."""
        while True:
            self._step += 1
            if self._step >= len(self.script):
                self._finish(hang_up=True)
                return
            step = self.script[self._step]
            if isinstance(step, WaitForBot):
                self._wait = step
                self._wait_since = now
                return
            if isinstance(step, Say):
                self._pending_say = step
                planned = self._planned_start(step)
                if planned is None:
                    self._speak_after = now + step.pause_before_ms / 1000
                elif planned <= now:
                    self.missed_plan += 1
                    self._speak_after = now  # as soon as possible: the next tick
                else:
                    # The first frame goes out at the first tick at or after ``planned``.
                    self._speak_after = planned - FRAME_MS / 2000
                return
            if isinstance(step, HangUp):
                self.results.hangup_by = "caller"
                self._finish(hang_up=True)
                return

    def _planned_start(self, step: Say) -> float | None:
        if self._says >= len(self.say_ends_at):
            return None
        frames = len(speech_payloads(step.text, self.ms_per_char))
        # The last frame is sent at the tick ``ends_at``; the first one frames - 1 ticks earlier.
        return self.say_ends_at[self._says] - (frames - 1) * FRAME_MS / 1000

    def _start_speaking(self, now: float) -> None:
        step = self._pending_say
        assert step is not None
        self._pending_say = self._speak_after = None
        self._says += 1
        turn = self._turn
        speaking = turn is not None and now - self._last_voiced_at < BOT_SPEAKING_S
        utterance = Utterance(step.text, barge_in=speaking)
        if speaking and turn is not None:
            turn.barged_in = True
        self.results.utterances.append(utterance)
        self._utterance = utterance
        self._speech = speech_payloads(step.text, self.ms_per_char)
        self._pos = 0

    def _bot_turn_since_my_speech(self) -> BotTurn | None:
        turns = self.results.bot_turns
        if not turns:
            return None
        last_said = next(
            (u.ended_at for u in reversed(self.results.utterances) if u.ended_at), None
        )
        if last_said is not None and turns[-1].started_at < last_said:
            return None
        return turns[-1]

    def _bot_done(self, now: float, quiet: float) -> bool:
        return self._bot_turn_since_my_speech() is not None and now - self._last_voiced_at >= quiet

    def _close_turn(self, last_voiced_at: float | None = None) -> None:
        turn = self._turn
        if turn is not None:
            turn.ended_at = self._last_voiced_at if last_voiced_at is None else last_voiced_at
            self._turn = None

    def _finish(self, *, hang_up: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self._wait = None
        self._speak_after = None
        self._speech = ()
        self._close_turn()
        if self.on_done is not None:
            self.on_done(hang_up)
