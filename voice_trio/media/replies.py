"""``Replies``: the bot's answer to each caller turn of a media call, from Claude.

A turn's reply is asked of Claude when the turn ends, or was asked before it ended: a
speculative reply (:mod:`~voice_trio.media.speculation`) started on a stable transcript is
adopted when the turn ends with the same text, and its buffered sentences go to TTS at once.
Either way ``Replies`` hands the bot turn (:class:`~voice_trio.media.voice.BotVoice`) a
sentence source, and the voice does the rest: TTS, pacing, the turn's record. What the
tools Claude called ask of the call is noted for ``converse`` (``note_acts``):
``CallAct.END`` ends the call after the reply, ``CallAct.TRANSFER`` leaves a transfer
pending (:mod:`~voice_trio.media.controls`).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, assert_never

import trio

from voice_trio.calls.services import CallServices
from voice_trio.conversation.history import Conversation
from voice_trio.conversation.thinking import ToolTurn, think_reply
from voice_trio.conversation.tool_use import ToolCaller, ToolLedger
from voice_trio.conversation.tools import CallAct
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.media.controls import CallControls
from voice_trio.media.speculation import Speculation, Speculator, normalize
from voice_trio.media.voice import BotVoice

log = logging.getLogger("voice_trio.calls")


class Replies:
    """Claude's replies for one call: asked, or adopted from the ``speculator``."""

    def __init__(
        self,
        services: CallServices,
        conversation: Conversation,
        voice: BotVoice,
        controls: CallControls,
        speculator: Speculator,
        *,
        caller: ToolCaller,
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.conversation = conversation
        self.voice = voice
        self.controls = controls
        self.speculator = speculator
        self.caller = caller
        self.end_requested = False  # a reply asked to end the call (CallAct.END)
        # Tool requests a cut turn left running: their results go with the next turn.
        self.ledger = ToolLedger()
        self._go_ahead = trio.Event()  # the current speculation's adoption

    def speculate(self, text: str, *, ready: bool) -> None:
        """Start (or replace, or drop) the speculative reply for the caller's ``text`` so
        far; ``ready``: the session's side of the rule holds (see ``consider_speculation``)."""
        speculator = self.speculator
        current = speculator.current
        if current is not None and current.key != normalize(text):
            speculator.cancel()  # the caller said more, or something else
            current = None
        if current is not None or not text or not ready or self.ledger.open:
            return
        future = copy.deepcopy(self.conversation)
        future.add_user(text)
        messages = future.window(self.settings.conversation_history_limit)
        record = TurnRecord(user_text=text, speculative=True)
        log.info("🔮 Speculative reply for: %s", text)
        self._go_ahead = trio.Event()
        speculator.start(
            text, messages, record, functools.partial(self._think_ahead, self._go_ahead)
        )

    async def _think_ahead(
        self,
        go_ahead: trio.Event,
        sentence_send: trio.MemorySendChannel[str],
        messages: list[dict[str, Any]],
        record: TurnRecord,
    ) -> None:
        await self._ask_claude(sentence_send, record, messages, go_ahead=go_ahead)

    async def _ask_claude(
        self,
        sentence_send: trio.MemorySendChannel[str],
        record: TurnRecord,
        messages: list[dict[str, Any]] | None = None,
        *,
        go_ahead: trio.Event | None = None,
    ) -> None:
        tools = ToolTurn(caller=self.caller, ledger=self.ledger, go_ahead=go_ahead)
        await think_reply(
            self.services.mind,
            self.conversation,
            sentence_send,
            record,
            nombre=self.caller.nombre,
            contexto=self.caller.contexto,
            can_transfer=bool(self.settings.transfer_number),
            messages=messages,
            tools=tools,
        )

    async def reply(self, user_text: str, t0: float) -> None:
        await self.settle_tools()
        self.conversation.add_user(user_text)
        messages = self.conversation.window(self.settings.conversation_history_limit)
        spec = self.speculator.take(user_text, messages)
        if spec is not None:
            await self.reply_adopted(spec, t0)
            return
        record = TurnRecord(user_text=user_text, t0=t0)
        record.count_usage(*self.speculator.take_unclaimed())
        await self.voice.turn(record, functools.partial(self.think, record))

    async def reply_adopted(self, spec: Speculation, t0: float) -> None:
        """The turn ended as speculated: its buffered sentences go to TTS now. The
        speculation's task is cancelled with the turn (barge-in, hang-up) like any reply."""
        record: TurnRecord = spec.record
        record.t0 = t0
        record.count_usage(*self.speculator.take_unclaimed())
        head = (t0 - record.t1) * 1000 if record.t1 is not None else 0.0
        log.info("🔮 Speculative reply kept (asked %.0f ms before the turn ended)", head)
        self._go_ahead.set()  # the turn is the speculation's: its tool requests may go

        async def buffered(sentence_send: trio.MemorySendChannel[str]) -> None:
            try:
                async with sentence_send, spec.sentences:
                    async for sentence in spec.sentences:
                        await sentence_send.send(sentence)
                await spec.done.wait()  # its tool calls are all in
            finally:
                spec.cancel()
                self.note_acts(record)

        await self.voice.turn(record, buffered)

    async def settle_tools(self) -> None:
        """Tool requests a cut turn left running: wait for them (each within its timeout)
        and put them in the conversation, so Claude reads their results with the words
        the caller said over the bot."""
        for exchange in await self.ledger.settle():
            log.info(
                "🛠️ %d tool result(s) from the cut turn go with this one", len(exchange.pending)
            )
            self.conversation.add_tool_exchange(exchange.asked, exchange.results())

    def note_acts(self, record: TurnRecord) -> None:
        """What the reply's tools ask of the call, carried out by ``converse`` once the
        reply has played."""
        for act in record.acts:
            match act:
                case CallAct.END:
                    self.end_requested = True
                case CallAct.TRANSFER:
                    if self.controls.pending is None:
                        self.controls.pending = "transfer"  # after the reply announcing it
                case _:
                    assert_never(act)

    async def think(self, record: TurnRecord, sentence_send: trio.MemorySendChannel[str]) -> None:
        """Claude's streamed reply, cut into sentences (at most MAX_RESPONSE_LENGTH): a
        bot turn's sentence source, once ``record`` is bound."""
        try:
            await self._ask_claude(sentence_send, record)
        finally:
            self.note_acts(record)
