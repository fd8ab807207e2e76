"""Anthropic Messages API simulator: ``POST /v1/messages``, JSON or SSE, with faults.

What is simulated (``shared/docs/protocols/anthropic.md``, docs/protocols/anthropic.md):

- Auth by ``x-api-key`` or ``Authorization: Bearer`` (``x-api-key`` wins if both are sent);
  ``anthropic-version`` must be ``2023-06-01`` or ``2026-10-21``; under ``2026-10-21``
  ``temperature``/``top_p``/``top_k`` are rejected. Bodies are validated (``model``,
  positive int ``max_tokens``, non-empty ``messages`` of text/tool_use/tool_result blocks).
  Errors are ``{"type":"error","error":{...},"request_id":"req_..."}``; every response
  carries a ``request-id`` header.
- Tool pairing, with the API's own error messages: every ``tool_use`` of an assistant
  message must be answered by a ``tool_result`` in the leading run of ``tool_result`` blocks
  of the very next (user) message, and every ``tool_result`` must answer a ``tool_use`` of
  the message just before it; otherwise a 400 ``invalid_request_error``. ``tool_use``
  blocks in a last (prefill) assistant message are refused too unless
  ``trailing_tool_use="allow"`` (the API's documentation does not say).
- ``"stream": true`` answers with the canonical SSE flow (message_start, content_block_start,
  ping, text deltas of ``words_per_delta`` words, content_block_stop, then one tool_use
  block per tool call, each with its own ``toolu_`` id and ``input_json_delta`` pieces,
  message_delta with ``stop_reason: "tool_use"`` if there were any, message_stop);
  otherwise the whole Message as JSON, sent once it would have finished streaming.
- Tokens are counted as words. ``max_tokens`` truncates the reply (and drops every tool
  call: they come whole or not at all) with ``stop_reason: "max_tokens"``;
  ``stop_sequences`` are honoured. ``cache_control``
  breakpoints on tools, system or message blocks create a prompt-cache entry (keyed by a
  hash of the model and the prefix) reported as ``cache_creation_input_tokens`` the first
  time and ``cache_read_input_tokens`` afterwards. A breakpoint engages only when the prompt
  up to and including its block has at least the model's minimum cacheable length
  (:data:`CACHE_MINIMUMS`, docs/protocols/anthropic.md); a shorter one is processed without
  caching (usage 0 and 0), or, with ``short_cache_prefix="error"``, refused with a 400 the
  way the API once did. There is no TTL.

What the model says is a :class:`Reply` (text, then any number of tool calls) from
``reply_fn``; the default, :func:`default_reply` (voice_trio.sim.anthropic_replies, where
the rules are listed), is a deterministic Spanish script: it quotes the caller back, ends
the call on a farewell and transfers on a request for a person when those tools are on
offer, and plays a clinic receptionist when the clinic's tools (sim/clinic_tools.toml)
are: an appointment request calls ``free_slots``, free slots are booked with
``book_appointment`` for the caller named in the system prompt, a booking is confirmed, an
error result is apologised for, and words the caller said over the tools are acknowledged.

Knobs on :class:`AnthropicSim`: ``api_key`` (``None`` accepts any key), ``ttft`` (seconds
before the first delta, default 0.4), ``tokens_per_second`` (default 80, must be > 0;
``math.inf`` for no pacing), ``words_per_delta``, ``thinking`` (text of a leading thinking
block, skipped when the request sends ``thinking: {"type": "disabled"}``), ``reply_fn``,
``cache_minimums`` (model id prefix -> minimum cacheable tokens; the longest matching prefix
wins), ``cache_minimum_default`` (for a model not listed), ``short_cache_prefix``
(``"ignore"`` or ``"error"``) and ``trailing_tool_use`` (``"error"`` or ``"allow"``). The
sources disagree on some minimums: set them here.
Faults queue up with :meth:`AnthropicSim.inject` and apply to the next requests that pass
auth and validation, one fault per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from voice_trio.sim._serve import serve_asgi
from voice_trio.sim.anthropic_replies import Reply, default_reply
from voice_trio.sim.anthropic_requests import API_VERSIONS, validate

HISTORY = 200

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ERROR_MESSAGES = {429: "Rate limit exceeded", 500: "Internal server error", 529: "Overloaded"}
_RECORDED_HEADERS = (
    "anthropic-version",
    "anthropic-beta",
    "content-type",
    "accept",
    "user-agent",
    "x-stainless-async",
    "x-stainless-retry-count",
)
# Minimum cacheable prompt length per model id prefix, as Anthropic's prompt-caching page
# gives it in 2026 (docs/protocols/anthropic.md lists the sources and where they disagree).
CACHE_MINIMUMS: dict[str, int] = {
    "claude-opus-5": 512,
    "claude-fable-5": 512,
    "claude-mythos-5": 512,
    "claude-opus-4-8": 1024,
    "claude-sonnet-5": 1024,
    "claude-sonnet-4-6": 1024,
    "claude-sonnet-4-5": 1024,
    "claude-opus-4-1": 1024,
    "claude-opus-4": 1024,
    "claude-sonnet-4": 1024,
    "claude-3-7-sonnet": 1024,
    "claude-3-5-sonnet": 1024,
    "claude-3-opus": 1024,
    "claude-opus-4-7": 2048,
    "claude-mythos-preview": 2048,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-haiku-4-5": 4096,
}
CACHE_MINIMUM_DEFAULT = 1024  # a model the sources do not list [unconfirmed]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Fault:
    """How one request goes wrong. Build with the class methods; fields combine freely."""

    status: int | None = None  # answer with this HTTP error instead of a message
    delay: float = 0.0  # extra seconds before the response headers
    cut_after: int | None = None  # drop the connection after this many deltas
    error_after: int | None = None  # send `event: error` (overloaded) after this many deltas
    retry_after: float | None = None  # `retry-after` header (seconds) on an HTTP error
    should_retry: bool | None = None  # `x-should-retry` header on an HTTP error

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Fault:
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls) -> Fault:
        return cls(status=500)

    @classmethod
    def overloaded(cls, retry_after: float | None = None) -> Fault:
        return cls(status=529, retry_after=retry_after)

    @classmethod
    def slow_start(cls, delay: float) -> Fault:
        return cls(delay=delay)

    @classmethod
    def cut(cls, after_deltas: int) -> Fault:
        """Close the connection mid-stream (mid-body for non-streaming requests)."""
        return cls(cut_after=after_deltas)

    @classmethod
    def stream_error(cls, after_deltas: int) -> Fault:
        """A 200 stream that ends in an overloaded ``error`` event (HTTP 529 if not streaming)."""
        return cls(error_after=after_deltas)


@dataclass
class RecordedRequest:
    """One request as received; ``status`` is 0 until the response starts."""

    method: str
    path: str
    headers: dict[str, str]
    auth: str | None  # "x-api-key", "bearer" or None; key values are not kept
    body: Any
    request_id: str
    status: int = 0
    fault: Fault | None = None
    usage: dict[str, int] | None = None  # the input side of the usage reported, if answered


def split_deltas(text: str, words_per_delta: int) -> list[str]:
    """Split ``text`` into pieces of ``words_per_delta`` words; the pieces join back to it."""
    words = re.findall(r"\s*\S+", text)
    if not words:
        return [text] if text else []
    words[-1] += text[len("".join(words)) :]
    n = max(1, words_per_delta)
    return ["".join(words[i : i + n]) for i in range(0, len(words), n)]


def _words(text: str) -> int:
    return len(text.split())


def _prompt_segments(body: Mapping[str, Any]) -> Iterator[tuple[Any, int, bool]]:
    """The prompt in cache order (tools, system, messages): ``(segment, tokens, breakpoint)``."""
    for tool in body.get("tools") or []:
        tokens = _words(json.dumps(_strip_cache(tool), ensure_ascii=False))
        yield _strip_cache(tool), tokens, "cache_control" in tool
    system = body.get("system")
    if isinstance(system, str):
        yield system, _words(system), False
    elif system:
        for block in system:
            yield _strip_cache(block), _words(block["text"]), "cache_control" in block
    for message in body["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks:
            tokens = _block_tokens(block)
            yield [message["role"], _strip_cache(block)], tokens, "cache_control" in block


def _block_tokens(block: Mapping[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return _words(block["text"])
    if kind == "tool_use":
        return 1 + _words(json.dumps(block["input"], ensure_ascii=False))
    if kind == "tool_result":
        content = block.get("content") or ""
        if isinstance(content, list):
            return sum(_block_tokens(b) for b in content if isinstance(b, dict))
        return _words(str(content))
    return _words(json.dumps(_strip_cache(block), ensure_ascii=False))


def _strip_cache(block: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


@dataclass
class _Output:
    """The planned reply after max_tokens and stop_sequences are applied."""

    thinking: str
    text: str
    tools: tuple[tuple[str, str, dict[str, Any]], ...]  # (id, name, input) per tool_use
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


@dataclass
class AnthropicSim:
    """Knobs and state of one simulated Messages API; the object is the ASGI app."""

    api_key: str | None = None
    ttft: float = 0.4
    tokens_per_second: float = 80.0
    words_per_delta: int = 3
    thinking: str | None = None
    reply_fn: Callable[[dict[str, Any]], Reply] = default_reply
    cache_minimums: dict[str, int] = field(default_factory=lambda: dict(CACHE_MINIMUMS))
    cache_minimum_default: int = CACHE_MINIMUM_DEFAULT
    short_cache_prefix: str = "ignore"  # or "error": a 400, as the API answered in 2024
    trailing_tool_use: str = "error"  # or "allow": unanswered tool_use in a last message
    history: int = HISTORY
    requests: deque[RecordedRequest] = field(init=False)
    request_count: int = field(init=False, default=0)
    status_counts: Counter[int] = field(init=False, default_factory=Counter)
    prompt_cache: dict[str, int] = field(init=False, default_factory=dict)
    _faults: deque[Fault] = field(init=False, default_factory=deque)
    _ids: Counter[str] = field(init=False, default_factory=Counter)

    def __post_init__(self) -> None:
        self.requests = deque(maxlen=self.history)

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to each of the next ``times`` requests that pass validation."""
        self._faults.extend([fault] * times)

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    def clear_faults(self) -> None:
        """Drop the faults not yet used."""
        self._faults.clear()

    def _new_id(self, prefix: str) -> str:
        self._ids[prefix] += 1
        return f"{prefix}_sim{self._ids[prefix]:018d}"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        raw = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._respond(scope, bytes(raw), send)
            nursery.cancel_scope.cancel()

    async def _respond(self, scope: dict[str, Any], raw: bytes, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        api_key, auth = headers.get("x-api-key"), "x-api-key"
        if api_key is None and headers.get("authorization", "").startswith("Bearer "):
            api_key, auth = headers["authorization"].removeprefix("Bearer "), "bearer"
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            headers={k: headers[k] for k in _RECORDED_HEADERS if k in headers},
            auth=auth if api_key else None,
            body=body,
            request_id=self._new_id("req"),
        )
        self.requests.append(record)
        self.request_count += 1
        error = partial(self._send_error, send, record)
        if scope["path"] != "/v1/messages":
            return await error(404, f"Not found: {scope['path']}")
        if scope["method"] != "POST":
            return await error(405, f"Method {scope['method']} not allowed")
        if not api_key or (self.api_key is not None and api_key != self.api_key):
            return await error(401, "invalid x-api-key")
        version = headers.get("anthropic-version", "")
        if version not in API_VERSIONS:
            return await error(400, f"anthropic-version: unsupported or missing ({version!r})")
        if raw and body is None:
            return await error(400, "request body is not valid JSON")
        if problem := validate(body, version, trailing_tool_use=self.trailing_tool_use):
            return await error(400, problem)
        assert isinstance(body, dict)  # validate() refuses anything else
        if self.short_cache_prefix == "error" and (problem := self._short_prefix_problem(body)):
            return await error(400, problem)

        fault = self._faults.popleft() if self._faults else None
        record.fault = fault
        if fault and fault.delay:
            await trio.sleep(fault.delay)
        if fault and fault.status:
            return await error(fault.status, fault=fault)
        streaming = body.get("stream", False)
        if fault and fault.error_after is not None and not streaming:
            return await error(529, fault=fault)
        usage = self._input_usage(body)
        record.usage = usage
        output = self._plan(body)
        if streaming:
            await self._stream(send, record, body, usage, output, fault)
        else:
            await self._send_message(send, record, body, usage, output, fault)

    def cache_minimum(self, model: str) -> int:
        """The minimum cacheable prompt length for ``model``: the longest listed prefix."""
        matches = [
            (len(prefix), tokens)
            for prefix, tokens in self.cache_minimums.items()
            if model == prefix or model.startswith(prefix + "-")
        ]
        return max(matches)[1] if matches else self.cache_minimum_default

    def _breakpoints(self, body: Mapping[str, Any]) -> tuple[int, list[tuple[str, int]]]:
        """The prompt's length and, per ``cache_control`` breakpoint, its cache key and the
        length of the prefix it closes."""
        digest = hashlib.sha256(body["model"].encode())
        total, breakpoints = 0, []
        for segment, tokens, marked in _prompt_segments(body):
            digest.update(json.dumps(segment, sort_keys=True, ensure_ascii=False).encode())
            total += tokens
            if marked:
                breakpoints.append((digest.copy().hexdigest(), total))
        return total, breakpoints

    def _short_prefix_problem(self, body: Mapping[str, Any]) -> str | None:
        """With ``short_cache_prefix="error"``: the 400 message for a breakpoint too early."""
        minimum = self.cache_minimum(body["model"])
        for _, upto in self._breakpoints(body)[1]:
            if upto < minimum:
                return (
                    "The message up to and including the first cache-control block must be "
                    f"at least {minimum} tokens. Found: {upto}."
                )
        return None

    def _input_usage(self, body: Mapping[str, Any]) -> dict[str, int]:
        total, marked = self._breakpoints(body)
        # A prefix shorter than the model's minimum is processed without caching.
        minimum = self.cache_minimum(body["model"])
        breakpoints = [(key, upto) for key, upto in marked if upto >= minimum]
        read = next((upto for key, upto in reversed(breakpoints) if key in self.prompt_cache), 0)
        created = breakpoints[-1][1] - read if breakpoints else 0
        for key, upto in breakpoints:
            self.prompt_cache.setdefault(key, upto)
        return {
            "input_tokens": max(1, total - read - created),
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }

    def _plan(self, body: dict[str, Any]) -> _Output:
        reply = self.reply_fn(body)
        budget = body["max_tokens"]
        thinking = self.thinking or ""
        if (body.get("thinking") or {}).get("type") == "disabled":
            thinking = ""
        stop_reason, stop_sequence = "end_turn", None
        text, tools = reply.text, reply.tool_calls
        for sequence in body.get("stop_sequences") or []:
            at = text.find(sequence)
            if sequence and at >= 0 and (stop_sequence is None or at < text.find(stop_sequence)):
                stop_reason, stop_sequence = "stop_sequence", sequence
        if stop_sequence is not None:
            text, tools = text[: text.find(stop_sequence)], ()
        pieces = []
        for part in (thinking, text):
            kept = re.findall(r"\s*\S+", part)[:budget]
            budget -= len(kept)
            if len(kept) < _words(part):
                stop_reason, tools = "max_tokens", ()
                part = "".join(kept)
            pieces.append(part)
        # The tool calls come whole or not at all: a cut tool_use would be useless input.
        tool_tokens = sum(_words(json.dumps(call[1], ensure_ascii=False)) for call in tools)
        if tools and tool_tokens > budget:
            stop_reason, tools = "max_tokens", ()
        elif tools:
            stop_reason = "tool_use"
        blocks = tuple((self._new_id("toolu"), name, tool_input) for name, tool_input in tools)
        used = body["max_tokens"] - budget + (tool_tokens if tools else 0)
        return _Output(pieces[0], pieces[1], blocks, stop_reason, stop_sequence, max(1, used))

    def _content(self, output: _Output) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if output.thinking:
            signature = hashlib.sha256(output.thinking.encode()).hexdigest()
            blocks.append({"type": "thinking", "thinking": output.thinking, "signature": signature})
        if output.text or not output.tools:
            blocks.append({"type": "text", "text": output.text})
        for tool_id, name, tool_input in output.tools:
            blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        return blocks

    def _message(
        self, body: Mapping[str, Any], usage: dict[str, int], output: _Output | None
    ) -> dict[str, Any]:
        return {
            "id": self._new_id("msg"),
            "type": "message",
            "role": "assistant",
            "content": self._content(output) if output else [],
            "model": body["model"],
            "stop_reason": output.stop_reason if output else None,
            "stop_sequence": output.stop_sequence if output else None,
            "usage": {**usage, "output_tokens": output.output_tokens if output else 1},
        }

    async def _send_message(
        self,
        send: Send,
        record: RecordedRequest,
        body: Mapping[str, Any],
        usage: dict[str, int],
        output: _Output,
        fault: Fault | None,
    ) -> None:
        await trio.sleep(self.ttft + output.output_tokens / self.tokens_per_second)
        payload = _dumps(self._message(body, usage, output))
        await self._start(send, record, 200, "application/json", len(payload))
        if fault and fault.cut_after is not None:
            half = payload[: len(payload) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            return  # the server drops the connection short of content-length
        await send({"type": "http.response.body", "body": payload})

    def _events(
        self, body: Mapping[str, Any], usage: dict[str, int], output: _Output
    ) -> Iterator[tuple[dict[str, Any], float | None]]:
        """The SSE events in order, each with its token cost if it is a delta."""
        yield {"type": "message_start", "message": self._message(body, usage, None)}, None
        for index, block in enumerate(self._content(output)):
            start: dict[str, Any]
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
            elif block["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                start = {**block, "input": {}}
            yield {"type": "content_block_start", "index": index, "content_block": start}, None
            if index == 0:
                yield {"type": "ping"}, None
            for delta, cost in self._deltas(block):
                yield {"type": "content_block_delta", "index": index, "delta": delta}, cost
            yield {"type": "content_block_stop", "index": index}, None
        delta = {"stop_reason": output.stop_reason, "stop_sequence": output.stop_sequence}
        usage_out = {"output_tokens": output.output_tokens}
        yield {"type": "message_delta", "delta": delta, "usage": usage_out}, None
        yield {"type": "message_stop"}, None

    def _deltas(self, block: dict[str, Any]) -> Iterator[tuple[dict[str, Any], float]]:
        if block["type"] == "thinking":
            for piece in split_deltas(block["thinking"], self.words_per_delta):
                yield {"type": "thinking_delta", "thinking": piece}, _words(piece)
            yield {"type": "signature_delta", "signature": block["signature"]}, 0
        elif block["type"] == "text":
            for piece in split_deltas(block["text"], self.words_per_delta):
                yield {"type": "text_delta", "text": piece}, _words(piece)
        else:
            raw = json.dumps(block["input"], ensure_ascii=False)
            pieces = [raw[i : i + 12] for i in range(0, len(raw), 12)]
            for piece in pieces:
                yield {"type": "input_json_delta", "partial_json": piece}, _words(raw) / len(pieces)

    async def _stream(
        self,
        send: Send,
        record: RecordedRequest,
        body: Mapping[str, Any],
        usage: dict[str, int],
        output: _Output,
        fault: Fault | None,
    ) -> None:
        await self._start(send, record, 200, "text/event-stream")
        trip = None  # the fault fires before delta number `trip`, or at message_delta
        if fault:
            trip = fault.cut_after if fault.cut_after is not None else fault.error_after
        first_at: float | None = None
        deltas, tokens = 0, 0.0
        for event, cost in self._events(body, usage, output):
            if trip is not None and (
                (cost is not None and deltas == trip) or event["type"] == "message_delta"
            ):
                if fault and fault.cut_after is not None:
                    return  # no final chunk: the server drops the connection
                error = {"type": "overloaded_error", "message": "Overloaded"}
                await send(_sse({"type": "error", "error": error}))
                break
            if cost is not None:
                if first_at is None:
                    await trio.sleep(self.ttft)
                    first_at = trio.current_time()
                else:
                    await trio.sleep_until(first_at + tokens / self.tokens_per_second)
                tokens += cost
                deltas += 1
            await send(_sse(event))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start(
        self,
        send: Send,
        record: RecordedRequest,
        status: int,
        content_type: str,
        length: int | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        record.status = status
        self.status_counts[status] += 1
        headers = [
            (b"content-type", content_type.encode()),
            (b"request-id", record.request_id.encode()),
            *extra,
        ]
        if length is None:
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_error(
        self,
        send: Send,
        record: RecordedRequest,
        status: int,
        message: str | None = None,
        *,
        fault: Fault | None = None,
    ) -> None:
        error_type = _ERROR_TYPES.get(status, "api_error")
        message = message or _ERROR_MESSAGES.get(status, error_type)
        payload = _dumps(
            {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": record.request_id,
            }
        )
        extra = []
        if fault and fault.retry_after is not None:
            extra.append((b"retry-after", f"{fault.retry_after:g}".encode()))
        if fault and fault.should_retry is not None:
            extra.append((b"x-should-retry", str(fault.should_retry).lower().encode()))
        await self._start(send, record, status, "application/json", len(payload), tuple(extra))
        await send({"type": "http.response.body", "body": payload})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(event: dict[str, Any]) -> dict[str, Any]:
    data = b"event: " + event["type"].encode() + b"\ndata: " + _dumps(event) + b"\n\n"
    return {"type": "http.response.body", "body": data, "more_body": True}


async def serve(
    sim: AnthropicSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status.started`` gets the base URL."""
    await serve_asgi(sim, host=host, port=port, task_status=task_status)


def _model_minimum(text: str) -> tuple[str, int]:
    model, _, tokens = text.partition("=")
    if not model.strip() or not tokens.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL=TOKENS, got {text!r}")
    return model.strip(), int(tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    parser.add_argument("--ttft-ms", type=float, default=400.0, help="time to first token")
    parser.add_argument("--tokens-per-second", type=float, default=80.0)
    parser.add_argument("--words-per-delta", type=int, default=3)
    parser.add_argument("--thinking", default=None, help="text of a leading thinking block")
    parser.add_argument(
        "--cache-minimum",
        action="append",
        default=[],
        type=_model_minimum,
        metavar="MODEL=TOKENS",
        help="minimum cacheable prompt length for a model id prefix (repeatable)",
    )
    parser.add_argument(
        "--short-cache-prefix",
        choices=("ignore", "error"),
        default="ignore",
        help="a cache breakpoint below the minimum: processed uncached, or a 400",
    )
    parser.add_argument(
        "--trailing-tool-use",
        choices=("error", "allow"),
        default="error",
        help="tool_use blocks in a last assistant message, with nothing to answer them",
    )


async def run_from_args(args: argparse.Namespace) -> None:
    sim = AnthropicSim(
        api_key=args.api_key,
        ttft=args.ttft_ms / 1000,
        tokens_per_second=args.tokens_per_second if args.tokens_per_second > 0 else math.inf,
        words_per_delta=args.words_per_delta,
        thinking=args.thinking,
        short_cache_prefix=args.short_cache_prefix,
        trailing_tool_use=args.trailing_tool_use,
    )
    sim.cache_minimums.update(args.cache_minimum)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve, sim, host=args.host, port=args.port))
        print(f"Anthropic simulator listening on {base_url}", flush=True)
