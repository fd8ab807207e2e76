"""Transfer to a person: the hand-off line, then Telnyx ``transfer`` (protocols/telnyx.md §1.8).

Asked for by Claude (the ``transfer_call`` tool, offered only with ``TRANSFER_NUMBER`` set),
by a key (``DTMF_SHORTCUTS``, ``0=transfer`` by default), or by an operator
(``POST /api/calls/{id}/transfer``, to ``TRANSFER_NUMBER`` or a number of their own). A tool call lets the reply that
announced it finish; a key cuts the bot at once. Either way the caller hears the hand-off
line to its end before the command goes out.

Telnyx then dials the number and bridges the caller to it; the call's media stream stops
(``stop`` frame, socket closed), which ends the session with end reason ``transferred`` and
no hang-up of ours. If Telnyx refuses the command, or the stream is still up after the
person's phone has rung out, nobody took the call: Telnyx keeps the caller on our leg
("the original call will remain active"), so the bot apologises and the conversation goes on.
"""

from __future__ import annotations

import logging

import trio

from voice_trio.calls.ends import EndReason
from voice_trio.media.line import CallLine
from voice_trio.providers.telnyx.control import CALL_ALREADY_ENDED, TelnyxError

log = logging.getLogger("voice_trio.calls")

RING_SECONDS = 30  # the transfer's timeout_secs: how long the person's phone may ring
LEAVE_GRACE_SECONDS = 5.0  # after that, a stream still up means the transfer failed
UNKNOWN_CALL = "90015"


async def hand_off(session: CallLine, number: str) -> bool:
    """Say the hand-off line and transfer the call to ``number``. A transfer that works ends
    the call's scope while this waits; otherwise True if the call is over anyway, False if
    the conversation goes on (the bot has apologised)."""
    phrases = session.services.phrases
    ccid = session.call.call_control_id
    await session.say(phrases.handoff, kind="handoff")
    session.transferring = True
    try:
        await session.services.telnyx.transfer(ccid, number, timeout_secs=RING_SECONDS)
    except TelnyxError as exc:
        session.transferring = False
        if exc.code in (CALL_ALREADY_ENDED, UNKNOWN_CALL):
            session.call.end(EndReason.HANGUP)
            return True
        log.warning("📞 Transfer refused: %s", exc)
        await session.say(phrases.transfer_failed, kind="apology")
        return False
    log.info("📞 Transferring the call to %s", number)
    await trio.sleep(RING_SECONDS + LEAVE_GRACE_SECONDS)
    session.transferring = False
    log.warning("📞 Nobody took the transfer: the call goes on here")
    await session.say(phrases.transfer_failed, kind="apology")
    return False
