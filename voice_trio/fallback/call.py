"""``FallbackCall``: a call carried by Telnyx's own speech and transcription, driven by webhooks.

The mode of ``USE_MEDIA_STREAMS=false``, and where a media-streams call goes on when its
stream fails (see :mod:`voice_trio.fallback.calls`). Telnyx ``speak`` says the bot's words
and Telnyx transcription sends the caller's as ``call.transcription`` webhooks; the
conversation in between is the media mode's own: the same history, persona prompt and
``end_call`` tool (:func:`~voice_trio.conversation.thinking.think_reply`).

Any instance may carry the call on. Its state lives in the store
(:mod:`voice_trio.fallback.state`); a webhook handler on any instance applies its
event there with one versioned update (caller words appended, a speak counted as ended)
and makes sure this instance has a ``FallbackCall`` for the call. A ``FallbackCall`` is one
task per call per instance, in the call's cancel scope (``ActiveCall.cancel_scope``):

- It asks :func:`~voice_trio.fallback.state.next_action` what the call needs (the
  greeting, a reply to caller words, a reprompt, a goodbye, the final record). To act it
  first takes the call's *turn* with a versioned save, so one instance acts at a time,
  and gives the turn back with what it did (history, turn record, usage) in another.
  Caller words that land elsewhere meanwhile are appended to the state; the holder finds
  them when it gives the turn back and answers them next.
- Otherwise it sleeps until the state's next deadline (silence reprompt, maximum length,
  a lease running out), woken early by a webhook handled here, and reloads the state at
  least every ``POLL_S``. Whichever instance wrote last keeps watching: a task that finds
  another instance's write (and holds no turn) leaves, so a timer only ever fires on the
  instance that armed it for the version it read, and the act itself is claimed with a
  versioned save anyway. A task that finds the state gone (the call ended elsewhere)
  stops; while it holds a turn it polls too, and cancels the turn at once.

``call.hangup`` landing on any instance marks the state ended. The turn holder, or the one
that ended a free call, writes the call record (all turns, usage, end reason) and deletes
the state; on cancellation or error that happens shielded and time-bounded.

What is done with the turn (the opening, a reply, a goodbye) is
:mod:`voice_trio.fallback.acts`; the call record is built from the state by
:mod:`voice_trio.fallback.records`.

Webhooks may arrive twice or out of order. Duplicates never get here (event ids are
claimed in the store at the door), and nothing depends on order: speech in progress is
speaks counted minus ``call.speak.ended`` received, caller words are sorted by when Telnyx
heard them. Not done here: barge-in (the caller's words are answered after the bot's
speech; stopping it would take ``playback_stop``) and interim transcripts.
"""

from __future__ import annotations

import logging
import time

import trio

from voice_trio.calls.ends import EndReason
from voice_trio.calls.registry import ActiveCall
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.fallback import acts
from voice_trio.fallback import state as fs
from voice_trio.fallback.line import FallbackHome
from voice_trio.fallback.records import add_bot_turn
from voice_trio.observability import call_id_var
from voice_trio.providers.telnyx.control import CALL_ALREADY_ENDED, TelnyxError
from voice_trio.providers.telnyx.speech import speak_language
from voice_trio.store.outage import SAVE_TIMEOUT_S

log = logging.getLogger("voice_trio.calls")

POLL_S = 0.5  # how often a task re-reads its call's state: notices calls ended elsewhere
UNKNOWN_CALL = "90015"  # Telnyx "Invalid Call Control ID": no such call (any more)
# End reasons after which the bot says nothing more, so no hang-up is sent either.
QUIET_ENDINGS = frozenset({EndReason.HANGUP, EndReason.SHUTDOWN})


class FallbackCall:
    """This instance's part in one fallback-mode call; see the module docstring.
    ``initial`` is the state to create (this instance starts the call); otherwise
    ``state`` is what a webhook handler here just wrote (this instance joins the call)."""

    def __init__(
        self,
        calls: FallbackHome,
        call: ActiveCall,
        *,
        initial: fs.FallbackState | None = None,
        state: fs.Snapshot | None = None,
    ) -> None:
        self.calls = calls
        self.services = calls.services
        self.settings = calls.services.settings
        self.call = call
        self.initial = initial
        self.state = state
        self.silence_s = self.settings.silence_timeout_ms / 1000
        self.speak_language = speak_language(self.settings.agent_language)
        self._poke = trio.Event()
        self.turn: TurnRecord | None = None  # the bot turn in progress, for the record
        self.said: list[str] = []  # its sentences Telnyx took
        self.ending = False  # this task is ending the call itself

    @property
    def call_control_id(self) -> str:
        return self.call.call_control_id

    @property
    def me(self) -> str:
        return self.calls.me

    @property
    def shared(self) -> fs.SharedCalls:
        return self.calls.shared

    def seen(self, state: fs.Snapshot) -> None:
        """A webhook handler here wrote ``state``: look again now."""
        self._adopt(state)
        self._poke.set()

    def _adopt(self, state: fs.Snapshot | None) -> None:
        """Take ``state`` as the call's, unless a newer version is known already (a load
        and a handler's write may finish in either order)."""
        if state is None or self.state is None or state.version >= self.state.version:
            self.state = state

    async def run(self) -> None:
        """Carry the call on until it ends, or until another instance does; failures are
        logged here and end the call, never propagated."""
        token = call_id_var.set(self.call_control_id)
        try:
            with self.call.cancel_scope:
                await self._run()
        except Exception:
            log.exception("Call failed")
            self.call.end_reason = self.call.end_reason or EndReason.ERROR
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SAVE_TIMEOUT_S) as bound:
                try:
                    await self._leave()
                except Exception:
                    log.exception("Call record not saved")
            if bound.cancelled_caught:
                log.error(
                    "Call record not saved: the store took longer than %.0f s", SAVE_TIMEOUT_S
                )
            call_id_var.reset(token)

    async def _run(self) -> None:
        if self.initial is not None:
            created = await self.shared.create(self.call_control_id, self.initial)
            if created is not None:
                await self.calls.record_started(self.call_control_id, created.data)
            self.state = created or await self.shared.load(self.call_control_id)
            self.initial = None
        while self.state is not None:
            data = self.state.data
            if data.writer != self.me and data.owner != self.me:
                return  # another instance wrote last: it carries the call on
            now = time.time()
            drain = self.call.wind_down.is_set()
            action = fs.next_action(data, self.me, now, self.silence_s, drain)
            if action is None:
                await self._sleep_until(fs.next_deadline(data, self.me, now, self.silence_s))
            elif await self._take_turn(action):
                await self._act(*action)

    async def _sleep_until(self, deadline: float) -> None:
        """Until ``deadline`` (epoch), a webhook handled here, or ``POLL_S``; then the
        state as it is now."""
        self._poke = trio.Event()
        with trio.move_on_after(max(0.0, min(deadline - time.time(), POLL_S))):
            await self._poke.wait()
        if not self._poke.is_set():
            self._adopt(await self.shared.load(self.call_control_id))

    async def _take_turn(self, action: tuple[str, EndReason | None]) -> bool:
        """Claim the turn for ``action`` if it is still what the current version needs."""
        drain = self.call.wind_down.is_set()

        def take(data: fs.FallbackState) -> bool:
            now = time.time()
            if fs.next_action(data, self.me, now, self.silence_s, drain) != action:
                return False
            fs.claim(data, self.me, now)
            return True

        self.state, taken = await self.shared.update(self.call_control_id, take)
        return taken

    async def _act(self, kind: str, reason: EndReason | None) -> None:
        """Do what the turn was taken for, then give it back, or end the call."""
        phrases = self.services.phrases
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_turn)
            if kind == "open":
                await acts.open_call(self)
            elif kind == "reply":
                await acts.reply(self)
            elif kind == "reprompt":
                await self.say(phrases.reprompt, kind="reprompt")
                await self.give_back(reprompted=True)
            elif kind == "finish":
                goodbye = phrases.timeout_goodbye if reason == EndReason.SILENCE_TIMEOUT else None
                await acts.finish(self, reason or EndReason.UNKNOWN, goodbye or phrases.goodbye)
            nursery.cancel_scope.cancel()
        if self.state is not None and self.state.data.ended:
            await self._finalize()

    async def _watch_turn(self) -> None:
        """While holding the turn: notice at once that the call ended elsewhere."""
        while True:
            await trio.sleep(POLL_S)
            await self._check_turn(await self.shared.load(self.call_control_id))

    async def _check_turn(self, state: fs.Snapshot | None) -> None:
        """Stop the call's task at once if the turn is no longer ours (the state is gone,
        or a lease ran out), or the call ended elsewhere (``_leave`` keeps the turn)."""
        if state is None or state.data.owner != self.me:
            await self._lose()
        elif state.data.ended and not self.ending:
            self.call.end(state.data.ended)
            await trio.lowlevel.checkpoint()  # raises Cancelled: the call's scope is

    async def _lose(self) -> None:
        log.info("📴 The call went on elsewhere")
        self.state = None
        self.call.end(EndReason.ENDED_ELSEWHERE)
        await trio.lowlevel.checkpoint()  # raises Cancelled: the call's scope is

    async def say(self, text: str, *, kind: str) -> None:
        """Speak a fixed phrase (greeting, reprompt, goodbye, continuation) as a bot turn."""
        self.turn, self.said = TurnRecord(user_text="", kind=kind, bot_text=text), []
        if await self.speak(text):
            self.said.append(text)

    async def speak(self, text: str) -> bool:
        """Count ``text`` in the state, then send it to Telnyx ``speak`` (Telnyx queues it
        behind speech still playing); False if Telnyx refused it."""
        now = time.time()
        state, _ = await self.shared.update(
            self.call_control_id, lambda d: fs.speech_sent(d, self.me, text, now)
        )
        await self._check_turn(state)
        self.state = state
        log.info("💬 Bot: %s", text)
        self.call.note("bot", text=text, turn=self.turn.kind if self.turn else "reply")
        try:
            await self.services.telnyx.speak(
                self.call_control_id,
                text,
                voice=self.settings.telnyx_speak_voice,
                language=self.speak_language,
            )
        except TelnyxError as exc:
            await self.update(lambda d: fs.speech_ended(d, time.time()))
            await self.on_command_error("speak", exc)
            return False
        return True

    async def on_command_error(self, action: str, exc: TelnyxError) -> None:
        if exc.code in (CALL_ALREADY_ENDED, UNKNOWN_CALL):
            log.info("📴 %s: the call has already ended", action)
            self.call.end(EndReason.HANGUP)
            await trio.lowlevel.checkpoint()
        else:
            log.warning("⚠️ Telnyx %s failed: %s", action, exc)

    async def update(self, mutate: fs.Mutation) -> None:
        state, _ = await self.shared.update(self.call_control_id, mutate)
        await self._check_turn(state)
        self.state = state

    def _keep_turn(self, data: fs.FallbackState, *, interrupted: bool = False) -> None:
        """Add the bot turn in progress (done, or cut) to ``data``."""
        record, self.turn = self.turn, None
        if record is not None:
            origin = self.trio_time(data.origin)
            add_bot_turn(data, record, self.said, origin, interrupted=interrupted)

    async def give_back(
        self, *, keep: bool = False, opened: bool = False, reprompted: bool = False
    ) -> None:
        """Store the bot turn just done and give the turn back (``keep``: hold on to it);
        ``opened``, ``reprompted``: what the turn did."""
        record, said = self.turn, list(self.said)

        def give_back(data: fs.FallbackState) -> bool:
            if data.owner != self.me:
                return False
            self.turn, self.said = record, said  # a retried update starts afresh
            data.opened = data.opened or opened
            data.reprompted = data.reprompted or reprompted
            self._keep_turn(data)
            if not keep and not data.ended:
                data.owner, data.lease_until = None, 0.0
            return True

        state, given = await self.shared.update(self.call_control_id, give_back)
        if state is None or not given:
            await self._lose()
        self.state = state

    async def _leave(self) -> None:
        """The task is ending. Cut off holding the turn (hang-up here, an error, shutdown):
        keep the turn in progress and end the call. An error or a shutdown also ends the
        call when this instance wrote last; a hang-up is ended by its webhook's handler."""
        reason = self.call.end_reason
        if reason is None or reason == EndReason.ENDED_ELSEWHERE:
            return  # another instance carries the call on, or it ended elsewhere
        if self.initial is not None:
            await self._record_unstarted(reason)
            return
        if self.state is None:
            return  # finalized
        record, said = self.turn, list(self.said)

        def end(data: fs.FallbackState) -> bool:
            now = time.time()
            holding = data.owner == self.me
            if not holding and data.writer != self.me and reason == EndReason.SHUTDOWN:
                return False
            if holding:
                self.turn, self.said = record, said
                self._keep_turn(data, interrupted=True)
            data.end(reason, now)
            if fs.turn_free(data, self.me, now):
                fs.claim(data, self.me, now)
            return True

        self.state, _ = await self.shared.update(self.call_control_id, end)
        if self.state is None or self.state.data.owner != self.me:
            return  # the turn holder elsewhere writes the record
        if reason not in QUIET_ENDINGS and not self.ending:
            await self.services.hang_up(self.call_control_id)
        await self._finalize()

    async def _finalize(self) -> None:
        """Write the call record from the state (holding the turn) and delete the state."""
        assert self.state is not None
        data = self.state.data
        self.state = None
        await self.calls.finalize(self.call_control_id, data)
        self.call.end_reason = data.ended

    async def _record_unstarted(self, reason: EndReason) -> None:
        """The call ended before its state was stored: its record from what there was."""
        assert self.initial is not None
        data, self.initial = self.initial, None
        data.end(reason, time.time())
        await self.calls.record_started(self.call_control_id, data)
        await self.calls.finalize(self.call_control_id, data, stored=False)

    @staticmethod
    def trio_time(epoch: float) -> float:
        """An epoch time on this process's Trio clock (turn stamps are made on both)."""
        return epoch - time.time() + trio.current_time()
