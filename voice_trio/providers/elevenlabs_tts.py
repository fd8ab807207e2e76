"""ElevenLabs streaming text-to-speech over the WebSocket ``stream-input`` protocol.

Same shape as :class:`voice_trio.providers.deepgram.tts.DeepgramTTS`, so the call layer can
use either: ``synthesize(text)`` is an async context manager yielding an async iterator of
raw mu-law 8 kHz chunks (``output_format=ulaw_8000``: no transcoding, no container).

One socket per ``synthesize`` call: the text of a whole sentence goes out at once, followed
by end-of-input (``{"text": ""}``), and the server answers with the audio, ``isFinal`` and
a close. That costs a WebSocket handshake per sentence, but a socket never outlives the
sentence it speaks, so a barge-in never leaves half-spoken text queued on a shared
connection and the 20-second inactivity timer never matters. The wire format lives in pure
functions (``stream_input_url``, ``parse_server_message``); the socket code is thin.

Reference: docs/protocols/elevenlabs.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio_websocket

from voice_trio import compat
from voice_trio.compat.trio_websocket import close_transport
from voice_trio.providers.deepgram.tts import TtsError

compat.apply()

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
DEFAULT_MODEL = "eleven_flash_v2_5"
OUTPUT_FORMAT = "ulaw_8000"
END_OF_INPUT = json.dumps({"text": ""})

# Errors that another attempt may well get past; everything else (a bad key, an exhausted
# quota, a malformed message) will fail the same way again.
_TRANSIENT_ERRORS = frozenset({"timeout", "transport", "input_timeout_exceeded", "system_busy"})
_TRANSIENT_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
# A server close after end-of-input that still counts as a normal end (1005: no code given).
_NORMAL_CLOSE_CODES = frozenset({1000, 1005})
# Audio messages waiting for the consumer inside trio-websocket; when full, it stops reading
# the socket and TCP back-pressure reaches the server. Messages are never dropped.
_MESSAGE_QUEUE_SIZE = 16
# One base64 audio message is a few kB; allow generous generations (trio-websocket's
# default limit is 1 MiB and closes the socket 1009 above it).
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ElevenLabsError(TtsError):
    """A failed ElevenLabs synthesis; a :class:`TtsError`, so callers catch one type.

    ``status`` is the HTTP status when the WebSocket upgrade itself was refused, else None.
    ``err_code`` is ElevenLabs' ``error`` (``invalid_api_key``, ``input_timeout_exceeded``,
    ``quota_exceeded``, ...) or ``detail.status`` of a refused upgrade; ``"timeout"`` and
    ``"transport"`` mean no usable answer; ``"closed"`` an unexplained close.
    ``close_code`` is the WebSocket close code when the server closed the socket.
    """

    def __init__(
        self,
        status: int | None,
        err_code: str | None,
        err_msg: str,
        *,
        close_code: int | None = None,
    ) -> None:
        super().__init__(status, err_code, err_msg)
        where = f"HTTP {status}" if status is not None else f"close {close_code or '-'}"
        self.args = (f"ElevenLabs TTS failed ({where}): {err_code or ''} {err_msg}".strip(),)
        self.close_code = close_code

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status == 429 or self.status >= 500
        if self.err_code in _TRANSIENT_ERRORS:
            return True
        return self.err_code == "closed" and self.close_code in _TRANSIENT_CLOSE_CODES


@dataclass(frozen=True, slots=True)
class AudioMessage:
    """One server message carrying audio (already base64-decoded)."""

    audio: bytes
    alignment_chars: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FinalMessage:
    """``{"isFinal": true}``: no audio follows for this socket."""


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """``{"message": ..., "error": ..., "code": ...}``: the server is about to close."""

    error: str
    message: str
    code: int | None


ServerMessage = AudioMessage | FinalMessage | ErrorMessage


def stream_input_url(
    base_url: str,
    voice_id: str,
    *,
    model_id: str = DEFAULT_MODEL,
    output_format: str = OUTPUT_FORMAT,
    language_code: str | None = None,
    auto_mode: bool = True,
    extra_params: tuple[tuple[str, str], ...] = (),
) -> str:
    """``ws(s)://<host>/v1/text-to-speech/<voice>/stream-input?model_id=..&output_format=..``.

    ``http(s)://`` bases become ``ws(s)://``. ``auto_mode=true`` is what ElevenLabs
    recommends when every message is a whole sentence, as here: no chunk schedule to wait
    for. ``language_code`` is only accepted by the v2.5 Flash/Turbo models.
    """
    if not voice_id:
        raise ValueError("voice_id must not be empty")
    scheme, sep, rest = base_url.rstrip("/").partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if not sep or scheme not in ("ws", "wss"):
        raise ValueError(f"TTS base URL must be ws(s):// or http(s)://, got {base_url!r}")
    params = [("model_id", model_id), ("output_format", output_format)]
    if language_code:
        params.append(("language_code", language_code))
    params.append(("auto_mode", "true" if auto_mode else "false"))
    params += extra_params
    voice = urllib.parse.quote(voice_id, safe="")
    query = urllib.parse.urlencode(params)
    return f"{scheme}://{rest}/v1/text-to-speech/{voice}/stream-input?{query}"


def initial_message(voice_settings: Mapping[str, Any] | None = None) -> str:
    """The first message: a single space, plus voice settings (allowed only here)."""
    message: dict[str, Any] = {"text": " "}
    if voice_settings:
        message["voice_settings"] = dict(voice_settings)
    return json.dumps(message)


def text_message(text: str) -> str:
    """Text to speak, ending in the single space the protocol asks for, flushed at once."""
    if not text.endswith(" "):
        text += " "
    return json.dumps({"text": text, "flush": True})


def _alignment_chars(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict) and isinstance(value.get("chars"), list):
        return tuple(c for c in value["chars"] if isinstance(c, str))
    return ()


def parse_server_message(raw: str | bytes) -> ServerMessage | None:
    """Classify one server frame; ``None`` for frames this client does not understand.

    Tolerant by design: keys may be absent or null (``isFinal`` is null on audio messages,
    ``audio`` is null on the final one), and unknown keys are ignored. An ``error`` key
    wins over everything else; a message may carry audio and ``isFinal`` only in theory,
    so audio is returned first and the final flag is looked at when there is no audio.
    """
    if isinstance(raw, bytes):
        return None
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    error = decoded.get("error")
    if error:
        message = decoded.get("message")
        code = decoded.get("code")
        return ErrorMessage(
            error=str(error),
            message=message if isinstance(message, str) else str(error),
            code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        )
    audio = decoded.get("audio")
    if isinstance(audio, str) and audio:
        try:
            chunk = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            return None
        alignment = decoded.get("alignment") or decoded.get("normalizedAlignment")
        return AudioMessage(chunk, _alignment_chars(alignment))
    if decoded.get("isFinal") is True:
        return FinalMessage()
    return None


def parse_rejection(status: int, body: bytes | None) -> ElevenLabsError:
    """A refused upgrade: REST-style ``{"detail": {"status", "message"}}`` when present."""
    text = (body or b"").decode("utf-8", "replace").strip()[:500]
    err_code: str | None = None
    err_msg = text or "WebSocket upgrade refused"
    try:
        decoded: Any = json.loads(body or b"")
    except ValueError:
        decoded = None
    detail = decoded.get("detail") if isinstance(decoded, dict) else None
    if isinstance(detail, dict):
        if isinstance(detail.get("status"), str):
            err_code = detail["status"]
        if isinstance(detail.get("message"), str):
            err_msg = detail["message"]
    elif isinstance(detail, str):
        err_msg = detail
    return ElevenLabsError(status, err_code, err_msg)


def _closed_error(reason: trio_websocket.CloseReason | None) -> ElevenLabsError:
    code = reason.code if reason is not None else 1006
    text = (reason.reason if reason is not None else None) or "connection closed"
    return ElevenLabsError(None, "closed", text, close_code=code)


class ElevenLabsAudio:
    """The audio of one ``synthesize`` call: an async iterator of mu-law chunks.

    Ends after ``isFinal`` (or a normal close after end-of-input). An error message or an
    abnormal close raises :class:`ElevenLabsError` after the audio received before it.
    Valid only inside the ``synthesize`` block that produced it.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection | None) -> None:
        self._ws = ws
        self.request_id: str | None = None  # ElevenLabs sends none on this socket
        self.bytes_received = 0
        self.spoken: list[str] = []  # characters from the alignment, when the server sends it
        self.finished = ws is None

    def __aiter__(self) -> ElevenLabsAudio:
        return self

    async def __anext__(self) -> bytes:
        while not self.finished and self._ws is not None:
            try:
                raw = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.finished = True
                reason = exc.reason
                if reason is not None and reason.code in _NORMAL_CLOSE_CODES:
                    break
                raise _closed_error(reason) from None
            message = parse_server_message(raw)
            if isinstance(message, AudioMessage):
                self.spoken.extend(message.alignment_chars)
                self.bytes_received += len(message.audio)
                return message.audio
            if isinstance(message, FinalMessage):
                self.finished = True
            elif isinstance(message, ErrorMessage):
                self.finished = True
                raise ElevenLabsError(None, message.error, message.message, close_code=message.code)
            elif message is None:
                logger.debug("ignored an ElevenLabs message: %.200r", raw)
        raise StopAsyncIteration


class ElevenLabsTTS:
    """ElevenLabs ``stream-input`` client; one WebSocket per :meth:`synthesize` call."""

    def __init__(
        self,
        *,
        api_key: str,
        voice_id: str,
        base_url: str = DEFAULT_BASE_URL,
        model_id: str = DEFAULT_MODEL,
        language_code: str | None = None,
        voice_settings: Mapping[str, Any] | None = None,
        connect_timeout: float = 5.0,
        disconnect_timeout: float = 2.0,
    ) -> None:
        self._api_key = api_key
        self.voice_id = voice_id
        self.model_id = model_id
        self.url = stream_input_url(
            base_url, voice_id, model_id=model_id, language_code=language_code
        )
        self._voice_settings = dict(voice_settings) if voice_settings else None
        self._connect_timeout = connect_timeout
        self._disconnect_timeout = disconnect_timeout
        self.characters_sent = 0
        self.requests = 0

    @asynccontextmanager
    async def synthesize(self, text: str) -> AsyncIterator[ElevenLabsAudio]:
        """Speak ``text`` and yield its audio as an async iterator of chunks::

            async with tts.synthesize("Hola.") as audio:
                async for chunk in audio:
                    ...

        The key goes in the ``xi-api-key`` upgrade header; the whole text, then end-of-input,
        are sent before the block is entered. A refused upgrade or an unreachable server
        raise :class:`ElevenLabsError` on entry; an error message or an abnormal close
        (a bad key is reported that way, after the upgrade) come out of the iteration. Leaving the block closes the socket at once: when the
        consumer is cancelled (barge-in) the TCP connection is dropped without waiting for a
        close handshake. Text that is empty after stripping yields no audio and opens no
        socket. ``characters_sent`` counts the text of every sent request.
        """
        if not text.strip():
            yield ElevenLabsAudio(None)
            return
        self.requests += 1
        headers = [(b"xi-api-key", self._api_key.encode())]
        ws_opened: trio_websocket.WebSocketConnection | None = None
        body_error: BaseException | None = None
        try:
            async with trio_websocket.open_websocket_url(
                self.url,
                extra_headers=headers,
                message_queue_size=_MESSAGE_QUEUE_SIZE,
                max_message_size=_MAX_MESSAGE_BYTES,
                connect_timeout=self._connect_timeout,
                disconnect_timeout=self._disconnect_timeout,
            ) as ws:
                ws_opened = ws
                try:
                    await ws.send_message(initial_message(self._voice_settings))
                    await ws.send_message(text_message(text))
                    await ws.send_message(END_OF_INPUT)
                except trio_websocket.ConnectionClosed:
                    # Closed before we finished talking: the reason (an error message or
                    # a close code) is what the iteration reports.
                    pass
                else:
                    self.characters_sent += len(text)
                try:
                    yield ElevenLabsAudio(ws)
                except BaseException as exc:
                    body_error = exc
                    raise
        except trio_websocket.ConnectionRejected as exc:
            if ws_opened is not None:
                raise
            # The refused upgrade's socket is already closed (compat.trio_websocket).
            raise parse_rejection(exc.status_code, exc.body) from None
        except trio_websocket.DisconnectionTimeout:
            # The server never answered our close frame; the stream is closed regardless, so
            # this is no error of its own, but it must not hide the block's exception.
            logger.debug("ElevenLabs did not complete the close handshake in time")
            if body_error is not None:
                raise body_error from None
        except trio_websocket.HandshakeError as exc:
            if ws_opened is not None:
                raise
            kind = "timeout" if isinstance(exc, trio_websocket.ConnectionTimeout) else "transport"
            cause = exc.__cause__ or exc
            raise ElevenLabsError(None, kind, f"cannot connect to {self.url}: {cause!r}") from exc
        finally:
            if ws_opened is not None:
                # trio-websocket leaves the socket open when ElevenLabs closed first.
                await close_transport(ws_opened)
