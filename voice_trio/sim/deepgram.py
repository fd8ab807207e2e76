"""Deepgram simulator: live STT (``/v1/listen``) and Aura TTS (``/v1/speak``) on one port.

What is simulated (``shared/docs/protocols/deepgram.md``):

- **Auth** on every endpoint: ``Authorization: Token <key>`` (or ``Bearer``), or for
  WebSockets ``Sec-WebSocket-Protocol: token, <key>`` (the ``token`` subprotocol is then
  selected). Failures are HTTP errors with a JSON body ``{err_code, err_msg, request_id}``;
  WebSocket handshakes are refused with a real HTTP response carrying ``dg-error``, and
  every handshake response carries ``dg-request-id``.
- **Live STT** (``deepgram_stt``): mulaw, alaw and linear16 audio of simulated speech
  (:mod:`voice_trio.sim.speech`) is decoded into ``Results`` (interim and final, with word
  timings, ``speech_final`` after ``endpointing`` ms of silence, ``from_finalize`` after
  ``Finalize``), ``SpeechStarted`` (``vad_events``), ``UtteranceEnd`` (``interim_results`` +
  ``utterance_end_ms``), empty results every couple of seconds of silence, and the closing
  ``Metadata`` after ``CloseStream``. Garbled symbols appear as U+FFFD with low confidence.
- **TTS** (``deepgram_tts``): REST returns chunked simulated speech with Deepgram's headers
  and errors; the WebSocket buffers ``Speak`` text, plays it on ``Flush`` (then
  ``Flushed``), honours ``Clear``/``Close``, the 2000-character ``Speak`` limit and the
  20-flushes-per-minute rule.

Timing: STT is driven by *stream time* — samples received divided by ``sample_rate`` — not by
the wall clock, so a test may send audio as fast as it likes and still get the results a
real-time stream would (word times, endpointing, utterance ends, interims once a second of
audio). Only two things use the wall clock: the STT idle timeout (``no_audio_timeout_s``,
close 1011 ``NET-0001``) and TTS pacing (``tts_ttfb_ms`` to the first chunk, then
``tts_speed`` times real time).

Knobs and counters live on :class:`DeepgramSim`; change them between (or during) tests.
"""

from __future__ import annotations

import argparse
import json
import secrets
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from voice_trio.sim._serve import serve_asgi
from voice_trio.sim.deepgram_stt import DeepgramError, ListenOptions, SttTranscriber
from voice_trio.sim.deepgram_tts import (
    Receive,
    Send,
    SpeakOptions,
    SpeakSocket,
    close_websocket,
    serve_speak_rest,
)
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR

_FAULTS = {
    400: ("Bad Request", "Bad Request."),
    401: ("INVALID_AUTH", "Invalid credentials."),
    402: ("ASR_PAYMENT_REQUIRED", "Project does not have enough credits."),
    403: ("INSUFFICIENT_PERMISSIONS", "Project does not have access to the requested model."),
    429: ("TOO_MANY_REQUESTS", "Too Many Requests"),
    500: ("INTERNAL_SERVER_ERROR", "Internal Server Error"),
    503: ("SERVICE_UNAVAILABLE", "Service Unavailable"),
}


def _fault(status: int) -> DeepgramError:
    code, message = _FAULTS.get(status, ("SIMULATED_FAULT", "Simulated failure."))
    return DeepgramError(status, code, message)


class SttStreamStats:
    """What a test can read about one ``/v1/listen`` connection."""

    __slots__ = (
        "close_code",
        "close_reason",
        "closed",
        "drop_after_s",
        "first_audio_at",
        "last_audio_at",
        "options",
        "request_id",
        "transcriber",
    )

    def __init__(self, request_id: str, options: ListenOptions, transcriber: SttTranscriber):
        self.request_id = request_id
        self.options = options
        self.transcriber = transcriber
        self.closed = False
        self.close_code: int | None = None  # None: the client went away first
        self.close_reason = ""
        self.drop_after_s: float | None = None  # this stream only (``drop_next_stt_after_s``)
        self.first_audio_at: float | None = None  # trio clock
        self.last_audio_at: float | None = None

    @property
    def audio_seconds(self) -> float:
        return self.transcriber.seconds

    @property
    def rate(self) -> float | None:
        """Audio seconds per wall-clock second between the first and last chunk."""
        if self.first_audio_at is None or self.last_audio_at is None:
            return None
        elapsed = self.last_audio_at - self.first_audio_at
        return self.audio_seconds / elapsed if elapsed > 0 else None


async def run_listen(sim: DeepgramSim, stats: SttStreamStats, send: Send, receive: Receive) -> None:
    """Serve one accepted ``/v1/listen`` socket until it closes.

    The idle deadline is wall-clock: any frame moves it ``sim.no_audio_timeout_s`` ahead,
    but (as Deepgram documents) text frames only count once some audio has arrived.
    """
    transcriber = stats.transcriber

    async def emit(messages: list[dict[str, Any]]) -> None:
        for message in messages:
            await send({"type": "websocket.send", "text": json.dumps(message)})

    async def close(code: int, reason: str = "") -> None:
        stats.close_code, stats.close_reason = code, reason
        await close_websocket(send, receive, code, reason)

    deadline = trio.current_time() + sim.no_audio_timeout_s
    while True:
        message = None
        with trio.move_on_at(deadline):
            message = await receive()
        if message is None:
            await close(1011, "NET-0001")
            return
        if message["type"] == "websocket.disconnect":
            return
        audio = message.get("bytes")
        if audio is not None:
            if not audio:  # the old end-of-stream signal
                await emit(transcriber.close())
                await close(1000)
                return
            now = trio.current_time()
            deadline = now + sim.no_audio_timeout_s
            if stats.first_audio_at is None:
                stats.first_audio_at = now
            stats.last_audio_at = now
            await emit(transcriber.feed(audio))
            limits = [x for x in (sim.close_stt_after_s, stats.drop_after_s) if x is not None]
            if limits and transcriber.seconds >= min(limits):
                await close(1011, "NET-0000")
                return
            continue
        if stats.first_audio_at is not None:
            deadline = trio.current_time() + sim.no_audio_timeout_s
        try:
            command = json.loads(message.get("text") or "")
        except ValueError:
            command = None
        if not isinstance(command, dict):
            await close(1008, "DATA-0000")
            return
        kind = command.get("type")
        if kind == "Finalize":
            await emit(transcriber.finalize())
        elif kind == "CloseStream":
            await emit(transcriber.close())
            await close(1000)
            return
        # KeepAlive needs no reply; unknown commands (e.g. Configure) are ignored.


@dataclass(eq=False)
class DeepgramSim:
    """The simulator's settings, fault knobs and counters; also its ASGI app."""

    api_key: str = "dg-test-key"
    ms_per_char: int = DEFAULT_MS_PER_CHAR  # TTS speaking rate
    tts_ttfb_ms: float = 150.0
    tts_speed: float = 4.0  # generation speed, times real time (inf: no pacing)
    tts_chunk_bytes: int = 800
    tts_flush_limit: int = 20  # per tts_flush_window_s, per socket
    tts_flush_window_s: float = 60.0
    no_audio_timeout_s: float = 10.0  # wall clock, then close 1011 NET-0001
    interim_interval_s: float = 1.0  # of stream time
    max_segment_s: float = 5.0  # of stream time before a final is forced
    silence_result_s: float = 2.0  # an empty final per this much silence
    # Faults. The `*_next` knobs apply once, before auth, then reset to None.
    reject_next_stt: int | None = None  # HTTP status for the next /v1/listen handshake
    close_stt_after_s: float | None = None  # close every stream 1011 at this stream time
    drop_next_stt_after_s: float | None = None  # the same, for the next accepted stream only
    tts_fail_next: int | None = None  # HTTP status for the next /v1/speak (REST or socket)
    # Counters.
    stt_streams: list[SttStreamStats] = field(default_factory=list)  # accepted, in order
    stt_rejected: int = 0
    tts_requests: int = 0  # REST requests, failed ones included
    tts_sockets: int = 0  # accepted TTS WebSockets
    tts_characters: int = 0  # characters synthesised (REST and socket flushes)

    @property
    def stt_connections_opened(self) -> int:
        return len(self.stt_streams)

    @property
    def stt_connections_active(self) -> int:
        return sum(1 for stream in self.stt_streams if not stream.closed)

    @property
    def stt_audio_seconds(self) -> list[float]:
        """Audio received per accepted STT connection, in opening order."""
        return [stream.audio_seconds for stream in self.stt_streams]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _websocket(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        request_id = str(uuid.uuid4())
        path = scope["path"]
        try:
            if path == "/v1/listen":
                self._take_fault("reject_next_stt")
            elif path == "/v1/speak":
                self._take_fault("tts_fail_next")
            else:
                raise DeepgramError(404, "NOT_FOUND", f"No such endpoint: {path}.")
            subprotocol = self._authorize(scope)
            if path == "/v1/listen":
                options: ListenOptions | SpeakOptions = ListenOptions.from_query(
                    scope["query_string"]
                )
            else:
                options = SpeakOptions.from_query(scope["query_string"], websocket=True)
        except DeepgramError as error:
            if path == "/v1/listen":
                self.stt_rejected += 1
            await _reject_handshake(send, error, request_id)
            return
        accept: dict[str, Any] = {
            "type": "websocket.accept",
            "headers": [(b"dg-request-id", request_id.encode())],
        }
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        if isinstance(options, ListenOptions):
            transcriber = SttTranscriber(
                options,
                request_id,
                interim_interval_s=self.interim_interval_s,
                max_segment_s=self.max_segment_s,
                silence_result_s=self.silence_result_s,
            )
            stats = SttStreamStats(request_id, options, transcriber)
            stats.drop_after_s, self.drop_next_stt_after_s = self.drop_next_stt_after_s, None
            self.stt_streams.append(stats)
            await send(accept)
            try:
                await run_listen(self, stats, send, receive)
            finally:
                stats.closed = True
        else:
            self.tts_sockets += 1
            await send(accept)
            await SpeakSocket(self, options, request_id, send).run(receive)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        try:
            if scope["path"] != "/v1/speak":
                raise DeepgramError(404, "NOT_FOUND", f"No such endpoint: {scope['path']}.")
            if scope["method"] != "POST":
                raise DeepgramError(405, "METHOD_NOT_ALLOWED", "Use POST for /v1/speak.")
            self.tts_requests += 1
            self._take_fault("tts_fail_next")
            self._authorize(scope)
            await serve_speak_rest(self, scope, receive, send, request_id)
        except DeepgramError as error:
            await send(
                {
                    "type": "http.response.start",
                    "status": error.status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"dg-request-id", request_id.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _error_body(error, request_id)})

    def _take_fault(self, knob: str) -> None:
        status = getattr(self, knob)
        if status is not None:
            setattr(self, knob, None)
            raise _fault(status)

    def _authorize(self, scope: dict[str, Any]) -> str | None:
        """Check the key; returns the subprotocol to select (``token``) if it came that way."""
        key, subprotocol = None, None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                scheme, _, rest = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() in ("token", "bearer"):
                    key = rest.strip()
        offered = scope.get("subprotocols") or []
        if key is None and len(offered) >= 2 and offered[0].lower() == "token":
            key, subprotocol = offered[1], offered[0]
        if key is None or not secrets.compare_digest(key.encode(), self.api_key.encode()):
            raise _fault(401)
        return subprotocol


def _error_body(error: DeepgramError, request_id: str) -> bytes:
    return json.dumps(
        {"err_code": error.err_code, "err_msg": error.err_msg, "request_id": request_id}
    ).encode()


async def _reject_handshake(send: Send, error: DeepgramError, request_id: str) -> None:
    """Refuse a WebSocket upgrade with a plain HTTP response (ASGI websocket.http.response)."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"dg-request-id", request_id.encode()),
                (b"dg-error", error.err_msg.encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": _error_body(error, request_id)})


async def serve(
    sim: DeepgramSim,
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
    parser.add_argument("--api-key", default="dg-test-key")
    parser.add_argument("--ms-per-char", type=int, default=DEFAULT_MS_PER_CHAR)
    parser.add_argument("--tts-ttfb-ms", type=float, default=150.0, help="TTS time to first byte")
    parser.add_argument("--tts-speed", type=float, default=4.0, help="TTS speed vs real time")
    parser.add_argument("--no-audio-timeout-s", type=float, default=10.0)


async def run_from_args(args: argparse.Namespace) -> None:
    sim = DeepgramSim(
        api_key=args.api_key,
        ms_per_char=args.ms_per_char,
        tts_ttfb_ms=args.tts_ttfb_ms,
        tts_speed=args.tts_speed,
        no_audio_timeout_s=args.no_audio_timeout_s,
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve, sim, host=args.host, port=args.port))
        print(f"Deepgram simulator listening on {base_url}", flush=True)
