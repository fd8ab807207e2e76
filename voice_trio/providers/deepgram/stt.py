"""Deepgram live speech-to-text (``/v1/listen``) over the lean WebSocket client
(``wire/ws_client.py``: no task of its own, one ``send_all`` per frame).

The wire format lives in pure functions (``listen_url``, ``parse_stt_message``); the socket
code around them is thin. Two ways to hold one Deepgram connection:

- ``open_stt`` serves it with one task of its own (the socket has none): it
  reads and parses the socket into a queue for ``events()`` and, with a deadline on that
  read, sends a KeepAlive whenever nothing was sent for ``keepalive_interval``. It ends
  with the ``async with`` block.
- ``connect_stt`` adds no task: ``events()`` reads the socket in the consumer's own task,
  and keeping the socket alive is the caller's (``keep_alive()``). The reconnecting
  ``SttLink`` uses it: its reader and its audio pump already wait on what those tasks did.

Reference: shared/docs/protocols/deepgram.md, part A.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from voice_trio.observability import WIRE
from voice_trio.wire.ws_client import (
    ClientWebSocket,
    HandshakeFailed,
    HandshakeRejected,
    WebSocketClosed,
    connect,
    header,
)

logger = logging.getLogger(__name__)

KEEPALIVE = json.dumps({"type": "KeepAlive"})
FINALIZE = json.dumps({"type": "Finalize"})
CLOSE_STREAM = json.dumps({"type": "CloseStream"})

# Close codes that end the event stream without an error: 1000 is what Deepgram sends after
# CloseStream; 1005 is a close frame without a code, which is still a polite close.
_NORMAL_CLOSE_CODES = frozenset({1000, 1005})

# Parsed events waiting for the consumer. When full, the reader stops reading the socket and
# TCP back-pressure reaches Deepgram; events are never dropped.
_EVENT_QUEUE_SIZE = 64

# A server message above this closes the socket with 1009 (a Results is a kilobyte or two).
MAX_MESSAGE_BYTES = 1 << 20

# Bytes per sample per channel for the raw encodings; compressed ones have no fixed rate.
_BYTES_PER_SAMPLE = {"mulaw": 1, "alaw": 1, "linear16": 2, "linear32": 4}


class SttError(Exception):
    """Base class of everything this module raises about the STT service."""


class SttProtocolError(SttError):
    """A message from the server that is not valid JSON or lacks a required field."""


class SttRejected(SttError):
    """The server refused the WebSocket upgrade with an HTTP status (401 bad key, 400 ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"Deepgram rejected the connection: HTTP {status} {reason}".rstrip())
        self.status = status
        self.reason = reason


class SttUnavailable(SttError):
    """The server could not be reached: DNS, TCP, TLS or handshake timeout."""


class SttClosed(SttError):
    """The socket closed abnormally (e.g. 1011 ``NET-0001``, 1006 dropped TCP)."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"Deepgram closed the stream: {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SttOptions:
    """Query options for ``/v1/listen``; defaults suit 8 kHz mu-law Spanish phone audio.

    ``endpointing_ms=None`` sends ``endpointing=false``; ``utterance_end_ms=None`` leaves
    UtteranceEnd off. ``extra_params`` are appended verbatim (``no_delay``, ``keyterm``, ...).
    """

    model: str = "nova-3"
    language: str = "es"
    encoding: str = "mulaw"
    sample_rate: int = 8000
    channels: int = 1
    interim_results: bool = True
    endpointing_ms: int | None = 300
    utterance_end_ms: int | None = 1000
    vad_events: bool = True
    punctuate: bool = True
    smart_format: bool = False
    extra_params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.utterance_end_ms is not None and not self.interim_results:
            raise ValueError("utterance_end_ms needs interim_results=True (Deepgram rule)")
        if self.sample_rate <= 0 or self.channels <= 0:
            raise ValueError("sample_rate and channels must be positive")


@dataclass(frozen=True, slots=True)
class Transcript:
    """One ``Results`` message: the best alternative of a (possibly interim) segment.

    ``words`` holds ``punctuated_word`` where present, else ``word``, so it matches ``text``.
    """

    text: str
    confidence: float
    is_final: bool
    speech_final: bool
    from_finalize: bool
    start: float
    duration: float
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    timestamp: float


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    last_word_end: float


@dataclass(frozen=True, slots=True)
class SttMetadata:
    request_id: str
    duration: float


SttEvent = Transcript | SpeechStarted | UtteranceEnd | SttMetadata


def _bool(value: bool) -> str:
    return "true" if value else "false"


def listen_url(base_url: str, opts: SttOptions) -> str:
    """Build ``<base>/v1/listen?...`` for ``opts``; ``http(s)://`` bases become ``ws(s)://``."""
    base = base_url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if not sep or scheme not in ("ws", "wss"):
        raise ValueError(f"STT base URL must be ws(s):// or http(s)://, got {base_url!r}")
    params: list[tuple[str, str]] = [
        ("model", opts.model),
        ("language", opts.language),
        ("encoding", opts.encoding),
        ("sample_rate", str(opts.sample_rate)),
        ("channels", str(opts.channels)),
        ("interim_results", _bool(opts.interim_results)),
        (
            "endpointing",
            "false" if opts.endpointing_ms is None else str(opts.endpointing_ms),
        ),
    ]
    if opts.utterance_end_ms is not None:
        params.append(("utterance_end_ms", str(opts.utterance_end_ms)))
    params += [
        ("vad_events", _bool(opts.vad_events)),
        ("punctuate", _bool(opts.punctuate)),
        ("smart_format", _bool(opts.smart_format)),
        *opts.extra_params,
    ]
    return f"{scheme}://{rest}/v1/listen?{urllib.parse.urlencode(params)}"


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise SttProtocolError(f"{where}: missing field {key!r}")
    return obj[key]


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SttProtocolError(f"{where}: field {key!r} must be a number, got {value!r}")
    return float(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SttProtocolError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SttProtocolError(f"{where}: field {key!r} must be a boolean, got {value!r}")
    return value


def _parse_results(msg: dict[str, Any]) -> Transcript:
    where = "Results"
    channel = _object(_field(msg, "channel", where), "Results.channel")
    alternatives = _field(channel, "alternatives", "Results.channel")
    if not isinstance(alternatives, list):
        raise SttProtocolError("Results.channel.alternatives must be a list")
    text, confidence = "", 0.0
    words: tuple[str, ...] = ()
    if alternatives:
        alt = _object(alternatives[0], "Results.channel.alternatives[0]")
        alt_where = "Results alternative"
        text = _field(alt, "transcript", alt_where)
        if not isinstance(text, str):
            raise SttProtocolError(f"{alt_where}: transcript must be a string")
        confidence = _number(alt, "confidence", alt_where)
        raw_words = _field(alt, "words", alt_where)
        if not isinstance(raw_words, list):
            raise SttProtocolError(f"{alt_where}: words must be a list")
        word_list: list[str] = []
        for raw in raw_words:
            word = _object(raw, "Results word")
            token = word.get("punctuated_word") or _field(word, "word", "Results word")
            if not isinstance(token, str):
                raise SttProtocolError(f"Results word must be a string, got {token!r}")
            word_list.append(token)
        words = tuple(word_list)
    return Transcript(
        text=text,
        confidence=confidence,
        is_final=_flag(msg, "is_final", where),
        speech_final=_flag(msg, "speech_final", where),
        from_finalize=_flag(msg, "from_finalize", where),
        start=_number(msg, "start", where),
        duration=_number(msg, "duration", where),
        words=words,
    )


def _parse_metadata(msg: dict[str, Any]) -> SttMetadata:
    request_id = _field(msg, "request_id", "Metadata")
    if not isinstance(request_id, str):
        raise SttProtocolError("Metadata: request_id must be a string")
    return SttMetadata(request_id=request_id, duration=_number(msg, "duration", "Metadata"))


def parse_stt_message(text: str) -> SttEvent | None:
    """Parse one server text frame; ``None`` for message types this client ignores.

    Extra keys are tolerated everywhere (the service adds fields within an API version);
    a frame that is not JSON, not an object, or lacks a required field raises
    ``SttProtocolError`` naming what is wrong.
    """
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SttProtocolError(f"not JSON: {exc}") from None
    msg = _object(decoded, "STT message")
    kind = _field(msg, "type", "STT message")
    if kind == "Results":
        return _parse_results(msg)
    if kind == "SpeechStarted":
        return SpeechStarted(timestamp=_number(msg, "timestamp", "SpeechStarted"))
    if kind == "UtteranceEnd":
        return UtteranceEnd(last_word_end=_number(msg, "last_word_end", "UtteranceEnd"))
    if kind == "Metadata":
        return _parse_metadata(msg)
    return None


class _EventIterator:
    """Async iterator over the parsed events; a plain class, so dropping it early is free."""

    def __init__(self, stream: SttStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> SttEvent:
        stream = self._stream
        queue = stream._event_recv
        event: SttEvent | None = None
        if queue is None:
            event = await stream._receive()
        else:
            try:
                event = await queue.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                pass
        if event is not None:
            return event
        if stream._close_error is not None:
            raise stream._close_error from None
        raise StopAsyncIteration


class SttStream:
    """One open Deepgram live-transcription socket; obtained from ``open_stt``.

    Sending (``send_audio``, ``finalize``, ``keep_alive``, ``close_stream``) may happen from
    any task; events are read by a single consumer through ``events()``.
    """

    def __init__(self, ws: ClientWebSocket, opts: SttOptions) -> None:
        self._ws = ws
        self._opts = opts
        # Set by open_stt, whose task fills it; without it events() reads the socket.
        self._event_recv: trio.MemoryReceiveChannel[SttEvent] | None = None
        self._last_send = trio.current_time()
        self._closing = False
        self._closed = trio.Event()
        self._close_error: SttClosed | None = None
        self.request_id: str | None = header(ws.headers, "dg-request-id")
        self.audio_bytes_sent = 0
        self.keepalives_sent = 0
        self.dropped_messages = 0
        self.metadata: SttMetadata | None = None
        self.close_code: int | None = None

    @property
    def audio_seconds(self) -> float | None:
        """Seconds of audio sent (what Deepgram bills); ``None`` for compressed encodings."""
        width = _BYTES_PER_SAMPLE.get(self._opts.encoding)
        if width is None:
            return None
        return self.audio_bytes_sent / (width * self._opts.sample_rate * self._opts.channels)

    @property
    def closed(self) -> bool:
        """True once the server closed the socket (normally or not) and that was read."""
        return self._closed.is_set()

    @property
    def last_send(self) -> float:
        """When something (audio or a control message) last went out (Trio clock)."""
        return self._last_send

    def events(self) -> AsyncIterator[SttEvent]:
        """Parsed events in arrival order, for a single consumer.

        Iteration ends when the socket closes normally (1000 after ``close_stream``) or when
        the ``open_stt`` block exits. Any other close is raised as ``SttClosed(code, reason)``
        after the events received before it have been delivered. From ``connect_stt`` the
        socket is read only here: the close is seen (and ``close_stream`` returns) only
        while someone iterates.
        """
        return _EventIterator(self)

    async def send_audio(self, chunk: bytes) -> None:
        """Send one binary audio frame; empty chunks are skipped (Deepgram closes on them).

        After ``close_stream()`` audio is ignored: frames racing a hang-up are harmless.
        Raises ``SttClosed`` if the socket has closed under us.
        """
        if not chunk or self._closing:
            return
        await self._send(chunk if type(chunk) is bytes else bytes(chunk))
        self.audio_bytes_sent += len(chunk)

    async def finalize(self) -> None:
        """Ask Deepgram to flush buffered audio now (results may carry ``from_finalize``)."""
        await self._send(FINALIZE)

    async def keep_alive(self) -> None:
        """Send a KeepAlive: Deepgram closes a stream that got nothing for 10 s (§A4)."""
        await self._send(KEEPALIVE)
        self.keepalives_sent += 1

    async def close_stream(self, timeout: float = 5.0) -> SttMetadata | None:
        """Send CloseStream and wait up to ``timeout`` s for the server to finish and close.

        Final Results and the Metadata summary still reach ``events()``. Returns the
        Metadata if it arrived. Calling it again only waits again.
        """
        if not self._closing and not self._closed.is_set():
            self._closing = True
            try:
                await self._send(CLOSE_STREAM)
            except SttClosed:
                pass
        with trio.move_on_after(timeout):
            await self._closed.wait()
        return self.metadata

    async def _send(self, message: str | bytes) -> None:
        try:
            await self._ws.send(message)
        except WebSocketClosed as exc:
            raise SttClosed(exc.code, exc.reason) from None
        WIRE.stt_out += 1
        self._last_send = trio.current_time()

    async def _receive(self) -> SttEvent | None:
        """The next event read from the socket; None once it has closed."""
        ws = self._ws
        while not self._closed.is_set():
            message = await ws.receive()
            if message is None:
                self._on_closed(ws.close_code, ws.close_reason)
                return None
            WIRE.stt_in += 1
            event = self._parse(message)
            if event is None:
                continue
            if isinstance(event, SttMetadata):
                self.metadata = event
            return event
        return None

    def _parse(self, message: str | bytes) -> SttEvent | None:
        if isinstance(message, bytes):
            self.dropped_messages += 1
            logger.warning("Deepgram sent an unexpected binary frame (%d bytes)", len(message))
            return None
        try:
            return parse_stt_message(message)
        except SttProtocolError as exc:
            self.dropped_messages += 1
            logger.warning("dropped a malformed Deepgram message: %s", exc)
            return None

    def _on_closed(self, code: int | None, reason: str | None) -> None:
        code = 1006 if code is None else code
        self.close_code = code
        if code not in _NORMAL_CLOSE_CODES:
            self._close_error = SttClosed(code, reason)
            logger.warning("%s", self._close_error)
        self._closed.set()

    async def _serve(
        self, queue: trio.MemorySendChannel[SttEvent], keepalive_interval: float | None
    ) -> None:
        """``open_stt``'s one task: the socket's events into ``queue`` until it closes, and
        a KeepAlive whenever nothing was sent for ``keepalive_interval`` s.

        One deadline covers both waits (for a message, for room in the queue): both can be
        cancelled without losing anything, and an event is held until the queue takes it.
        Deepgram's 10 s NET-0001 timer is reset by any frame, so only idle gaps need one;
        none goes out after CloseStream.
        """
        interval = keepalive_interval if keepalive_interval and keepalive_interval > 0 else None
        held: SttEvent | None = None
        async with queue:
            while True:
                due = math.inf if interval is None or self._closing else self._last_send + interval
                with trio.move_on_at(due):
                    if held is None:
                        held = await self._receive()
                        if held is None:
                            return
                    await queue.send(held)
                    held = None
                    continue
                # The deadline, unless something went out meanwhile and moved it on.
                if (
                    interval
                    and not self._closing
                    and trio.current_time() >= self.last_send + interval
                ):
                    try:
                        await self.keep_alive()
                    except SttClosed:
                        interval = None  # the socket is gone: reading will see its close


def _rejection(exc: HandshakeRejected) -> SttRejected:
    reason = header(exc.headers, "dg-error")
    if reason is None and exc.body:
        reason = exc.body.decode("utf-8", "replace").strip()[:300]
    return SttRejected(exc.status, reason or "")


@asynccontextmanager
async def connect_stt(
    base_url: str,
    api_key: str,
    opts: SttOptions,
    *,
    connect_timeout: float = 5.0,
    disconnect_timeout: float = 2.0,
) -> AsyncIterator[SttStream]:
    """Connect to ``<base_url>/v1/listen`` and yield an ``SttStream`` with no task of its own.

    ``events()`` reads the socket in the task that iterates it, and nothing is sent unless
    the caller sends it: a caller that may leave the socket idle sends ``keep_alive()``
    (``open_stt`` does both for its caller). Raises ``SttRejected(status, reason)`` if the
    upgrade is refused and ``SttUnavailable`` if the server cannot be reached within
    ``connect_timeout``.

    Leaving the block closes the socket (waiting at most ``disconnect_timeout`` s for the
    close handshake). An exception from the block comes out unchanged.
    """
    url = listen_url(base_url, opts)
    try:
        ws = await connect(
            url,
            [("Authorization", f"Token {api_key}")],
            connect_timeout=connect_timeout,
            max_message_size=MAX_MESSAGE_BYTES,
        )
    except HandshakeRejected as exc:
        raise _rejection(exc) from None
    except HandshakeFailed as exc:
        cause = exc.__cause__ or exc
        raise SttUnavailable(f"cannot connect to Deepgram STT at {base_url}: {cause!r}") from exc
    try:
        stream = SttStream(ws, opts)
        logger.debug("connected to Deepgram STT, request id %s", stream.request_id)
        yield stream
    finally:
        # Shielded and bounded: the socket is closed even when the block was cancelled,
        # and the block's exception comes out unchanged.
        await ws.aclose(disconnect_timeout)


@asynccontextmanager
async def open_stt(
    base_url: str,
    api_key: str,
    opts: SttOptions,
    *,
    keepalive_interval: float | None = 4.0,
    connect_timeout: float = 5.0,
    disconnect_timeout: float = 2.0,
) -> AsyncIterator[SttStream]:
    """Connect to ``<base_url>/v1/listen`` and yield an ``SttStream`` served by one task.

    Raises ``SttRejected(status, reason)`` if the upgrade is refused and ``SttUnavailable``
    if the server cannot be reached within ``connect_timeout``. The task reads the socket
    into a queue of ``_EVENT_QUEUE_SIZE`` events (full: it stops reading, and TCP
    back-pressure reaches Deepgram), and sends a KeepAlive text frame whenever nothing was
    sent for ``keepalive_interval`` s (``None`` turns that off).

    Leaving the block stops the task and closes the socket (waiting at most
    ``disconnect_timeout`` s for the close handshake). Pending results are not waited for:
    call ``close_stream()`` first for that. An exception from the block comes out
    unchanged, not wrapped in an exception group.
    """
    body_error: BaseException | None = None
    async with connect_stt(
        base_url,
        api_key,
        opts,
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
    ) as stream:
        queue, stream._event_recv = trio.open_memory_channel[SttEvent](_EVENT_QUEUE_SIZE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream._serve, queue, keepalive_interval)
            try:
                yield stream
            except BaseException as exc:
                # Re-raised outside the nursery so the caller gets its own exception
                # back rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
