"""The carrier's media streams for load tests: every call's stream on one reactor thread.

The reference carrier (:mod:`voice_trio.sim.carrier`) gives each call a clock task, a
trio-websocket connection and a JSON round trip per frame: about as much CPU per call as the
server under test spends. This module keeps its wire behaviour and drops that machinery:

- :class:`StreamFrames` builds the exact text frames :class:`~voice_trio.sim.carrier.MediaStream`
  sends (``connected``, ``start``, ``media``, ``mark``, ``dtmf``, ``stop``, ``error``), as
  bytes. A ``media`` frame is one ``%`` over a per-stream template and a payload the caller
  base64-encoded once per utterance (:func:`~voice_trio.sim.lean_caller.speech_payloads`).
- :class:`StreamSession` is one stream over a plain non-blocking socket: the RFC 6455
  handshake and framing of :mod:`voice_trio.sim.rfc6455`, one ``send`` per frame, every
  frame masked with a fresh random key. Of what the server sends, only ``media`` frames are
  common; they are recognised by their prefix (the server builds them by concatenation) and
  their payload decoded with one ``a2b_base64``; anything else (``mark``, ``clear``, errors,
  a ``media`` frame spelt differently) takes the reference's JSON path and checks.
- :class:`MediaEngine` runs every session of the process on one :class:`~voice_trio.sim.reactor.Reactor`
  thread and ticks them. Pacing is the reference's rule: each stream gets a tick every 20 ms
  on a fixed schedule (a late tick does not push the next one back; after 200 ms of lag the
  schedule restarts from now). A stream's schedule starts on one of ``phases`` offsets 2 ms
  apart, so a hundred calls cost the clock at most 500 wake-ups a second, not 5 000, and
  the frames of different calls still reach the server spread over the 20 ms.

The Trio side of a stream (what :class:`~voice_trio.sim.telnyx_calls.SimCall` holds) is
:class:`~voice_trio.sim.lean_telnyx.LeanMediaStream`: it opens, stops and drops its session
through the reactor, and the session reports back through ``notify`` (a thread-safe call
into Trio). The session updates that stream's counters (``media_sent``, ``frames_in``,
``marks_echoed``, ...) and plays into its ``playback``; only the reactor's thread writes them.

Limits: the stream sends PCMU on ``inbound_track`` only (the server's choice; anything else
fails the stream, as the reference fails what it cannot play) and does not simulate
out-of-order frames. Announcements and transcription taps, which the reference line plays,
are not ticked here: the calls of a load test do not use them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
from binascii import Error as Base64Error
from binascii import a2b_base64
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from voice_trio.audio import FRAME_BYTES, FRAME_MS, alaw_to_mulaw
from voice_trio.sim.carrier import (
    AUTH_TOKEN_FIELD,
    MAX_CHUNK_BYTES,
    MAX_LAG_S,
    MAX_QUEUED_BYTES,
    SILENCE_FRAME,
    Line,
    MediaStream,
    StreamParams,
    start_frame,
)
from voice_trio.sim.lean_caller import LeanCaller
from voice_trio.sim.reactor import Reactor, Timer
from voice_trio.sim.rfc6455 import (
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
from voice_trio.sim.telnyx_webhooks import utc_now

log = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000
SILENCE_PAYLOAD = base64.b64encode(SILENCE_FRAME)  # 20 ms of mu-law silence
MAX_OUTBOX = 1 << 20  # bytes the server has not taken; beyond this the stream is dropped
CLOSE_WAIT_S = 1.0  # for the server's close frame after ours, as the reference waits
LATENESS_KEPT = 200_000
_SERVER_MEDIA = b'{"event":"media","media":{"payload":"'  # how the server builds media frames
_SERVER_MEDIA_END = b'"}}'
_EINPROGRESS = 115

Notify = Callable[..., None]  # notify(fn, *args): run fn(*args) on the Trio side, soon


def unsupported(params: StreamParams) -> str | None:
    """Why a stream cannot be carried by the lean path (None: it can)."""
    if params.codec != "PCMU" or params.track != "inbound_track":
        return (
            f"the lean carrier sends PCMU on inbound_track only, not {params.codec} {params.track}"
        )
    if params.strip_query:
        return "the lean carrier does not strip the stream URL's query"
    return None


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
        return start_frame(self.params, self.next_seq()).encode()

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


class MediaEngine:
    """Every lean stream of a process, on one reactor thread, with one 20 ms clock."""

    def __init__(self, reactor: Reactor, phases: int = 10) -> None:
        self.reactor = reactor
        self.phases = phases
        self.step_s = FRAME_S / phases
        self.late_resyncs = 0
        self.ticks = 0  # stream ticks, all streams
        self.outbox_peak = 0  # the largest unsent backlog any stream had
        self.lateness: list[float] = []  # seconds each clock wake-up came after its deadline
        self._slots: list[list[StreamSession]] = [[] for _ in range(phases)]
        self._where: dict[StreamSession, int] = {}
        self._epoch = 0.0
        self._index = 0  # the clock position armed (a multiple of step_s after the epoch)
        self._fired = -1  # the last position ticked
        self._timer: Timer | None = None

    @property
    def streams(self) -> int:
        return len(self._where)

    def add(self, session: StreamSession) -> None:
        """Tick ``session`` from the next clock position on (reactor thread)."""
        now = self.reactor.now()
        if not self._where:
            self._epoch, self._index, self._fired = now, 0, -1
        index = max(self._fired + 1, math.ceil((now - self._epoch) / self.step_s))
        slot = index % self.phases
        self._slots[slot].append(session)
        self._where[session] = slot
        if self._timer is None or index < self._index:
            self._arm(index)

    def discard(self, session: StreamSession) -> None:
        slot = self._where.pop(session, None)
        if slot is not None:
            self._slots[slot].remove(session)

    def _arm(self, index: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._where:
            return
        slots, phases = self._slots, self.phases
        while not slots[index % phases]:
            index += 1
        self._index = index
        self._timer = self.reactor.call_at(self._epoch + index * self.step_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._fired = self._index
        deadline = self._epoch + self._index * self.step_s
        late = self.reactor.now() - deadline
        lateness = self.lateness
        lateness.append(late)
        if len(lateness) > LATENESS_KEPT:
            del lateness[: LATENESS_KEPT // 2]
        if late > MAX_LAG_S:
            # Do not burst through the missed ticks: the schedule restarts from now.
            self._epoch += late
            deadline += late
            self.late_resyncs += 1
            for session in self._where:
                session.line.late_resyncs += 1
        sessions = tuple(self._slots[self._index % self.phases])
        self.ticks += len(sessions)
        for session in sessions:
            try:
                session.step(deadline)
            except Exception:
                # One broken stream must not stop the clock of every other call.
                log.exception("lean stream %s failed", session.frames.params.stream_id)
                session.abort("error")
        self._arm(self._index + 1)


class StreamSession:
    """One media stream on the reactor's thread; see the module docstring."""

    def __init__(
        self,
        engine: MediaEngine,
        stream: MediaStream,
        *,
        caller: LeanCaller,
        line: Line,
        notify: Notify,
        on_opened: Callable[[str | None], None],
        on_closed: Callable[[str, int | None], None],
    ) -> None:
        self.engine = engine
        self.reactor = engine.reactor
        self.stream = stream  # the Trio side: its counters and playback are updated here
        self.frames = StreamFrames(stream.params)
        self.caller = caller
        self.line = line
        self.broken = False
        self.outbox_peak = 0  # the most bytes the socket had not taken yet
        self._notify = notify
        self._on_opened = on_opened
        self._on_closed = on_closed
        self._sock: socket.socket | None = None
        self._key = ""
        self._buffer = b""
        self._reader = FrameReader()
        self._outbox = bytearray()
        self._keys = MaskKeys()
        self._open = False
        self._stopping = False
        self._close_sent = False
        self._closed = False
        self._timer: Timer | None = None
        self._dtmf: list[str] = []

    # -- opening (reactor thread) -------------------------------------------------------

    def open(self, timeout: float) -> None:
        params = self.stream.params
        reason = unsupported(params)
        if reason is not None:
            self._fail_open(reason)
            return
        url = urlsplit(params.url)
        try:
            address = socket.getaddrinfo(
                url.hostname or "127.0.0.1", url.port or 80, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(address[0], address[1], address[2])
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address[4])
        except OSError as exc:
            self._fail_open(f"websocket connection failed: {exc}")
            return
        self._sock = sock
        if error not in (0, _EINPROGRESS):
            self._fail_open(f"websocket connection failed: {_strerror(error)}")
            return
        self._timer = self.reactor.call_later(
            timeout, self._fail_open, "websocket connection timed out"
        )
        self.reactor.watch(sock.fileno(), None, self._connected)

    def _connected(self) -> None:
        sock = self._sock
        assert sock is not None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fail_open(f"websocket connection failed: {_strerror(error)}")
            return
        params = self.stream.params
        url = urlsplit(params.url)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = []
        if params.auth_token and params.auth_header:
            headers.append((AUTH_TOKEN_FIELD, params.auth_token))
        self._key = new_key()
        self.reactor.watch(sock.fileno(), self._handshake)
        self._send(upgrade_request(url.netloc, target, self._key, headers))

    def _handshake(self) -> None:
        data = self._recv()
        if data is None:
            return
        if not data:
            self._fail_open("websocket closed before the stream started")
            return
        self._buffer += data
        try:
            answer = read_upgrade_response(self._buffer, self._key)
        except WebSocketError as exc:
            self._fail_open(str(exc))
            return
        if answer is None:
            return
        status, rest = answer
        if status != 101:
            self._fail_open(f"websocket upgrade rejected with HTTP {status}")
            return
        self._buffer = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open = True
        self._send_text(self.frames.connected())
        self._send_text(self.frames.start())
        assert self._sock is not None
        self.reactor.watch(
            self._sock.fileno(), self._readable, self._flush if self._outbox else None
        )
        self.engine.add(self)
        self._notify(self._on_opened, None)
        if rest:
            self._feed(rest)

    def _fail_open(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        self._notify(self._on_opened, reason)

    # -- commands from the Trio side (reactor thread) ----------------------------------

    def stop(self) -> None:
        """Send ``stop`` and close with 1000; the session ends on the server's close."""
        if self._open and not self._stopping:
            self._stopping = True
            self._send_text(self.frames.stop())
            self._close(1000)

    def drop(self, code: int) -> None:
        """Close without ``stop`` (a broken media path)."""
        if self._open and not self._stopping:
            self._stopping = True
            self._close(code)

    def press(self, digit: str) -> None:
        if self.stream.params.dtmf_frames:
            self._dtmf.append(digit)

    def abort(self, reason: str = "cancelled") -> None:
        """End now, without a close handshake (the call is gone, or the session broke)."""
        self._end(reason, None)

    # -- the clock (reactor thread) -----------------------------------------------------

    def step(self, deadline: float) -> None:
        """One 20 ms tick: echo the marks reached, play 20 ms, send the caller's 20 ms."""
        stream = self.stream
        playback = stream.playback
        played = b""
        if not playback.empty:
            for mark in playback.reached_marks():
                self._echo(mark)  # type: ignore[arg-type]
            played = playback.take(FRAME_BYTES)
            if played:
                stream.played_bytes += len(played)
        line = self.line
        line.ticks += 1
        payload = self.caller.next_payload(deadline)
        if self._open and not self._stopping:
            self._send_text(self.frames.media(payload or SILENCE_PAYLOAD))
            stream.media_sent += 1
            while self._dtmf:
                digit = self._dtmf.pop(0)
                frame = self.frames.event("dtmf", {"digit": digit}, occurred_at=utc_now())
                self._send_text(frame)
        if played:
            line.played_frames += 1
            self.caller.bot_audio(played, deadline)

    # -- the socket (reactor thread) ----------------------------------------------------

    def _recv(self) -> bytes | None:
        """What the socket has (b"": the peer closed; None: nothing yet)."""
        sock = self._sock
        if sock is None:
            return b""
        try:
            return sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _readable(self) -> None:
        data = self._recv()
        if data is None:
            return
        if not data:
            self._end("stopped" if self._stopping else "server_closed", None)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except WebSocketError as exc:
            log.warning("stream %s: %s", self.frames.params.stream_id, exc)
            self._close(1002)
            self._end("stopped" if self._stopping else "server_closed", None)
            return
        for opcode, payload in messages:
            if self._closed:
                return
            if opcode == OP_CLOSE:
                code = close_code(payload)
                self._close(code or 1000)  # the reply, unless ours went first
                self._end("stopped" if self._stopping else "server_closed", code)
                return
            self._on_message(opcode, payload)

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            if payload.startswith(_SERVER_MEDIA) and payload.endswith(_SERVER_MEDIA_END):
                self.stream.frames_in["media"] += 1
                self._play(payload[len(_SERVER_MEDIA) : -len(_SERVER_MEDIA_END)])
            else:
                self._handle_json(payload)
        elif opcode == OP_PING:
            self._send(masked_frame(OP_PONG, payload, self._keys.next()))
        elif opcode == OP_BINARY:
            self._error("100003", "malformed_frame", "binary frames are not accepted")

    def _handle_json(self, message: bytes) -> None:
        """Everything but the common media frame: the reference's checks, synchronously."""
        stream = self.stream
        try:
            frame = json.loads(message)
        except ValueError as exc:
            frame = exc
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            stream.frames_in["malformed"] += 1
            self._error("100003", "malformed_frame", "not a JSON object with an event")
            return
        event = frame["event"]
        stream.frames_in[event] += 1
        now = self.reactor.now()
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
            stream.marks_received.append(name)
            self.caller.on_event("mark", name, now)
            if stream.playback.empty:
                self._echo(name)
            else:
                stream.playback.push_mark(name)
        elif event == "clear":
            stream.clears += 1
            pending = stream.playback.clear()
            self.caller.on_event("clear", "", now)
            for mark in pending:
                self._echo(mark)  # type: ignore[arg-type]
        else:
            self._error("100003", "malformed_frame", f"unknown event {event!r}")

    def _play(self, b64: bytes) -> None:
        stream = self.stream
        if stream.params.bidirectional_mode != "rtp":
            stream.media_ignored += 1  # mp3 mode, as in the reference
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
        if stream.playback.queued_bytes + len(audio) > MAX_QUEUED_BYTES:
            self._error("100005", "rate_limit_reached", "more than 2 minutes of audio queued")
            return
        alaw = stream.params.bidirectional_codec == "PCMA"
        stream.playback.push(alaw_to_mulaw(audio) if alaw else audio)

    def _echo(self, name: str) -> None:
        self.stream.marks_echoed.append(name)
        if self._open and not self._stopping:
            self._send_text(self.frames.mark(name))

    def _error(self, code: str, title: str, detail: str) -> None:
        self.stream.errors_sent.append(code)
        if self._open and not self._stopping:
            self._send_text(self.frames.error(code, title, detail))

    def _send_text(self, text: bytes) -> None:
        self._send(masked_frame(OP_TEXT, text, self._keys.next()))

    def _close(self, code: int) -> None:
        """Send our close frame (once); wait a second at most for the server's."""
        if not self._close_sent and self._sock is not None:
            self._close_sent = True
            self._send(masked_frame(OP_CLOSE, close_payload(code), self._keys.next()))
            if self._timer is None:
                reason = "stopped" if self._stopping else "server_closed"
                self._timer = self.reactor.call_later(CLOSE_WAIT_S, self._end, reason, None)

    def _send(self, data: bytes) -> None:
        """One write; what the socket does not take waits in the outbox, flushed when the
        socket is writable again."""
        sock = self._sock
        if sock is None:
            return
        outbox = self._outbox
        if outbox:
            outbox += data
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the reader sees the broken connection and ends the session
        if sent < len(data):
            outbox += data[sent:]
            self.outbox_peak = max(self.outbox_peak, len(outbox))
            self.reactor.watch(
                sock.fileno(), self._readable if self._open else self._handshake, self._flush
            )

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        outbox = self._outbox
        try:
            sent = sock.send(outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            outbox.clear()
            sent = 0
        del outbox[:sent]
        self.outbox_peak = max(self.outbox_peak, len(outbox))
        self.engine.outbox_peak = max(self.engine.outbox_peak, len(outbox))
        if len(outbox) > MAX_OUTBOX:
            log.warning(
                "stream %s: the server left %d bytes unread",
                self.frames.params.stream_id,
                len(outbox),
            )
            self.broken = True
            self._end("server_closed", None)
            return
        if not outbox:
            self.reactor.watch(sock.fileno(), self._readable if self._open else self._handshake)

    def _end(self, reason: str, code: int | None) -> None:
        if self._closed:
            return
        self._closed = True
        was_open = self._open
        self._open = False
        self._release()
        if was_open:
            self._notify(self._on_closed, reason, code)
        else:
            self._notify(self._on_opened, "websocket closed before the stream started")

    def _release(self) -> None:
        self.engine.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sock, self._sock = self._sock, None
        if sock is not None:
            self.reactor.unwatch(sock.fileno())
            sock.close()


def _strerror(code: int) -> str:
    return os.strerror(code)
