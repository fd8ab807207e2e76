"""The two sides of a fallback call's task, as protocols: ``FallbackLine`` is what the
turn acts (``fallback.acts``) may do to the call, ``FallbackHome`` what the call needs of
the instance's fallback calls (``fallback.calls``).

``fallback.call.FallbackCall`` and ``fallback.calls.FallbackCalls`` implement them. The acts
and the call take these instead of each other's classes, so the three modules import in
one direction only, and an act can be tested against a small fake call.
"""

from __future__ import annotations

from typing import Protocol

from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.services import CallServices
from voice_trio.config import Settings
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.fallback.state import FallbackState, Mutation, SharedCalls, Snapshot
from voice_trio.providers.telnyx.control import TelnyxError


class FallbackHome(Protocol):
    """The fallback calls of this instance, as one call's task sees them."""

    services: CallServices
    me: str  # this instance, as turn owner and state writer

    @property
    def shared(self) -> SharedCalls: ...

    async def record_started(self, ccid: str, data: FallbackState) -> None: ...

    async def finalize(self, ccid: str, data: FallbackState, *, stored: bool = True) -> None:
        """Write the ended call's record and delete its state."""


class FallbackLine(Protocol):
    """One fallback call, as the acts of its turns see it."""

    services: CallServices
    settings: Settings
    call: ActiveCall
    state: Snapshot | None  # the call's shared state as last read or written here
    turn: TurnRecord | None  # the bot turn in progress, for the record
    said: list[str]  # its sentences Telnyx took
    ending: bool  # this task is ending the call itself

    @property
    def call_control_id(self) -> str: ...

    @property
    def me(self) -> str: ...

    @property
    def shared(self) -> SharedCalls: ...

    async def say(self, text: str, *, kind: str) -> None:
        """Speak a fixed phrase as a bot turn."""

    async def speak(self, text: str) -> bool:
        """Send ``text`` to Telnyx ``speak``; False if Telnyx refused it."""
        ...

    async def on_command_error(self, action: str, exc: TelnyxError) -> None: ...

    async def update(self, mutate: Mutation) -> None:
        """Change the shared state (and keep the result)."""

    async def give_back(
        self, *, keep: bool = False, opened: bool = False, reprompted: bool = False
    ) -> None:
        """End this instance's turn: the next webhook's instance may take the call."""

    def trio_time(self, epoch: float) -> float:
        """An epoch time on this process's Trio clock."""
        ...
