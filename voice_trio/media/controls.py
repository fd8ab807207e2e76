"""``CallControls``: what may cut a media call's conversation short, and carrying it out.

Key presses arrive from two paths (``dtmf`` frames and ``call.dtmf.received``) and are
counted once (:mod:`voice_trio.conversation.dtmf`): a key with a configured action (``DTMF_ACTIONS``)
interrupts, any other barges in and reaches the conversation as a bracketed note. Other
webhook facts may interrupt too: an answering machine on an outbound call
(:mod:`~voice_trio.media.voicemail`). Claude's ``transfer_call`` tool
(:mod:`~voice_trio.media.transfer`) leaves its action ``pending`` after the reply that
announces it.

``interrupt`` never blocks: it notes the action (the first one wins) and has the session
stop waiting and cut the bot's turn; ``converse`` carries the action out between turns
(``act``).

The call's time is watched here too, in the same task as the keys (``run``, one task
with one deadline): the maximum call length (``MAX_CALL_SECONDS``) or the server's drain
(``ActiveCall.wind_down``) ends the conversation with a goodbye (``CallLine.time_up``).
The task waits for the drain in a cancel scope whose deadline is the earliest of the
call's end and the end of the group of keys being typed; a press cancels the scope, so
the wait ends at once and the press barges in.

An operator's orders (:mod:`voice_trio.instance.live`, from any process) come here too
(``obey``): a hang-up or a transfer interrupts like a key; a text to say waits in ``notes``
for the bot's current turn to end and is then said as a turn of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from voice_trio.calls.ends import EndReason
from voice_trio.calls.orders import OPERATOR_HANGUP, Order, Outcome, accepted, refused
from voice_trio.conversation.dtmf import WEBHOOK, KeyCollector, PressDeduper, key_note
from voice_trio.media.line import CallLine
from voice_trio.media.transfer import hand_off
from voice_trio.media.voicemail import MachineDetection, leave_voicemail

log = logging.getLogger("voice_trio.calls")

MAX_NOTES = 4  # operator's texts waiting to be said; more is refused (409), never dropped


class CallControls:
    """Key presses, webhook facts and the time of one session's call; owned by the session."""

    def __init__(self, session: CallLine, amd: MachineDetection | None) -> None:
        self.session = session
        self.settings = session.settings
        self.amd = amd  # answering machine detection, outbound calls only
        self.presses = PressDeduper()
        self.keys = KeyCollector()
        self.pending: str | None = None  # transfer | end_call | voicemail | operator_hangup
        self.transfer_to = ""  # an operator's number for the pending transfer
        # An operator's texts, said next (at most MAX_NOTES: a list, not an empty deque's
        # 600-byte block per call).
        self.notes: list[str] = []
        self._watch = trio.CancelScope()  # the wait of ``run``: a key press cancels it

    async def run(self) -> None:
        """Watch the call (a task of the call's nursery): each key press barges in as it
        comes, each group of keys becomes a caller turn, and once the call's maximum
        length has passed or the server drains, its time is up. Keys are still watched
        after that: a press cuts the goodbye, as it cuts any bot turn."""
        call = self.session.call
        keys = self.keys
        ends_at = trio.current_time() + self.settings.max_call_seconds
        time_up = False
        while True:
            deadline = keys.due if time_up else min(keys.due, ends_at)
            with trio.CancelScope(deadline=deadline) as self._watch:
                if time_up:
                    await trio.sleep_forever()
                else:
                    await call.wind_down.wait()
            for key in keys.take_presses():
                await self.key_pressed(key)
            group = keys.take_group(trio.current_time())
            if group:
                self.keys_entered(group)
            if not time_up and (call.wind_down.is_set() or trio.current_time() >= ends_at):
                time_up = True
                drain = call.wind_down.is_set()
                await self.session.time_up(EndReason.DRAIN if drain else EndReason.MAX_DURATION)

    def on_signal(self, kind: str, payload: dict[str, Any]) -> None:
        """A webhook fact for this call (``CallSignals``): never blocks."""
        if kind == "call.dtmf.received":
            digit = payload.get("digit")
            if isinstance(digit, str) and digit:
                self.on_key(digit, WEBHOOK)
        elif kind == "call.speak.ended":
            self.session.voice.speak_ended()
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
        elif self.keys.push(key, trio.current_time()):
            self._watch.cancel()  # ``run`` reports it now
        else:
            log.warning("🎤 Too many keys waiting; dropped %s", key)

    async def key_pressed(self, key: str) -> None:
        await self.session.caller_active(trio.current_time())

    def keys_entered(self, keys: list[str]) -> None:
        note = key_note(keys, self.settings.agent_language)
        log.info("🎤 Caller: %s", note)
        if not self.session.add_user_turn(note, trio.current_time()):
            log.warning("🎤 Too many caller turns waiting; dropped %s", note)

    def interrupt(self, action: str) -> None:
        """Cut the conversation short for ``action`` (transfer, end_call, voicemail): the
        bot's turn stops (with a ``clear``) and the wait for the caller ends; ``converse``
        carries the action out. The first action wins."""
        if self.pending is not None:
            return
        self.pending = action
        self.session.cut_short()

    def obey(self, order: Order) -> Outcome:
        """An operator's order: taken (200), or refused (409) while the call is leaving
        (transferring, leaving a voicemail, ending). Never blocks."""
        busy = self._busy()
        if busy is not None:
            return refused(busy)
        if order.action == "say":
            if len(self.notes) >= MAX_NOTES:
                return refused(f"{MAX_NOTES} texts are already waiting to be said")
            self.notes.append(order.text)
            log.info("🗒️ Operator's text to say next: %s", order.text)
            self.session.wake()
            return accepted(status="queued", waiting=len(self.notes))
        if order.action == "transfer":
            log.info("📞 Operator asks for a transfer to %s", order.to)
            self.transfer_to = order.to
            self.interrupt("transfer")
            return accepted(status="transferring", to=order.to)
        log.info("📴 Operator asks to hang up")
        self.interrupt(OPERATOR_HANGUP)
        return accepted(status="hanging_up")

    def _busy(self) -> str | None:
        if self.session.transferring or self.pending == "transfer":
            return "the call is being transferred"
        if self.pending == "voicemail":
            return "the call is leaving a voicemail"
        if self.pending is not None or self.session.ending:
            return "the call is ending"
        return None

    async def act(self) -> bool:
        """Carry out the action that cut the conversation short, if any; True if the
        conversation is over."""
        action = self.pending
        if action is None:
            return False
        session = self.session
        if action == "voicemail" and self.amd is not None:
            await leave_voicemail(session, self.amd)
            return True
        if action == "transfer":
            over = await hand_off(session, self.transfer_to or self.settings.transfer_number)
            self.pending = None
            self.transfer_to = ""
            return over
        reason = EndReason.OPERATOR_HANGUP if action == OPERATOR_HANGUP else EndReason.CALLER_ENDED
        await session.finish(reason, session.services.phrases.goodbye)
        return True
