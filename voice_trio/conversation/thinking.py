"""The agent's side of a turn, shared by both call modes: Claude's reply as sentences.

The media session turns the sentences into streamed TTS audio; the fallback mode hands each
one to Telnyx ``speak``. Either way the request is the same: the persona system prompt with
this call's facts, the last ``CONVERSATION_HISTORY_LIMIT`` messages of the conversation, and
the tools offered on the call (:mod:`~voice_trio.conversation.tools`: ``end_call``, plus
``transfer_call`` when the call can transfer); the reply is cut at ``MAX_RESPONSE_LENGTH``
characters. The tools Claude called become acts on the turn (``TurnRecord.acts``), which the
call mode carries out once the reply has been said; the operator's HTTP tools are run within
the turn and their answers given back to Claude (docs/tools.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from voice_trio.conversation.history import Conversation
from voice_trio.conversation.persona import system_blocks
from voice_trio.conversation.phrases import local_now
from voice_trio.conversation.sentences import SentenceChunker
from voice_trio.conversation.tool_use import (
    PendingTool,
    ToolCaller,
    ToolExchange,
    ToolLedger,
    ToolRunner,
)
from voice_trio.conversation.tools import Tool, offered_tools, tool_specs
from voice_trio.providers.claude import ClaudeClient, ClaudeReply, LlmError, ToolCall
from voice_trio.providers.tool_http import ToolOutcome
from voice_trio.tools_file import HttpToolSpec

if TYPE_CHECKING:
    from voice_trio.conversation.turn_record import TurnRecord

log = logging.getLogger("voice_trio.calls")

# A caller waits in silence while Claude is retried: past this, an apology is better.
RETRY_BUDGET_SECONDS = 2.5
MIN_ATTEMPT_SECONDS = 0.5  # no retry that would leave the new attempt less than this
# Sentences waiting to be spoken (TTS, or Telnyx speak); the LLM is far ahead of speech anyway.
SENTENCE_QUEUE = 8
TOOL_ROUNDS = 4  # requests to tools, then Claude again, at most this often in one turn


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
    http_tools: tuple[HttpToolSpec, ...] = ()  # the operator's tools (TOOLS_FILE)
    tool_runner: ToolRunner | None = None  # runs their requests, outside the call
    tool_wait_s: float = 0.7  # an answer slower than this gets a waiting phrase said
    waiting_phrase: str = ""  # said for a tool that has none of its own


@dataclass(slots=True, kw_only=True)
class ToolTurn:
    """What a reply needs to run the operator's HTTP tools on its call."""

    caller: ToolCaller
    ledger: ToolLedger  # where a cut turn leaves its requests for the next one
    # A speculative reply waits for this (its adoption) before it sends any request.
    go_ahead: trio.Event | None = None


class _Speaker:
    """The turn's sentences on their way out, within MAX_RESPONSE_LENGTH."""

    def __init__(self, send: trio.MemorySendChannel[str], limit: int, record: TurnRecord):
        self.send = send
        self.limit = limit
        self.record = record
        self.spoken = 0  # characters, the whole turn

    async def say(self, sentence: str) -> bool:
        """Send ``sentence``; False (and nothing sent) once the reply is over its limit."""
        if self.record.t2s is None:
            self.record.t2s = trio.current_time()
        if self.spoken + len(sentence) > self.limit and self.spoken:
            return False
        self.spoken += len(sentence)
        await self.send.send(sentence)
        return True


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
    tools: ToolTurn | None = None,
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

    With ``tools`` (and tools in ``TOOLS_FILE``) the operator's HTTP tools are offered too.
    A reply that calls them has its requests run (:func:`_run_tools`), their results added
    to the conversation, and Claude asked again, all in this turn: up to ``TOOL_ROUNDS``
    rounds, the sentences of each going out as they come.
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
    http = mind.http_tools if tools is not None and mind.tool_runner is not None else ()
    offered = offered_tools(can_transfer=can_transfer, http=http)
    specs = tool_specs(offered)
    by_name = {tool.name: tool for tool in offered}
    speaker = _Speaker(sentence_send, mind.max_response_length, record)
    async with sentence_send:
        record.t1 = trio.current_time()
        for round_ in range(TOOL_ROUNDS + 1):
            reply = await _ask(mind, system, messages, specs, record, speaker)
            if reply is None:
                return
            _note_tool_calls(record, reply.tool_calls, by_name)
            asked = [c for c in reply.tool_calls if c.name in by_name and by_name[c.name].http]
            if not asked or tools is None or reply.stop_reason != "tool_use":
                return
            if round_ == TOOL_ROUNDS:
                log.warning("⚡ Claude still asks for tools after %d rounds: not run", round_)
                return
            exchange = await _run_tools(mind, tools, reply, asked, by_name, speaker)
            conversation.add_tool_exchange(exchange.asked, exchange.results())
            messages = [
                *messages,
                {"role": "assistant", "content": exchange.asked},
                {"role": "user", "content": exchange.results()},
            ]
            log.info("⚡ LLM request with %d tool result(s)", len(exchange.pending))


async def _ask(
    mind: Mind,
    system: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    specs: list[dict[str, Any]],
    record: TurnRecord,
    speaker: _Speaker,
) -> ClaudeReply | None:
    """One request of the turn, its sentences sent as they complete; retried while nothing
    of it was said. None: the turn is over (the length limit, or Claude failed)."""
    log.info("⚡ LLM request (%d messages)", len(messages))
    started = trio.current_time()
    spoken_before = speaker.spoken
    chunker = SentenceChunker()
    attempt = 0
    while True:
        try:
            async with mind.claude.stream_reply(
                system, messages, specs, on_usage=record.count_usage
            ) as reply:
                async for delta in reply:
                    if record.t2 is None:
                        record.t2 = trio.current_time()
                        assert record.t1 is not None
                        log.info("⚡ First token in %.0f ms", (record.t2 - record.t1) * 1000)
                    for sentence in chunker.push(delta.text):
                        if not await speaker.say(sentence):
                            return None
            break
        except LlmError as exc:
            attempt += 1
            said = speaker.spoken - spoken_before
            wait = _retry_delay(exc, attempt, started, said)
            if wait is None:
                log.warning("⚡ Claude failed: %s", exc)
                if not said:
                    await speaker.send.send(mind.apology)
                return None
            log.warning("⚡ Claude failed (%s), retrying in %.0f ms", exc.kind, wait * 1000)
            chunker = SentenceChunker()
            await trio.sleep(wait)
    for sentence in chunker.flush():
        if not await speaker.say(sentence):
            return None
    return reply


async def _run_tools(
    mind: Mind,
    turn: ToolTurn,
    reply: ClaudeReply,
    asked: list[ToolCall],
    by_name: Mapping[str, Tool],
    speaker: _Speaker,
) -> ToolExchange:
    """Send the requests ``asked`` for, and wait for their answers: a waiting phrase is
    said if they take longer than ``tool_wait_s``. The requests run outside the turn
    (``Mind.tool_runner``); while they do, the exchange is in the call's ledger, so a turn
    cut meanwhile leaves it for the next turn to settle. Every other ``tool_use`` of the
    reply is answered too (the API wants a result for each)."""
    runner = mind.tool_runner
    assert runner is not None
    if turn.go_ahead is not None:
        await turn.go_ahead.wait()  # a speculation sends nothing before it is adopted
    pending: list[PendingTool] = []
    for call in reply.tool_calls:
        tool = by_name.get(call.name)
        if call in asked and tool is not None and tool.http is not None:
            pending.append(runner.start(turn.caller, tool.http, call.id, call.input))
        else:
            done = PendingTool(call.id, call.name, call.input)
            done.finish(_answered_elsewhere(call.name, tool))
            pending.append(done)
    exchange = ToolExchange(asked=reply.assistant_content(), pending=pending)
    turn.ledger.open.append(exchange)
    with trio.move_on_after(mind.tool_wait_s):
        for request in pending:
            await request.done.wait()
    slow = [p for p in pending if not p.done.is_set()]
    if slow:
        spec = by_name[slow[0].name].http
        phrase = (spec.waiting_phrase if spec is not None else "") or mind.waiting_phrase
        log.info("🛠️ Tool %s is slow: saying the waiting phrase", slow[0].name)
        await speaker.send.send(phrase)
        for request in slow:
            await request.done.wait()
    turn.ledger.open.remove(exchange)
    return exchange


def _answered_elsewhere(name: str, tool: Tool | None) -> ToolOutcome:
    """The result of a ``tool_use`` that is not an HTTP request: an act the call carries
    out after the reply, or a name that was never offered."""
    if tool is None:
        return ToolOutcome("error", json.dumps({"error": f"no tool named {name}"}), None, 0.0)
    return ToolOutcome(
        "ok", json.dumps({"status": "done once your reply has been said"}), None, 0.0
    )


def _note_tool_calls(
    record: TurnRecord, calls: list[ToolCall], by_name: Mapping[str, Tool]
) -> None:
    """Record the tools Claude called and the acts they ask for. A name that is not an
    offered tool (Claude invents one now and then) is kept in ``tool_calls``, as said, and
    asks nothing of the call."""
    for call in calls:
        record.tool_calls.append(call.name)
        tool = by_name.get(call.name)
        if tool is None:
            log.warning("⚡ Claude called %r, not a tool offered on this call: ignored", call.name)
        elif tool.act is not None:
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
