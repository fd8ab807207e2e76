"""The carrier's side of a call: the media-stream WebSocket client and the call's audio clock.

Two pieces, both used by :mod:`voice_trio.sim.telnyx` and usable on their own in tests:

- :class:`Line` is the phone line of one call. Its clock ticks every 20 ms on a fixed
  schedule (``trio.sleep_until``; a tick that is late does not push the next one back, and
  after 200 ms of lag the schedule is reset rather than bursting). Each tick asks the party on
  the phone (an :class:`AudioPort`, e.g. the scripted caller) for the next 20 ms of its audio,
  hands it to the media stream and to any taps (the transcription emulation), then plays the
  next 20 ms of queued bot audio to the party. Audio queued by ``speak``/``playback_start``
  (announcements) plays when the stream has nothing to play.
- :class:`MediaStream` is one WebSocket opened towards the server's ``stream_url``
  (``shared/docs/protocols/telnyx.md`` §3; ``docs/protocols/telnyx.md``). A
  ``stream_auth_token`` is sent as the ``x-telnyx-streaming-auth-token`` upgrade header and
  as that field of the ``connected`` frame, as Telnyx documents (``auth_header``,
  ``auth_in_connected`` turn either off); ``strip_query`` connects without the URL's query
  string (nothing documents that Telnyx keeps it). Then ``connected``, ``start`` (top-level
  ``stream_id``; string ``sequence_number``), then a ``media`` frame per tick with string
  ``chunk``/``timestamp`` (ms since the stream started) and the base64 of 160 bytes in the
  stream codec (PCMU, or PCMA transcoded with :func:`voice_trio.audio.mulaw_to_alaw`). The sim
  cannot encode the other codecs Telnyx may stream (G722, OPUS, AMR-WB, L16): such a stream
  says so in ``start.media_format`` (with the codec's rate) and its ``media`` frames carry
  160 placeholder bytes, which is all a server that must refuse the codec gets to see.
  ``inbound_track`` sends the party's audio, ``outbound_track`` what is played to the party,
  ``both_tracks`` both. ``dtmf`` frames follow key presses. From the server it accepts
  ``media`` (played only in ``rtp`` bidirectional mode; the payload must be a whole number
  of 20 ms frames, at most 30 s, else error ``100004``; beyond 2 minutes queued, ``100005``;
  other modes are counted and not played), ``mark`` (echoed once the audio queued before it
  has played, at once if nothing is queued), ``clear`` (drops all unplayed audio and echoes
  the pending marks) and answers anything unparsable with an ``error`` frame ``100003``. :meth:`MediaStream.stop` sends
  ``stop`` and closes with 1000; :meth:`MediaStream.drop` closes without ``stop`` (a lost
  stream, for fault tests); a server that closes the socket just ends the stream.

Knobs: ``out_of_order_share`` (share of media frames swapped with the next one, drawn from
``rng``), ``record_audio_bytes`` (how much played audio each stream keeps for tests),
``connect_timeout``. Hundreds of lines run in one process in load tests, so the per-tick
path formats JSON with ``%`` and reuses a cached base64 silence frame.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import trio
import trio_websocket

from voice_trio.audio import (
    BYTES_PER_MS,
    FRAME_BYTES,
    FRAME_MS,
    MULAW_SILENCE,
    alaw_to_mulaw,
    mulaw_to_alaw,
)

FRAME_S = FRAME_MS / 1000
MAX_LAG_S = 0.2
MAX_CHUNK_BYTES = 30_000 * BYTES_PER_MS  # a server media frame carries 20 ms to 30 s
MAX_QUEUED_BYTES = 120_000 * BYTES_PER_MS
SILENCE_FRAME = bytes([MULAW_SILENCE]) * FRAME_BYTES
PLAYABLE_CODECS = frozenset({"PCMU", "PCMA"})
AUTH_TOKEN_FIELD = "x-telnyx-streaming-auth-token"  # the upgrade header, and in ``connected``
# Every codec Telnyx streams in, with the rate its ``media_format`` reports. The G.711 rate is
# the codec's; the others are the codecs' usual rates, not confirmed for Telnyx (telnyx.md).
STREAM_CODEC_RATES = {
    "PCMU": 8000,
    "PCMA": 8000,
    "G722": 16000,
    "OPUS": 48000,
    "AMR-WB": 16000,
    "L16": 16000,
}

_SILENCE_B64 = {
    "PCMU": base64.b64encode(SILENCE_FRAME).decode(),
    "PCMA": base64.b64encode(mulaw_to_alaw(SILENCE_FRAME)).decode(),
}
_PLACEHOLDER_B64 = base64.b64encode(bytes(FRAME_BYTES)).decode()  # not audio: see above
_MEDIA = (
    '{"event":"media","sequence_number":"%d","stream_id":"%s",'
    '"media":{"track":"%s","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)
_MARK = '{"event":"mark","sequence_number":"%d","stream_id":"%s","mark":{"name":%s}}'
_ERROR = (
    '{"event":"error","sequence_number":"%d","stream_id":"%s",'
    '"error":{"title":"%s","code":"%s","detail":%s}}'
)


class AudioPort:
    """The party on the phone, as the line sees it. This base class is a silent party."""

    def attach(self, line: Line) -> None:
        """The line this party is on (called once, when the party joins the call)."""

    def caller_frame(self, now: float) -> bytes | None:
        """The party's next 20 ms (160 mu-law bytes) starting at ``now``; None is silence."""
        return None

    def bot_audio(self, audio: bytes, now: float) -> None:
        """``audio`` (mu-law) starts playing to the party at ``now``; called only with audio."""

    def on_event(self, kind: str, detail: str, now: float) -> None:
        """Something the party may notice: answered, clear, mark, dtmf, transferred,
        stream_started, stream_stopped, hangup (detail: caller | bot | network)."""


class StreamConnectError(Exception):
    """The media WebSocket could not be opened (the reason becomes ``failure_reason``)."""


class Playback:
    """Audio waiting to be played, with marks between the chunks.

    Items are ``bytes`` or marks (a mark name, or a ``trio.Event`` for the sim's own use).
    A mark is *reached* once it is at the head of the queue at a tick, i.e. every chunk queued
    before it has been handed out and has had its 20 ms to play.
    """

    def __init__(self) -> None:
        self._items: deque[bytes | object] = deque()
        self._offset = 0  # bytes of the head chunk already played
        self.queued_bytes = 0

    @property
    def empty(self) -> bool:
        return not self._items

    def push(self, audio: bytes) -> None:
        if audio:
            self._items.append(audio)
            self.queued_bytes += len(audio)

    def push_mark(self, mark: object) -> None:
        self._items.append(mark)

    def reached_marks(self) -> list[object]:
        items = self._items
        marks = []
        while items and not isinstance(items[0], bytes):
            marks.append(items.popleft())
        return marks

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of audio from the head, stopping at the next mark."""
        items = self._items
        parts: list[bytes] = []
        need = size
        while need and items and isinstance(items[0], bytes):
            chunk = items[0]
            available = len(chunk) - self._offset
            if available <= need:
                parts.append(chunk[self._offset :] if self._offset else chunk)
                items.popleft()
                self._offset = 0
                need -= available
            else:
                parts.append(chunk[self._offset : self._offset + need])
                self._offset += need
                need = 0
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.queued_bytes -= len(out)
        return out

    def clear(self) -> list[object]:
        """Drop all unplayed audio; the marks that were pending are returned."""
        marks = [item for item in self._items if not isinstance(item, bytes)]
        self._items.clear()
        self._offset = 0
        self.queued_bytes = 0
        return marks


@dataclass(frozen=True, slots=True)
class StreamParams:
    """What the carrier knows about a stream (from ``streaming_start``, dial or answer)."""

    url: str
    stream_id: str
    call_control_id: str
    call_session_id: str
    from_: str
    to: str
    user_id: str
    client_state: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    auth_token: str | None = None  # stream_auth_token
    auth_header: bool = True  # send it as the x-telnyx-streaming-auth-token upgrade header
    auth_in_connected: bool = True  # and in the connected frame
    strip_query: bool = False  # connect to ``url`` without its query string
    codec: str = "PCMU"  # of the audio sent to the server
    track: str = "inbound_track"
    bidirectional_mode: str = "mp3"  # only "rtp" media from the server is played
    bidirectional_codec: str = "PCMU"
    dtmf_frames: bool = True  # key presses as ``dtmf`` frames (else by webhook only)


def _noop_event(kind: str, detail: str) -> None:
    return None


class MediaStream:
    """One media WebSocket from the carrier to the server; see the module docstring.

    ``run`` connects and serves the socket until :meth:`stop` or the server closes it. What
    happened is kept for tests: ``frames_in`` (server frames by event), ``clears``,
    ``marks_received``/``marks_echoed``, ``errors_sent`` (codes), ``media_sent``,
    ``played_bytes`` and the first ``record_audio_bytes`` of ``played_audio``.
    """

    def __init__(
        self,
        params: StreamParams,
        *,
        on_event: Callable[[str, str], None] = _noop_event,
        on_closed: Callable[[MediaStream], None] | None = None,
        out_of_order_share: float = 0.0,
        rng: random.Random | None = None,
        record_audio_bytes: int = 30_000 * BYTES_PER_MS,
        connect_timeout: float = 5.0,
    ) -> None:
        self.params = params
        self.frames_in: Counter[str] = Counter()
        self.clears = 0
        self.marks_received: list[str] = []
        self.marks_echoed: list[str] = []
        self.errors_sent: list[str] = []
        self.media_sent = 0
        self.media_ignored = 0  # server media outside rtp mode
        self.played_bytes = 0
        self.played_audio = bytearray()
        self.started = trio.Event()
        self.closed = trio.Event()
        self.close_reason: str | None = None  # stopped | dropped | server_closed | cancelled
        self.close_code: int | None = None
        self._on_event = on_event
        self._on_closed = on_closed
        self._share = out_of_order_share
        self._rng = rng or random.Random()
        self._record_cap = record_audio_bytes
        self._connect_timeout = connect_timeout
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._seq = 0
        self._chunks = {"inbound": 0, "outbound": 0}
        self._held: str | None = None  # a media frame waiting to be sent out of order
        self._dtmf: list[str] = []
        self._stopping = False
        self._alaw_out = params.codec == "PCMA"
        self._encoded_out = params.codec in PLAYABLE_CODECS  # else placeholder payloads
        self._alaw_in = params.bidirectional_codec == "PCMA"
        self._rtp = params.bidirectional_mode == "rtp"
        self._inbound = params.track in ("inbound_track", "both_tracks")
        self._outbound = params.track in ("outbound_track", "both_tracks")
        self._silence_b64 = _SILENCE_B64.get(params.codec, _PLACEHOLDER_B64)
        self.playback = Playback()

    @property
    def is_open(self) -> bool:
        return self.started.is_set() and not self.closed.is_set() and not self._stopping

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and serve the socket; ``started`` once ``connected`` and ``start`` are sent.

        Raises :class:`StreamConnectError` if that never happens; afterwards it returns
        normally however the socket ends.
        """
        p = self.params
        headers = []
        connected: dict[str, str] = {"event": "connected", "version": "1.0.0"}
        if p.auth_token and p.auth_header:
            headers.append((AUTH_TOKEN_FIELD.encode(), p.auth_token.encode()))
        if p.auth_token and p.auth_in_connected:
            connected[AUTH_TOKEN_FIELD] = p.auth_token
        url = urlsplit(p.url)._replace(query="").geturl() if p.strip_query else p.url
        try:
            async with trio_websocket.open_websocket_url(
                url,
                extra_headers=headers,
                connect_timeout=self._connect_timeout,
                disconnect_timeout=1.0,
            ) as ws:
                self._ws = ws
                await ws.send_message(json.dumps(connected, separators=(",", ":")))
                await ws.send_message(self._start_frame())
                self.started.set()
                task_status.started()
                await self._read(ws)
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
            if not self.started.is_set():
                raise StreamConnectError(_describe(exc)) from exc
        finally:
            if self.started.is_set():
                self._finish(self.close_reason or "cancelled")

    async def stop(self) -> None:
        """Send ``stop`` and close with 1000 (hang-up or ``streaming_stop``); idempotent."""
        ws = self._ws
        if ws is None or self._stopping or self.closed.is_set():
            return
        self._stopping = True
        self.close_reason = "stopped"
        with trio.move_on_after(1.0):
            try:
                if self._held is not None:
                    await ws.send_message(self._held)
                    self._held = None
                p = self.params
                stop = {"user_id": p.user_id, "call_control_id": p.call_control_id}
                await ws.send_message(self._frame("stop", stop))
                await ws.aclose(1000)
            except trio_websocket.ConnectionClosed:
                pass
            await self.closed.wait()

    async def drop(self, code: int = 1011) -> None:
        """Lose the stream while the call stays up: close the socket *without* a ``stop``
        frame (a broken media path; the fault a server must survive). Idempotent."""
        ws = self._ws
        if ws is None or self._stopping or self.closed.is_set():
            return
        self._stopping = True
        self.close_reason = "dropped"
        with trio.move_on_after(1.0):
            try:
                await ws.aclose(code)
            except trio_websocket.ConnectionClosed:
                pass
            await self.closed.wait()

    def press(self, digit: str) -> None:
        """Queue a ``dtmf`` frame (sent on the next tick), unless the stream sends none."""
        if self.params.dtmf_frames:
            self._dtmf.append(digit)

    async def tick(self, caller: bytes | None) -> bytes:
        """One 20 ms step: send the party's frame, return the next 20 ms to play to it."""
        for mark in self.playback.reached_marks():
            await self._echo_mark(mark)  # type: ignore[arg-type]
        played = self.playback.take(FRAME_BYTES)
        if played:
            self.played_bytes += len(played)
            room = self._record_cap - len(self.played_audio)
            if room > 0:
                self.played_audio += played[:room]
        if not self.is_open:
            return played
        try:
            if self._inbound:
                await self._send_media("inbound", caller)
            if self._outbound:
                out = played.ljust(FRAME_BYTES, b"\xff") if played else None
                await self._send_media("outbound", out)
            while self._dtmf:
                digit = self._dtmf.pop(0)
                frame = self._frame("dtmf", {"digit": digit}, occurred_at=_utc_now())
                await self._ws.send_message(frame)  # type: ignore[union-attr]
        except trio_websocket.ConnectionClosed:
            pass  # the reader sees the close and ends the stream
        return played

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _frame(self, event: str, body: dict, **extra: str) -> str:
        """A rare frame (stop, dtmf): built with json, unlike the per-tick media frames."""
        frame = {
            "event": event,
            "sequence_number": str(self._next_seq()),
            "stream_id": self.params.stream_id,
            **extra,
            event: body,
        }
        return json.dumps(frame)

    def _start_frame(self) -> str:
        return start_frame(self.params, self._next_seq())

    async def _send_media(self, track: str, frame: bytes | None) -> None:
        self._chunks[track] = chunk = self._chunks[track] + 1
        if frame is None or not self._encoded_out:
            payload = self._silence_b64
        else:
            payload = base64.b64encode(mulaw_to_alaw(frame) if self._alaw_out else frame).decode()
        text = _MEDIA % (
            self._next_seq(),
            self.params.stream_id,
            track,
            chunk,
            (chunk - 1) * FRAME_MS,
            payload,
        )
        ws: trio_websocket.WebSocketConnection = self._ws  # type: ignore[assignment]
        if self._held is None and self._share and self._rng.random() < self._share:
            self._held = text  # goes out right after the next frame
            return
        await ws.send_message(text)
        self.media_sent += 1
        if self._held is not None:
            held, self._held = self._held, None
            await ws.send_message(held)
            self.media_sent += 1

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                message = await ws.get_message()
                await self._handle(message)
        except trio_websocket.ConnectionClosed as exc:
            if not self._stopping:
                self.close_reason = "server_closed"
            self.close_code = exc.reason.code if exc.reason else None

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._error("100003", "malformed_frame", "binary frames are not accepted")
            return
        try:
            frame = json.loads(message)
        except ValueError as exc:
            frame = exc
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            self.frames_in["malformed"] += 1
            await self._error("100003", "malformed_frame", "not a JSON object with an event")
            return
        event = frame["event"]
        self.frames_in[event] += 1
        if event == "media":
            await self._handle_media(frame)
        elif event == "mark":
            mark = frame.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                await self._error("100003", "malformed_frame", "mark.name must be a string")
                return
            self.marks_received.append(name)
            self._on_event("mark", name)
            if self.playback.empty:
                await self._echo_mark(name)
            else:
                self.playback.push_mark(name)
        elif event == "clear":
            self.clears += 1
            pending = self.playback.clear()
            self._on_event("clear", "")
            for mark in pending:
                await self._echo_mark(mark)  # type: ignore[arg-type]
        else:
            await self._error("100003", "malformed_frame", f"unknown event {event!r}")

    async def _handle_media(self, frame: dict) -> None:
        media = frame.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            await self._error("100004", "invalid_media", "media.payload must be a base64 string")
            return
        if not self._rtp:
            self.media_ignored += 1  # mp3 mode: a sim cannot decode MP3, and PCMU is dropped
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            await self._error("100004", "invalid_media", "media.payload is not valid base64")
            return
        if not audio or len(audio) % FRAME_BYTES or len(audio) > MAX_CHUNK_BYTES:
            await self._error(
                "100004",
                "invalid_media",
                f"payload of {len(audio)} bytes is not a multiple of 20 ms up to 30 s",
            )
            return
        if self.playback.queued_bytes + len(audio) > MAX_QUEUED_BYTES:
            # Bounded like any jitter buffer: a server that races minutes ahead is refused.
            await self._error("100005", "rate_limit_reached", "more than 2 minutes of audio queued")
            return
        self.playback.push(alaw_to_mulaw(audio) if self._alaw_in else audio)

    async def _echo_mark(self, name: str) -> None:
        self.marks_echoed.append(name)
        if self.is_open:
            try:
                await self._ws.send_message(  # type: ignore[union-attr]
                    _MARK % (self._next_seq(), self.params.stream_id, json.dumps(name))
                )
            except trio_websocket.ConnectionClosed:
                pass

    async def _error(self, code: str, title: str, detail: str) -> None:
        self.errors_sent.append(code)
        if self.is_open:
            try:
                await self._ws.send_message(  # type: ignore[union-attr]
                    _ERROR
                    % (self._next_seq(), self.params.stream_id, title, code, json.dumps(detail))
                )
            except trio_websocket.ConnectionClosed:
                pass

    def _finish(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        if self._on_closed is not None:
            self._on_closed(self)


class Line:
    """The phone line of one call: the 20 ms clock between the party, the stream and taps.

    The party uses :meth:`press` and :meth:`hang_up`; the sim wires ``on_dtmf`` and
    ``on_hang_up`` and sets ``stream`` while a media stream is open. ``answered`` and
    ``ended`` are set by the sim; ``hangup_by`` says who ended the call.
    """

    def __init__(
        self,
        party: AudioPort,
        *,
        on_dtmf: Callable[[str], None] | None = None,
        on_hang_up: Callable[[], None] | None = None,
    ) -> None:
        self.party = party
        self.stream: MediaStream | None = None
        self.announcements = Playback()
        self.caller_taps: list[Callable[[bytes], None]] = []
        self.played_taps: list[Callable[[bytes], None]] = []
        self.answered = trio.Event()
        self.ended = trio.Event()
        self.hangup_by: str | None = None
        self.ticks = 0
        self.played_frames = 0
        self.late_resyncs = 0
        self.digits_pressed: list[str] = []
        self._on_dtmf = on_dtmf
        self._on_hang_up = on_hang_up

    def press(self, digit: str) -> None:
        """The party presses a key: a ``dtmf`` frame and a ``call.dtmf.received`` webhook."""
        if self.ended.is_set():
            return
        self.digits_pressed.append(digit)
        if self.stream is not None:
            self.stream.press(digit)
        if self._on_dtmf is not None:
            self._on_dtmf(digit)

    def hang_up(self) -> None:
        """The party hangs up."""
        if not self.ended.is_set() and self._on_hang_up is not None:
            self._on_hang_up()

    def announce(self, audio: bytes) -> trio.Event:
        """Queue audio played by the network itself (speak, playback); the event is set
        once it has all played (or was cleared)."""
        done = trio.Event()
        self.announcements.push(audio)
        self.announcements.push_mark(done)
        return done

    def cancel_announcements(self) -> None:
        for mark in self.announcements.clear():
            if isinstance(mark, trio.Event):
                mark.set()

    def end(self, by: str) -> None:
        if self.ended.is_set():
            return
        self.hangup_by = by
        self.ended.set()
        self.cancel_announcements()
        self.party.on_event("hangup", by, trio.current_time())

    async def run(self) -> None:
        """Tick every 20 ms until cancelled."""
        party = self.party
        deadline = trio.current_time()
        while True:
            deadline += FRAME_S
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if now - deadline > MAX_LAG_S:
                self.late_resyncs += 1
                deadline = now
            self.ticks += 1
            if party is not self.party:
                party = self.party
            frame = party.caller_frame(deadline)
            if self.caller_taps:
                for tap in self.caller_taps:
                    tap(frame or SILENCE_FRAME)
            stream = self.stream
            played = await stream.tick(frame) if stream is not None else b""
            if not played:
                for mark in self.announcements.reached_marks():
                    mark.set()  # type: ignore[attr-defined]
                played = self.announcements.take(FRAME_BYTES)
            if played:
                self.played_frames += 1
                party.bot_audio(played, deadline)
                for tap in self.played_taps:
                    tap(played)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"websocket upgrade rejected with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "websocket connection timed out"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return "websocket closed before the stream started"
    cause = exc.__cause__ or exc
    return f"websocket connection failed: {cause}"


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def start_frame(p: StreamParams, sequence_number: int) -> str:
    """The ``start`` frame Telnyx sends first on a media stream (the lean carrier's too)."""
    return json.dumps(
        {
            "event": "start",
            "sequence_number": str(sequence_number),
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
    )
