"""Deepgram Aura text-to-speech over REST streaming (``POST /v1/speak``) with httpx.

One request per text chunk; the audio comes back chunked as it is generated, raw mu-law
8 kHz (``container=none``: a WAV header would be played as a click).

Reference: shared/docs/protocols/deepgram.md, part B1.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

DEFAULT_VOICE = "aura-2-celeste-es"


class TtsError(Exception):
    """Synthesis failed: an HTTP error status, or ``status=None`` for a transport failure.

    ``err_code``/``err_msg`` come from Deepgram's JSON error body when there is one; for
    transport failures ``err_code`` is ``"timeout"`` or ``"transport"``.
    """

    def __init__(
        self, status: int | None, err_code: str | None, err_msg: str, request_id: str | None = None
    ) -> None:
        where = f"HTTP {status}" if status is not None else "transport"
        super().__init__(f"Deepgram TTS failed ({where}): {err_code or ''} {err_msg}".strip())
        self.status = status
        self.err_code = err_code
        self.err_msg = err_msg
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        """Worth another try: no answer at all, rate limiting, or a server-side failure."""
        return self.status is None or self.status == 429 or self.status >= 500


def speak_url(
    base_url: str,
    model: str,
    *,
    encoding: str = "mulaw",
    sample_rate: int = 8000,
    container: str = "none",
) -> str:
    """Build ``<base>/v1/speak?model=..&encoding=..&sample_rate=..&container=..``."""
    query = urllib.parse.urlencode(
        [
            ("model", model),
            ("encoding", encoding),
            ("sample_rate", str(sample_rate)),
            ("container", container),
        ]
    )
    return f"{base_url.rstrip('/')}/v1/speak?{query}"


def parse_tts_error(status: int, body: bytes, request_id: str | None = None) -> TtsError:
    """Turn an error response into ``TtsError``; tolerant of non-JSON bodies."""
    err_code: str | None = None
    err_msg = body.decode("utf-8", "replace").strip()[:500]
    try:
        decoded: Any = json.loads(body)
    except (ValueError, RecursionError):
        decoded = None
    if isinstance(decoded, dict):
        code = decoded.get("err_code")
        msg = decoded.get("err_msg")
        err_code = code if isinstance(code, str) else None
        if isinstance(msg, str):
            err_msg = msg
        rid = decoded.get("request_id")
        if request_id is None and isinstance(rid, str):
            request_id = rid
    return TtsError(status, err_code, err_msg, request_id)


def _transport_error(exc: httpx.TransportError, request_id: str | None) -> TtsError:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "transport"
    return TtsError(None, kind, repr(exc), request_id)


class TtsAudio:
    """The audio of one request: an async iterator of mu-law chunks as they arrive.

    Valid only inside the ``synthesize`` block that produced it.
    """

    def __init__(self, chunks: AsyncIterator[bytes] | None, request_id: str | None) -> None:
        self._chunks = chunks
        self.request_id = request_id
        self.bytes_received = 0

    def __aiter__(self) -> TtsAudio:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            raise StopAsyncIteration
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.request_id) from exc
            if chunk:
                self.bytes_received += len(chunk)
                return chunk

    async def _aclose(self) -> None:
        if isinstance(self._chunks, AsyncGenerator):
            await self._chunks.aclose()


class DeepgramTTS:
    """Aura REST client over a caller-owned ``httpx.AsyncClient`` (its timeouts apply)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        model: str = DEFAULT_VOICE,
        *,
        encoding: str = "mulaw",
        sample_rate: int = 8000,
    ) -> None:
        self._http = http
        self._api_key = api_key
        self.model = model
        self.url = speak_url(base_url, model, encoding=encoding, sample_rate=sample_rate)
        self.characters_sent = 0
        self.requests = 0

    @asynccontextmanager
    async def synthesize(self, text: str) -> AsyncIterator[TtsAudio]:
        """POST ``text`` and yield its audio as an async iterator of chunks::

            async with tts.synthesize("Hola.") as audio:
                async for chunk in audio:
                    ...

        A context manager rather than a bare async generator so that the HTTP response is
        closed the moment the block is left, also when the consumer is cancelled while
        parked between chunks (barge-in); an abandoned generator would hold the connection
        until garbage collection. The status is checked on entry: a non-200 raises
        ``TtsError`` before any audio. Text that is empty after stripping yields no audio
        and sends no request. ``characters_sent`` counts the text of accepted requests.
        """
        if not text.strip():
            yield TtsAudio(None, None)
            return
        headers = {"Authorization": f"Token {self._api_key}"}
        self.requests += 1
        entered = False
        try:
            async with self._http.stream(
                "POST", self.url, json={"text": text}, headers=headers
            ) as response:
                request_id = response.headers.get("dg-request-id")
                if response.status_code != 200:
                    body = await response.aread()
                    raise parse_tts_error(response.status_code, body, request_id)
                self.characters_sent += len(text)
                audio = TtsAudio(response.aiter_raw(), request_id)
                entered = True
                try:
                    yield audio
                finally:
                    await audio._aclose()
        except httpx.TransportError as exc:
            if entered:
                raise  # from the caller's block, not from this request
            raise _transport_error(exc, None) from exc
