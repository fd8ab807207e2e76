"""``BotVoice``: the bot's turns of a media call, from sentences to paced audio frames.

A bot turn is given a *sentence source* (fixed text, Claude's streamed reply, an adopted
speculation): it writes the turn's sentences into a bounded sentence queue. The turn runs
it, synthesizes each sentence into a bounded audio queue (cached audio, else streamed TTS,
else Telnyx ``speak``), and ``pace`` writes that audio to Telnyx at playback speed, all in
the turn's own cancel scope. Barge-in, an action that cuts the conversation short and the
end of the call's time cancel the scope (``cut``, ``stop``): the source (Claude's stream),
the TTS stream and the pacing stop together. Either way the turn's
:class:`~voice_trio.conversation.turn_record.TurnRecord` keeps what the caller actually heard.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.services import CallServices
from voice_trio.conversation.history import Conversation
from voice_trio.conversation.sentences import SentenceChunker
from voice_trio.conversation.thinking import SENTENCE_QUEUE
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.media.playback import Playback
from voice_trio.providers.deepgram.tts import TtsError
from voice_trio.providers.telnyx.control import TelnyxError
from voice_trio.providers.telnyx.speech import speak_language

log = logging.getLogger("voice_trio.calls")

AUDIO_QUEUE = 32  # TTS chunks waiting for pacing; full = TTS waits (back-pressure)
# Telnyx speak talks at roughly 14 characters a second; a sentence sent through it is given
# this long (plus SPEAK_SLACK_S) to be heard if ``call.speak.ended`` does not come first.
SPEAK_SECONDS_PER_CHAR = 0.09
SPEAK_SLACK_S = 1.5


# What a turn's audio queue carries, in order, for each sentence: its start, its audio in
# chunks (or, if the voice provider failed before any, the text for Telnyx speak), its end.
@dataclass(frozen=True, slots=True)
class SentenceStart:
    text: str


@dataclass(frozen=True, slots=True)
class AudioChunk:
    audio: bytes  # mu-law 8 kHz


@dataclass(frozen=True, slots=True)
class SpeakInstead:
    text: str  # to go out through Telnyx speak, in its turn


@dataclass(frozen=True, slots=True)
class SentenceEnd:
    text: str


VoiceItem = SentenceStart | AudioChunk | SpeakInstead | SentenceEnd
# Writes a turn's sentences into the channel it is given, and closes it (the turn closes it
# too once the source returns). Runs in the turn's cancel scope: barge-in cancels it. The
# channel holds SENTENCE_QUEUE sentences; full = the source waits for TTS (back-pressure).
SentenceSource = Callable[[trio.MemorySendChannel[str]], Awaitable[None]]


class BotVoice:
    """Speaks one call's bot turns, one at a time, and keeps their records."""

    def __init__(
        self,
        services: CallServices,
        call: ActiveCall,
        playback: Playback,
        conversation: Conversation,
    ) -> None:
        self.services = services
        self.call = call
        self.playback = playback
        self.conversation = conversation
        self.records: list[TurnRecord] = []
        self.tts_characters = 0
        self._scope: trio.CancelScope | None = None
        self._barged_at: float | None = None
        self._cut_for_action = False
        self._speak_ended = trio.Event()

    @property
    def speaking(self) -> bool:
        """A bot turn is running (producing or pacing audio)."""
        return self._scope is not None

    def cut(self, now: float, *, for_action: bool = False) -> bool:
        """Cancel the running turn as heard up to ``now``; False if none was left to cut.
        ``for_action``: the turn also drops what Telnyx has queued of it (a ``clear``)."""
        scope = self._scope
        if scope is None or scope.cancel_called:
            return False
        self._barged_at = now
        if for_action:
            self._cut_for_action = True
        scope.cancel()
        return True

    async def stop(self) -> None:
        """The call's time is up: the running turn stops, and so does its audio."""
        if self._scope is not None:
            self._scope.cancel()
            await self.playback.interrupt()

    async def say(self, text: str, *, kind: str) -> TurnRecord:
        """Speak fixed text (cached audio where possible) as a bot turn."""
        record = TurnRecord(user_text="", kind=kind, bot_text=text)
        chunker = SentenceChunker()
        sentences = chunker.push(text) + chunker.flush()

        async def fixed_text(sentence_send: trio.MemorySendChannel[str]) -> None:
            async with sentence_send:
                for sentence in sentences:
                    await sentence_send.send(sentence)

        await self.turn(record, fixed_text)
        return record

    async def _synthesize(
        self,
        sentence_recv: trio.MemoryReceiveChannel[str],
        audio_send: trio.MemorySendChannel[VoiceItem],
        record: TurnRecord,
    ) -> None:
        """Each sentence of the turn into its audio queue, in order; closes it at the end."""
        async with sentence_recv, audio_send:
            async for sentence in sentence_recv:
                await self._synthesize_sentence(sentence, audio_send, record)

    async def _synthesize_sentence(
        self, sentence: str, audio_send: trio.MemorySendChannel[VoiceItem], record: TurnRecord
    ) -> None:
        """One sentence's audio into the turn's audio queue: cached, else streamed TTS."""
        if record.t3 is None:
            record.t3 = trio.current_time()
        await audio_send.send(SentenceStart(sentence))
        cached = self.services.phrase_cache.get(sentence)
        if cached is not None:
            record.t4 = record.t4 or trio.current_time()
            await audio_send.send(AudioChunk(cached))
        else:
            sent_audio = False
            try:
                async with self.services.tts.synthesize(sentence) as audio:
                    async for chunk in audio:
                        if record.t4 is None:
                            record.t4 = trio.current_time()
                        sent_audio = True
                        await audio_send.send(AudioChunk(chunk))
                self.tts_characters += len(sentence)
            except TtsError as exc:
                log.warning("🔊 TTS failed for a sentence: %s", exc)
                if not sent_audio:
                    await audio_send.send(SpeakInstead(sentence))
        await audio_send.send(SentenceEnd(sentence))

    async def speak_through_telnyx(self, sentence: str) -> None:
        """The voice provider failed: this sentence goes out through Telnyx ``speak``, in
        its turn. Telnyx plays speak audio whenever the stream is idle, so it is sent only
        once what was streamed before it has played, and the turn streams nothing more
        until Telnyx says it has finished (``call.speak.ended``) or the time it takes has
        passed: otherwise the two voices interleave, word for word."""
        await trio.sleep_until(self.playback.play_until)
        self._speak_ended = trio.Event()
        s = self.services.settings
        try:
            await self.services.telnyx.speak(
                self.call.call_control_id,
                sentence,
                voice=s.telnyx_speak_voice,
                language=speak_language(s.agent_language),
            )
        except TelnyxError as exc:
            log.warning("🔊 Telnyx speak failed too: %s", exc)
            return
        log.info("🔊 Sentence sent through Telnyx speak instead")
        with trio.move_on_after(len(sentence) * SPEAK_SECONDS_PER_CHAR + SPEAK_SLACK_S):
            await self._speak_ended.wait()

    def speak_ended(self) -> None:
        """Telnyx says its ``speak`` has played (``call.speak.ended``)."""
        self._speak_ended.set()

    async def turn(self, record: TurnRecord, sentences: SentenceSource) -> None:
        """Speak the sentences ``sentences`` writes, inside the turn's own cancel scope:
        the source, the synthesis and the pacing run together and stop together. Then
        record what the caller heard."""
        first_sentence = len(self.playback.sentences)
        self._barged_at = None
        if record.kind == "reply":
            self.call.set_state("thinking")
        scope = trio.CancelScope()
        try:
            with scope:
                self._scope = scope
                sentence_send, sentence_recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
                audio_send, audio_recv = trio.open_memory_channel[VoiceItem](AUDIO_QUEUE)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_run_source, sentences, sentence_send)
                    nursery.start_soon(self._synthesize, sentence_recv, audio_send, record)
                    await self.pace(audio_recv, record)
                await self.playback.wait_played()
            if self._cut_for_action:
                self._cut_for_action = False
                await self.playback.interrupt()  # drop what Telnyx has queued of this turn
        finally:
            # Also when the whole call is being cancelled (hang-up mid-turn): the record
            # keeps the turn, cut where the caller stopped hearing it.
            self._scope = None
            at = self._barged_at if self._barged_at is not None else trio.current_time()
            heard, cut = self.playback.heard_since(first_sentence, at)
            record.heard_text = heard
            record.interrupted = cut and (scope.cancel_called or self.call.end_reason is not None)
            self.conversation.add_assistant(heard, interrupted=record.interrupted)
            if record.interrupted:
                self.call.note("heard", text=heard)
            self.call.set_state("listening")
            self.records.append(record)
            self.report(record)

    async def pace(
        self, audio_recv: trio.MemoryReceiveChannel[VoiceItem], record: TurnRecord
    ) -> None:
        sentence = None
        async with audio_recv:
            async for item in audio_recv:
                if isinstance(item, SentenceStart):
                    sentence = self.playback.begin_sentence(item.text)
                    log.info("💬 Bot: %s", item.text)
                    greeting = record.kind == "greeting"
                    self.call.set_state("greeting" if greeting else "speaking")
                    self.call.note("bot", text=item.text, turn=record.kind)
                elif isinstance(item, SpeakInstead):
                    await self.speak_through_telnyx(item.text)
                elif isinstance(item, AudioChunk) and sentence is not None:
                    sent = await self.playback.feed(sentence, item.audio)
                    if sent is not None and record.t5 is None:
                        record.t5 = sent
                elif isinstance(item, SentenceEnd) and sentence is not None:
                    sent = await self.playback.end_sentence(sentence)
                    if sent is not None and record.t5 is None:
                        record.t5 = sent

    def report(self, record: TurnRecord) -> None:
        metrics = self.services.metrics
        stages = record.stages_ms()
        for name, ms in stages.items():
            metrics.turn_stage.labels(name).observe(max(0.0, ms) / 1000)
        overhead = record.overhead()
        if overhead is not None:
            metrics.server_overhead.observe(overhead)
        note = " (interrumpido)" if record.interrupted else ""
        timing = " ".join(f"{k}={v:.0f}ms" for k, v in stages.items())
        extra = f" overhead={overhead * 1000:.1f}ms" if overhead is not None else ""
        log.info("🔊 Bot turn %s done%s: %s%s", record.kind, note, timing or "-", extra)


async def _run_source(sentences: SentenceSource, send: trio.MemorySendChannel[str]) -> None:
    """Run a turn's source; its channel is closed after it however it ends, so synthesis
    never waits on a source that returned without closing it."""
    async with send:
        await sentences(send)
