"""Answering machines on outbound calls: what Telnyx detected, and the message to leave.

With ``ANSWERING_MACHINE_DETECTION`` set, outbound calls are dialled with Telnyx AMD. Telnyx
says ``call.machine.detection.ended`` (``human`` | ``machine`` | ``not_sure``; premium:
``human_residence`` ... ``machine``), and for the modes that listen for it,
``call.machine.greeting.ended`` once the machine's greeting is over — the moment a message
starts being recorded. :class:`MachineDetection` is that state for one call; the session
holds its greeting for the verdict at most ``AMD_WAIT_MS``, and a machine verdict at any
point stops the conversation: the session waits for the greeting to end (at most
``VOICEMAIL_GREETING_TIMEOUT_MS``), leaves :func:`voicemail_message`, and hangs up.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from voice_trio.calls.ends import EndReason
from voice_trio.conversation.phrases import local_now
from voice_trio.media.line import CallLine
from voice_trio.providers.telnyx.webhooks import (
    AMD_DETECTION_EVENTS,
    AMD_GREETING_EVENTS,
    MACHINE_RESULTS,
)

log = logging.getLogger("voice_trio.calls")

# Modes after which Telnyx may send call.machine.greeting.ended (the others never do, so
# waiting for it would only waste the timeout).
GREETING_MODES = frozenset({"detect_beep", "detect_words", "greeting_end", "premium"})


class MachineDetection:
    """What Telnyx's answering machine detection said about one call (webhooks in order
    or not: a greeting end before the verdict still counts)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.result: str | None = None
        self.decided = trio.Event()
        self.greeting_ended = trio.Event()

    @property
    def machine(self) -> bool:
        return self.result in MACHINE_RESULTS

    def on_event(self, kind: str, payload: dict[str, Any]) -> bool:
        """Take a webhook's fact; True if it is the news that a machine answered."""
        if kind in AMD_GREETING_EVENTS:
            self.greeting_ended.set()
        elif kind in AMD_DETECTION_EVENTS and not self.decided.is_set():
            self.result = str(payload.get("result") or "not_sure")
            self.decided.set()
            return self.machine
        return False

    async def wait_for_verdict(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.decided.wait()

    async def wait_for_greeting_end(self, seconds: float) -> bool:
        """True once the machine's greeting ended; False after ``seconds`` (or at once, for
        a mode that never reports it)."""
        if self.mode not in GREETING_MODES:
            return False
        with trio.move_on_after(seconds):
            await self.greeting_ended.wait()
        return self.greeting_ended.is_set()


async def leave_voicemail(session: CallLine, detection: MachineDetection) -> None:
    """Wait for the machine's greeting to end, leave the message, hang up."""
    s = session.settings
    log.info("📼 Answering machine: waiting for the end of its greeting")
    if not await detection.wait_for_greeting_end(s.voicemail_greeting_timeout_ms / 1000):
        log.info("📼 No end of greeting reported: leaving the message now")
    message = session.services.phrases.voicemail(
        nombre=session.nombre, contexto=session.contexto, now=local_now(s.timezone)
    )
    await session.say(message, kind="voicemail")
    await session.finish(EndReason.VOICEMAIL, None)
