"""The Aura TTS half of the Deepgram simulator: ``/v1/speak`` over REST and over WebSocket.

The "synthesised" audio is simulated speech (:func:`voice_trio.sim.speech.encode_speech`), so
whoever plays it back can decode exactly the text that was spoken. Pacing is wall-clock:
the first chunk leaves ``sim.tts_ttfb_ms`` after the request, the rest at ``sim.tts_speed``
times real time.
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

import trio

from voice_trio.audio import mulaw_to_alaw
from voice_trio.sim.deepgram_stt import DeepgramError, bad_parameter, model_uuid, unknown_model
from voice_trio.sim.speech import encode_speech, silence


class DeepgramSim(Protocol):
    """The TTS side of ``sim.deepgram.DeepgramSim``: its pacing knobs and counters (a
    protocol, so that this module need not import the simulator that serves it)."""

    ms_per_char: int  # TTS speaking rate
    tts_ttfb_ms: float
    tts_speed: float  # generation speed, times real time (inf: no pacing)
    tts_chunk_bytes: int
    tts_flush_limit: int  # per tts_flush_window_s, per socket
    tts_flush_window_s: float
    tts_characters: int  # characters synthesised (REST and socket flushes)


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

SPANISH_VOICES = tuple(
    f"aura-2-{name}-es"
    for name in (
        "agustina alvaro antonia aquila carina celeste diana estrella gloria javier luciano "
        "nestor olivia selena silvia sirio valerio"
    ).split()
)
VOICES = frozenset((*SPANISH_VOICES, "aura-2-thalia-en", "aura-2-helena-en", "aura-asteria-en"))
DEFAULT_VOICE = "aura-asteria-en"
MODEL_VERSION = "2025-04-07.0"
MAX_TEXT_CHARS = 2000
MAX_BODY_BYTES = 2 * 1024 * 1024
_WAV_FORMAT_TAGS = {"mulaw": 7, "alaw": 6}


@dataclass(frozen=True, slots=True)
class SpeakOptions:
    """Voice and output format of one TTS request or socket."""

    model: str = DEFAULT_VOICE
    encoding: str = "mulaw"
    sample_rate: int = 8000
    container: str = "none"

    @classmethod
    def from_query(cls, query_string: bytes, *, websocket: bool) -> SpeakOptions:
        """Validate voice and format; raises :class:`DeepgramError` (400).

        Only mulaw and alaw are produced (the table's 8000/16000 Hz, container wav or
        none); every other encoding Deepgram knows is refused as unsupported *here*.
        """
        params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        model = params.get("model", DEFAULT_VOICE)
        if model not in VOICES:
            raise unknown_model()
        encoding = params.get("encoding")
        if encoding not in _WAV_FORMAT_TAGS:
            raise bad_parameter(
                f"Unsupported audio format: encoding={encoding or '(default)'}; this "
                "simulator only produces mulaw or alaw, so pass encoding explicitly."
            )
        container = "none" if websocket else params.get("container", "wav")
        if container not in ("none", "wav"):
            raise bad_parameter(f"Unsupported audio format: container={container} with {encoding}.")
        rate = params.get("sample_rate", "8000")
        if rate not in ("8000", "16000"):
            raise bad_parameter(f"Unsupported audio format: sample_rate={rate} with {encoding}.")
        return cls(model=model, encoding=encoding, sample_rate=int(rate), container=container)

    @property
    def content_type(self) -> str:
        if self.container == "wav":
            return "audio/wav"
        return f"audio/{self.encoding};rate={self.sample_rate}"

    def render(self, text: str, ms_per_char: int) -> tuple[bytes, bytes]:
        """``(header, audio)`` for ``text``; the header is empty unless container is wav."""
        # Synthesised speech ends with a short pause, as real voices do.
        audio = encode_speech(text, ms_per_char) + silence(TRAILING_SILENCE_MS)
        if self.sample_rate == 16000:  # each sample twice: right length, not decodable
            doubled = bytearray(2 * len(audio))
            doubled[0::2] = audio
            doubled[1::2] = audio
            audio = bytes(doubled)
        if self.encoding == "alaw":
            audio = mulaw_to_alaw(audio)
        if self.container != "wav":
            return b"", audio
        return wav_header(len(audio), self.sample_rate, _WAV_FORMAT_TAGS[self.encoding]), audio


def wav_header(data_bytes: int, sample_rate: int, format_tag: int) -> bytes:
    """The 44-byte RIFF header of mono 8-bit G.711 audio (7 = mu-law, 6 = A-law)."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        format_tag,
        1,
        sample_rate,
        sample_rate,
        1,
        8,
        b"data",
        data_bytes,
    )


def text_from_body(content_type: str, body: bytes) -> str:
    """The text to speak from a REST body; raises :class:`DeepgramError` like Deepgram."""
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type not in ("application/json", "text/plain"):
        raise DeepgramError(
            415, "UNSUPPORTED_MEDIA_TYPE", f"Unsupported content type: {media_type or '(none)'}."
        )
    try:
        decoded = body.decode("utf-8")
        payload: Any = json.loads(decoded) if media_type == "application/json" else decoded
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise DeepgramError(400, "PAYLOAD_ERROR", "Failed to parse the request body.") from None
    if isinstance(payload, dict):
        if "url" in payload and "text" not in payload:
            raise DeepgramError(
                400, "PAYLOAD_ERROR", "url input is not supported by the simulator."
            )
        payload = payload.get("text")
    if not isinstance(payload, str):
        raise DeepgramError(400, "PAYLOAD_ERROR", "The body must be a JSON object with a text.")
    if not payload.strip():
        raise DeepgramError(400, "Bad Request", "Input text contains no characters.")
    if len(payload) > MAX_TEXT_CHARS:
        raise DeepgramError(
            413,
            "PAYLOAD_TOO_LARGE",
            f"Input text is {len(payload)} characters; the limit is {MAX_TEXT_CHARS}.",
        )
    return payload


async def close_websocket(send: Send, receive: Receive, code: int, reason: str = "") -> None:
    """Send a close frame, then wait (briefly) for the client's, so it is not lost.

    Returning at once would make the server drop the TCP connection; a client still
    sending audio would then see a reset instead of our close code.
    """
    await send({"type": "websocket.close", "code": code, "reason": reason})
    with trio.move_on_after(2):
        while (await receive())["type"] != "websocket.disconnect":
            pass


async def stream_audio(
    sim: DeepgramSim,
    audio: bytes,
    sample_rate: int,
    emit: Callable[[bytes], Awaitable[None]],
    prefix: bytes = b"",
) -> None:
    """Emit ``audio`` in chunks: the first after the TTFB, the rest at ``tts_speed``x."""
    first_at = trio.current_time() + sim.tts_ttfb_ms / 1000
    size = max(1, sim.tts_chunk_bytes)
    speed = sim.tts_speed
    step = size / sample_rate / speed if 0 < speed < math.inf else 0.0
    for index, pos in enumerate(range(0, len(audio), size)):
        await trio.sleep_until(first_at + index * step)
        chunk = audio[pos : pos + size]
        await emit(prefix + chunk if index == 0 else chunk)


def response_headers(
    options: SpeakOptions, request_id: str, chars: int
) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", options.content_type.encode()),
        (b"dg-model-name", options.model.encode()),
        (b"dg-model-uuid", model_uuid(options.model).encode()),
        (b"dg-char-count", str(chars).encode()),
        (b"dg-request-id", request_id.encode()),
    ]


async def serve_speak_rest(
    sim: DeepgramSim, scope: dict[str, Any], receive: Receive, send: Send, request_id: str
) -> None:
    """``POST /v1/speak`` after auth; raises :class:`DeepgramError` before any byte is sent."""
    options = SpeakOptions.from_query(scope["query_string"], websocket=False)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise DeepgramError(413, "PAYLOAD_TOO_LARGE", "The request body is over 2 MB.")
        if not message.get("more_body"):
            break
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    text = text_from_body(headers.get("content-type", ""), bytes(body))
    sim.tts_characters += len(text)
    header, audio = options.render(text, sim.ms_per_char)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": response_headers(options, request_id, len(text)),
        }
    )

    async def emit(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def stop_on_disconnect(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_disconnect, nursery.cancel_scope)
        await stream_audio(sim, audio, options.sample_rate, emit, prefix=header)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        nursery.cancel_scope.cancel()


TRAILING_SILENCE_MS = 120


class SpeakSocket:
    """One ``/v1/speak`` WebSocket: buffered text, flushes played in order, ``Clear``.

    Two tasks send: the command loop (replies) and :meth:`play_flushes` (audio). Sends go
    through one lock and are shielded, so a ``Clear`` that cancels playback never cuts a
    frame in half, and its ``Cleared`` is the first thing sent after the cancelled audio.
    """

    def __init__(self, sim: DeepgramSim, options: SpeakOptions, request_id: str, send: Send):
        self.sim = sim
        self.options = options
        self.request_id = request_id
        self._send = send
        self._lock = trio.Lock()
        self._text: list[str] = []
        self._flushes: deque[tuple[str, int]] = deque()
        self._flush_ready = trio.Event()
        self._playing: trio.CancelScope | None = None
        self._flush_times: deque[float] = deque()
        self._flush_count = 0
        self._clear_count = 0

    async def run(self, receive: Receive) -> None:
        await self._send_json(
            {
                "type": "Metadata",
                "request_id": self.request_id,
                "model_name": self.options.model,
                "model_version": MODEL_VERSION,
                "model_uuid": model_uuid(self.options.model),
                "additional_model_uuids": [],
            }
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.play_flushes)
            end = await self.serve_commands(receive)
            nursery.cancel_scope.cancel()
        if end is not None:
            await close_websocket(self._send, receive, *end)

    async def serve_commands(self, receive: Receive) -> tuple[int, str] | None:
        """Handle client frames; returns the close to send (None if the client left)."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                return 1003, "MESSAGE-0000"
            try:
                command = json.loads(message.get("text") or "")
            except ValueError:
                command = None
            kind = command.get("type") if isinstance(command, dict) else None
            if kind == "Speak" and isinstance(command.get("text"), str):
                if len(command["text"]) > MAX_TEXT_CHARS:
                    return 1009, "BIG-0001"
                self._text.append(command["text"])
            elif kind == "Flush":
                await self._flush()
            elif kind == "Clear":
                await self._clear()
            elif kind == "Close":
                return 1000, ""
            else:
                return 1008, "DATA-0000"

    async def _flush(self) -> None:
        now = trio.current_time()
        window = self.sim.tts_flush_window_s
        while self._flush_times and self._flush_times[0] <= now - window:
            self._flush_times.popleft()
        if len(self._flush_times) >= self.sim.tts_flush_limit:
            await self._send_json(
                {
                    "type": "Warning",
                    "description": f"Too many Flush messages: at most "
                    f"{self.sim.tts_flush_limit} per {window:g} seconds; this one was refused.",
                    "code": "TOO_MANY_FLUSHES",
                }
            )
            return
        self._flush_times.append(now)
        self._flushes.append(("".join(self._text), self._flush_count))
        self._text.clear()
        self._flush_count += 1
        self._flush_ready.set()

    async def _clear(self) -> None:
        self._text.clear()
        self._flushes.clear()
        if self._playing is not None:
            self._playing.cancel()
        await self._send_json({"type": "Cleared", "sequence_id": self._clear_count})
        self._clear_count += 1

    async def play_flushes(self) -> None:
        """Play each flushed text in order, then report it ``Flushed``."""
        while True:
            if not self._flushes:
                self._flush_ready = trio.Event()
                await self._flush_ready.wait()
                continue
            text, sequence_id = self._flushes.popleft()
            with trio.CancelScope() as playing:
                self._playing = playing
                if text:
                    self.sim.tts_characters += len(text)
                    _, audio = self.options.render(text, self.sim.ms_per_char)
                    await stream_audio(self.sim, audio, self.options.sample_rate, self._send_bytes)
                await self._send_json({"type": "Flushed", "sequence_id": sequence_id})
            self._playing = None

    async def _send_bytes(self, chunk: bytes) -> None:
        async with self._lock:
            with trio.CancelScope(shield=True):
                await self._send({"type": "websocket.send", "bytes": chunk})

    async def _send_json(self, message: dict[str, Any]) -> None:
        async with self._lock:
            with trio.CancelScope(shield=True):
                await self._send({"type": "websocket.send", "text": json.dumps(message)})
