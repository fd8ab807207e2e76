"""Deepgram's live STT (``/v1/listen``) and REST TTS (``POST /v1/speak``) on a reactor, for load
tests: what the reference simulator (:mod:`voice_trio.sim.deepgram`) answers, without Hypercorn
and Trio in the per-message path.

A server under load sends Deepgram ~23 WebSocket messages per call per second and gets its
speech back in ~10 chunks per second of speech; through Hypercorn and Trio that costs the
reference simulator about as much CPU per message as the server spends on it. Here both run
as callbacks on a :class:`~voice_trio.sim.reactor.Reactor` thread, over a minimal HTTP/1.1
(keep-alive, ``Content-Length`` bodies, chunked responses) and the server half of
:mod:`voice_trio.sim.rfc6455`. What is said stays the reference's: the same option parsing and
errors (:class:`~voice_trio.sim.deepgram_stt.ListenOptions`,
:class:`~voice_trio.sim.deepgram_tts.SpeakOptions`, ``text_from_body``), the same transcriber
(:class:`~voice_trio.sim.deepgram_stt.SttTranscriber`) and synthesised speech, the same auth
(``Authorization: Token|Bearer`` or the ``token`` subprotocol), headers (``dg-request-id``,
``dg-error`` on a refused upgrade), close codes (``NET-0001`` idle, ``DATA-0000`` bad text)
and TTS pacing (``tts_ttfb_ms``, then ``tts_speed`` times real time).

Not here (the reference has them; a load test does not use them): the TTS WebSocket
(``/v1/speak`` upgrades are refused with 404), fault knobs, per-stream statistics.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from voice_trio.sim.deepgram_stt import DeepgramError, ListenOptions, SttTranscriber
from voice_trio.sim.deepgram_tts import (
    MAX_BODY_BYTES,
    SpeakOptions,
    response_headers,
    text_from_body,
)
from voice_trio.sim.reactor import Connection, Reactor, Timer, listen
from voice_trio.sim.rfc6455 import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WebSocketError,
    close_payload,
    server_frame,
    upgrade_response,
)
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 65536
CLOSE_WAIT_S = 2.0  # for the client's close frame after ours, as the reference waits
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
}


@dataclass(eq=False)
class LeanDeepgram:
    """The simulator's settings and counters; :meth:`serve` binds it to a reactor."""

    api_key: str = "dg-test-key"
    ms_per_char: int = DEFAULT_MS_PER_CHAR  # TTS speaking rate
    tts_ttfb_ms: float = 150.0
    tts_speed: float = 4.0  # generation speed, times real time (inf: no pacing)
    tts_chunk_bytes: int = 800
    no_audio_timeout_s: float = 10.0  # wall clock, then close 1011 NET-0001
    interim_interval_s: float = 1.0
    max_segment_s: float = 5.0
    silence_result_s: float = 2.0
    keep_alive_s: float = 5.0  # an idle HTTP connection is closed after this long
    stt_streams: int = 0  # accepted /v1/listen sockets
    stt_active: int = 0
    stt_rejected: int = 0
    tts_requests: int = 0
    tts_characters: int = 0
    connections: set[HttpConnection] = field(default_factory=set)

    def serve(self, reactor: Reactor, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (call on the reactor's thread, or before it runs);
        returns the base URL."""

        def accept(sock: socket.socket) -> None:
            HttpConnection(self, reactor, sock)  # it registers itself with the reactor

        server = listen(reactor, host, port, accept)
        bound_host, bound_port = server.getsockname()[:2]
        return f"http://{bound_host}:{bound_port}"

    def authorize(self, headers: dict[str, str]) -> str | None:
        """Check the key as the reference does; the subprotocol to select (``token``) if it
        came that way. Raises a 401 :class:`DeepgramError`."""
        key, subprotocol = None, None
        scheme, _, rest = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() in ("token", "bearer"):
            key = rest.strip()
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        if key is None and len(offered) >= 2 and offered[0].lower() == "token":
            key, subprotocol = offered[1], offered[0]
        if key is None or not secrets.compare_digest(key.encode(), self.api_key.encode()):
            raise DeepgramError(401, "INVALID_AUTH", "Invalid credentials.")
        return subprotocol


def error_body(error: DeepgramError, request_id: str) -> bytes:
    return json.dumps(
        {"err_code": error.err_code, "err_msg": error.err_msg, "request_id": request_id}
    ).encode()


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class Request:
    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    body: bytes = b""


class HttpConnection:
    """One client connection: HTTP/1.1 requests in turn, or one ``/v1/listen`` WebSocket."""

    def __init__(self, sim: LeanDeepgram, reactor: Reactor, sock: socket.socket) -> None:
        self.sim = sim
        self.reactor = reactor
        self.conn = Connection(reactor, sock, self._on_data, self._on_end)
        self._buffer = bytearray()
        self._busy = False  # a response is being streamed
        self._stt: SttSocket | None = None
        self._idle: Timer | None = None
        self._tts: list[Timer] = []
        sim.connections.add(self)
        self._arm_idle()

    def _on_data(self, data: bytes) -> None:
        if self._stt is not None:
            self._stt.on_data(data)
            return
        self._buffer += data
        self._next_request()

    def _next_request(self) -> None:
        while not self._busy and self._stt is None and self.conn.open:
            request = self._parse()
            if request is None:
                return
            self._cancel_idle()
            self._handle(request)

    def _parse(self) -> Request | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self.conn.close()
            return None
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self.conn.close()
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                length = -1
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            length = -1
        if length < 0:
            del buffer[:]
            self._respond_error(
                DeepgramError(411, "Bad Request", "Send the body with a Content-Length."), ""
            )
            return None
        if len(buffer) < end + 4 + length:
            return None
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        target = urlsplit(parts[1])
        return Request(parts[0], target.path, target.query.encode("latin-1"), headers, body)

    def _handle(self, request: Request) -> None:
        sim = self.sim
        request_id = str(uuid.uuid4())
        websocket = request.headers.get("upgrade", "").lower() == "websocket"
        try:
            if websocket:
                if request.path != "/v1/listen":
                    raise DeepgramError(404, "NOT_FOUND", f"No such endpoint: {request.path}.")
                subprotocol = sim.authorize(request.headers)
                options = ListenOptions.from_query(request.query)
                self._accept_stt(request, request_id, options, subprotocol)
                return
            if request.path != "/v1/speak":
                raise DeepgramError(404, "NOT_FOUND", f"No such endpoint: {request.path}.")
            if request.method != "POST":
                raise DeepgramError(405, "METHOD_NOT_ALLOWED", "Use POST for /v1/speak.")
            sim.tts_requests += 1
            sim.authorize(request.headers)
            speak = SpeakOptions.from_query(request.query, websocket=False)
            if len(request.body) > MAX_BODY_BYTES:
                raise DeepgramError(413, "PAYLOAD_TOO_LARGE", "The request body is over 2 MB.")
            text = text_from_body(request.headers.get("content-type", ""), request.body)
        except DeepgramError as error:
            if websocket:
                sim.stt_rejected += 1
            self._respond_error(error, request_id, refused_upgrade=websocket)
            return
        self._speak(speak, text, request_id, request.headers)

    def _respond_error(
        self, error: DeepgramError, request_id: str, *, refused_upgrade: bool = False
    ) -> None:
        body = error_body(error, request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"dg-request-id", request_id.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        if refused_upgrade:
            headers.append((b"dg-error", error.err_msg.encode()))
        self.conn.send(response_head(error.status, headers) + body)
        if refused_upgrade or error.status == 411:
            self.conn.close_after_sending()
        else:
            self._arm_idle()

    def _speak(
        self, options: SpeakOptions, text: str, request_id: str, headers: dict[str, str]
    ) -> None:
        sim = self.sim
        sim.tts_characters += len(text)
        prefix, audio = options.render(text, sim.ms_per_char)
        head = response_headers(options, request_id, len(text))
        head.append((b"transfer-encoding", b"chunked"))
        self.conn.send(response_head(200, head))
        self._busy = True
        close = headers.get("connection", "").lower() == "close"
        size = max(1, sim.tts_chunk_bytes)
        speed = sim.tts_speed
        step = size / options.sample_rate / speed if 0 < speed < math.inf else 0.0
        first_at = self.reactor.now() + sim.tts_ttfb_ms / 1000
        pieces = [audio[at : at + size] for at in range(0, len(audio), size)]
        if pieces:
            pieces[0] = prefix + pieces[0]
        self._tts = [
            self.reactor.call_at(
                first_at + index * step, self._chunk, piece, index == len(pieces) - 1, close
            )
            for index, piece in enumerate(pieces)
        ]
        if not pieces:
            self._chunk(b"", True, close)

    def _chunk(self, piece: bytes, last: bool, close: bool) -> None:
        data = b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b""
        if last:
            data += b"0\r\n\r\n"
            self._tts = []
            self._busy = False
        self.conn.send(data)
        if last:
            if close:
                self.conn.close_after_sending()
            else:
                self._arm_idle()
                self._next_request()

    def _accept_stt(
        self,
        request: Request,
        request_id: str,
        options: ListenOptions,
        subprotocol: str | None,
    ) -> None:
        sim = self.sim
        headers = [("dg-request-id", request_id)]
        if subprotocol is not None:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        self.conn.send(upgrade_response(request.headers.get("sec-websocket-key", ""), headers))
        transcriber = SttTranscriber(
            options,
            request_id,
            interim_interval_s=sim.interim_interval_s,
            max_segment_s=sim.max_segment_s,
            silence_result_s=sim.silence_result_s,
        )
        sim.stt_streams += 1
        sim.stt_active += 1
        self._stt = SttSocket(self, transcriber)
        rest = bytes(self._buffer)
        self._buffer.clear()
        if rest:
            self._stt.on_data(rest)

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.reactor.call_later(self.sim.keep_alive_s, self.conn.close)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_end(self) -> None:
        self._cancel_idle()
        for timer in self._tts:
            timer.cancel()
        self._tts = []
        if self._stt is not None:
            self._stt.ended()
        self.sim.connections.discard(self)


class SttSocket:
    """One ``/v1/listen`` WebSocket after the upgrade: the reference's ``run_listen``."""

    def __init__(self, http: HttpConnection, transcriber: SttTranscriber) -> None:
        self.http = http
        self.conn = http.conn
        self.sim = http.sim
        self.reactor = http.reactor
        self.transcriber = transcriber
        self.reader = FrameReader(from_client=True)
        self.audio_seen = False
        self.closing = False
        self._done = False
        self._deadline = self.reactor.now() + self.sim.no_audio_timeout_s
        self._idle = self.reactor.call_at(self._deadline, self._check_idle)

    def on_data(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except WebSocketError as exc:
            log.warning("listen socket: %s", exc)
            self.close(1002)
            return
        for opcode, payload in messages:
            if self._done or not self.conn.open:
                return
            if opcode == OP_CLOSE:
                if not self.closing:
                    self.conn.send(server_frame(OP_CLOSE, payload[:2]))
                self.conn.close_after_sending()
                return
            if opcode == OP_PING:
                self.conn.send(server_frame(OP_PONG, payload))
            elif opcode == OP_BINARY:
                self._audio(payload)
            elif opcode == OP_TEXT:
                self._command(payload)

    def _audio(self, audio: bytes) -> None:
        if self.closing:
            return
        if not audio:  # the old end-of-stream signal
            self._emit(self.transcriber.close())
            self.close(1000)
            return
        self.audio_seen = True
        self._deadline = self.reactor.now() + self.sim.no_audio_timeout_s
        self._emit(self.transcriber.feed(audio))

    def _command(self, text: bytes) -> None:
        if self.closing:
            return
        if self.audio_seen:
            self._deadline = self.reactor.now() + self.sim.no_audio_timeout_s
        try:
            command: Any = json.loads(text)
        except ValueError:
            command = None
        if not isinstance(command, dict):
            self.close(1008, "DATA-0000")
            return
        kind = command.get("type")
        if kind == "Finalize":
            self._emit(self.transcriber.finalize())
        elif kind == "CloseStream":
            self._emit(self.transcriber.close())
            self.close(1000)
        # KeepAlive needs no reply; unknown commands (e.g. Configure) are ignored.

    def _emit(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.conn.send(server_frame(OP_TEXT, json.dumps(message).encode()))

    def _check_idle(self) -> None:
        now = self.reactor.now()
        if now >= self._deadline:
            self.close(1011, "NET-0001")
        else:
            self._idle = self.reactor.call_at(self._deadline, self._check_idle)

    def close(self, code: int, reason: str = "") -> None:
        """Our close frame, then the client's (2 s at most) before the connection ends."""
        if self.closing:
            return
        self.closing = True
        self._idle.cancel()
        self.conn.send(server_frame(OP_CLOSE, close_payload(code, reason)))
        self._idle = self.reactor.call_later(CLOSE_WAIT_S, self.conn.close)

    def ended(self) -> None:
        if not self._done:
            self._done = True
            self._idle.cancel()
            self.sim.stt_active -= 1
