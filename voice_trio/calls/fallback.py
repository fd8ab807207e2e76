"""``FallbackCall``: a call carried by Telnyx's own speech and transcription, driven by webhooks.

The mode of ``USE_MEDIA_STREAMS=false``, and where a media-streams call goes on when its
stream fails (see :mod:`voice_trio.calls.degrade`). Telnyx ``speak`` says the bot's words
and Telnyx transcription sends the caller's as ``call.transcription`` webhooks; the
conversation in between is the media mode's own: the same history, persona prompt and
``end_call`` tool (:func:`~voice_trio.calls.thinking.think_reply`).

A call is one nursery (its ``ActiveCall.cancel_scope``) of three tasks:

- ``consume``: the call's webhooks, strictly one after another, from a bounded inbox.
  Handling an event only updates state (no awaits), so events can never race each other.
- ``converse``: greeting, then one reply per caller turn; silence reprompt and goodbye.
  Claude's reply goes to ``speak`` sentence by sentence as it streams in (Telnyx queues
  consecutive ``speak`` commands), so the first sentence plays while the rest is written.
- ``watch_duration``: the maximum call length.

Webhooks may arrive twice or out of order. Duplicates never get here (event ids are
checked at the door), and nothing below depends on order: speech in progress is a count
of ``speak`` commands sent minus ``call.speak.ended`` received, whatever came first.
``call.hangup`` does not queue behind other events: it cancels the call's scope at once.

Not done here: barge-in (the caller's words are answered after the bot's speech; stopping
it would take ``playback_stop``) and interim transcripts (only finals are asked for, so
caller speech longer than the silence timeout without a pause could draw a reprompt).
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from voice_trio.calls.history import Conversation
from voice_trio.calls.phrases import local_now
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.session import SENTENCE_QUEUE, TurnRecord
from voice_trio.calls.telnyx_speech import base_language, caller_words, speak_language
from voice_trio.calls.thinking import think_reply
from voice_trio.observability import call_id_var
from voice_trio.providers.telnyx_control import CALL_ALREADY_ENDED, TelnyxError
from voice_trio.providers.telnyx_webhooks import WebhookEvent

if TYPE_CHECKING:
    from voice_trio.calls.center import CallCenter

log = logging.getLogger("voice_trio.calls")

# A call gets a few webhooks a second at most and ``consume`` never blocks, so a full inbox
# means the call is wedged: the newest event is dropped (and counted) rather than holding
# up the webhook handler. ``call.hangup`` never goes through the inbox.
INBOX_SIZE = 64
TURN_QUEUE = 16  # caller turns waiting while the bot is thinking; joined when read
# A speak whose ``call.speak.ended`` never arrives counts as finished after this long.
SPEAK_GUARD_S_PER_CHAR = 0.12
SPEAK_GUARD_S = 2.0

UNKNOWN_CALL = "90015"  # Telnyx "Invalid Call Control ID": no such call (any more)

CONTINUATION = {"es": "Disculpe, ¿me decía?", "en": "Sorry, what were you saying?"}


class FallbackCall:
    """One call in fallback mode; see the module docstring. ``conversation`` is the media
    session's when the call was degraded, and ``grace`` how long to wait first for a
    ``call.hangup`` that would show the call is over (a media socket that just closed)."""

    def __init__(
        self,
        center: CallCenter,
        call: ActiveCall,
        context: dict[str, Any],
        conversation: Conversation | None = None,
        *,
        grace: float = 0.0,
    ) -> None:
        self.center = center
        self.settings = center.settings
        self.call = call
        self.nombre = str(context.get("nombre") or "")
        self.contexto = str(context.get("contexto") or "")
        self.saludo = str(context.get("saludo") or "")
        self.conversation = conversation if conversation is not None else Conversation()
        self.grace = grace
        self.records: list[TurnRecord] = []
        self.speak_language = speak_language(self.settings.agent_language)
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[WebhookEvent](INBOX_SIZE)
        self._turn_send, self._turn_recv = trio.open_memory_channel[tuple[str, float]](TURN_QUEUE)
        self._speeches = 0  # speak commands sent whose call.speak.ended has not come
        self._quiet = trio.Event()  # set while no speech is pending
        self._quiet.set()
        self._guard_until = -math.inf  # when pending speech is assumed over regardless
        self._quiet_since = trio.current_time()
        self._wait_scope = trio.CancelScope()
        self._time_up = trio.Event()
        self._time_up_reason = "max_duration"
        self._end_requested = False

    @property
    def call_control_id(self) -> str:
        return self.call.call_control_id

    def deliver(self, event: WebhookEvent) -> None:
        """Queue a webhook for ``consume`` (called by the webhook handler; never blocks)."""
        try:
            self._inbox_send.send_nowait(event)
        except trio.WouldBlock:
            self.center.metrics.webhooks.labels(event.event_type, "dropped").inc()
            log.warning("📨 Call inbox full: %s dropped", event.event_type)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the call is ending

    def close_inbox(self) -> None:
        self._inbox_send.close()

    async def run(self) -> None:
        """Run the call until it ends; its failure is logged here, never propagated."""
        token = call_id_var.set(self.call_control_id)
        try:
            with self.call.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.consume)
                    nursery.start_soon(self.watch_duration)
                    nursery.start_soon(self.converse)
        except Exception:
            log.exception("Call failed")
            await self.hang_up("error")
        finally:
            call_id_var.reset(token)

    async def consume(self) -> None:
        async with self._inbox_recv:
            async for event in self._inbox_recv:
                self.on_event(event)

    def on_event(self, event: WebhookEvent) -> None:
        kind = event.event_type
        if kind == "call.speak.ended":
            self._speech_ended()
        elif kind == "call.transcription":
            text = caller_words(event.payload, self.settings.transcription_min_confidence)
            if text is None:
                return
            log.info("🎤 Caller: %s", text)
            try:
                self._turn_send.send_nowait((text, trio.current_time()))
            except trio.WouldBlock:
                log.warning("🎤 Too many caller turns waiting; dropped: %s", text)
        elif kind == "call.dtmf.received":
            log.info("🎤 DTMF %s", event.payload.get("digit"))
        else:
            log.debug("Webhook %s: nothing to do in fallback mode", kind)

    async def converse(self) -> None:
        phrases = self.center.phrases_text
        if self.grace:
            await trio.sleep(self.grace)  # a call.hangup meanwhile cancels the call
            log.info("🔀 The call is still up: continuing in fallback mode")
        await self.open()
        reprompted = False
        while True:
            turn = await self.next_user_turn()
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
            if self._end_requested:
                await self.finish("agent_ended", None)
                return

    async def open(self) -> None:
        """The first words, and Telnyx transcription started. The greeting if nothing was
        said yet; after a degrade, an answer to caller words the media session left
        unanswered, else a short prompt to go on. Speech first: the caller is waiting."""
        turns = self.conversation.turns
        if turns and turns[-1].role == "user":
            await self.start_transcription()
            await self.reply(None, trio.current_time())
            return
        if not turns:
            opening = self.center.phrases_text.greeting(
                nombre=self.nombre, saludo=self.saludo, now=local_now(self.settings.timezone)
            )
            await self.say(opening, kind="greeting")
        else:
            language = base_language(self.settings.agent_language)
            await self.say(CONTINUATION.get(language, CONTINUATION["es"]), kind="continuation")
        await self.start_transcription()

    async def start_transcription(self) -> None:
        try:
            await self.center.telnyx.transcription_start(
                self.call_control_id, language=base_language(self.settings.agent_language)
            )
        except TelnyxError as exc:
            self._on_command_error("transcription_start", exc)

    async def next_user_turn(self) -> tuple[str, float] | None:
        """The next caller turn (turns queued meanwhile are joined); None after
        ``SILENCE_TIMEOUT_MS`` of silence once the bot's speech has ended."""
        while not self._time_up.is_set():
            with trio.CancelScope(deadline=self._listen_deadline()) as self._wait_scope:
                text, t0 = await self._turn_recv.receive()
                while True:
                    try:
                        more, t0 = self._turn_recv.receive_nowait()
                    except trio.WouldBlock:
                        return text, t0
                    text = f"{text} {more}"
            if trio.current_time() >= self._listen_deadline():
                return None
        return None

    def _listen_deadline(self) -> float:
        silence = self.settings.silence_timeout_ms / 1000
        if self._speeches:
            return self._guard_until + silence
        return self._quiet_since + silence

    async def say(self, text: str, *, kind: str) -> None:
        """Speak a fixed phrase (greeting, reprompt, goodbye, continuation) as a bot turn."""
        if await self.speak(text):
            self.conversation.add_assistant(text)
            self.records.append(TurnRecord(user_text="", kind=kind, bot_text=text, heard_text=text))

    async def speak(self, text: str) -> bool:
        """Send ``text`` to Telnyx ``speak`` (Telnyx queues it behind speech still playing);
        False if Telnyx refused it."""
        log.info("💬 Bot: %s", text)
        now = trio.current_time()
        self._speeches += 1
        if self._quiet.is_set():
            self._quiet = trio.Event()
        self._guard_until = (
            max(self._guard_until, now) + SPEAK_GUARD_S + len(text) * SPEAK_GUARD_S_PER_CHAR
        )
        try:
            await self.center.telnyx.speak(
                self.call_control_id,
                text,
                voice=self.settings.telnyx_speak_voice,
                language=self.speak_language,
            )
        except TelnyxError as exc:
            self._speech_ended()
            self._on_command_error("speak", exc)
            return False
        return True

    def _speech_ended(self) -> None:
        if self._speeches == 0:
            return  # more ends than speaks: not ours to count
        self._speeches -= 1
        if self._speeches == 0:
            self._quiet_since = trio.current_time()
            self._quiet.set()
            self._wait_scope.deadline = self._listen_deadline()

    def _on_command_error(self, action: str, exc: TelnyxError) -> None:
        if exc.code in (CALL_ALREADY_ENDED, UNKNOWN_CALL):
            log.info("📴 %s: the call has already ended", action)
            self.call.end("hangup")
        else:
            log.warning("⚠️ Telnyx %s failed: %s", action, exc)

    async def reply(self, user_text: str | None, t0: float) -> None:
        """Answer the caller: Claude's sentences go to ``speak`` one by one as they come.
        ``user_text`` None answers the conversation as it stands."""
        if user_text is not None:
            self.conversation.add_user(user_text)
        record = TurnRecord(user_text=user_text or "", t0=t0)
        sentence_send, sentence_recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
        said: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    think_reply,
                    self.center,
                    self.conversation,
                    sentence_send,
                    record,
                    nombre=self.nombre,
                    contexto=self.contexto,
                )
            )
            async with sentence_recv:
                async for sentence in sentence_recv:
                    if record.t3 is None:
                        record.t3 = trio.current_time()
                    if await self.speak(sentence):
                        said.append(sentence)
        record.bot_text = record.heard_text = " ".join(said)
        self.conversation.add_assistant(record.bot_text)
        if "end_call" in record.tool_calls:
            self._end_requested = True
        self.records.append(record)
        self.report(record)

    def report(self, record: TurnRecord) -> None:
        stages = {
            name: round((b - a) * 1000, 1)
            for name, a, b in (
                ("t0-t1", record.t0, record.t1),
                ("t1-t2", record.t1, record.t2),
                ("t2-t3", record.t2, record.t3),
            )
            if a is not None and b is not None
        }
        for name, ms in stages.items():
            self.center.metrics.turn_stage.labels(name).observe(ms / 1000)
        timing = " ".join(f"{k}={v:.0f}ms" for k, v in stages.items())
        log.info("🔊 Bot turn %s sent to Telnyx speak: %s", record.kind, timing or "-")

    async def wait_spoken(self) -> None:
        """Until every speak sent has been played (or its guard time has passed)."""
        with trio.move_on_at(self._guard_until):
            await self._quiet.wait()

    async def finish(self, reason: str, goodbye: str | None) -> None:
        """Say goodbye (if any), let it play, hang up once, and end the call."""
        if goodbye:
            await self.say(goodbye, kind="goodbye")
        await self.wait_spoken()
        await self.hang_up(reason)
        self.call.end(reason)

    async def hang_up(self, reason: str) -> None:
        if self.call.end_reason is not None:
            return
        self.call.end_reason = reason
        await self.center.hang_up(self.call_control_id)

    async def watch_duration(self) -> None:
        elapsed = time.time() - self.call.started_at  # a degraded call keeps its start
        left = max(0.0, self.settings.max_call_seconds - elapsed)
        self._time_up_reason = await self.call.time_up_after(left)
        log.info("⏱️ Time to end the call (%s)", self._time_up_reason)
        self._time_up.set()
        self._wait_scope.cancel()
