"""``CallLine``: what the parts of a media call that act on it (its controls, a transfer,
a voicemail) may do to the call, without knowing the session that does it.

``media.session.CallSession`` is the one implementation. The parts take this protocol
instead of the session so that the session may own them without an import circle, and a
test may drive one part against a small fake.
"""

from __future__ import annotations

from typing import Protocol

from voice_trio.calls.ends import EndReason
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.services import CallServices
from voice_trio.config import Settings
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.media.voice import BotVoice


class CallLine(Protocol):
    services: CallServices
    settings: Settings
    call: ActiveCall
    voice: BotVoice
    nombre: str  # the callee's name, from the call's client state
    contexto: str  # what the call is about, from the call's client state
    transferring: bool  # the transfer command went out: the leg is leaving us

    @property
    def ending(self) -> bool:
        """The call's time is up, or it is being ended."""
        ...

    async def say(self, text: str, *, kind: str) -> TurnRecord:
        """Speak fixed text as a bot turn, to its end (or until it is cut)."""
        ...

    async def finish(self, reason: EndReason, goodbye: str | None) -> None:
        """Say goodbye (if any), hang up once, and end the call."""

    async def caller_active(self, now: float) -> None:
        """The caller spoke or pressed a key: the bot's turn is cut."""

    def add_user_turn(self, text: str, t0: float) -> bool:
        """Queue a caller turn; False (dropped) if too many are waiting."""
        ...

    def wake(self) -> None:
        """Something is to be said: the wait for the caller ends."""

    def cut_short(self) -> None:
        """An action is pending: the wait ends and the bot's turn stops."""

    async def time_up(self, reason: EndReason) -> None:
        """The call's maximum length has passed, or the server drains (``reason``): the
        bot's turn stops and the conversation ends with a goodbye."""
