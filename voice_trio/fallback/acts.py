"""What a fallback-mode call does with its turn: the opening, a reply, a goodbye.

Each act runs in the call's task (:class:`~voice_trio.fallback.call.FallbackCall`, seen as a
:class:`~voice_trio.fallback.line.FallbackLine`) while it holds the call's
turn, and says things through ``FallbackLine.speak`` (counted in the shared state, then
Telnyx ``speak``); it ends by giving the turn back, or by ending the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import assert_never

import trio

from voice_trio.calls.ends import EndReason
from voice_trio.conversation.phrases import local_now
from voice_trio.conversation.thinking import SENTENCE_QUEUE, ToolTurn, think_reply
from voice_trio.conversation.tool_use import ToolCaller, ToolLedger
from voice_trio.conversation.tools import CallAct
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.fallback import state as fs
from voice_trio.fallback.line import FallbackLine
from voice_trio.providers.telnyx.control import TelnyxError
from voice_trio.providers.telnyx.speech import base_language

log = logging.getLogger("voice_trio.calls")

SPOKEN_POLL_S = 0.2  # while waiting for the goodbye to play out before hanging up
CONTINUATION = {"es": "Disculpe, ¿me decía?", "en": "Sorry, what were you saying?"}


async def open_call(call: FallbackLine) -> None:
    """The first words, and Telnyx transcription started. The greeting if nothing was
    said yet; after a degrade, an answer to caller words the media session left
    unanswered, else a short prompt to go on. Speech first: the caller is waiting."""
    assert call.state is not None
    data = call.state.data
    if data.grace_until is not None:
        await trio.sleep(max(0.0, data.grace_until - time.time()))  # for call.hangup
        log.info("🔀 The call is still up: continuing in fallback mode")
    history = data.history
    if history and history[-1].role == "user":
        await start_transcription(call)
        await call.update(opened)
        await reply(call)
        return
    if not history:
        opening = call.services.phrases.greeting(
            nombre=data.caller.nombre,
            saludo=data.caller.saludo,
            now=local_now(call.settings.timezone),
        )
        await call.say(opening, kind="greeting")
    else:
        language = base_language(call.settings.agent_language)
        await call.say(CONTINUATION.get(language, CONTINUATION["es"]), kind="continuation")
    await start_transcription(call)
    await call.give_back(opened=True)


def opened(data: fs.FallbackState) -> bool:
    data.opened = True
    return True


async def start_transcription(call: FallbackLine) -> None:
    try:
        await call.services.telnyx.transcription_start(
            call.call_control_id, language=base_language(call.settings.agent_language)
        )
    except TelnyxError as exc:
        await call.on_command_error("transcription_start", exc)


async def reply(call: FallbackLine) -> None:
    """Answer the caller words waiting in the state (with none, the conversation as it
    stands): Claude's sentences go to ``speak`` one by one as they come."""
    words: list[fs.CallerWords] = []

    def take_words(data: fs.FallbackState) -> bool:
        words[:] = data.pending
        if not words:
            return False
        data.pending = []
        data.history.append(fs.Said("user", " ".join(w.text for w in words)))
        data.reprompted = False
        return True

    await call.update(take_words)
    assert call.state is not None
    data = call.state.data
    t0 = call.trio_time(max(w.t0 for w in words)) if words else None
    record = TurnRecord(user_text=" ".join(w.text for w in words), t0=t0)
    call.turn, call.said = record, []
    sentence_send, sentence_recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                think_reply,
                call.services.mind,
                data.conversation(),
                sentence_send,
                record,
                nombre=data.caller.nombre,
                contexto=data.caller.contexto,
                can_transfer=False,  # a transfer is a media-mode act (docs/reliability.md)
                tools=ToolTurn(caller=tool_caller(call, data), ledger=ToolLedger()),
            )
        )
        async with sentence_recv:
            async for sentence in sentence_recv:
                if record.t3 is None:
                    record.t3 = trio.current_time()
                if await call.speak(sentence):
                    call.said.append(sentence)
    report(call, record)
    if ends_the_call(record.acts):
        await call.give_back(keep=True)
        await finish(call, EndReason.AGENT_ENDED, None)
    else:
        await call.give_back()


def ends_the_call(acts: Iterable[CallAct]) -> bool:
    """Whether what the reply's tools ask ends a fallback-mode call. ``TRANSFER`` is never
    offered here, so never asked: the turn goes on."""
    ends = False
    for act in acts:
        match act:
            case CallAct.END:
                ends = True
            case CallAct.TRANSFER:
                pass
            case _:
                assert_never(act)
    return ends


def tool_caller(call: FallbackLine, data: fs.FallbackState) -> ToolCaller:
    """Whom the call's tool requests are made for. No barge-in in this mode: a request
    is always answered within its turn (a hang-up cuts the turn, never the request)."""
    line = data.line
    return ToolCaller(
        call.call_control_id,
        nombre=data.caller.nombre,
        telefono=line.from_number if line.direction == "inbound" else line.to_number,
        contexto=data.caller.contexto,
        on_line=lambda: call.call.end_reason is None,
    )


def report(call: FallbackLine, record: TurnRecord) -> None:
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
        call.services.metrics.turn_stage.labels(name).observe(ms / 1000)
    timing = " ".join(f"{k}={v:.0f}ms" for k, v in stages.items())
    log.info("🔊 Bot turn %s sent to Telnyx speak: %s", record.kind, timing or "-")


async def finish(call: FallbackLine, reason: EndReason, goodbye: str | None) -> None:
    """Say goodbye (if any), let it play, and hang up once: the call is over unless the
    caller hung up first."""
    if goodbye:
        await call.say(goodbye, kind="goodbye")
        await call.give_back(keep=True)
    await wait_spoken(call)
    call.ending = True

    state, ended = await call.shared.update(
        call.call_control_id, lambda data: data.end(reason, time.time())
    )
    call.state = state
    if ended:
        call.call.end_reason = reason
        await call.services.hang_up(call.call_control_id)


async def wait_spoken(call: FallbackLine) -> None:
    """Until every speak sent has been played (or its guard time has passed)."""
    while call.state is not None:
        data = call.state.data
        if not fs.pending_speech(data) or time.time() >= data.guard_until:
            return
        await trio.sleep(SPOKEN_POLL_S)
        call.state = await call.shared.load(call.call_control_id)
