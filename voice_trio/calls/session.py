"""``CallSession``: one media-streams call, STT → Claude → TTS, inside one nursery.

Tasks of the call's nursery (DESIGN.md §3):

- ``read_carrier``: Telnyx frames → (reorder, transcode) → Deepgram; marks; stop/close.
- ``listen``: Deepgram events → ``TurnDetector`` → user turns; caller speech barges in.
- ``converse``: greeting, then one ``BotTurn`` per user turn; silence reprompt/goodbye.
- ``watch_duration``: the maximum call length.
- ``keys.run``: key presses (``dtmf`` frames and ``call.dtmf.received``, counted once)
  barge in and reach the conversation as a bracketed note (:mod:`voice_trio.calls.dtmf`).

Some events cut the conversation short (``interrupt``): a key shortcut, Claude's
``transfer_call`` tool (:mod:`~voice_trio.calls.transfer`), an answering machine on an
outbound call (:mod:`~voice_trio.calls.voicemail`). ``converse`` carries them out between
turns (``act``).

A bot turn runs in its own cancel scope: Claude's stream, the TTS stream and the pacing of
its audio stop together when the caller barges in.

Faster turns (:mod:`~voice_trio.calls.speculation`): ``read_carrier`` also watches the
caller's audio for the end of speech, sends Deepgram ``Finalize`` after a short silence and
ends a turn itself once the endpointing silence has passed and the finals cover the voice;
a stable transcript starts a speculative reply (``speculator``) that the turn adopts when it
ends with the same text. The call's scope is the registry's
``ActiveCall.cancel_scope``: hang-up, socket close and shutdown cancel it from outside.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from voice_trio.audio import ALAW_TO_MULAW, BYTES_PER_MS
from voice_trio.calls.dtmf import STREAM, WEBHOOK, KeyCollector, PressDeduper, key_note
from voice_trio.calls.history import Conversation
from voice_trio.calls.phrases import local_now
from voice_trio.calls.playback import Playback
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.sentences import SentenceChunker
from voice_trio.calls.speculation import (
    ENDPOINT,
    QUIET,
    Speculation,
    Speculator,
    SpeechEndWatch,
    normalize,
)
from voice_trio.calls.stt_link import SttLink, SttLost, open_stt_link
from voice_trio.calls.telnyx_speech import speak_language
from voice_trio.calls.thinking import think_reply
from voice_trio.calls.transfer import TRANSFERRED, hand_off
from voice_trio.calls.turns import CallerSpeaking, TurnDetector, UserTurn
from voice_trio.calls.voicemail import MachineDetection, leave_voicemail
from voice_trio.providers.deepgram_stt import (
    SpeechStarted,
    Transcript,
    UtteranceEnd,
)
from voice_trio.providers.deepgram_tts import TtsError
from voice_trio.providers.telnyx_control import TelnyxError, decode_client_state
from voice_trio.providers.telnyx_media import (
    Dtmf,
    FrameError,
    FrameReorderer,
    Mark,
    Media,
    Start,
    Stop,
    StreamError,
    parse_frame,
)

if TYPE_CHECKING:
    # Only a type here: center imports the fallback mode, which imports this module.
    from voice_trio.calls.center import CallCenter

log = logging.getLogger("voice_trio.calls")

SENTENCE_QUEUE = 8  # sentences waiting for TTS; the LLM is far ahead of speech anyway
AUDIO_QUEUE = 32  # TTS chunks waiting for pacing; full = TTS waits (back-pressure)
# End reason: the media socket closed without a ``stop`` frame. Telnyx sends ``stop`` when
# the call ends, so the call may well be up still: it goes on in fallback mode.
STREAM_LOST = "stream_lost"
STT_LOST = "stt_lost"
STT_UNAVAILABLE = "stt_unavailable"
# Voice-detector chunks end on 20 ms frame edges, Deepgram's times on its own: a transcript
# that ends this close to the last voiced chunk still covers it.
COVER_SLACK_S = 0.06


@dataclass
class TurnRecord:
    """One bot turn: what was said, what was heard, and its latency ledger (DESIGN.md §5)."""

    user_text: str
    kind: str = "reply"  # reply | greeting | reprompt | goodbye | apology
    bot_text: str = ""
    heard_text: str = ""
    interrupted: bool = False
    t0: float | None = None  # turn end detected
    t1: float | None = None  # LLM request sent
    t2: float | None = None  # first LLM token
    t2s: float | None = None  # the token that completed the first sentence
    t3: float | None = None  # first sentence sent to TTS
    t4: float | None = None  # first TTS audio
    t5: float | None = None  # first audio frame written to Telnyx
    tool_calls: list[str] = field(default_factory=list)
    llm_input_tokens: int = 0  # every request of the turn (retries too), as reported
    llm_output_tokens: int = 0
    speculative: bool = False  # adopted a reply started before t0 (t1 < t0)

    def count_usage(self, input_tokens: int, output_tokens: int) -> None:
        self.llm_input_tokens += input_tokens
        self.llm_output_tokens += output_tokens

    def overhead(self) -> float | None:
        """Time the server itself added: (t1-t0) + (t3-t2s) + (t5-t4).

        DESIGN.md §5 writes (t3-t2); but from the first token to the end of the first
        sentence the server only waits for Claude to write it, so that span is provider
        time. ``t2s``, when the sentence's last token arrived, leaves only our own delay.
        """
        stamps = (self.t0, self.t1, self.t2s, self.t3, self.t4, self.t5)
        if any(t is None for t in stamps):
            return None
        t0, t1, t2s, t3, t4, t5 = stamps  # type: ignore[misc]
        # A speculative reply was asked before the turn ended: no wait of ours there.
        return max(0.0, t1 - t0) + (t3 - t2s) + (t5 - t4)

    def stages_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        pairs = (
            ("t0-t1", self.t0, self.t1),
            ("t1-t2", self.t1, self.t2),
            ("t2-t3", self.t2, self.t3),
            ("t3-t4", self.t3, self.t4),
            ("t4-t5", self.t4, self.t5),
            ("t0-t5", self.t0, self.t5),
        )
        for name, a, b in pairs:
            if a is not None and b is not None:
                out[name] = round((b - a) * 1000, 1)
        return out


class CallSession:
    def __init__(self, center: CallCenter, socket: Any, start: Start, call: ActiveCall) -> None:
        self.center = center
        self.settings = center.settings
        self.socket = socket
        self.start = start
        self.call = call
        context = decode_client_state(start.client_state)
        self.nombre = str(context.get("nombre") or "")
        self.contexto = str(context.get("contexto") or "")
        self.saludo = str(context.get("saludo") or "")
        self.conversation = Conversation()
        self.turns = TurnDetector(min_confidence=self.settings.transcription_min_confidence)
        self.playback = Playback(socket, center.metrics)
        self.records: list[TurnRecord] = []
        self._user_send, self._user_recv = trio.open_memory_channel[tuple[str, float]](16)
        self._bot_scope: trio.CancelScope | None = None
        self._barged_at: float | None = None
        self._silence_deadline = trio.current_time() + self.settings.silence_timeout_ms / 1000
        self._time_up = trio.Event()
        self._time_up_reason = "max_duration"
        self.tts_characters = 0
        self._wait_scope = trio.CancelScope()
        self._end_requested = False
        self.stt: SttLink | None = None
        self.presses = PressDeduper()
        self.keys = KeyCollector()
        self.transferring = False  # the transfer command went out: the leg is leaving us
        self._pending: str | None = None  # transfer | end_call | voicemail (see ``act``)
        self._cut_for_action = False
        amd = self.settings.answering_machine_detection
        outbound = context.get("dir") == "outbound"
        self.amd = MachineDetection(amd) if outbound and amd != "disabled" else None
        s = self.settings
        finalize_s = s.stt_finalize_silence_ms / 1000
        endpoint_s = s.stt_endpointing_ms / 1000
        self.speech_end = SpeechEndWatch(
            finalize_s if finalize_s < endpoint_s else 0.0, endpoint_s, BYTES_PER_MS * 1000
        )
        outcomes = center.metrics.speculations
        self.speculator = Speculator(lambda outcome: outcomes.labels(outcome).inc())
        self._awaiting_user = False  # converse waits in next_user_turn

    async def run(self) -> None:
        s = self.settings
        async with open_stt_link(
            s.deepgram_ws_base, s.deepgram_api_key, self.center.stt_options
        ) as stt:
            self.stt = stt
            log.info("🔌 Conectado a Deepgram WebSocket (%s)", stt.request_id or "-")
            ccid = self.call.call_control_id
            self.center.signals.attach(ccid, self.on_signal)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.speculator.run)
                    nursery.start_soon(self.read_carrier, stt)
                    nursery.start_soon(self.listen, stt)
                    nursery.start_soon(self.converse)
                    nursery.start_soon(self.watch_duration)
                    nursery.start_soon(self.keys.run, self.key_pressed, self.keys_entered)
            finally:
                self.center.signals.detach(ccid, self.on_signal)
                spent = self.speculator.take_unclaimed()
                if self.records and any(spent):
                    self.records[-1].count_usage(*spent)  # billed all the same
                with trio.CancelScope(shield=True):
                    await stt.close_stream(timeout=0.3)

    async def read_carrier(self, stt: SttLink) -> None:
        """Telnyx frames in, until ``stop`` (the call is over) or the socket closing without
        one (the stream is lost; whether the call is over is decided by the caller)."""
        reorder = FrameReorderer()
        alaw = self.start.encoding == "PCMA"
        metrics = self.center.metrics
        while True:
            raw = await self.socket.receive()
            if raw is None:
                # Mid-transfer the socket closing is the leg leaving us, not a lost stream.
                self.call.end(TRANSFERRED if self.transferring else STREAM_LOST)
                return
            try:
                frame = parse_frame(raw)
            except FrameError as exc:
                metrics.frames_dropped.labels("malformed").inc()
                log.debug("Dropped frame: %s", exc)
                continue
            if isinstance(frame, Media):
                if frame.track != "inbound":
                    continue
                for ready in reorder.push(frame):
                    audio = ready.payload.translate(ALAW_TO_MULAW) if alaw else ready.payload
                    await stt.send_audio(audio)
                    edge = self.speech_end.feed(audio)
                    if edge is not None:
                        await self.on_silence(stt, edge)
            elif isinstance(frame, Mark):
                self.playback.on_mark(frame.name)
            elif isinstance(frame, Stop):
                self.call.end(TRANSFERRED if self.transferring else "caller_hangup")
                return
            elif isinstance(frame, Dtmf):
                self.on_key(frame.digit, STREAM)
            elif isinstance(frame, StreamError):
                log.warning("Telnyx stream error %s %s: %s", frame.code, frame.title, frame.detail)

    def on_signal(self, kind: str, payload: dict[str, Any]) -> None:
        """A webhook fact for this call (``CallSignals``): never blocks."""
        if kind == "call.dtmf.received":
            digit = payload.get("digit")
            if isinstance(digit, str) and digit:
                self.on_key(digit, WEBHOOK)
        elif self.amd is not None and self.amd.on_event(kind, payload):
            log.info("📼 Answering machine detected (%s)", self.amd.result)
            self.interrupt("voicemail")
        elif self.amd is not None and kind.startswith("call.machine."):
            log.info("📼 Answering machine detection: %s", payload.get("result"))

    def on_key(self, key: str, source: str) -> None:
        """A key press from either path; the second report of one press is dropped."""
        if not self.presses.first_report(key, source, trio.current_time()):
            return
        action = self.settings.dtmf_actions.get(key)
        log.info("🎤 DTMF %s%s", key, f" → {action}" if action else "")
        if action is not None:
            self.interrupt(action)
        elif not self.keys.push(key):
            log.warning("🎤 Too many keys waiting; dropped %s", key)

    async def key_pressed(self, key: str) -> None:
        now = trio.current_time()
        self._silence_deadline = now + self.settings.silence_timeout_ms / 1000
        await self.barge_in(now)

    def keys_entered(self, keys: list[str]) -> None:
        note = key_note(keys, self.settings.agent_language)
        log.info("🎤 Caller: %s", note)
        try:
            self._user_send.send_nowait((note, trio.current_time()))
        except trio.WouldBlock:
            log.warning("🎤 Too many caller turns waiting; dropped %s", note)

    def interrupt(self, action: str) -> None:
        """Cut the conversation short for ``action`` (transfer, end_call, voicemail): the
        bot's turn stops (with a ``clear``) and the wait for the caller ends; ``converse``
        carries the action out. The first action wins."""
        if self._pending is not None:
            return
        self._pending = action
        self._wait_scope.cancel()
        self.speculator.cancel()
        scope = self._bot_scope
        if scope is not None and not scope.cancel_called:
            self._barged_at = trio.current_time()
            self._cut_for_action = True
            scope.cancel()

    async def act(self) -> bool:
        """Carry out the action that cut the conversation short, if any; True if the
        conversation is over."""
        action = self._pending
        if action is None:
            return False
        if action == "voicemail" and self.amd is not None:
            await leave_voicemail(self, self.amd)
            return True
        if action == "transfer":
            over = await hand_off(self)
            self._pending = None
            return over
        await self.finish("caller_ended", self.center.phrases_text.goodbye)
        return True

    def handover(self) -> Conversation:
        """The conversation so far, with caller turns not answered yet, for the fallback mode
        to carry on with once the media stream has failed. Finals of a turn that had not
        ended yet count too (with Finalize they are often all of it): Deepgram is gone, so
        no endpoint will come for them."""
        while True:
            try:
                text, _ = self._user_recv.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError):
                self.conversation.add_user(self.turns.pending_text)
                return self.conversation
            self.conversation.add_user(text)

    async def listen(self, stt: SttLink) -> None:
        try:
            await self._listen(stt)
        except SttLost as exc:
            # Deepgram is gone for good: the call goes on through Telnyx's own speech
            # recognition (fallback mode) with its history.
            log.error("🔌 Deepgram lost (%s): the call continues in fallback mode", exc.reason)
            self.call.end(STT_LOST)

    async def _listen(self, stt: SttLink) -> None:
        async for event in stt.events():
            if self._pending == "voicemail":
                continue  # the machine's greeting is no turn, and must not cut the message
            if isinstance(event, Transcript):
                signal = self.turns.on_transcript(
                    event.text,
                    event.confidence,
                    event.is_final,
                    event.speech_final,
                    from_finalize=event.from_finalize,
                    end=event.start + event.duration,
                )
            elif isinstance(event, SpeechStarted):
                signal = self.turns.on_speech_started()
            elif isinstance(event, UtteranceEnd):
                signal = self.turns.on_utterance_end()
            else:
                continue
            if signal is None:
                self.consider_speculation()
                continue
            await self.on_turn_signal(signal)

    async def on_turn_signal(self, signal: CallerSpeaking | UserTurn) -> None:
        now = trio.current_time()
        self._silence_deadline = now + self.settings.silence_timeout_ms / 1000
        if isinstance(signal, CallerSpeaking):
            await self.barge_in(now)
            self.consider_speculation()
        else:
            await self.barge_in(now)
            log.info("🎤 Caller: %s", signal.text)
            self._user_send.send_nowait((signal.text, now))

    async def on_silence(self, stt: SttLink, edge: str) -> None:
        """The caller's voice stopped ``STT_FINALIZE_SILENCE_MS`` ago (``QUIET``): ask
        Deepgram for the final now. Or ``STT_ENDPOINTING_MS`` ago (``ENDPOINT``): if the
        finals cover the voice, the turn is over (Deepgram may send no ``speech_final``
        for audio it flushed)."""
        if self._pending == "voicemail":
            return
        if edge == QUIET:
            await stt.finalize()
            self.consider_speculation()
        elif edge == ENDPOINT:
            turn = self.turns.end_if_covered(self.speech_end.voiced_until, COVER_SLACK_S)
            if turn is not None:
                await self.on_turn_signal(turn)

    def consider_speculation(self) -> None:
        """Start (or replace, or drop) the speculative reply; the rule is in
        :mod:`~voice_trio.calls.speculation`: silence, and a transcript covering the voice."""
        speculator = self.speculator
        text = self.turns.candidate
        current = speculator.current
        if current is not None and current.key != normalize(text):
            speculator.cancel()  # the caller said more, or something else
            current = None
        if (
            current is not None
            or not text
            or not self.settings.speculative_replies
            or not self.speech_end.quiet
            or self.turns.covered_until + COVER_SLACK_S < self.speech_end.voiced_until
            or not self._awaiting_user
            or self._bot_scope is not None
            or self._pending is not None
            or self._time_up.is_set()
            or self._user_recv.statistics().current_buffer_used
        ):
            return
        future = copy.deepcopy(self.conversation)
        future.add_user(text)
        messages = future.window(self.settings.conversation_history_limit)
        record = TurnRecord(user_text=text, speculative=True)
        log.info("🔮 Speculative reply for: %s", text)
        speculator.start(text, messages, record, self._think_ahead)

    async def _think_ahead(
        self,
        sentence_send: trio.MemorySendChannel[str],
        messages: list[dict[str, Any]],
        record: TurnRecord,
    ) -> None:
        await self._ask_claude(sentence_send, record, messages)

    async def _ask_claude(
        self,
        sentence_send: trio.MemorySendChannel[str],
        record: TurnRecord,
        messages: list[dict[str, Any]] | None = None,
    ) -> None:
        await think_reply(
            self.center,
            self.conversation,
            sentence_send,
            record,
            nombre=self.nombre,
            contexto=self.contexto,
            can_transfer=bool(self.settings.transfer_number),
            messages=messages,
        )

    async def barge_in(self, now: float) -> None:
        """Caller speech while the bot is speaking (or about to): cut the bot's turn."""
        scope = self._bot_scope
        if scope is None or scope.cancel_called:
            return
        self._barged_at = now
        scope.cancel()
        self.speculator.cancel()
        await self.playback.interrupt()
        self.center.metrics.barge_ins.inc()
        log.info("✋ Barge-in: bot interrupted")

    async def converse(self) -> None:
        phrases = self.center.phrases_text
        greeting = phrases.greeting(
            nombre=self.nombre, saludo=self.saludo, now=local_now(self.settings.timezone)
        )
        if self.amd is not None and self.settings.amd_wait_ms:
            # Hold the greeting for the verdict: a machine should not hear a conversation.
            await self.amd.wait_for_verdict(self.settings.amd_wait_ms / 1000)
        if await self.act():
            return
        await self.say(greeting, kind="greeting")
        reprompted = False
        while True:
            if await self.act():
                return
            turn = await self.next_user_turn()
            if await self.act():
                return
            if self._time_up.is_set():
                await self.finish(self._time_up_reason, phrases.goodbye)
                return
            if turn is None:
                if reprompted:
                    await self.finish("silence_timeout", phrases.timeout_goodbye)
                    return
                reprompted = True
                await self.say(phrases.reprompt, kind="reprompt")
                continue
            reprompted = False
            await self.reply(*turn)
            if await self.act():
                return
            if self._end_requested:
                await self.finish("agent_ended", None)
                return

    async def next_user_turn(self) -> tuple[str, float] | None:
        """The next user turn (turns queued meanwhile are joined); None after
        ``SILENCE_TIMEOUT_MS`` of caller silence once the bot has finished speaking."""
        self._silence_deadline = max(
            self._silence_deadline,
            self.playback.speaking_until + self.settings.silence_timeout_ms / 1000,
        )
        while not self._time_up.is_set() and self._pending is None:
            with trio.move_on_at(self._silence_deadline) as self._wait_scope:
                self._awaiting_user = True
                try:
                    self.consider_speculation()  # the caller may have finished already
                    text, t0 = await self._user_recv.receive()
                finally:
                    self._awaiting_user = False
                while True:
                    try:
                        more, t0 = self._user_recv.receive_nowait()
                    except trio.WouldBlock:
                        return text, t0
                    text = f"{text} {more}"
            if self._time_up.is_set() or self._pending is not None:
                return None
            if trio.current_time() >= self._silence_deadline and not self.turns.in_utterance:
                return None
        return None

    async def say(self, text: str, *, kind: str) -> TurnRecord:
        """Speak fixed text (cached audio where possible) as a bot turn."""
        record = TurnRecord(user_text="", kind=kind, bot_text=text)
        chunker = SentenceChunker()
        sentences = chunker.push(text) + chunker.flush()

        async def produce(audio_send: trio.MemorySendChannel[Any]) -> None:
            async with audio_send:
                for sentence in sentences:
                    await self.synthesize_into(sentence, audio_send, record)

        await self.bot_turn(record, produce)
        return record

    async def reply(self, user_text: str, t0: float) -> None:
        self.conversation.add_user(user_text)
        messages = self.conversation.window(self.settings.conversation_history_limit)
        spec = self.speculator.take(user_text, messages)
        if spec is not None:
            await self.reply_adopted(spec, t0)
            return
        record = TurnRecord(user_text=user_text, t0=t0)
        record.count_usage(*self.speculator.take_unclaimed())

        async def produce(audio_send: trio.MemorySendChannel[Any]) -> None:
            sentence_send, sentence_recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.think, sentence_send, record)
                async with audio_send, sentence_recv:
                    async for sentence in sentence_recv:
                        await self.synthesize_into(sentence, audio_send, record)

        await self.bot_turn(record, produce)

    async def reply_adopted(self, spec: Speculation, t0: float) -> None:
        """The turn ended as speculated: its buffered sentences go to TTS now. The
        speculation's task is cancelled with the turn (barge-in, hang-up) like any reply."""
        record: TurnRecord = spec.record
        record.t0 = t0
        record.count_usage(*self.speculator.take_unclaimed())
        head = (t0 - record.t1) * 1000 if record.t1 is not None else 0.0
        log.info("🔮 Speculative reply kept (asked %.0f ms before the turn ended)", head)

        async def produce(audio_send: trio.MemorySendChannel[Any]) -> None:
            try:
                async with audio_send, spec.sentences:
                    async for sentence in spec.sentences:
                        await self.synthesize_into(sentence, audio_send, record)
                await spec.done.wait()  # its tool calls are all in
            finally:
                spec.cancel()
                self.note_tool_calls(record)

        await self.bot_turn(record, produce)

    def note_tool_calls(self, record: TurnRecord) -> None:
        if "end_call" in record.tool_calls:
            self._end_requested = True
        if "transfer_call" in record.tool_calls and self._pending is None:
            self._pending = "transfer"  # after the reply that announces it has played

    async def think(self, sentence_send: trio.MemorySendChannel[str], record: TurnRecord) -> None:
        """Claude's streamed reply, cut into sentences (at most MAX_RESPONSE_LENGTH)."""
        try:
            await self._ask_claude(sentence_send, record)
        finally:
            self.note_tool_calls(record)

    async def synthesize_into(
        self, sentence: str, audio_send: trio.MemorySendChannel[Any], record: TurnRecord
    ) -> None:
        """One sentence's audio into the turn's audio queue: cached, else streamed TTS."""
        if record.t3 is None:
            record.t3 = trio.current_time()
        await audio_send.send(("sentence", sentence))
        cached = self.center.phrase_cache.get(sentence)
        if cached is not None:
            record.t4 = record.t4 or trio.current_time()
            await audio_send.send(("audio", cached))
        else:
            sent_audio = False
            try:
                async with self.center.tts.synthesize(sentence) as audio:
                    async for chunk in audio:
                        if record.t4 is None:
                            record.t4 = trio.current_time()
                        sent_audio = True
                        await audio_send.send(("audio", chunk))
                self.tts_characters += len(sentence)
            except TtsError as exc:
                log.warning("🔊 TTS failed for a sentence: %s", exc)
                if not sent_audio:
                    await self.speak_through_telnyx(sentence)
        await audio_send.send(("end", sentence))

    async def speak_through_telnyx(self, sentence: str) -> None:
        """The voice provider failed: this sentence goes out through Telnyx ``speak``,
        which plays into the same call."""
        s = self.settings
        try:
            await self.center.telnyx.speak(
                self.call.call_control_id,
                sentence,
                voice=s.telnyx_speak_voice,
                language=speak_language(s.agent_language),
            )
            log.info("🔊 Sentence sent through Telnyx speak instead")
        except TelnyxError as exc:
            log.warning("🔊 Telnyx speak failed too: %s", exc)

    async def bot_turn(self, record: TurnRecord, produce: Any) -> None:
        """Run ``produce`` (which fills an audio queue) and pace its audio out, inside the
        turn's own cancel scope; then record what the caller heard."""
        first_sentence = len(self.playback.sentences)
        self._barged_at = None
        scope = trio.CancelScope()
        try:
            with scope:
                self._bot_scope = scope
                audio_send, audio_recv = trio.open_memory_channel[Any](AUDIO_QUEUE)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(produce, audio_send)
                    await self.pace(audio_recv, record)
                await self.playback.wait_played()
            if self._cut_for_action:
                self._cut_for_action = False
                await self.playback.interrupt()  # drop what Telnyx has queued of this turn
        finally:
            # Also when the whole call is being cancelled (hang-up mid-turn): the record
            # keeps the turn, cut where the caller stopped hearing it.
            self._bot_scope = None
            at = self._barged_at if self._barged_at is not None else trio.current_time()
            heard, cut = self.playback.heard_since(first_sentence, at)
            record.heard_text = heard
            record.interrupted = cut and (scope.cancel_called or self.call.end_reason is not None)
            self.conversation.add_assistant(heard, interrupted=record.interrupted)
            self.records.append(record)
            self.report(record)

    async def pace(self, audio_recv: trio.MemoryReceiveChannel[Any], record: TurnRecord) -> None:
        sentence = None
        async with audio_recv:
            async for kind, value in audio_recv:
                if kind == "sentence":
                    sentence = self.playback.begin_sentence(value)
                    log.info("💬 Bot: %s", value)
                elif kind == "audio" and sentence is not None:
                    sent = await self.playback.feed(sentence, value)
                    if sent is not None and record.t5 is None:
                        record.t5 = sent
                elif kind == "end" and sentence is not None:
                    sent = await self.playback.end_sentence(sentence)
                    if sent is not None and record.t5 is None:
                        record.t5 = sent

    def report(self, record: TurnRecord) -> None:
        metrics = self.center.metrics
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

    async def finish(self, reason: str, goodbye: str | None) -> None:
        """Say goodbye (if any), hang up once, and end the call."""
        if goodbye:
            await self.say(goodbye, kind="goodbye")
        if self.call.end_reason is None:
            self.call.end_reason = reason
        await self.center.hang_up(self.call.call_control_id)
        self.call.end(reason)

    async def watch_duration(self) -> None:
        self._time_up_reason = await self.call.time_up_after(self.settings.max_call_seconds)
        log.info("⏱️ Time to end the call (%s)", self._time_up_reason)
        self._time_up.set()
        self._wait_scope.cancel()
        self.speculator.cancel()
        if self._bot_scope is not None:
            self._bot_scope.cancel()
            await self.playback.interrupt()
