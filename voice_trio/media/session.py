"""``CallSession``: one media-streams call, STT → Claude → TTS, inside one nursery.

Tasks of the call's nursery (DESIGN.md §3), four while the call idles:

- ``read_carrier``: Telnyx frames → (reorder, transcode) → Deepgram; marks; stop/close.
- ``listen``: Deepgram events → ``TurnDetector`` → user turns; caller speech barges in.
- ``converse``: greeting, then one reply per user turn (:mod:`~voice_trio.media.replies`);
  the silence reprompt/goodbye is the deadline of its wait for the caller.
- ``controls.run``, the call's watch, one task with one deadline: key presses (``dtmf``
  frames and ``call.dtmf.received``, counted once) barge in and reach the conversation as
  a bracketed note (:mod:`voice_trio.conversation.dtmf`); the maximum call length and the
  server's drain end it (``time_up``).

Besides them a bot turn runs its own tasks while it speaks (:mod:`~voice_trio.media.voice`),
a speculation runs as a task of this nursery while there is one, and the Deepgram link
(:mod:`~voice_trio.providers.deepgram.link`) runs three tasks around the nursery.

Some events cut the conversation short: a key shortcut, Claude's ``transfer_call`` tool, an
answering machine on an outbound call, an operator's hang-up or transfer
(:mod:`~voice_trio.media.controls`). ``converse`` carries them out between turns, and says
an operator's text (``POST /api/calls/{id}/say``) once the bot's turn under way has ended.

A bot turn runs in its own cancel scope (:mod:`~voice_trio.media.voice`): Claude's
stream, the TTS stream and the pacing of its audio stop together when the caller barges in.

Faster turns (:mod:`~voice_trio.media.speculation`): ``read_carrier`` also watches the
caller's audio for the end of speech, sends Deepgram ``Finalize`` after a short silence and
ends a turn itself once the endpointing silence has passed and the finals cover the voice;
a stable transcript starts a speculative reply (``speculator``) that the turn adopts when it
ends with the same text. The call's scope is the registry's
``ActiveCall.cancel_scope``: hang-up, socket close and shutdown cancel it from outside.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from voice_trio.audio import ALAW_TO_MULAW, BYTES_PER_MS
from voice_trio.calls.ends import EndReason
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.services import CallServices
from voice_trio.conversation.dtmf import STREAM
from voice_trio.conversation.history import Conversation
from voice_trio.conversation.phrases import local_now
from voice_trio.conversation.tool_use import ToolCaller
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.media.controls import CallControls
from voice_trio.media.playback import Playback
from voice_trio.media.recording import CallRecording
from voice_trio.media.replies import Replies
from voice_trio.media.speculation import ENDPOINT, QUIET, Speculator, SpeechEndWatch
from voice_trio.media.turns import CallerSpeaking, TurnDetector, UserTurn
from voice_trio.media.voice import BotVoice
from voice_trio.media.voicemail import MachineDetection
from voice_trio.providers.deepgram.link import SttLink, SttLost, open_stt_link
from voice_trio.providers.deepgram.stt import (
    SpeechStarted,
    Transcript,
    UtteranceEnd,
)
from voice_trio.providers.telnyx.control import decode_client_state
from voice_trio.providers.telnyx.media import (
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

log = logging.getLogger("voice_trio.calls")

# Voice-detector chunks end on 20 ms frame edges, Deepgram's times on its own: a transcript
# that ends this close to the last voiced chunk still covers it.
COVER_SLACK_S = 0.06

# Caller turns that may wait for ``converse``; one more is dropped (``add_user_turn``).
USER_TURN_QUEUE = 16


class _UserTurns:
    """Caller turns waiting for ``converse``, its only reader: what a trio memory channel
    did here (``send_nowait``, ``receive``, ``receive_nowait``) in a list, with an event
    only while the reader waits. A channel is ~1.8 KB for the life of every call."""

    __slots__ = ("_arrived", "_turns")

    def __init__(self) -> None:
        self._turns: list[tuple[str, float]] = []
        self._arrived: trio.Event | None = None  # while ``receive`` waits

    def __len__(self) -> int:
        return len(self._turns)

    def send_nowait(self, turn: tuple[str, float]) -> None:
        """Queue ``turn``; ``trio.WouldBlock`` if ``USER_TURN_QUEUE`` are waiting."""
        if len(self._turns) >= USER_TURN_QUEUE:
            raise trio.WouldBlock
        self._turns.append(turn)
        if self._arrived is not None:
            self._arrived.set()

    def receive_nowait(self) -> tuple[str, float]:
        if not self._turns:
            raise trio.WouldBlock
        return self._turns.pop(0)

    async def receive(self) -> tuple[str, float]:
        """The oldest turn, waiting for one; a checkpoint either way (as a channel's)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._turns:
            turn = self._turns.pop(0)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return turn
        while not self._turns:
            arrived = self._arrived = trio.Event()
            try:
                await arrived.wait()
            finally:
                self._arrived = None
        return self._turns.pop(0)


class CallSession:
    def __init__(self, services: CallServices, socket: Any, start: Start, call: ActiveCall) -> None:
        self.services = services
        self.settings = services.settings
        self.socket = socket
        self.start = start
        self.call = call
        context = decode_client_state(start.client_state)
        self.nombre = str(context.get("nombre") or "")
        self.contexto = str(context.get("contexto") or "")
        self.saludo = str(context.get("saludo") or "")
        self.conversation = Conversation()
        self.turns = TurnDetector(min_confidence=self.settings.transcription_min_confidence)
        self.playback = Playback(socket, services.metrics)
        self.recording: CallRecording | None = None
        if self.settings.record_calls:
            self.recording = CallRecording(
                self.settings.recordings_dir,
                call.call_control_id,
                start.encoding or "PCMU",
                origin=trio.current_time(),
            )
            self.playback.recording = self.recording
        self.voice = BotVoice(services, call, self.playback, self.conversation)
        self.records: list[TurnRecord] = self.voice.records  # the same list, for the record
        self._user_turns = _UserTurns()
        self._silence_deadline = trio.current_time() + self.settings.silence_timeout_ms / 1000
        self._time_up = trio.Event()
        self._time_up_reason = EndReason.MAX_DURATION
        self._wait_scope = trio.CancelScope()
        self.stt: SttLink | None = None
        self.transferring = False  # the transfer command went out: the leg is leaving us
        amd = self.settings.answering_machine_detection
        outbound = context.get("dir") == "outbound"
        self.controls = CallControls(
            self, MachineDetection(amd) if outbound and amd != "disabled" else None
        )
        s = self.settings
        finalize_s = s.stt_finalize_silence_ms / 1000
        endpoint_s = s.stt_endpointing_ms / 1000
        self.speech_end = SpeechEndWatch(
            finalize_s if finalize_s < endpoint_s else 0.0, endpoint_s, BYTES_PER_MS * 1000
        )
        outcomes = services.metrics.speculations
        self.speculator = Speculator(lambda outcome: outcomes.labels(outcome).inc())
        inbound = context.get("dir") == "inbound"
        self.replies = Replies(
            services,
            self.conversation,
            self.voice,
            self.controls,
            self.speculator,
            caller=ToolCaller(
                call.call_control_id,
                nombre=self.nombre,
                telefono=(start.from_ if inbound else start.to) or "",
                contexto=self.contexto,
                on_line=lambda: call.end_reason is None,
            ),
        )
        self._awaiting_user = False  # converse waits in next_user_turn

    @property
    def tts_characters(self) -> int:
        return self.voice.tts_characters

    async def run(self) -> None:
        s = self.settings
        async with open_stt_link(
            s.deepgram_ws_base, s.deepgram_api_key, self.services.stt_options
        ) as stt:
            self.stt = stt
            log.info("🔌 Conectado a Deepgram WebSocket (%s)", stt.request_id or "-")
            ccid = self.call.call_control_id
            on_signal = self.controls.on_signal
            self.services.signals.attach(ccid, on_signal)
            self.call.obey = self.controls.obey  # operators' orders, from now on
            try:
                async with trio.open_nursery() as nursery:
                    self.speculator.attach(nursery)
                    if self.recording is not None and not await nursery.start(self.recording.run):
                        self.recording = self.playback.recording = None
                    nursery.start_soon(self.read_carrier, stt)
                    nursery.start_soon(self.listen, stt)
                    nursery.start_soon(self.converse)
                    nursery.start_soon(self.controls.run)
            finally:
                self.call.obey = None
                self.services.signals.detach(ccid, on_signal)
                self.speculator.detach()
                spent = self.speculator.take_unclaimed()
                if self.records and any(spent):
                    self.records[-1].count_usage(*spent)  # billed all the same
                with trio.CancelScope(shield=True):
                    await stt.close_stream(timeout=0.3)

    async def read_carrier(self, stt: SttLink) -> None:
        """Telnyx frames in, until ``stop`` (the call is over) or the socket closing without
        one (the stream is lost; whether the call is over is decided by the caller)."""
        try:
            await self._read_carrier(stt)
        finally:
            # Whatever ended the reading (``stop``, the close, a hang-up cancelling the
            # call), the carrier's close is answered now, not after the call's teardown.
            self.socket.done_reading()

    async def _read_carrier(self, stt: SttLink) -> None:
        reorder = FrameReorderer()
        alaw = self.start.encoding == "PCMA"
        metrics = self.services.metrics
        socket = self.socket
        # While nothing in the caller's audio is on its way to a turn end, reads are
        # gathered: one wake-up every STT batch instead of one per 20 ms frame. The audio
        # reaches Deepgram no later than batching alone would send it (the batch counts
        # from when the bytes began to arrive), and the voice that ends the quiet is read
        # at once from the next read on. Not for a recorded call: its track places caller
        # audio by when it was read.
        gather = stt.batch_seconds if self.recording is None else 0.0
        while True:
            raw = await socket.receive()
            if raw is None:
                # Mid-transfer the socket closing is the leg leaving us, not a lost stream.
                # Telnyx sends ``stop`` when the call ends: without one the call may well be
                # up still, and it goes on in fallback mode.
                self.call.end(EndReason.TRANSFERRED if self.transferring else EndReason.STREAM_LOST)
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
                    if self.recording is not None:
                        self.recording.caller_frame(ready.payload, trio.current_time())
                    audio = ready.payload.translate(ALAW_TO_MULAW) if alaw else ready.payload
                    await stt.send_audio(audio, socket.gathered_since)
                    edge = self.speech_end.feed(audio)
                    if edge is not None:
                        await self.on_silence(stt, edge)
                if gather:
                    quiet = self.speech_end.settled and not stt.speaking
                    socket.read_gap = gather if quiet else 0.0
            elif isinstance(frame, Mark):
                self.playback.on_mark(frame.name)
            elif isinstance(frame, Stop):
                self.call.end(
                    EndReason.TRANSFERRED if self.transferring else EndReason.CALLER_HANGUP
                )
                return
            elif isinstance(frame, Dtmf):
                self.controls.on_key(frame.digit, STREAM)
            elif isinstance(frame, StreamError):
                log.warning("Telnyx stream error %s %s: %s", frame.code, frame.title, frame.detail)

    async def caller_active(self, now: float) -> None:
        """The caller spoke or pressed a key: the silence wait starts over and the bot's
        turn is cut."""
        self._silence_deadline = now + self.settings.silence_timeout_ms / 1000
        await self.barge_in(now)

    def add_user_turn(self, text: str, t0: float) -> bool:
        """Queue a caller turn for ``converse``; False (dropped) if too many are waiting."""
        try:
            self._user_turns.send_nowait((text, t0))
        except trio.WouldBlock:
            return False
        return True

    @property
    def ending(self) -> bool:
        """The call's time is up, or it is being ended."""
        return self._time_up.is_set() or self.call.cancel_scope.cancel_called

    def wake(self) -> None:
        """Something is to be said (an operator's text): the wait for the caller ends."""
        self._wait_scope.cancel()

    async def say_notes(self) -> bool:
        """Say the operator's texts waiting (``controls.notes``), each as a turn of its own;
        True if any was said."""
        said = False
        notes = self.controls.notes
        while notes and self.controls.pending is None and not self._time_up.is_set():
            await self.say(notes.pop(0), kind="note")
            said = True
        return said

    def cut_short(self) -> None:
        """An action is pending (``controls.interrupt``): the wait for the caller ends, any
        speculation is dropped, and the bot's turn stops with a ``clear``."""
        self._wait_scope.cancel()
        self.speculator.cancel()
        self.voice.cut(trio.current_time(), for_action=True)

    def handover(self) -> Conversation:
        """The conversation so far, with caller turns not answered yet, for the fallback mode
        to carry on with once the media stream has failed. Finals of a turn that had not
        ended yet count too (with Finalize they are often all of it): Deepgram is gone, so
        no endpoint will come for them."""
        while True:
            try:
                text, _ = self._user_turns.receive_nowait()
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
            self.call.end(EndReason.STT_LOST)

    async def _listen(self, stt: SttLink) -> None:
        async for event in stt.events():
            if self.controls.pending == "voicemail":
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
        await self.caller_active(now)
        if isinstance(signal, CallerSpeaking):
            self.consider_speculation()
        else:
            log.info("🎤 Caller: %s", signal.text)
            self.call.note("caller", text=signal.text)
            self._user_turns.send_nowait((signal.text, now))

    async def on_silence(self, stt: SttLink, edge: str) -> None:
        """The caller's voice stopped ``STT_FINALIZE_SILENCE_MS`` ago (``QUIET``): ask
        Deepgram for the final now. Or ``STT_ENDPOINTING_MS`` ago (``ENDPOINT``): if the
        finals cover the voice, the turn is over (Deepgram may send no ``speech_final``
        for audio it flushed)."""
        if self.controls.pending == "voicemail":
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
        :mod:`~voice_trio.media.speculation`: silence, and a transcript covering the voice,
        while the bot is idle and waiting for the caller."""
        ready = (
            self.settings.speculative_replies
            and self.speech_end.quiet
            and self.turns.covered_until + COVER_SLACK_S >= self.speech_end.voiced_until
            and self._awaiting_user
            and not self.voice.speaking
            and self.controls.pending is None
            and not self._time_up.is_set()
            and not self._user_turns
        )
        self.replies.speculate(self.turns.candidate, ready=ready)

    async def barge_in(self, now: float) -> None:
        """Caller speech while the bot is speaking (or about to): cut the bot's turn."""
        if not self.voice.cut(now):
            return
        self.speculator.cancel()
        await self.playback.interrupt()
        self.services.metrics.barge_ins.inc()
        log.info("✋ Barge-in: bot interrupted")
        self.call.note("barge_in")

    async def converse(self) -> None:
        phrases = self.services.phrases
        greeting = phrases.greeting(
            nombre=self.nombre, saludo=self.saludo, now=local_now(self.settings.timezone)
        )
        if self.controls.amd is not None and self.settings.amd_wait_ms:
            # Hold the greeting for the verdict: a machine should not hear a conversation.
            await self.controls.amd.wait_for_verdict(self.settings.amd_wait_ms / 1000)
        if await self.controls.act():
            return
        if self.recording is not None:
            await self.say(
                self.settings.recording_notice or phrases.recording_notice, kind="notice"
            )
        await self.say(greeting, kind="greeting")
        reprompted = False
        while True:
            if await self.controls.act():
                return
            turn = await self.next_user_turn()
            if await self.controls.act():
                return
            if self._time_up.is_set():
                await self.finish(self._time_up_reason, phrases.goodbye)
                return
            if turn is None and await self.say_notes():
                continue  # the wait ended for the operator's text, not for silence
            if turn is None:
                if reprompted:
                    await self.finish(EndReason.SILENCE_TIMEOUT, phrases.timeout_goodbye)
                    return
                reprompted = True
                await self.say(phrases.reprompt, kind="reprompt")
                continue
            reprompted = False
            await self.replies.reply(*turn)
            if await self.controls.act():
                return
            if self.replies.end_requested:
                await self.finish(EndReason.AGENT_ENDED, None)
                return

    async def next_user_turn(self) -> tuple[str, float] | None:
        """The next user turn (turns queued meanwhile are joined); None after
        ``SILENCE_TIMEOUT_MS`` of caller silence once the bot has finished speaking."""
        self._silence_deadline = max(
            self._silence_deadline,
            self.playback.speaking_until + self.settings.silence_timeout_ms / 1000,
        )
        controls = self.controls
        while not self._time_up.is_set() and controls.pending is None and not controls.notes:
            with trio.move_on_at(self._silence_deadline) as self._wait_scope:
                self._awaiting_user = True
                try:
                    self.consider_speculation()  # the caller may have finished already
                    text, t0 = await self._user_turns.receive()
                finally:
                    self._awaiting_user = False
                while True:
                    try:
                        more, t0 = self._user_turns.receive_nowait()
                    except trio.WouldBlock:
                        return text, t0
                    text = f"{text} {more}"
            if self._time_up.is_set() or controls.pending is not None or controls.notes:
                return None
            if trio.current_time() >= self._silence_deadline and not self.turns.in_utterance:
                return None
        return None

    async def say(self, text: str, *, kind: str) -> TurnRecord:
        """Speak fixed text (cached audio where possible) as a bot turn."""
        return await self.voice.say(text, kind=kind)

    async def finish(self, reason: EndReason, goodbye: str | None) -> None:
        """Say goodbye (if any), hang up once, and end the call."""
        if goodbye:
            await self.say(goodbye, kind="goodbye")
        if self.call.end_reason is None:
            self.call.end_reason = reason
        await self.services.hang_up(self.call.call_control_id)
        self.call.end(reason)

    async def time_up(self, reason: EndReason) -> None:
        """The call's maximum length has passed, or the server drains (``reason``, from the
        call's watch, ``controls.run``): the bot's turn stops now, and ``converse`` says
        goodbye and hangs up."""
        self._time_up_reason = reason
        log.info("⏱️ Time to end the call (%s)", reason)
        self._time_up.set()
        self._wait_scope.cancel()
        self.speculator.cancel()
        await self.voice.stop()
