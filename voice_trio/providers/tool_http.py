"""The request to an operator's HTTP tool: signed, bounded, and always an answer for Claude.

docs/tools.md is the contract. ``POST`` the JSON body to the tool's endpoint with
``X-Voice-Trio-Timestamp``, ``X-Voice-Trio-Signature`` (``v1=`` + HMAC-SHA256 of
``timestamp.body`` with ``TOOLS_SECRET``) and ``X-Voice-Trio-Tool-Call`` (Claude's id, the
same on a retry). Whatever happens becomes a :class:`ToolOutcome`: a 2xx JSON answer is the
result; anything else (timeout, refused connection, non-2xx, a body that is not JSON) is an
error result with a short reason. The answer Claude sees is cut to ``max_chars``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from voice_trio.tools_file import HttpToolSpec

TIMESTAMP_HEADER = "X-Voice-Trio-Timestamp"
SIGNATURE_HEADER = "X-Voice-Trio-Signature"
TOOL_CALL_HEADER = "X-Voice-Trio-Tool-Call"
ERROR_BODY_CHARS = 300  # of a non-2xx answer, in the error Claude is given
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # read no more of an answer than this
MIN_RETRY_LEFT_S = 0.25  # no second attempt with less than this left of the timeout


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    message = str(timestamp).encode() + b"." + body
    return "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """How one tool request ended, and what Claude is told of it."""

    status: str  # ok | error | timeout
    content: str  # the tool_result content: the JSON answer, or the error as JSON
    http_status: int | None  # None: no answer came
    latency_ms: float
    attempts: int = 1

    @property
    def is_error(self) -> bool:
        return self.status != "ok"


def cut(text: str, max_chars: int) -> str:
    """``text``, or its first ``max_chars`` characters marked as cut."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}…[truncated {len(text) - max_chars} characters]"


class ToolClient:
    """Sends tool requests over the instance's shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, secret: str, max_chars: int) -> None:
        self.http = http
        self.secret = secret
        self.max_chars = max_chars

    async def call(self, tool: HttpToolSpec, body: dict[str, Any], tool_use_id: str) -> ToolOutcome:
        """One tool request, retried once (if the tool allows it) after a connection error
        or a 5xx while its timeout leaves room; never raises for what the endpoint does."""
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        started = time.monotonic()
        deadline = trio.current_time() + tool.timeout
        attempts = 0
        outcome: ToolOutcome | None = None
        while True:
            attempts += 1
            with trio.move_on_at(deadline):
                outcome = await self._attempt(tool, raw, tool_use_id, started, attempts)
            if outcome is None:
                error = {"error": "timeout", "after_s": tool.timeout}
                return self._error("timeout", error, None, started, attempts)
            left = deadline - trio.current_time()
            retryable = outcome.http_status is None or outcome.http_status >= 500
            if not (outcome.is_error and retryable and tool.retry and attempts == 1):
                return outcome
            if left < MIN_RETRY_LEFT_S:
                return outcome

    async def _attempt(
        self, tool: HttpToolSpec, raw: bytes, tool_use_id: str, started: float, attempts: int
    ) -> ToolOutcome:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, raw),
            TOOL_CALL_HEADER: tool_use_id,
        }
        try:
            # The deadline is the caller's (trio.move_on_at); httpx's own stays out of it.
            request = self.http.build_request(
                "POST", tool.endpoint, content=raw, headers=headers, timeout=None
            )
            response = await self.http.send(request, stream=True)
            try:
                body = await _read_at_most(response, MAX_ANSWER_BYTES)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            error = {"error": "no answer", "detail": type(exc).__name__}
            return self._error("error", error, None, started, attempts)
        status = response.status_code
        if body is None:
            error = {"error": f"the answer is larger than {MAX_ANSWER_BYTES} bytes"}
            return self._error("error", error, status, started, attempts)
        shown = body[:ERROR_BODY_CHARS].decode("utf-8", "replace")
        if not 200 <= status < 300:
            error = {"error": f"http {status}", "body": shown}
            return self._error("error", error, status, started, attempts)
        try:
            answer = json.loads(body)
        except ValueError:
            error = {"error": "the answer was not JSON", "body": shown}
            return self._error("error", error, status, started, attempts)
        text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        return ToolOutcome("ok", cut(text, self.max_chars), status, _ms_since(started), attempts)

    def _error(
        self,
        status: str,
        error: dict[str, Any],
        http_status: int | None,
        started: float,
        attempts: int,
    ) -> ToolOutcome:
        text = json.dumps(error, ensure_ascii=False)
        return ToolOutcome(
            status, cut(text, self.max_chars), http_status, _ms_since(started), attempts
        )


async def _read_at_most(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000
