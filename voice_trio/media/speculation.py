"""Faster turns: hear the end of speech ourselves, and start the reply before the turn ends.

Deepgram ends a turn after ``STT_ENDPOINTING_MS`` of silence (``speech_final``); only then
would Claude be asked. Two things win back part of that wait without ending turns any
sooner than the endpointing setting says (turn-taking stays as configured):

- **Finalize.** :class:`SpeechEndWatch` is a small voice-activity detector over the caller
  audio the session sends to Deepgram, measured in *stream time* (bytes sent), the clock
  Deepgram's own endpointing uses. After ``STT_FINALIZE_SILENCE_MS`` of silence following
  voice, the caller's speech has (probably) ended: the session sends ``Finalize``, and
  Deepgram flushes what it holds as a final with ``from_finalize`` at once, instead of
  after the whole endpointing delay. That final is the *stable transcript*. Deepgram may
  not send a ``speech_final`` for flushed audio, so once the session's watch has seen
  ``STT_ENDPOINTING_MS`` of silence and the finals cover every voiced byte, the turn ends
  on our side (``TurnDetector.end_if_covered``). Noise that keeps the watch "voiced" only
  means no Finalize: Deepgram's own ``speech_final`` / ``UtteranceEnd`` still end the turn.
- **Speculation.** The rule: the turn's text is *stable* when the caller has been silent
  for ``STT_FINALIZE_SILENCE_MS`` and the transcript (finals plus the latest interim) covers
  every voiced byte — so no word can still be on its way. An interim that qualifies counts
  as much as the flushed final. Then, if the bot is idle and waiting for the caller
  (``SPECULATIVE_REPLIES``), the reply is started for that text in a cancel scope of its
  own (:class:`Speculation`): Claude streams into a bounded sentence buffer, nothing is
  synthesized or played. When the turn ends with the same text (compared after
  :func:`normalize`: case, punctuation, spacing) and the same history, the turn *adopts*
  it: its buffered sentences go to TTS at once and its record keeps its honest ``t1``
  (before ``t0``). A transcript that changes the text, a turn that ends differently,
  barge-in, an action that cuts the conversation, or hang-up cancels it.

A speculation never touches the call's history (it asks with a copy), and its token usage
is never lost: an adopted one's stays in its record; a cancelled one's is handed to the
next reply's record (``take_unclaimed``). ``/metrics`` counts them as
``voice_speculations_total{outcome=started|kept|cancelled}``.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from voice_trio.audio import mulaw_to_linear

__all__ = [
    "ENDPOINT",
    "QUIET",
    "Speculation",
    "Speculator",
    "SpeechEndWatch",
    "is_voiced",
    "normalize",
]

log = logging.getLogger("voice_trio.calls")

# A mu-law sample louder than this (of 32767) is voice; telephone line noise sits well
# below it, speech peaks well above. A chunk is voiced when a fifth of its samples are.
VOICE_LEVEL = 500
_QUIET_CODES = bytes(b for b in range(256) if abs(mulaw_to_linear(b)) <= VOICE_LEVEL)
QUIET = "quiet"  # silence reached the Finalize threshold
ENDPOINT = "endpoint"  # silence reached the endpointing threshold
SENTENCE_BUFFER = 8  # sentences a speculation may write ahead of being adopted


def is_voiced(audio: bytes) -> bool:
    """Whether a chunk of mu-law audio carries voice (C-level delete, no Python loop)."""
    loud = len(audio.translate(None, _QUIET_CODES))
    return loud * 5 >= len(audio) > 0


def normalize(text: str) -> str:
    """Text for comparing transcripts: lower case, no punctuation, single spaces."""
    kept = (
        " " if unicodedata.category(c)[0] in "PZ" else c
        for c in unicodedata.normalize("NFC", text.lower())
    )
    return " ".join("".join(kept).split())


class SpeechEndWatch:
    """Where the caller's voice ended, in stream time (bytes of audio fed so far).

    ``feed`` returns :data:`QUIET` on the chunk where the silence after voice reaches
    ``quiet_s``, :data:`ENDPOINT` where it reaches ``endpoint_s``, else ``None``; each at
    most once per silence. ``quiet_s == 0`` turns :data:`QUIET` off.
    """

    def __init__(self, quiet_s: float, endpoint_s: float, bytes_per_second: int = 8000) -> None:
        self._bps = bytes_per_second
        self._quiet = int(quiet_s * bytes_per_second)
        self._endpoint = int(endpoint_s * bytes_per_second)
        self.position = 0  # bytes fed
        self._voiced_until = 0  # end of the last voiced chunk
        self._spoke = False  # voice since the stream began

    @property
    def voiced_until(self) -> float:
        """Stream time (seconds) where the last voiced chunk ended."""
        return self._voiced_until / self._bps

    @property
    def quiet(self) -> bool:
        """The caller spoke and has been silent for at least ``quiet_s`` since."""
        return self._spoke and 0 < self._quiet <= self.position - self._voiced_until

    @property
    def settled(self) -> bool:
        """No voice yet, or silence since it for the endpointing time: nothing in the
        caller's audio is on its way to a turn end (no edge is due)."""
        return not self._spoke or self.position - self._voiced_until >= self._endpoint

    def feed(self, audio: bytes) -> str | None:
        before = self.position - self._voiced_until
        self.position += len(audio)
        if is_voiced(audio):
            self._voiced_until = self.position
            self._spoke = True
            return None
        if not self._spoke:
            return None
        silent = self.position - self._voiced_until
        if before < self._endpoint <= silent:
            return ENDPOINT
        if 0 < self._quiet and before < self._quiet <= silent:
            return QUIET
        return None


class _Usage(Protocol):
    llm_input_tokens: int
    llm_output_tokens: int


@dataclass(eq=False)
class Speculation:
    """One reply started before its turn ended; see the module doc."""

    text: str
    messages: list[dict[str, Any]]  # what Claude was asked with
    record: Any  # the TurnRecord it fills (t1, t2, usage, tool calls)
    sentences: trio.MemoryReceiveChannel[str]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    adopted: bool = False
    accounted: bool = False  # counted as cancelled, usage handed on

    @property
    def key(self) -> str:
        return normalize(self.text)

    def cancel(self) -> None:
        self.scope.cancel()


Think = Callable[[trio.MemorySendChannel[str], list[dict[str, Any]], Any], Awaitable[None]]


class Speculator:
    """Runs a call's speculations, at most one at a time, as tasks of the call's nursery.

    ``attach`` gives it that nursery (hang-up cancels it, and every speculation with it);
    ``detach``, once the nursery is done, drops the one left. ``on_outcome`` is told
    ``started``, ``kept`` or ``cancelled`` (once per speculation: every one not kept counts
    as cancelled).
    """

    def __init__(self, on_outcome: Callable[[str], None] = lambda outcome: None) -> None:
        self._nursery: trio.Nursery | None = None
        self._on_outcome = on_outcome
        self.current: Speculation | None = None
        self.unclaimed = (0, 0)  # (input, output) tokens of speculations not kept

    def attach(self, nursery: trio.Nursery) -> None:
        """Start speculations in ``nursery`` from now on (the call's: no task of its own)."""
        self._nursery = nursery

    def detach(self) -> None:
        """Start no more; the current one is cancelled and counted (its usage kept)."""
        self._nursery = None
        self.cancel()

    def start(
        self, text: str, messages: list[dict[str, Any]], record: _Usage, think: Think
    ) -> Speculation | None:
        """Start replying to ``text`` (asking with ``messages``); replaces any other."""
        self.cancel()
        if self._nursery is None:
            return None
        send, recv = trio.open_memory_channel[str](SENTENCE_BUFFER)
        spec = Speculation(text, messages, record, recv)
        self.current = spec
        self._on_outcome("started")
        self._nursery.start_soon(self._run, spec, send, think)
        return spec

    async def _run(
        self, spec: Speculation, send: trio.MemorySendChannel[str], think: Think
    ) -> None:
        try:
            with spec.scope:
                await think(send, spec.messages, spec.record)
        finally:
            send.close()  # think closes it on return; not when cancelled before starting
            spec.done.set()
            if spec.scope.cancel_called:
                self._account(spec)

    def _discard(self, spec: Speculation) -> None:
        spec.cancel()
        if spec.done.is_set():
            self._account(spec)  # finished already: its task will not do it

    def _account(self, spec: Speculation) -> None:
        """A speculation that will not be kept: count it once, keep its usage."""
        if spec.adopted or spec.accounted:
            return
        spec.accounted = True
        spec.sentences.close()
        record = spec.record
        spent_in, spent_out = self.unclaimed
        self.unclaimed = (spent_in + record.llm_input_tokens, spent_out + record.llm_output_tokens)
        self._on_outcome("cancelled")

    def take(self, text: str, messages: list[dict[str, Any]]) -> Speculation | None:
        """The speculation for a turn that ended with ``text`` and asks with ``messages``,
        now adopted; or ``None`` (and any other speculation is cancelled)."""
        spec = self.current
        self.current = None
        if spec is None:
            return None
        if spec.key != normalize(text) or spec.messages != messages or spec.scope.cancel_called:
            self._discard(spec)
            return None
        spec.adopted = True
        self._on_outcome("kept")
        return spec

    def cancel(self) -> None:
        spec = self.current
        if spec is not None:
            self.current = None
            self._discard(spec)

    def take_unclaimed(self) -> tuple[int, int]:
        usage, self.unclaimed = self.unclaimed, (0, 0)
        return usage
