"""ElevenLabs simulator: the text-to-speech ``stream-input`` WebSocket.

What is simulated (docs/protocols/elevenlabs.md):

- **Upgrade** on ``/v1/text-to-speech/{voice_id}/stream-input`` with ``model_id``,
  ``output_format``, ``language_code`` (v2.5 Flash/Turbo only), ``inactivity_timeout``
  (at most 180 s), ``auto_mode`` and ``sync_alignment``. Only ``ulaw_8000`` and
  ``alaw_8000`` are produced (simulated speech is mu-law), so any other format - the real
  default is MP3 - is refused, as are ``eleven_v3`` (403, not offered on WebSockets) and
  unknown models. Refusals are HTTP responses with a REST-style
  ``{"detail": {"status", "message"}}`` body.
- **Auth**: the ``xi-api-key`` header, else ``xi_api_key`` (or ``xi-api-key``) in the first
  message. It is checked when that first message arrives, since the key may be in it; a
  bad key gets ``{"message", "error": "invalid_api_key", "code": 1008}`` then close 1008.
- **Text**: the first message is ``" "`` with optional ``voice_settings`` and
  ``generation_config`` (neither may change later: close 1008). Text is buffered and
  generated in order when the buffer reaches the ``chunk_length_schedule``
  ([120, 160, 250, 290] by default), on ``flush``, on ``try_trigger_generation`` with 50+
  characters, for every message in ``auto_mode``, and at end of input (``{"text": ""}``),
  after which the last audio is followed by ``{"isFinal": true}`` and a 1000 close.
- **Audio**: ``{"audio": <base64>, "isFinal": null, "normalizedAlignment", "alignment"}``
  messages of simulated speech (:mod:`voice_trio.sim.speech`); a generation that ends an
  utterance (flush or end of input) ends with a short silence. Alignment comes with the
  first chunk of each generation, or with every chunk under ``sync_alignment=true``.
- **Errors**: an error message, then close 1008 with its text as the reason (cut to the
  123-byte limit): unparsable messages (``invalid_input_message``), no text for
  ``inactivity_timeout`` seconds (``input_timeout_exceeded``), ``fail_next``.

Timing is wall-clock: each generation's first chunk leaves ``ttfb_ms`` after it starts, the
rest at ``speed`` times real time. Knobs and counters live on :class:`ElevenLabsSim`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import secrets
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote

import trio

from voice_trio.audio import BYTES_PER_MS, SAMPLE_RATE, mulaw_to_alaw
from voice_trio.sim._serve import serve_asgi
from voice_trio.sim.deepgram_tts import TRAILING_SILENCE_MS, Receive, Send, close_websocket
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR, encode_speech, silence

MODELS = frozenset(
    {
        "eleven_flash_v2_5",
        "eleven_turbo_v2_5",
        "eleven_multilingual_v2",
        "eleven_flash_v2",
        "eleven_turbo_v2",
        "eleven_monolingual_v1",
        "eleven_multilingual_v1",
    }
)
LANGUAGE_CODE_MODELS = frozenset({"eleven_flash_v2_5", "eleven_turbo_v2_5"})
OUTPUT_FORMATS = frozenset({"ulaw_8000", "alaw_8000"})
DEFAULT_SCHEDULE = (120, 160, 250, 290)
TRY_TRIGGER_MIN_CHARS = 50
MAX_INACTIVITY_S = 180.0
MAX_CLOSE_REASON_BYTES = 123
POLICY_VIOLATION = 1008

ERROR_MESSAGES = {
    "invalid_api_key": "Invalid API key",
    "invalid_input_message": "Could not parse input message, make sure it is a json and "
    "follows the schema outlined in protocol.",
    "quota_exceeded": "This request exceeds your quota. You have 0 credits remaining, while "
    "more credits are required for this request.",
    "detected_unusual_activity": "Unusual activity detected. Free Tier usage disabled.",
}
_STATUS_FAULTS = {
    400: ("invalid_request", "Invalid request."),
    401: ("invalid_api_key", "Invalid API key"),
    403: ("forbidden", "Forbidden."),
    429: ("too_many_concurrent_requests", "Too many concurrent requests."),
    500: ("internal_server_error", "Internal Server error."),
    503: ("service_unavailable", "Service unavailable."),
}


def input_timeout_message(timeout_s: float) -> str:
    return (
        f"Have not received a new text input within the timeout of {timeout_s:g} seconds. "
        "Streaming input terminated. Please make sure to either feed the input in the timely "
        'manner, or to send the end of input text (empty string "") when done.'
    )


def close_reason(text: str) -> str:
    """``text`` cut to the 123 bytes a close frame's reason may hold, on a UTF-8 boundary."""
    return text.encode()[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


class Rejection(Exception):
    """Refuse the upgrade with an HTTP ``status`` and a ``{"detail": ...}`` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _flag(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value not in ("true", "false"):
        raise Rejection(400, "invalid_parameter", f"{name} must be true or false.")
    return value == "true"


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What the upgrade request asked for."""

    voice_id: str
    model_id: str | None
    output_format: str
    language_code: str | None
    inactivity_timeout_s: float | None
    auto_mode: bool
    sync_alignment: bool

    @classmethod
    def from_request(cls, path: str, query_string: bytes) -> StreamOptions:
        parts = path.split("/")
        if len(parts) != 5 or parts[:3] != ["", "v1", "text-to-speech"] or not parts[3]:
            raise Rejection(404, "not_found", f"No such endpoint: {path}.")
        if parts[4] != "stream-input":
            raise Rejection(404, "not_found", f"Not simulated here: {path}.")
        params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        model = params.get("model_id")
        if model == "eleven_v3":
            raise Rejection(403, "model_not_allowed", "eleven_v3 is not available here.")
        if model is not None and model not in MODELS:
            raise Rejection(400, "model_not_found", f"A model with id {model} was not found.")
        output_format = params.get("output_format", "mp3_44100_128")
        if output_format not in OUTPUT_FORMATS:
            raise Rejection(
                400,
                "invalid_output_format",
                f"output_format={output_format}: this simulator only produces ulaw_8000 "
                "or alaw_8000, so pass one explicitly.",
            )
        language = params.get("language_code") or None
        if language is not None and model not in LANGUAGE_CODE_MODELS:
            raise Rejection(
                400, "unsupported_language", f"Model {model} does not support language_code."
            )
        timeout: float | None = None
        if "inactivity_timeout" in params:
            try:
                timeout = float(params["inactivity_timeout"])
            except ValueError:
                timeout = math.nan
            if not 0 < timeout <= MAX_INACTIVITY_S:
                raise Rejection(
                    400, "invalid_parameter", "inactivity_timeout must be at most 180 seconds."
                )
        return cls(
            voice_id=unquote(parts[3]),
            model_id=model,
            output_format=output_format,
            language_code=language,
            inactivity_timeout_s=timeout,
            auto_mode=_flag(params, "auto_mode"),
            sync_alignment=_flag(params, "sync_alignment"),
        )


@dataclass(eq=False)
class StreamStats:
    """What a test can read about one accepted socket."""

    options: StreamOptions
    texts: list[str] = field(default_factory=list)  # client text messages after the first
    generations: list[str] = field(default_factory=list)  # text spoken, per generation
    audio_bytes: int = 0
    final_sent: bool = False
    closed: bool = False
    done: trio.Event = field(default_factory=trio.Event)  # set once closed
    client_left: bool = False  # the client went away before we closed
    close_code: int | None = None  # our close code; None if the client went first
    close_reason: str = ""


def alignment(text: str, char_ms: int, start: int, end: int) -> dict[str, list[Any]] | None:
    """Alignment of the characters whose symbols start in audio bytes ``[start, end)``,
    timed from ``start``; None when there are none."""
    chars, starts = [], []
    for index, char in enumerate(text):
        at = index * char_ms * BYTES_PER_MS
        if start <= at < end:
            chars.append(char)
            starts.append((at - start) // BYTES_PER_MS)
    if not chars:
        return None
    return {"chars": chars, "charStartTimesMs": starts, "charDurationsMs": [char_ms] * len(chars)}


@dataclass(frozen=True, slots=True)
class _Generation:
    text: str
    ends_utterance: bool


_FINAL = _Generation("", True)


class StreamInputSocket:
    """One accepted ``stream-input`` socket: buffered text, generations played in order.

    Two tasks send - the message loop (errors) and :meth:`_play` (audio) - through one
    lock, shielded, so no frame is cut in half. Either ends the socket with :meth:`_finish`,
    which records the close to send and cancels both.
    """

    def __init__(
        self, sim: ElevenLabsSim, stats: StreamStats, send: Send, header_key: str | None
    ) -> None:
        self.sim = sim
        self.stats = stats
        self.options = stats.options
        self._send = send
        self._header_key = header_key
        self._lock = trio.Lock()
        self._queue: deque[_Generation] = deque()
        self._ready = trio.Event()
        self._buffer = ""
        self._schedule = list(DEFAULT_SCHEDULE)
        self._schedule_step = 0
        self._first = True
        self._voice_settings: Any = None
        self._generation_config: Any = None
        self._ended_input = False
        self._mid_utterance = False  # audio went out and the utterance has not ended yet
        self._end: tuple[int, str] | None = None
        self._serving = trio.CancelScope()
        self._audio_messages = 0
        timeout = self.options.inactivity_timeout_s
        self.timeout_s = timeout if timeout is not None else sim.inactivity_timeout_s

    async def run(self, receive: Receive) -> None:
        with self._serving:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._play)
                self.stats.client_left = await self._serve(receive)
                nursery.cancel_scope.cancel()
        if self._end is not None and not self.stats.client_left:
            code, reason = self._end
            self.stats.close_code, self.stats.close_reason = code, reason
            await close_websocket(self._send, receive, code, reason)

    def _finish(self, code: int, reason: str = "") -> None:
        if self._end is None:
            self._end = (code, close_reason(reason))
        self._serving.cancel()

    async def _fail(self, error: str | None, message: str) -> None:
        """End with close 1008, after an error message unless ``error`` is None."""
        if error is not None:
            await self._send_json({"message": message, "error": error, "code": POLICY_VIOLATION})
        self._finish(POLICY_VIOLATION, message)

    async def _serve(self, receive: Receive) -> bool:
        """Handle client frames; True when the client left, False after :meth:`_fail`."""
        deadline = trio.current_time() + self.timeout_s
        while True:
            message = None
            with trio.move_on_at(math.inf if self._ended_input else deadline):
                message = await receive()
            if message is None:
                error = "input_timeout_exceeded"
                await self._fail(error, input_timeout_message(self.timeout_s))
                return False
            if message["type"] == "websocket.disconnect":
                return True
            if self._ended_input:
                continue  # nothing more is read after end of input
            deadline = trio.current_time() + self.timeout_s
            try:
                command = json.loads(message.get("text") or "")
            except ValueError:
                command = None
            if not isinstance(command, dict) or not isinstance(command.get("text"), str):
                error = "invalid_input_message"
                await self._fail(error, ERROR_MESSAGES[error])
                return False
            if not await self._handle(command):
                return False

    async def _handle(self, command: dict[str, Any]) -> bool:
        text: str = command["text"]
        if self._first:
            self._first = False
            key = self._header_key or command.get("xi_api_key") or command.get("xi-api-key")
            if not isinstance(key, str) or not secrets.compare_digest(
                key.encode(), self.sim.api_key.encode()
            ):
                await self._fail("invalid_api_key", ERROR_MESSAGES["invalid_api_key"])
                return False
            fault = self.sim.take_message_fault()
            if fault is not None:
                await self._fail(fault, ERROR_MESSAGES.get(fault, f"Simulated {fault}."))
                return False
            self._voice_settings = command.get("voice_settings")
            self._generation_config = command.get("generation_config")
            config = self._generation_config
            schedule = config.get("chunk_length_schedule") if isinstance(config, dict) else None
            if isinstance(schedule, list):
                sizes = [n for n in schedule if isinstance(n, int | float)]
                self._schedule = [min(500, max(50, int(n))) for n in sizes] or self._schedule
            if text == " ":
                return True
        else:
            for name, first in (
                ("voice_settings", self._voice_settings),
                ("generation_config", self._generation_config),
            ):
                if command.get(name) not in (None, first):
                    await self._fail(
                        None,
                        f"{name} field must be provided in the first message and then either "
                        "be not provided or not change.",
                    )
                    return False
        self.stats.texts.append(text)
        if text == "":
            self._generate(ends_utterance=True)
            self._queue.append(_FINAL)
            self._ready.set()
            self._ended_input = True
            return True
        self._buffer += text
        threshold = self._schedule[min(self._schedule_step, len(self._schedule) - 1)]
        if command.get("flush") is True:
            self._generate(ends_utterance=True)
        elif self.options.auto_mode or (
            command.get("try_trigger_generation") is True
            and len(self._buffer.strip()) >= TRY_TRIGGER_MIN_CHARS
        ):
            self._generate(ends_utterance=False)
        elif len(self._buffer) >= threshold:
            self._generate(ends_utterance=False)
            self._schedule_step += 1
        return True

    def _generate(self, *, ends_utterance: bool) -> None:
        # The protocol's trailing space is not spoken: mid-utterance it is kept back as the
        # word gap that starts the next generation. An utterance that ends with nothing left
        # to say still gets its closing silence.
        text = self._buffer.rstrip()
        self._buffer = "" if ends_utterance else self._buffer[len(text) :]
        if text.strip() or (ends_utterance and self._mid_utterance):
            self._queue.append(_Generation(text, ends_utterance))
            self._ready.set()
            self._mid_utterance = not ends_utterance

    async def _play(self) -> None:
        while True:
            if not self._queue:
                self._ready = trio.Event()
                await self._ready.wait()
                continue
            generation = self._queue.popleft()
            if generation is _FINAL:
                await self._send_json({"isFinal": True})
                self.stats.final_sent = True
                self._finish(1000)
                return
            if not await self._speak(generation):
                return

    async def _speak(self, generation: _Generation) -> bool:
        """Stream one generation's audio; False if a fault closed the socket meanwhile."""
        sim, text = self.sim, generation.text
        sim.characters += len(text)
        if text:
            self.stats.generations.append(text)
        char_ms = max(2, min(255, sim.ms_per_char))
        audio = encode_speech(text, char_ms)
        if generation.ends_utterance:
            audio += silence(TRAILING_SILENCE_MS)
        if self.options.output_format == "alaw_8000":
            audio = mulaw_to_alaw(audio)
        size = max(1, sim.chunk_bytes)
        step = size / SAMPLE_RATE / sim.speed if 0 < sim.speed < math.inf else 0.0
        first_at = trio.current_time() + sim.ttfb_ms / 1000
        for index, pos in enumerate(range(0, len(audio), size)):
            await trio.sleep_until(first_at + index * step)
            chunk = audio[pos : pos + size]
            if self.options.sync_alignment:
                aligned = alignment(text, char_ms, pos, pos + len(chunk))
            else:
                aligned = alignment(text, char_ms, 0, len(audio)) if index == 0 else None
            await self._send_json(
                {
                    "audio": base64.b64encode(chunk).decode("ascii"),
                    "isFinal": None,
                    "normalizedAlignment": aligned,
                    "alignment": aligned,
                }
            )
            self.stats.audio_bytes += len(chunk)
            sim.audio_messages += 1
            self._audio_messages += 1
            limit = sim.close_after_chunks
            if limit is not None and self._audio_messages >= limit:
                sim.close_after_chunks = None
                self._finish(1011, "Internal server error.")
                return False
        return True

    async def _send_json(self, message: dict[str, Any]) -> None:
        async with self._lock:
            with trio.CancelScope(shield=True):
                await self._send({"type": "websocket.send", "text": json.dumps(message)})


@dataclass(eq=False)
class ElevenLabsSim:
    """The simulator's settings, fault knobs and counters; also its ASGI app."""

    api_key: str = "el-test-key"
    ms_per_char: int = DEFAULT_MS_PER_CHAR
    ttfb_ms: float = 150.0
    speed: float = 4.0  # generation speed, times real time (inf: no pacing)
    chunk_bytes: int = 1600  # audio bytes per message (200 ms)
    inactivity_timeout_s: float = 20.0  # when the URL has no inactivity_timeout
    # Faults; each applies once, then resets to None.
    fail_next: int | str | None = None  # int: refuse the next upgrade with this HTTP status;
    # str: answer the next socket's first message with this error, then close 1008
    close_after_chunks: int | None = None  # close 1011 after this many audio messages on a socket
    # Counters.
    streams: list[StreamStats] = field(default_factory=list)  # accepted sockets, in order
    rejected: int = 0  # refused upgrades
    characters: int = 0  # characters synthesised
    audio_messages: int = 0  # audio messages sent, all sockets

    @property
    def sockets_opened(self) -> int:
        return len(self.streams)

    @property
    def sockets_active(self) -> int:
        return sum(1 for stream in self.streams if not stream.closed)

    def take_message_fault(self) -> str | None:
        if isinstance(self.fail_next, str):
            fault, self.fail_next = self.fail_next, None
            return fault
        return None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            body = _detail_body("not_found", "Only the stream-input WebSocket is simulated.")
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        try:
            if isinstance(self.fail_next, int):
                status, self.fail_next = self.fail_next, None
                raise Rejection(status, *_STATUS_FAULTS.get(status, ("error", "Simulated.")))
            options = StreamOptions.from_request(scope["path"], scope["query_string"])
        except Rejection as rejection:
            self.rejected += 1
            await _reject(send, rejection)
            return
        header_key = None
        for name, value in scope["headers"]:
            if name.lower() == b"xi-api-key":
                header_key = value.decode("latin-1").strip()
        stats = StreamStats(options)
        self.streams.append(stats)
        await send({"type": "websocket.accept"})
        try:
            await StreamInputSocket(self, stats, send, header_key).run(receive)
        finally:
            stats.closed = True
            stats.done.set()


def _detail_body(code: str, message: str) -> bytes:
    return json.dumps({"detail": {"status": code, "message": message}}).encode()


async def _reject(send: Send, rejection: Rejection) -> None:
    """Refuse a WebSocket upgrade with a plain HTTP response (ASGI websocket.http.response)."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": rejection.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    body = _detail_body(rejection.code, rejection.message)
    await send({"type": "websocket.http.response.body", "body": body})


async def serve(
    sim: ElevenLabsSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status.started`` gets ``http://host:port``."""
    await serve_asgi(sim, host=host, port=port, task_status=task_status)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="el-test-key")
    parser.add_argument("--ms-per-char", type=int, default=DEFAULT_MS_PER_CHAR)
    parser.add_argument("--ttfb-ms", type=float, default=150.0, help="TTS time to first byte")
    parser.add_argument("--speed", type=float, default=4.0, help="TTS speed vs real time")
    parser.add_argument("--inactivity-timeout-s", type=float, default=20.0)


async def run_from_args(args: argparse.Namespace) -> None:
    sim = ElevenLabsSim(
        api_key=args.api_key,
        ms_per_char=args.ms_per_char,
        ttfb_ms=args.ttfb_ms,
        speed=args.speed,
        inactivity_timeout_s=args.inactivity_timeout_s,
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve, sim, host=args.host, port=args.port))
        print(f"ElevenLabs simulator listening on {base_url}", flush=True)
