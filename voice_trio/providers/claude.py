"""Streaming Claude replies over the Messages API (``anthropic`` 2.x SDK, httpx2 under Trio).

The SDK does the HTTP and SSE work; this module narrows it to what a phone turn needs:
text deltas as they arrive, tool calls, stop reason and token usage, and one error type
(``LlmError``) that says whether a retry may help. The SDK's own retries are off by
default: a retried request costs seconds of silence on a call, so the call layer decides.

Reference: shared/docs/protocols/anthropic.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anthropic
import httpx2

# Statuses below 500 where another attempt may succeed (the SDK's own retry policy).
_RETRYABLE_STATUSES = frozenset({408, 409, 429})
# error.type values that describe the request itself; retrying them cannot help.
_CLIENT_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
    }
)


class LlmError(Exception):
    """A failed Claude request.

    ``status`` is the HTTP status, or ``None`` when there was none to speak of (transport
    failure, timeout, or an ``error`` event after the 200 had been sent). ``kind`` is the
    API's ``error.type`` when it gave one (``overloaded_error``, ``rate_limit_error``, ...),
    else ``timeout``, ``connection`` or ``protocol``. ``during_stream`` is true when the
    failure came after the response started, so some text may already have been yielded.
    """

    def __init__(
        self,
        status: int | None,
        kind: str,
        retryable: bool,
        message: str = "",
        *,
        during_stream: bool = False,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "no status"
        super().__init__(f"Claude request failed ({where}, {kind}): {message}".rstrip(": "))
        self.status = status
        self.kind = kind
        self.retryable = retryable
        self.during_stream = during_stream
        self.retry_after = retry_after
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    input: dict[str, Any]
    id: str


@dataclass(frozen=True, slots=True)
class LlmUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        """Every prompt token the request read: the API's ``input_tokens`` counts only
        those after the last cache breakpoint, cache reads and writes come on top."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    def __sub__(self, other: LlmUsage) -> LlmUsage:
        return LlmUsage(
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.cache_read_input_tokens - other.cache_read_input_tokens,
            self.cache_creation_input_tokens - other.cache_creation_input_tokens,
        )


# Told (input, output) tokens as they are reported: the increase since the last report.
UsageHook = Callable[[int, int], None]
# Told every usage report as it arrives, split by kind: the increase since the last report.
UsageSink = Callable[[LlmUsage], None]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue  # an HTTP date: rare, and not worth parsing here
        if seconds >= 0:
            return seconds
    return None


def llm_error_from(exc: BaseException, *, during_stream: bool = False) -> LlmError:
    """Classify an SDK or transport exception as ``LlmError`` (pure; used by the client)."""
    if isinstance(exc, LlmError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        kind = exc.type or f"http_{exc.status_code}"
        headers = exc.response.headers
        if exc.status_code == 200:
            # An `error` event after the stream began: the status line said 200.
            retryable = kind not in _CLIENT_ERROR_TYPES
            status: int | None = None
            during_stream = True
        else:
            status = exc.status_code
            retryable = status in _RETRYABLE_STATUSES or status >= 500
        should_retry = headers.get("x-should-retry")
        if should_retry in ("true", "false"):
            retryable = should_retry == "true"
        return LlmError(
            status,
            kind,
            retryable,
            exc.api_message or exc.message,
            during_stream=during_stream,
            retry_after=_retry_after(headers),
            request_id=exc.request_id,
        )
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return LlmError(None, "timeout", True, str(exc), during_stream=during_stream)
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return LlmError(None, "connection", True, repr(exc), during_stream=during_stream)
    return LlmError(None, "protocol", False, repr(exc), during_stream=during_stream)


_MAPPED_ERRORS = (anthropic.APIError, httpx2.TransportError)


class ClaudeReply:
    """One streamed reply: iterate it for ``TextDelta``; the rest is filled in as it arrives.

    After iteration ends: ``tool_calls`` (in order), ``stop_reason``, ``usage``, ``text``.
    If the turn is cancelled part-way these hold what had arrived by then. A response that
    ends without ``message_stop`` (cut off) raises ``LlmError(kind="incomplete_stream")``.
    """

    def __init__(
        self,
        sdk_stream: Any,
        on_usage: UsageHook | None = None,
        usage_sink: UsageSink | None = None,
    ) -> None:
        self._sdk_stream = sdk_stream
        self._on_usage = on_usage
        self._usage_sink = usage_sink
        self._blocks: list[dict[str, Any]] = []
        self._text_parts: list[str] = []
        self._usage = LlmUsage()
        self.tool_calls: list[ToolCall] = []
        self.stop_reason: str | None = None
        self.done = False
        self._message_stopped = False

    @property
    def request_id(self) -> str | None:
        return self._sdk_stream.request_id

    @property
    def text(self) -> str:
        """All text received so far."""
        return "".join(self._text_parts)

    @property
    def usage(self) -> LlmUsage:
        return self._usage

    def assistant_content(self) -> list[dict[str, Any]]:
        """The completed content blocks as request params, for the next turn's history.

        Text, tool_use and thinking blocks (thinking must be sent back with tool results).
        """
        return list(self._blocks)

    def __aiter__(self) -> ClaudeReply:
        return self

    async def __anext__(self) -> TextDelta:
        while True:
            try:
                # __anext__ directly: __aiter__ would add a generator of our own that a
                # cancelled turn leaves suspended until garbage collection.
                event = await self._sdk_stream.__anext__()
            except StopAsyncIteration:
                if not self._message_stopped:
                    # The body ended without message_stop: a cut-off response.
                    raise LlmError(
                        None,
                        "incomplete_stream",
                        True,
                        "stream ended before message_stop",
                        during_stream=True,
                        request_id=self.request_id,
                    ) from None
                self.done = True
                raise
            except _MAPPED_ERRORS as exc:
                raise llm_error_from(exc, during_stream=True) from exc
            delta = self._handle(event)
            if delta is not None:
                return delta

    def _handle(self, event: Any) -> TextDelta | None:
        kind = event.type
        if kind == "text":
            self._text_parts.append(event.text)
            return TextDelta(event.text)
        if kind == "content_block_stop":
            self._finish_block(event.content_block)
        elif kind == "message_start":
            self._add_usage(event.message.usage)
        elif kind == "message_delta":
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            self._add_usage(event.usage)
        elif kind == "message_stop":
            self._message_stopped = True
        return None

    def _finish_block(self, block: Any) -> None:
        if block.type == "text":
            self._blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            call = ToolCall(name=block.name, input=dict(block.input or {}), id=block.id)
            self.tool_calls.append(call)
            self._blocks.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}
            )
        elif block.type == "thinking":
            self._blocks.append(
                {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
            )

    def _add_usage(self, usage: Any) -> None:
        # message_start carries the input side; message_delta carries cumulative counts
        # and may repeat the input side. Later non-null values win.
        old = self._usage

        def pick(name: str, current: int) -> int:
            value = getattr(usage, name, None)
            return current if value is None else int(value)

        self._usage = new = LlmUsage(
            input_tokens=pick("input_tokens", old.input_tokens),
            output_tokens=pick("output_tokens", old.output_tokens),
            cache_read_input_tokens=pick("cache_read_input_tokens", old.cache_read_input_tokens),
            cache_creation_input_tokens=pick(
                "cache_creation_input_tokens", old.cache_creation_input_tokens
            ),
        )
        # As it arrives: a reply cut off by barge-in or hang-up still counts its tokens.
        if self._on_usage is not None:
            self._on_usage(
                new.total_input_tokens - old.total_input_tokens,
                new.output_tokens - old.output_tokens,
            )
        if self._usage_sink is not None:
            self._usage_sink(new - old)


class ClaudeClient:
    """An ``AsyncAnthropic`` client configured for phone turns; close it (``async with``).

    ``timeout`` bounds each request (and each wait for the next streamed chunk);
    ``connect_timeout`` is kept short so a dead endpoint fails fast. ``thinking`` is sent
    as given when set (e.g. ``{"type": "disabled"}`` for lowest latency on models that
    think by default). ``usage_sink`` is told every usage report of every reply, split into
    uncached input, cache reads, cache writes and output, exactly as the API reported them.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        max_tokens: int = 300,
        timeout: float = 15.0,
        connect_timeout: float = 3.0,
        max_retries: int = 0,
        thinking: Mapping[str, Any] | None = None,
        usage_sink: UsageSink | None = None,
    ) -> None:
        self.model = model
        self._usage_sink = usage_sink
        self.max_tokens = max_tokens
        self._thinking = dict(thinking) if thinking is not None else None
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=httpx2.Timeout(timeout, connect=min(connect_timeout, timeout)),
            max_retries=max_retries,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (the SDK's own cleanup relies on asyncio, not Trio)."""
        await self._sdk.close()

    @asynccontextmanager
    async def stream_reply(
        self,
        system: str | Sequence[Mapping[str, Any]],
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        max_tokens: int | None = None,
        on_usage: UsageHook | None = None,
    ) -> AsyncIterator[ClaudeReply]:
        """Start a streamed reply and yield a ``ClaudeReply`` to iterate.

        ``system`` may be a string or a list of text blocks (put ``cache_control`` on them
        for prompt caching). ``on_usage`` is told token usage as the stream reports it
        (``message_start``, ``message_delta``). Errors before the first byte are raised on
        entry, errors mid-stream from the iteration; both as ``LlmError``. Leaving the block, including
        by cancellation on barge-in, closes the HTTP response at once; the client stays
        usable.
        """
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens or self.max_tokens,
            "messages": list(messages),
        }
        if system:
            params["system"] = system if isinstance(system, str) else list(system)
        if tools:
            params["tools"] = list(tools)
        if self._thinking is not None:
            params["thinking"] = self._thinking
        entered = False
        try:
            async with self._sdk.messages.stream(**params) as sdk_stream:
                entered = True
                yield ClaudeReply(sdk_stream, on_usage, self._usage_sink)
        except _MAPPED_ERRORS as exc:
            if entered:
                raise
            raise llm_error_from(exc) from exc
