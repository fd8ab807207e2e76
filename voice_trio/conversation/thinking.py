"""The agent's side of a turn, shared by both call modes: Claude's reply as sentences.

The media session turns the sentences into streamed TTS audio; the fallback mode hands each
one to Telnyx ``speak``. Either way the request is the same: the persona system prompt with
this call's facts, the last ``CONVERSATION_HISTORY_LIMIT`` messages of the conversation, and
the tools offered on the call (:mod:`~voice_trio.conversation.tools`: ``end_call``, plus
``transfer_call`` when the call can transfer); the reply is cut at ``MAX_RESPONSE_LENGTH``
characters. The tools Claude called become acts on the turn (``TurnRecord.acts``), which the
call mode carries out once the reply has been said.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from voice_trio.conversation.history import Conversation
from voice_trio.conversation.persona import system_blocks
from voice_trio.conversation.phrases import local_now
from voice_trio.conversation.sentences import SentenceChunker
from voice_trio.conversation.tools import Tool, offered_tools, tool_specs
from voice_trio.providers.claude import ClaudeClient, LlmError, ToolCall

if TYPE_CHECKING:
    from voice_trio.conversation.turn_record import TurnRecord

log = logging.getLogger("voice_trio.calls")

# A caller waits in silence while Claude is retried: past this, an apology is better.
RETRY_BUDGET_SECONDS = 2.5
MIN_ATTEMPT_SECONDS = 0.5  # no retry that would leave the new attempt less than this
# Sentences waiting to be spoken (TTS, or Telnyx speak); the LLM is far ahead of speech anyway.
SENTENCE_QUEUE = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Mind:
    """Claude with the persona, and the limits every reply keeps to."""

    claude: ClaudeClient
    persona: str  # the system prompt, before this call's facts
    # Whether the persona gets a prompt-cache breakpoint, by whether the call can transfer:
    # that decides the tools offered, which come before the persona in the cached prefix.
    cache_persona: Mapping[bool, bool]
    apology: str  # said when Claude fails before anything was said
    timezone: str
    max_response_length: int  # characters
    history_limit: int  # messages of the conversation sent with each request


async def think_reply(
    mind: Mind,
    conversation: Conversation,
    sentence_send: trio.MemorySendChannel[str],
    record: TurnRecord,
    *,
    nombre: str,
    contexto: str,
    can_transfer: bool = False,
    messages: list[dict[str, Any]] | None = None,
) -> None:
    """Stream Claude's reply to ``conversation`` into ``sentence_send`` (closed on return).

    ``messages``, when given, replaces the conversation's window: a speculative reply asks
    with a copy of the history plus the text it guesses, and leaves the history alone.

    Fills ``record.t1``, ``t2``, ``t2s``, the LLM token counts (every attempt's, as they are
    reported), ``tool_calls`` (the names Claude called) and ``acts`` (what those tools ask
    of the call; the tools offered are :func:`~voice_trio.conversation.tools.offered_tools`
    with ``can_transfer``, and a name not among them is logged and ignored). A reply cut at
    the length limit drops its tool calls; a failed request is retried within
    RETRY_BUDGET_SECONDS while nothing was said yet, then yields the apology phrase.
    """
    system = system_blocks(
        mind.persona,
        nombre=nombre,
        contexto=contexto,
        now=local_now(mind.timezone),
        max_chars=mind.max_response_length,
        cache_persona=mind.cache_persona[can_transfer],
    )
    if messages is None:
        messages = conversation.window(mind.history_limit)
    offered = offered_tools(can_transfer=can_transfer)
    tools = tool_specs(offered)
    chunker = SentenceChunker()
    spoken = 0
    async with sentence_send:
        record.t1 = trio.current_time()
        log.info("⚡ LLM request (%d messages)", len(messages))
        attempt = 0
        while True:
            try:
                async with mind.claude.stream_reply(
                    system, messages, tools, on_usage=record.count_usage
                ) as reply:
                    async for delta in reply:
                        if record.t2 is None:
                            record.t2 = trio.current_time()
                            log.info("⚡ First token in %.0f ms", (record.t2 - record.t1) * 1000)
                        for sentence in chunker.push(delta.text):
                            if record.t2s is None:
                                record.t2s = trio.current_time()
                            if spoken + len(sentence) > mind.max_response_length and spoken:
                                return
                            spoken += len(sentence)
                            await sentence_send.send(sentence)
                    _note_tool_calls(record, reply.tool_calls, offered)
                break
            except LlmError as exc:
                attempt += 1
                wait = _retry_delay(exc, attempt, record.t1, spoken)
                if wait is None:
                    log.warning("⚡ Claude failed: %s", exc)
                    if not spoken:
                        await sentence_send.send(mind.apology)
                    return
                log.warning("⚡ Claude failed (%s), retrying in %.0f ms", exc.kind, wait * 1000)
                chunker = SentenceChunker()
                await trio.sleep(wait)
        for sentence in chunker.flush():
            if record.t2s is None:
                record.t2s = trio.current_time()
            if spoken + len(sentence) > mind.max_response_length and spoken:
                return
            spoken += len(sentence)
            await sentence_send.send(sentence)


def _note_tool_calls(record: TurnRecord, calls: list[ToolCall], offered: tuple[Tool, ...]) -> None:
    """Record the tools Claude called and the acts they ask for. A name that is not an
    offered tool (Claude invents one now and then) is kept in ``tool_calls``, as said, and
    asks nothing of the call."""
    by_name = {tool.name: tool for tool in offered}
    for call in calls:
        record.tool_calls.append(call.name)
        tool = by_name.get(call.name)
        if tool is None:
            log.warning("⚡ Claude called %r, not a tool offered on this call: ignored", call.name)
        else:
            record.acts.add(tool.act)


def _retry_delay(exc: LlmError, attempt: int, started: float, spoken: int) -> float | None:
    """How long to wait before asking again, or None to give up: only retryable errors,
    only before anything was said (a retry would repeat it), and only while the caller's
    wait stays within RETRY_BUDGET_SECONDS of silence."""
    if not exc.retryable or spoken:
        return None
    delay = exc.retry_after if exc.retry_after is not None else 0.15 * 2 ** (attempt - 1)
    left = started + RETRY_BUDGET_SECONDS - trio.current_time()
    if delay > left - MIN_ATTEMPT_SECONDS:
        return None
    return max(0.0, delay)
