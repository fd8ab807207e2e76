"""Bot audio out to Telnyx: paced to real time with a small lead (200 ms), marked per sentence,
and able to say afterwards how much of each sentence the caller actually heard.

The carrier plays what it receives in order, so ``play_until`` — when everything sent so
far will have finished playing — advances by each chunk's duration and never falls behind
the clock. A chunk goes out when ``play_until`` is at most ``lead`` ahead, which keeps the
carrier's buffer small: barge-in (``clear``) has little to throw away, and the heard-text
estimate stays close to the truth. A ``mark`` follows each sentence; Telnyx echoes it when
playback reaches it, which confirms the sentence was heard. Where marks do not come back,
the pacing clock is the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from voice_trio.audio import BYTES_PER_MS, FRAME_BYTES, MULAW_SILENCE
from voice_trio.observability import Metrics
from voice_trio.providers.telnyx.media import build_clear, build_mark, build_media


@dataclass(slots=True)
class SpokenSentence:
    """One sentence sent to the caller, as scheduled on the carrier's playback clock."""

    text: str
    mark: str
    starts_at: float = 0.0
    audio_bytes: int = 0
    complete: bool = False
    mark_echoed: bool = False

    @property
    def ends_at(self) -> float:
        return self.starts_at + self.audio_bytes / (BYTES_PER_MS * 1000)

    def heard_text(self, at: float) -> str:
        if self.mark_echoed or (self.complete and at >= self.ends_at):
            return self.text
        if at <= self.starts_at or not self.audio_bytes:
            return ""
        share = min(1.0, (at - self.starts_at) / (self.ends_at - self.starts_at))
        cut = int(len(self.text) * share)
        if cut >= len(self.text):
            return self.text
        space = self.text.rfind(" ", 0, cut + 1)
        return self.text[:space].rstrip(" ,;:") if space > 0 else ""


@dataclass
class Playback:
    """The outbound audio of one call. Sending is serialised by the socket itself."""

    socket: object  # MediaSocket; typed loosely to keep providers/calls import-light
    metrics: Metrics
    # Telnyx plays RTP chunks of 20 ms to 30 s; 100 ms chunks cost a fifth of the
    # messages of 20 ms frames, and clear still stops playback at once.
    chunk_bytes: int = 5 * FRAME_BYTES
    lead: float = 0.2
    play_until: float = 0.0
    frames_sent: int = 0
    late_frames: int = 0
    sentences: list[SpokenSentence] = field(default_factory=list)
    # The call's recording (``media.recording.CallRecording``), told what plays when.
    recording: Any = None
    _pending: bytearray = field(default_factory=bytearray)
    _mark_seq: int = 0
    _mark_event: trio.Event = field(default_factory=trio.Event)

    @property
    def speaking_until(self) -> float:
        return self.play_until

    def is_audible(self, now: float) -> bool:
        return now < self.play_until

    def begin_sentence(self, text: str) -> SpokenSentence:
        self._mark_seq += 1
        sentence = SpokenSentence(text=text, mark=f"s{self._mark_seq}")
        self.sentences.append(sentence)
        return sentence

    async def feed(self, sentence: SpokenSentence, audio: bytes) -> float | None:
        """Queue ``audio`` of ``sentence`` and send every whole chunk, paced.
        Returns the time the first chunk went out, if one did."""
        self._pending += audio
        first: float | None = None
        while len(self._pending) >= self.chunk_bytes:
            piece = bytes(self._pending[: self.chunk_bytes])
            del self._pending[: self.chunk_bytes]
            sent = await self._send_paced(sentence, piece, continuing=first is not None)
            first = first if first is not None else sent
        return first

    async def end_sentence(self, sentence: SpokenSentence) -> float | None:
        """Send the rest (padded to a whole frame with silence) and the sentence's mark."""
        first: float | None = None
        if self._pending:
            pad = (-len(self._pending)) % FRAME_BYTES
            piece = bytes(self._pending) + bytes([MULAW_SILENCE]) * pad
            self._pending.clear()
            first = await self._send_paced(sentence, piece, continuing=True)
        sentence.complete = True
        await self.socket.send_text(build_mark(sentence.mark))  # type: ignore[attr-defined]
        return first

    async def _send_paced(self, sentence: SpokenSentence, piece: bytes, continuing: bool) -> float:
        now = trio.current_time()
        if self.play_until > now + self.lead:
            await trio.sleep_until(self.play_until - self.lead)
            now = trio.current_time()
            if now > self.play_until:  # woke up after this audio should have started
                self.late_frames += len(piece) // FRAME_BYTES
                self.metrics.frames_late.inc(len(piece) // FRAME_BYTES)
        if self.play_until < now:
            self.play_until = now  # nothing queued at the carrier: playback restarts now
        if not sentence.audio_bytes:
            sentence.starts_at = self.play_until
        await self.socket.send_text(build_media(piece))  # type: ignore[attr-defined]
        if self.recording is not None:
            self.recording.bot_audio(piece, self.play_until)
        sentence.audio_bytes += len(piece)
        self.play_until += len(piece) / (BYTES_PER_MS * 1000)
        self.frames_sent += len(piece) // FRAME_BYTES
        return now

    def on_mark(self, name: str) -> None:
        for sentence in self.sentences:
            if sentence.mark == name:
                sentence.mark_echoed = True
        self._mark_event.set()
        self._mark_event = trio.Event()

    async def wait_played(self, grace: float = 1.0) -> None:
        """Until the last sentence's mark comes back, or the clock says it has played
        (plus ``grace`` for the echo in flight)."""
        if not self.sentences:
            return
        last = self.sentences[-1]
        with trio.move_on_at(max(self.play_until, trio.current_time()) + grace):
            while not last.mark_echoed:
                if trio.current_time() >= self.play_until and not self._marks_ever_echoed():
                    return  # this carrier does not echo marks: the clock is all we have
                await self._mark_event.wait()

    def _marks_ever_echoed(self) -> bool:
        return any(s.mark_echoed for s in self.sentences)

    async def interrupt(self) -> None:
        """Barge-in: tell the carrier to drop what it has not played yet."""
        self._pending.clear()
        if self.play_until > trio.current_time():
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.socket.send_text(build_clear())  # type: ignore[attr-defined]
        now = trio.current_time()
        if self.recording is not None:
            self.recording.unheard_after(now)
        self.play_until = min(self.play_until, now)

    def heard_since(self, index: int, at: float) -> tuple[str, bool]:
        """What the caller heard of sentences ``index:`` by time ``at``, and whether any
        of them was cut short."""
        parts: list[str] = []
        cut = False
        for sentence in self.sentences[index:]:
            heard = sentence.heard_text(at)
            if heard != sentence.text:
                cut = True
            if heard:
                parts.append(heard)
            if heard != sentence.text:
                break
        return " ".join(parts), cut
