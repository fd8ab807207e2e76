"""The carrier's media streams for load tests: one clock and raw sockets for every call.

The reference carrier (:mod:`voice_trio.sim.carrier`) gives each call a clock task, a
trio-websocket connection and a JSON round trip per frame: about as much CPU per call as the
server under test spends. This module keeps its wire behaviour and drops that machinery:

- :class:`StreamFrames` builds the exact text frames :class:`~voice_trio.sim.carrier.MediaStream`
  sends (``connected``, ``start``, ``media``, ``mark``, ``dtmf``, ``stop``, ``error``), as
  bytes. A ``media`` frame is one ``%`` over a per-stream template and a payload the caller
  base64-encoded once per utterance (:func:`~voice_trio.sim.lean_caller.speech_payloads`).
- :class:`LeanMediaStream` is a :class:`MediaStream` (same state, counters, ``stop``/``drop``
  and close reasons, so :class:`~voice_trio.sim.telnyx_calls.SimCall` runs it unchanged) over
  a plain non-blocking socket: the RFC 6455 handshake and framing of
  :mod:`voice_trio.sim.ws_client`, one ``send`` per frame, every frame masked with a fresh
  random key. Of what the server sends, only ``media`` frames are common; they are
  recognised by their prefix (the server builds them by concatenation) and their payload
  decoded with one ``a2b_base64``; anything else (``mark``, ``clear``, errors, a ``media``
  frame spelt differently) takes the reference's JSON path.
- :class:`CarrierClock` ticks every stream of the process from one task. Pacing is the
  reference's rule: each stream gets a tick every 20 ms on a fixed schedule (a late tick
  does not push the next one back; after 200 ms of lag the schedule restarts from now).
  A stream's schedule starts on one of ``phases`` offsets 2 ms apart, so a hundred calls
  cost the clock at most 500 wake-ups a second, not 5 000.

Limits: the stream sends PCMU on ``inbound_track`` only (the server's choice; anything
else fails the stream as the reference fails what it cannot play) and does not simulate
out-of-order frames. Announcements and transcription taps, which the reference line plays,
are not ticked here: the calls of a load test do not use them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
from binascii import Error as Base64Error
from binascii import a2b_base64
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from voice_trio.audio import FRAME_BYTES, FRAME_MS, alaw_to_mulaw
from voice_trio.sim.carrier import (
    AUTH_TOKEN_FIELD,
    MAX_CHUNK_BYTES,
    MAX_LAG_S,
    MAX_QUEUED_BYTES,
    SILENCE_FRAME,
    STREAM_CODEC_RATES,
    Line,
    MediaStream,
    StreamConnectError,
    StreamParams,
)
from voice_trio.sim.lean_caller import LeanCaller
from voice_trio.sim.telnyx_webhooks import utc_now
from voice_trio.sim.ws_client import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    MaskKeys,
    WebSocketError,
    close_code,
    close_payload,
    masked_frame,
    new_key,
    read_upgrade_response,
    upgrade_request,
)

log = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000
SILENCE_PAYLOAD = base64.b64encode(SILENCE_FRAME)  # 20 ms of mu-law silence
MAX_OUTBOX = 1 << 20  # bytes the server has not taken; beyond this the stream is dropped
_SERVER_MEDIA = b'{"event":"media","media":{"payload":"'  # how the server builds media frames
_SERVER_MEDIA_END = b'"}}'


class StreamFrames:
    """The text frames of one stream, as the reference carrier formats them, in bytes.

    It owns the stream's counters: ``sequence_number`` (shared by every frame after
    ``connected``) and the ``inbound`` chunk number.
    """

    def __init__(self, params: StreamParams) -> None:
        self.params = params
        self.seq = 0
        self.chunk = 0
        sid = params.stream_id.replace("%", "%%").encode()
        self._media = (
            b'{"event":"media","sequence_number":"%d","stream_id":"' + sid + b'",'
            b'"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
        )
        self._mark = b'{"event":"mark","sequence_number":"%d","stream_id":"' + sid + b'",'
        self._mark += b'"mark":{"name":%s}}'
        self._error = b'{"event":"error","sequence_number":"%d","stream_id":"' + sid + b'",'
        self._error += b'"error":{"title":"%s","code":"%s","detail":%s}}'

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def connected(self) -> bytes:
        p = self.params
        frame = {"event": "connected", "version": "1.0.0"}
        if p.auth_token and p.auth_in_connected:
            frame[AUTH_TOKEN_FIELD] = p.auth_token
        return json.dumps(frame, separators=(",", ":")).encode()

    def start(self) -> bytes:
        p = self.params
        return json.dumps(
            {
                "event": "start",
                "sequence_number": str(self.next_seq()),
                "stream_id": p.stream_id,
                "start": {
                    "user_id": p.user_id,
                    "call_control_id": p.call_control_id,
                    "call_session_id": p.call_session_id,
                    "from": p.from_,
                    "to": p.to,
                    "tags": list(p.tags),
                    "client_state": p.client_state,
                    "custom_parameters": p.custom_parameters,
                    "media_format": {
                        "encoding": p.codec,
                        "sample_rate": STREAM_CODEC_RATES.get(p.codec, 8000),
                        "channels": 1,
                    },
                },
            }
        ).encode()

    def media(self, payload: bytes) -> bytes:
        """The next ``inbound`` media frame carrying ``payload`` (base64 of 20 ms)."""
        self.seq += 1
        self.chunk = chunk = self.chunk + 1
        return self._media % (self.seq, chunk, (chunk - 1) * FRAME_MS, payload)

    def mark(self, name: str) -> bytes:
        return self._mark % (self.next_seq(), json.dumps(name).encode())

    def error(self, code: str, title: str, detail: str) -> bytes:
        return self._error % (
            self.next_seq(),
            title.encode(),
            code.encode(),
            json.dumps(detail).encode(),
        )

    def event(self, event: str, body: dict[str, Any], **extra: str) -> bytes:
        """A rare frame (stop, dtmf), built with json as the reference builds it."""
        frame = {
            "event": event,
            "sequence_number": str(self.next_seq()),
            "stream_id": self.params.stream_id,
            **extra,
            event: body,
        }
        return json.dumps(frame).encode()

    def stop(self) -> bytes:
        p = self.params
        return self.event("stop", {"user_id": p.user_id, "call_control_id": p.call_control_id})


class CarrierClock:
    """The 20 ms clock of every lean stream in the process; see the module docstring."""

    def __init__(self, phases: int = 10) -> None:
        self.phases = phases
        self.step_s = FRAME_S / phases
        self.late_resyncs = 0
        self.ticks = 0  # stream ticks, all streams
        self._slots: list[list[LeanMediaStream]] = [[] for _ in range(phases)]
        self._where: dict[LeanMediaStream, int] = {}
        self._epoch = 0.0
        self._wake = trio.Event()

    @property
    def streams(self) -> int:
        return len(self._where)

    def add(self, stream: LeanMediaStream) -> None:
        if not self._where:
            self._epoch = trio.current_time()
            self._wake.set()
        index = math.ceil((trio.current_time() - self._epoch) / self.step_s)
        slot = index % self.phases
        self._slots[slot].append(stream)
        self._where[stream] = slot

    def discard(self, stream: LeanMediaStream) -> None:
        slot = self._where.pop(stream, None)
        if slot is not None:
            self._slots[slot].remove(stream)

    async def run(self) -> None:
        """Tick the streams until cancelled."""
        slots, phases, step_s = self._slots, self.phases, self.step_s
        index = 0
        while True:
            if not self._where:
                self._wake = trio.Event()
                await self._wake.wait()
                index = 0
            while not slots[index % phases]:
                index += 1
            deadline = self._epoch + index * step_s
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if now - deadline > MAX_LAG_S:
                # Do not burst through the missed ticks: the schedule restarts from now.
                self._epoch += now - deadline
                deadline = now
                self.late_resyncs += 1
                for stream in self._where:
                    stream.line.late_resyncs += 1
            streams = slots[index % phases]
            self.ticks += len(streams)
            for stream in tuple(streams):
                try:
                    stream.step(deadline)
                except Exception:
                    # One broken stream must not stop the clock of every other call.
                    log.exception("lean stream %s failed", stream.params.stream_id)
                    self.discard(stream)
                    stream.broken = True
            index += 1


class LeanMediaStream(MediaStream):
    """A media stream over a raw socket, ticked by a :class:`CarrierClock`."""

    def __init__(
        self,
        params: StreamParams,
        *,
        clock: CarrierClock,
        line: Line,
        caller: LeanCaller,
        on_event: Callable[[str, str], None],
        on_closed: Callable[[MediaStream], None] | None = None,
        record_audio_bytes: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            params,
            on_event=on_event,
            on_closed=on_closed,
            record_audio_bytes=record_audio_bytes,
            connect_timeout=connect_timeout,
        )
        self.clock = clock
        self.line = line
        self.caller = caller
        self.frames = StreamFrames(params)
        self.broken = False
        self.outbox_peak = 0
        self._sock: socket.socket | None = None
        self._outbox = bytearray()
        self._keys = MaskKeys()
        self._close_sent = False

    def unsupported(self) -> str | None:
        """Why this stream cannot be carried by the lean path (None: it can)."""
        p = self.params
        if p.codec != "PCMU" or p.track != "inbound_track":
            return f"the lean carrier sends PCMU on inbound_track only, not {p.codec} {p.track}"
        if p.strip_query:
            return "the lean carrier does not strip the stream URL's query"
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, send ``connected`` and ``start``, join the clock, read until the end."""
        reason = self.unsupported()
        if reason is not None:
            raise StreamConnectError(reason)
        try:
            with trio.fail_after(self._connect_timeout):
                sock, rest = await self._connect()
        except (OSError, WebSocketError, trio.TooSlowError) as exc:
            raise StreamConnectError(_describe(exc)) from exc
        self._sock = sock
        try:
            self._send_text(self.frames.connected())
            self._send_text(self.frames.start())
            self.started.set()
            self.clock.add(self)
            task_status.started()
            await self._read_frames(sock, rest)
        finally:
            self.clock.discard(self)
            self._sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._finish(self.close_reason or "cancelled")

    async def _connect(self) -> tuple[socket.socket, bytes]:
        url = urlsplit(self.params.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address)
            if error not in (0, 115):  # EINPROGRESS
                raise OSError(error, "connect failed")
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, "connect failed")
            key = new_key()
            target = url.path or "/"
            if url.query:
                target += "?" + url.query
            headers = []
            if self.params.auth_token and self.params.auth_header:
                headers.append((AUTH_TOKEN_FIELD, self.params.auth_token))
            request = upgrade_request(url.netloc, target, key, headers)
            while request:
                await trio.lowlevel.wait_writable(sock)
                request = request[sock.send(request) :]
            buffer = b""
            while True:
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(65536)
                if not data:
                    raise WebSocketError("the server closed the connection during the upgrade")
                buffer += data
                answer = read_upgrade_response(buffer, key)
                if answer is not None:
                    status, rest = answer
                    if status != 101:
                        raise WebSocketError(f"websocket upgrade rejected with HTTP {status}")
                    return sock, rest
        except BaseException:
            sock.close()
            raise

    def step(self, deadline: float) -> None:
        """One 20 ms tick: echo the marks reached, play 20 ms, send the caller's 20 ms."""
        playback = self.playback
        played = b""
        if not playback.empty:
            for mark in playback.reached_marks():
                self._echo(mark)  # type: ignore[arg-type]
            played = playback.take(FRAME_BYTES)
            if played:
                self.played_bytes += len(played)
                room = self._record_cap - len(self.played_audio)
                if room > 0:
                    self.played_audio += played[:room]
        line = self.line
        line.ticks += 1
        payload = self.caller.next_payload(deadline)
        if self.is_open:
            self._send_text(self.frames.media(payload or SILENCE_PAYLOAD))
            self.media_sent += 1
            while self._dtmf:
                digit = self._dtmf.pop(0)
                frame = self.frames.event("dtmf", {"digit": digit}, occurred_at=utc_now())
                self._send_text(frame)
        if played:
            line.played_frames += 1
            self.caller.bot_audio(played, deadline)

    async def tick(self, caller: bytes | None) -> bytes:
        raise RuntimeError("a lean stream is ticked by its CarrierClock, not by a Line")

    async def stop(self) -> None:
        """Send ``stop`` and close with 1000, as the reference does; idempotent."""
        if self._sock is None or self._stopping or self.closed.is_set():
            return
        self._stopping = True
        self.close_reason = "stopped"
        with trio.move_on_after(1.0):
            self._send_text(self.frames.stop())
            self._send_close(1000)
            await self._drain()
            await self.closed.wait()

    async def drop(self, code: int = 1011) -> None:
        """Close without ``stop`` (a broken media path); idempotent."""
        if self._sock is None or self._stopping or self.closed.is_set():
            return
        self._stopping = True
        self.close_reason = "dropped"
        with trio.move_on_after(1.0):
            self._send_close(code)
            await self._drain()
            await self.closed.wait()

    def _send_text(self, text: bytes) -> None:
        self._send(masked_frame(OP_TEXT, text, self._keys.next()))

    def _send_close(self, code: int) -> None:
        if not self._close_sent:
            self._close_sent = True
            self._send(masked_frame(OP_CLOSE, close_payload(code), self._keys.next()))

    def _send(self, data: bytes) -> None:
        """Write now; what the socket does not take waits in the outbox for the next write."""
        sock = self._sock
        if sock is None:
            return
        outbox = self._outbox
        if outbox:
            outbox += data
            data = bytes(outbox)
            outbox.clear()
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the reader sees the broken connection and ends the stream
        if sent < len(data):
            outbox += data[sent:]
            self.outbox_peak = max(self.outbox_peak, len(outbox))
            if len(outbox) > MAX_OUTBOX and not self.broken:
                # The server stopped reading: give up on the stream (the reader sees EOF).
                log.warning("stream %s: %d bytes unread", self.params.stream_id, len(outbox))
                self.broken = True
                outbox.clear()
                sock.shutdown(socket.SHUT_RDWR)

    async def _drain(self) -> None:
        sock = self._sock
        while sock is not None and self._outbox:
            await trio.lowlevel.wait_writable(sock)
            self._send(b"")

    async def _read_frames(self, sock: socket.socket, rest: bytes) -> None:
        reader = FrameReader()
        data = rest
        while True:
            if data:
                try:
                    messages = reader.feed(data)
                except WebSocketError as exc:
                    log.warning("stream %s: %s", self.params.stream_id, exc)
                    self._send_close(1002)
                    self.close_reason = self.close_reason or "server_closed"
                    return
                for opcode, payload in messages:
                    if opcode == OP_CLOSE:
                        self.close_code = close_code(payload)
                        if not self._stopping:
                            self.close_reason = "server_closed"
                        self._send_close(self.close_code or 1000)
                        return
                    self._on_message(opcode, payload)
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                if not self._stopping:
                    self.close_reason = "server_closed"
                return

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            if payload.startswith(_SERVER_MEDIA) and payload.endswith(_SERVER_MEDIA_END):
                self.frames_in["media"] += 1
                self._play(payload[len(_SERVER_MEDIA) : -len(_SERVER_MEDIA_END)])
            else:
                self._handle_json(payload)
        elif opcode == OP_PING:
            self._send(masked_frame(OP_PONG, payload, self._keys.next()))
        elif opcode == OP_BINARY:
            self._error("100003", "malformed_frame", "binary frames are not accepted")

    def _handle_json(self, message: bytes) -> None:
        """Everything but the common media frame: the reference's checks, synchronously."""
        try:
            frame = json.loads(message)
        except ValueError as exc:
            frame = exc
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            self.frames_in["malformed"] += 1
            self._error("100003", "malformed_frame", "not a JSON object with an event")
            return
        event = frame["event"]
        self.frames_in[event] += 1
        if event == "media":
            media = frame.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str):
                self._error("100004", "invalid_media", "media.payload must be a base64 string")
                return
            self._play(payload.encode())
        elif event == "mark":
            mark = frame.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                self._error("100003", "malformed_frame", "mark.name must be a string")
                return
            self.marks_received.append(name)
            self._on_event("mark", name)
            if self.playback.empty:
                self._echo(name)
            else:
                self.playback.push_mark(name)
        elif event == "clear":
            self.clears += 1
            pending = self.playback.clear()
            self._on_event("clear", "")
            for mark in pending:
                self._echo(mark)  # type: ignore[arg-type]
        else:
            self._error("100003", "malformed_frame", f"unknown event {event!r}")

    def _play(self, b64: bytes) -> None:
        if not self._rtp:
            self.media_ignored += 1  # mp3 mode, as in the reference
            return
        try:
            audio = a2b_base64(b64, strict_mode=True)
        except (Base64Error, ValueError):
            self._error("100004", "invalid_media", "media.payload is not valid base64")
            return
        if not audio or len(audio) % FRAME_BYTES or len(audio) > MAX_CHUNK_BYTES:
            self._error(
                "100004",
                "invalid_media",
                f"payload of {len(audio)} bytes is not a multiple of 20 ms up to 30 s",
            )
            return
        if self.playback.queued_bytes + len(audio) > MAX_QUEUED_BYTES:
            self._error("100005", "rate_limit_reached", "more than 2 minutes of audio queued")
            return
        self.playback.push(alaw_to_mulaw(audio) if self._alaw_in else audio)

    def _echo(self, name: str) -> None:
        self.marks_echoed.append(name)
        if self.is_open:
            self._send_text(self.frames.mark(name))

    def _error(self, code: str, title: str, detail: str) -> None:  # type: ignore[override]
        self.errors_sent.append(code)
        if self.is_open:
            self._send_text(self.frames.error(code, title, detail))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "websocket connection timed out"
    if isinstance(exc, WebSocketError):
        return str(exc)
    return f"websocket connection failed: {exc}"
