"""Deciding when the caller has finished a turn, from Deepgram's streaming results.

Deepgram's rules (``protocols/deepgram.md`` §A7): a user turn is every ``is_final``
transcript concatenated until one carries ``speech_final``; if ``UtteranceEnd`` arrives
with finals collected and no ``speech_final`` since the last turn, those finals are the
turn; an ``UtteranceEnd`` after a ``speech_final`` turn has nothing left and is ignored.

Faster turns (:mod:`voice_trio.media.speculation`): the detector also keeps how far into
the stream Deepgram has transcribed (``covered_until``, on the link timeline) and the best
guess of the turn so far (``candidate``: finals plus the latest interim), so the session
can tell when a transcript covers every voiced byte it sent. A final that Deepgram sent
because we asked (``from_finalize``) is a plain final, never a turn end by itself: we ask
for it early, before the endpointing silence; ``end_if_covered`` ends the turn once the
session's own clock has seen that silence.

:class:`TurnDetector` is pure state: the STT task feeds it parsed events and acts on the
signals it returns. It knows nothing about sockets, clocks or whether the bot is talking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CallerSpeaking", "TurnDetector", "TurnSignal", "UserTurn"]


@dataclass(frozen=True, slots=True)
class CallerSpeaking:
    """The caller is (probably) talking: barge in, reset the silence watchdog.

    ``text`` is the transcript that showed words, or ``""`` when the evidence is only
    Deepgram's voice-activity ``SpeechStarted`` (which noise can trigger too). A session that
    wants to barge in on words only can wait for a non-empty ``text``.
    """

    text: str = ""


@dataclass(frozen=True, slots=True)
class UserTurn:
    """The caller finished a turn; ``text`` is the finals joined with single spaces."""

    text: str


TurnSignal = CallerSpeaking | UserTurn


@dataclass(slots=True)
class TurnDetector:
    """Turn Deepgram ``Results`` / ``SpeechStarted`` / ``UtteranceEnd`` into turn signals.

    Emission of :class:`CallerSpeaking` is deduplicated per utterance (from the first sign
    of speech to the end of the turn or an ``UtteranceEnd``): at most one for the
    ``SpeechStarted`` event(s) and one for the first transcript with words, so the dozens of
    interims of a long sentence cost the session nothing. After a turn ends the next sign
    of speech is reported again, which is what barge-in needs. A :class:`UserTurn` also
    means the caller spoke: when the very first words of an utterance arrive as a
    ``speech_final`` final, only the ``UserTurn`` is returned.

    Transcripts below ``min_confidence``: a final is dropped and counted in
    ``low_confidence_dropped`` (its ``speech_final`` still ends a turn already collected);
    an interim is ignored entirely. Empty transcripts are never counted as drops, since
    Deepgram reports silence as an empty transcript with zero confidence.
    """

    min_confidence: float = 0.0
    low_confidence_dropped: int = 0
    _finals: list[str] = field(default_factory=list)
    _last_interim: str = ""
    _vad_reported: bool = False
    _words_reported: bool = False
    _finals_until: float = 0.0
    _interim_until: float = 0.0

    @property
    def pending_text(self) -> str:
        """The finals of the turn in progress, joined with single spaces."""
        return " ".join(self._finals)

    @property
    def last_interim(self) -> str:
        """The latest interim transcript of the turn in progress ("" once a final covers it)."""
        return self._last_interim

    @property
    def candidate(self) -> str:
        """What the turn would say if it ended now: the finals and the latest interim."""
        parts = [*self._finals, self._last_interim] if self._last_interim else self._finals
        return " ".join(parts)

    @property
    def covered_until(self) -> float:
        """Stream time up to which ``candidate`` reflects the audio (0 without timings)."""
        return max(self._finals_until, self._interim_until)

    @property
    def finals_until(self) -> float:
        """Stream time up to which finals (words that will not change) cover the audio."""
        return self._finals_until

    @property
    def has_words(self) -> bool:
        """Whether the turn in progress has shown any words (interim or final)."""
        return self._words_reported or bool(self._finals)

    @property
    def in_utterance(self) -> bool:
        """Whether speech was reported and its turn has not ended yet."""
        return self._vad_reported or self._words_reported or bool(self._finals)

    def on_speech_started(self) -> TurnSignal | None:
        if self._vad_reported or self._words_reported:
            return None
        self._vad_reported = True
        return CallerSpeaking()

    def on_transcript(
        self,
        text: str,
        confidence: float,
        is_final: bool,
        speech_final: bool,
        *,
        from_finalize: bool = False,
        end: float | None = None,
    ) -> TurnSignal | None:
        """One ``Results`` message; ``end`` is its ``start + duration`` in stream time."""
        if from_finalize:
            speech_final = False  # we asked for the flush: no endpoint was detected
        if end is not None:
            if is_final or speech_final:
                self._finals_until = max(self._finals_until, end)
            else:
                self._interim_until = max(self._interim_until, end)
        text = text.strip()
        if text and confidence < self.min_confidence:
            if is_final or speech_final:
                self.low_confidence_dropped += 1
                text = ""
            else:
                return None
        if not (is_final or speech_final):
            if not text:
                return None
            self._last_interim = text
            return self._words(text)
        # speech_final implies is_final (deepgram.md §A7), so it is treated as one.
        self._last_interim = ""
        if text:
            self._finals.append(text)
        if speech_final:
            if self._finals:
                return self._end_turn()
            self._reset()  # endpoint after nothing usable: the next speech is news again
            return None
        return self._words(text) if text else None

    def end_if_covered(self, voiced_until: float, slack: float = 0.0) -> UserTurn | None:
        """End the turn now if its finals cover the audio up to ``voiced_until`` (the end
        of the caller's voice, stream time) and no interim shows words beyond them."""
        if not self._finals or self._last_interim:
            return None
        if self._finals_until + slack < voiced_until:
            return None
        return self._end_turn()

    def on_utterance_end(self) -> TurnSignal | None:
        if self._finals:
            return self._end_turn()
        self._reset()
        return None

    def _words(self, text: str) -> CallerSpeaking | None:
        if self._words_reported:
            return None
        self._words_reported = True
        return CallerSpeaking(text)

    def _end_turn(self) -> UserTurn:
        turn = UserTurn(" ".join(self._finals))
        self._reset()
        return turn

    def _reset(self) -> None:
        self._finals.clear()
        self._last_interim = ""
        self._vad_reported = False
        self._words_reported = False
