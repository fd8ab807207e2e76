"""The call record of a fallback-mode call: built from its shared state, written to the store.

The state (:mod:`voice_trio.fallback.state`) holds the record's fixed fields, every
bot turn as a ``TurnEntry`` and the call's usage; whoever holds the turn when the call
ends writes the record from it (:class:`FallbackRecords`). A degraded call's record was
started by its media session: that part is read back and put first. A store that fails
costs the record, never the call (:func:`voice_trio.store.outage.keep`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from voice_trio.calls.services import CallServices
from voice_trio.fallback.state import FallbackState, Said
from voice_trio.store import CallRecord, CallStore, TurnEntry
from voice_trio.store.outage import keep

if TYPE_CHECKING:
    from voice_trio.conversation.turn_record import TurnRecord

log = logging.getLogger("voice_trio.calls")


def add_bot_turn(
    data: FallbackState,
    record: TurnRecord,
    said: list[str],
    origin: float,
    *,
    interrupted: bool = False,
) -> None:
    """Add a bot turn (done, or cut) to the state ``data``: its entry in the record, what
    was heard of it (``said``: the sentences Telnyx took) to the history, and its LLM usage.
    ``origin`` is the call's origin on this process's Trio clock."""
    heard = " ".join(said)
    if record.kind == "reply":
        record.bot_text = heard
    record.heard_text = heard
    record.interrupted = interrupted
    if heard or record.kind == "reply":
        data.turns.append(TurnEntry.from_turn(len(data.turns), record, origin))
    if heard:
        data.history.append(Said("assistant", heard, interrupted))
    data.llm_input_tokens += record.llm_input_tokens
    data.llm_output_tokens += record.llm_output_tokens


def call_record(call_control_id: str, data: FallbackState) -> tuple[CallRecord, list[TurnEntry]]:
    """The call record and turns the state holds (ended or not)."""
    line = data.line
    record = CallRecord(
        call_control_id=call_control_id,
        call_session_id=line.call_session_id,
        direction=line.direction,
        from_number=line.from_number,
        to_number=line.to_number,
        nombre=data.caller.nombre,
        contexto=data.caller.contexto,
        created_at=line.created_at,
        answered_at=line.answered_at,
        ended_at=data.ended_at,
        end_reason=data.ended,
        mode=data.mode,
        status="ended" if data.ended else "active",
        llm_input_tokens=data.llm_input_tokens,
        llm_output_tokens=data.llm_output_tokens,
        tts_characters=data.tts_characters,
    )
    return record, [replace(t, tool_calls=list(t.tool_calls)) for t in data.turns]


def merge_media_part(
    record: CallRecord, turns: list[TurnEntry], media: CallRecord, media_turns: list[TurnEntry]
) -> None:
    """Put the media session's part of a degraded call (its record as the session left
    it) before the fallback part: its turns first, its usage added."""
    record.created_at, record.answered_at = media.created_at, media.answered_at
    record.stt_audio_seconds = media.stt_audio_seconds
    record.tts_characters += media.tts_characters
    record.llm_input_tokens += media.llm_input_tokens
    record.llm_output_tokens += media.llm_output_tokens
    record.from_number = record.from_number or media.from_number
    record.to_number = record.to_number or media.to_number
    record.call_session_id = record.call_session_id or media.call_session_id
    for entry in turns:
        entry.index += len(media_turns)
    turns[:0] = media_turns


class FallbackRecords:
    """Writes fallback calls' records to the instance's store (if it has one)."""

    def __init__(self, services: CallServices) -> None:
        self.services = services

    def failed(self, operation: str) -> None:
        """A store operation given up: counted in ``voice_store_errors_total``."""
        self.services.metrics.store_errors.labels(operation).inc()

    async def keep(self, write: Any, *args: Any, first: bool = False) -> Any:
        """A store write the call depends on: shielded, bounded, never raising."""
        return await keep(write, *args, on_failure=self.failed, first=first)

    async def started(self, ccid: str, data: FallbackState) -> None:
        """The call's record as it starts (a degraded media call has one already)."""
        if not data.merge_record and self.services.store is not None:
            record, _ = call_record(ccid, data)
            await self.keep(self.services.store.start_call, record, first=True)

    async def ended(self, ccid: str, data: FallbackState) -> CallRecord:
        """Write the ended call's record, with a degraded call's media part first."""
        record, turns = call_record(ccid, data)
        store = self.services.store
        if store is not None:
            if data.merge_record:
                await self._merge_media_part(store, record, turns)
            await self.keep(store.save_call, record, turns)
        return record

    async def _merge_media_part(
        self, store: CallStore, record: CallRecord, turns: list[TurnEntry]
    ) -> None:
        found = await self.keep(store.get_call, record.call_control_id)
        if found is None:
            return
        media, media_turns = found
        merge_media_part(record, turns, media, media_turns)
