"""``SttLink``: a call's connection to Deepgram live STT that survives a dropped socket.

It has the surface the session uses on ``SttStream`` (``send_audio``, ``finalize``,
``close_stream``, ``events()``, ``request_id``, ``audio_seconds``) and underneath it holds one
``connect_stt`` connection at a time:

- **Buffer.** Every chunk of caller audio goes into a ring of the audio since the last
  final transcript (``is_final``), at most ``replay_seconds`` long; past that the oldest
  audio is dropped (and a replay that lacks it says so in the log). A final proves Deepgram
  has committed its span, so that span is released.
- **Pump.** One task per connection sends the buffer to the socket from its cursor, never
  faster than ``replay_rate`` times real time (Deepgram allows 1.25x, deepgram.md §A3).
  ``send_audio`` only appends (and wakes it when there is something to send), so live
  audio queues behind a replay in order and the carrier loop never blocks on Deepgram.
  Being the only sender, it also keeps the socket alive: its wait for audio has a
  deadline, and a KeepAlive goes out whenever nothing was sent for ``keepalive_interval``
  (Deepgram closes a stream that got nothing for 10 s, deepgram.md §A4).
- **Batches.** Live audio goes out in messages of up to ``batch_seconds`` (100 ms: a fifth
  of the messages of 20 ms carrier frames, and each costs a send, a wake-up and framing on
  both sides). The oldest byte of a batch waits at most ``batch_seconds``. While the
  caller is speaking (from ``SpeechStarted`` or a transcript with words until
  ``speech_final`` or ``UtteranceEnd``) batches are ``speech_batch_seconds`` (40 ms: two
  frames, the first waiting 20 ms for the second), so interim results come at most that
  much later and half the messages go out; a turn's end is not delayed by it, because a
  ``Finalize`` sends what is held first. Nothing is held before a ``Finalize`` or
  ``CloseStream``, nor in a replay.
- **Reconnect.** When a connection closes abnormally (``SttClosed`` from its events or from
  a send), the link opens a new one with the same options after a short backoff and
  replays the buffer. Deepgram's timestamps restart at 0 on every connection (§A5), so each
  connection maps its times onto the link's single timeline (the link position where its
  audio began); the consumer of ``events()`` sees one stream and never a recovered drop.
  After ``max_reconnects`` attempts in a row that did not yield a final transcript, or a
  401/402/403 refusal at any point, ``events()`` raises ``SttLost``.
- **Start.** The first connection is opened by ``open_stt_link`` itself: ``SttRejected`` or
  ``SttUnavailable`` come out of it unchanged, before the block runs.

**Tasks.** The link's own task holds the connection (and reconnects): it reads the
socket's events itself, moves them onto the link timeline and queues them for
``events()``; the connection's pump runs beside it, and the socket has no task of its own
(``wire/ws_client.py``): two tasks for one Deepgram stream. Every one lives in the nursery of
``open_stt_link``; leaving the block ends them and closes the socket.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from voice_trio.providers.deepgram.stt import (
    SpeechStarted,
    SttClosed,
    SttError,
    SttEvent,
    SttMetadata,
    SttOptions,
    SttRejected,
    SttStream,
    SttUnavailable,
    Transcript,
    UtteranceEnd,
    connect_stt,
)

__all__ = ["SttLink", "SttLost", "open_stt_link"]

logger = logging.getLogger(__name__)

# Refusals that no retry can fix: bad key, no credit, no access to the model.
FATAL_STATUSES = frozenset({401, 402, 403})

# Parsed events waiting for the consumer. When full, the connection's reader stops reading
# its socket (TCP back-pressure reaches Deepgram); events are never dropped.
_EVENT_QUEUE_SIZE = 64

# The pump sends at most this much audio per WebSocket frame (Deepgram suggests 20-100 ms);
# in live audio it is also how long the oldest byte of a batch may wait (see ``batch_seconds``).
_MAX_FRAME_S = 0.1

# Default live batch (see the module doc); benchmarks set it to 0 to compare.
BATCH_SECONDS = 0.1
# Default batch while the caller speaks (at most the live batch); 0: frame by frame.
SPEECH_BATCH_SECONDS = 0.04

# Idle seconds before the pump sends a KeepAlive (Deepgram: every 3-5 s while not sending
# audio, deepgram.md §A3).
KEEPALIVE_SECONDS = 4.0

# The longest the pump waits for audio at a stretch before it looks again (see ``_pump``):
# how long an unused deadline of its may stay in Trio's deadline heap.
_IDLE_WAIT_S = 0.25

# Unused sending allowance the pacer keeps, so a burst of late carrier frames goes out at
# once; a fresh connection starts with none, so a replay is paced from its first byte.
_PACING_SLACK_S = 0.25

# Per connection, the points where its audio jumped on the link timeline (unsent audio was
# dropped from a full buffer). Older points only matter for long-past timestamps.
_MAX_TIME_BREAKS = 16

_BYTES_PER_SAMPLE = {"mulaw": 1, "alaw": 1, "linear16": 2, "linear32": 4}

OpenStream = Callable[..., AbstractAsyncContextManager[SttStream]]


class SttLost(SttError):
    """Deepgram is gone for this call: reconnecting failed or was refused for good.

    ``reason`` says why; the last underlying error is the ``__cause__``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"lost the Deepgram STT stream: {reason}")
        self.reason = reason


class _AudioRing:
    """The audio since the last final, on the link timeline (absolute byte positions).

    Bounded by ``capacity`` bytes: appending past it drops the oldest bytes.
    """

    __slots__ = ("_data", "capacity", "frame", "start")

    def __init__(self, capacity: int, frame: int) -> None:
        self.capacity = capacity
        self.frame = frame  # bytes per sample frame: cuts never split one
        self.start = 0  # link position of the first byte held
        self._data = bytearray()

    @property
    def end(self) -> int:
        return self.start + len(self._data)

    def append(self, chunk: bytes) -> None:
        self._data += chunk
        excess = len(self._data) - self.capacity
        if excess > 0:
            excess = -(-excess // self.frame) * self.frame
            self.release(self.start + excess)

    def release(self, until: int) -> None:
        """Forget everything before link position ``until`` (rounded down to a frame)."""
        cut = min(until - self.start, len(self._data))
        cut -= cut % self.frame
        if cut > 0:
            del self._data[:cut]
            self.start += cut
            # A bytearray keeps its largest allocation (up to ``capacity``, 80 KB) for the
            # life of the call; once most of it is free, a copy gives the memory back.
            if self._data.__sizeof__() > 4 * len(self._data) + 4096:
                self._data = bytearray(self._data)

    def read(self, pos: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from link position ``pos`` (which must be held)."""
        offset = pos - self.start
        return bytes(self._data[offset : offset + limit])


class _Timeline:
    """Maps one connection's stream times (seconds from its first byte) to link times."""

    __slots__ = ("_bps", "_breaks")

    def __init__(self, link_start: int, bytes_per_second: int) -> None:
        self._bps = bytes_per_second
        # (connection byte, link byte) pairs, increasing in both; at most _MAX_TIME_BREAKS.
        # A list: there is rarely more than the first, and a deque is a 600-byte block.
        self._breaks: list[tuple[int, int]] = [(0, link_start)]

    def jump(self, conn_pos: int, link_pos: int) -> None:
        breaks = self._breaks
        if breaks[-1][0] == conn_pos:
            breaks.pop()
        breaks.append((conn_pos, link_pos))
        if len(breaks) > _MAX_TIME_BREAKS:
            del breaks[0]

    def to_link(self, seconds: float) -> float:
        conn_pos = seconds * self._bps
        base_conn, base_link = self._breaks[0]
        for point in self._breaks:
            if point[0] > conn_pos:
                break
            base_conn, base_link = point
        return round((base_link + conn_pos - base_conn) / self._bps, 6)


class _Pacer:
    """Holds a connection's sends to at most ``rate`` times real time.

    A chunk goes out once the audio sent *including it* fits in ``rate`` times the time
    since the first send, so even the first-to-last-byte rate of a replay stays within
    ``rate``. Allowance left unused carries over up to ``slack`` seconds, for bursts of late
    carrier frames.
    """

    __slots__ = ("_origin", "_rate", "_sent", "_slack")

    def __init__(self, rate: float, slack: float) -> None:
        self._rate = rate
        self._slack = slack
        self._origin: float | None = None
        self._sent = 0.0

    async def ready(self, seconds: float) -> None:
        """Wait until ``seconds`` of audio may be sent, and count them as sent."""
        now = trio.current_time()
        if self._origin is None:
            self._origin = now
        else:
            due = self._origin + (self._sent + seconds) / self._rate
            if due < now - self._slack:
                self._origin += now - self._slack - due
            elif due > now:
                await trio.sleep_until(due)
        self._sent += seconds


@dataclasses.dataclass(eq=False, slots=True)
class _Connection:
    stream: SttStream
    timeline: _Timeline
    cursor: int  # link position of the next byte to send
    sent: int = 0  # bytes sent on this connection
    healthy: bool = False  # a final arrived: Deepgram is transcribing what we send
    finished: bool = False  # closed normally after our CloseStream
    error: SttClosed | None = None
    last_send: float = dataclasses.field(default_factory=trio.current_time)
    # Its reader and its pump run in this scope: failing or finishing ends both.
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)

    def fail(self, error: SttClosed) -> None:
        if not self.scope.cancel_called:
            self.error = error
            self.scope.cancel()

    def finish(self) -> None:
        if not self.scope.cancel_called:
            self.finished = True
            self.scope.cancel()


class _EventQueue:
    """Parsed events from the link's task to the single consumer of ``events()``: what a
    trio memory channel of ``_EVENT_QUEUE_SIZE`` did here, without its ~1.8 KB for the
    life of every call. A list, and an event only while one side waits: the sender when
    it is full (back-pressure, events are never dropped), the receiver when it is empty.

    ``close`` is the sender's end (the receiver drains, then gets ``trio.EndOfChannel``);
    ``close_receiving`` the receiver's (``trio.ClosedResourceError`` to a receive,
    ``trio.BrokenResourceError`` to a send), as the channel's ends behaved.
    """

    __slots__ = ("_events", "_gone", "_has_event", "_has_room", "_sender_closed")

    def __init__(self) -> None:
        self._events: list[SttEvent] = []
        self._sender_closed = False
        self._gone = False  # the receiver closed
        self._has_room: trio.Event | None = None  # while ``send`` waits
        self._has_event: trio.Event | None = None  # while ``receive`` waits

    async def send(self, event: SttEvent) -> None:
        """Queue ``event``, waiting while the queue is full; a checkpoint either way."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while not self._gone and len(self._events) >= _EVENT_QUEUE_SIZE:
            has_room = self._has_room = trio.Event()
            try:
                await has_room.wait()
            finally:
                self._has_room = None
            waited = True
        if self._gone:
            raise trio.BrokenResourceError
        self._events.append(event)
        if self._has_event is not None:
            self._has_event.set()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        self._sender_closed = True
        if self._has_event is not None:
            self._has_event.set()

    async def receive(self) -> SttEvent:
        """The oldest event, waiting for one; a checkpoint either way."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while not self._events:
            if self._gone:
                raise trio.ClosedResourceError
            if self._sender_closed:
                raise trio.EndOfChannel
            has_event = self._has_event = trio.Event()
            try:
                await has_event.wait()
            finally:
                self._has_event = None
            waited = True
        if self._gone:
            raise trio.ClosedResourceError
        event = self._events.pop(0)  # at most _EVENT_QUEUE_SIZE
        if self._has_room is not None:
            self._has_room.set()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return event

    def close_receiving(self) -> None:
        self._gone = True
        self._events.clear()
        for waiting in (self._has_room, self._has_event):
            if waiting is not None:
                waiting.set()


class _EventIterator:
    __slots__ = ("_link",)

    def __init__(self, link: SttLink) -> None:
        self._link = link

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> SttEvent:
        try:
            return await self._link._events.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._link.lost is not None:
                raise self._link.lost from self._link.lost.__cause__
            raise StopAsyncIteration from None


class SttLink:
    """A call's Deepgram STT connection that reconnects and replays; see the module doc.

    Obtained from ``open_stt_link``. Sending may happen from any task; events are read by
    a single consumer through ``events()``.
    """

    # One per call, with some thirty attributes: slots instead of a 1.6 KB instance dict.
    __slots__ = (
        "_api_key",
        "_backoff",
        "_base_url",
        "_batch",
        "_batch_wait",
        "_bps",
        "_closing",
        "_closing_requested",
        "_conn",
        "_events",
        "_finalize_at",
        "_finalized_until",
        "_finished",
        "_keepalive",
        "_lost",
        "_lost_until",
        "_max_frame",
        "_max_reconnects",
        "_open_stream",
        "_opts",
        "_replay_rate",
        "_ring",
        "_sent_before",
        "_speaking",
        "_speech_batch",
        "_speech_wait",
        "_stream_kwargs",
        "_unsent_since",
        "_wake",
        "lost",
        "metadata",
        "reconnects",
        "request_id",
        "request_ids",
    )

    def __init__(
        self,
        base_url: str,
        api_key: str,
        opts: SttOptions,
        *,
        replay_seconds: float,
        max_reconnects: int,
        replay_rate: float,
        backoff: tuple[float, float],
        open_stream: OpenStream,
        stream_kwargs: dict[str, Any],
        batch_seconds: float | None = None,
        speech_batch_seconds: float | None = None,
        keepalive_interval: float | None = KEEPALIVE_SECONDS,
    ) -> None:
        width = _BYTES_PER_SAMPLE.get(opts.encoding)
        if width is None:
            raise ValueError(
                f"SttLink replays raw audio only (mulaw, alaw, linear16, linear32), "
                f"not {opts.encoding!r}"
            )
        if not 0 < replay_rate <= 1.25:
            raise ValueError("replay_rate must be in (0, 1.25] (Deepgram's limit)")
        if replay_seconds <= 0 or max_reconnects < 0:
            raise ValueError("replay_seconds must be positive and max_reconnects >= 0")
        if batch_seconds is None:
            batch_seconds = BATCH_SECONDS
        if not 0 <= batch_seconds <= _MAX_FRAME_S:
            raise ValueError(f"batch_seconds must be in [0, {_MAX_FRAME_S}]")
        if speech_batch_seconds is None:
            speech_batch_seconds = min(SPEECH_BATCH_SECONDS, batch_seconds)
        if not 0 <= speech_batch_seconds <= batch_seconds:
            raise ValueError("speech_batch_seconds must be in [0, batch_seconds]")
        self._base_url = base_url
        self._api_key = api_key
        self._opts = opts
        self._max_reconnects = max_reconnects
        self._replay_rate = replay_rate
        self._backoff = backoff
        self._open_stream = open_stream
        self._stream_kwargs = stream_kwargs
        frame = width * opts.channels
        self._bps = frame * opts.sample_rate
        self._max_frame = max(frame, int(self._bps * _MAX_FRAME_S) // frame * frame)
        # Live audio waits for a whole batch of this many bytes, or for ``_batch_wait`` s.
        self._batch = min(self._max_frame, int(self._bps * batch_seconds) // frame * frame)
        self._batch_wait = batch_seconds
        self._speech_batch = int(self._bps * speech_batch_seconds) // frame * frame
        self._speech_wait = speech_batch_seconds
        self._keepalive = keepalive_interval if keepalive_interval and keepalive_interval > 0 else 0
        self._unsent_since: float | None = None  # when the oldest unsent live byte arrived
        self._speaking = False  # the caller is mid-utterance: speech batches
        self._ring = _AudioRing(max(frame, int(replay_seconds * self._bps)) // frame * frame, frame)
        self._finalized_until = 0  # link position up to which a final covers the audio
        self._lost = 0  # bytes counted in lost_audio_seconds
        self._lost_until = 0  # link position up to which losses are counted
        self._finalize_at: int | None = None  # a Finalize waits for the pump to reach this
        self._wake = trio.Event()
        self._closing = False
        self._closing_requested = trio.Event()
        self._finished = trio.Event()
        self._events = _EventQueue()
        self._conn: _Connection | None = None
        self._sent_before = 0  # bytes sent on connections that are gone
        self.request_id: str | None = None
        self.request_ids: list[str | None] = []
        self.reconnects = 0
        self.metadata: SttMetadata | None = None
        self.lost: SttLost | None = None

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio sent to Deepgram over every connection, replays included
        (what Deepgram bills)."""
        current = self._conn.sent if self._conn is not None else 0
        return (self._sent_before + current) / self._bps

    @property
    def caller_audio_seconds(self) -> float:
        """Seconds of caller audio handed to ``send_audio`` (the link's timeline)."""
        return self._ring.end / self._bps

    @property
    def backlog_seconds(self) -> float:
        """Audio handed to the link but not yet sent on the current connection."""
        start = self._conn.cursor if self._conn is not None else self._ring.start
        return (self._ring.end - start) / self._bps

    @property
    def lost_audio_seconds(self) -> float:
        """Caller audio with no transcript because the replay buffer was full: the part of
        an unfinished segment a replay could not include, or audio a slow socket never took."""
        return self._lost / self._bps

    def events(self) -> AsyncIterator[SttEvent]:
        """Parsed events on the link's timeline, in order, for a single consumer.

        Iteration ends after ``close_stream()`` has finished the stream (or when the block
        exits). Dropped sockets that were recovered never show; ``SttLost`` is raised once
        recovery has failed, after every event received before it.
        """
        return _EventIterator(self)

    @property
    def batch_seconds(self) -> float:
        """How long live audio may wait to go out in a batch (0: never batched)."""
        return self._batch_wait

    @property
    def speaking(self) -> bool:
        """Deepgram hears the caller mid-utterance (live audio goes out unbatched)."""
        return self._speaking

    async def send_audio(self, chunk: bytes, arrived: float | None = None) -> None:
        """Queue one chunk of caller audio; it never blocks on Deepgram.

        ``arrived``: the earliest the chunk can have reached us, when it was read later
        than that (the carrier socket's gathered reads); a batch's wait counts from it, so
        audio waits no longer in all than ``batch_seconds``. Ignored after
        ``close_stream()`` or once the link is lost (the call may carry on without
        transcription). Runs ~50 times a second per call: it appends, and wakes the pump
        only when a batch is due (or the first byte of one arrived, to start its timer).
        """
        if chunk and not (self._closing or self._finished.is_set()):
            ring = self._ring
            ring.append(chunk)
            conn = self._conn
            pending = ring.end - (conn.cursor if conn is not None else ring.start)
            if pending <= len(chunk):
                now = trio.current_time()
                self._unsent_since = now if arrived is None else min(arrived, now)
                self._wake.set()
            elif pending >= (self._speech_batch if self._speaking else self._batch):
                self._wake.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def finalize(self) -> None:
        """Ask Deepgram to flush what it has, once the audio queued so far has been sent."""
        if not (self._closing or self._finished.is_set()):
            self._finalize_at = self._ring.end
            self._wake.set()
        await trio.lowlevel.checkpoint()

    async def close_stream(self, timeout: float = 5.0) -> SttMetadata | None:
        """Send what is queued, then CloseStream; wait up to ``timeout`` s for the end.

        No reconnect is attempted after this. Final Results and the Metadata summary still
        reach ``events()``. Returns the last Metadata if it arrived.
        """
        if not self._closing:
            self._closing = True
            self._closing_requested.set()
            self._wake.set()
        with trio.move_on_after(timeout):
            await self._finished.wait()
        return self.metadata

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold one connection at a time until the link closes or is lost."""
        started = False
        try:
            # A refusal here propagates unchanged: open_stt_link raises it to its caller.
            async with self._open() as stream:
                conn = self._attach(stream)
                task_status.started()
                started = True
                await self._serve(conn)
            await self._keep_connected(conn)
        except Exception as exc:
            if not started:
                raise
            # A bug here must not take the call down with it: the call loses STT only.
            logger.exception("Deepgram STT link failed")
            self._lose(f"internal error: {exc!r}", exc)
        finally:
            self._events.close()
            self._finished.set()

    async def _keep_connected(self, conn: _Connection) -> None:
        """After ``conn`` ended: reconnect with backoff until one closes normally."""
        attempts = 0  # reconnect attempts since the last connection that worked
        error: BaseException | None = conn.error
        worked, finished = conn.healthy, conn.finished
        while not (finished or self._closing):
            if worked:
                attempts = 0
            if attempts >= self._max_reconnects:
                self._lose(f"{attempts} reconnect attempts in a row failed", error)
                return
            attempts += 1
            self.reconnects += 1
            delay = min(self._backoff[0] * 2 ** (attempts - 1), self._backoff[1])
            logger.warning(
                "Deepgram STT lost (%s); reconnect %d/%d in %.2f s",
                error,
                attempts,
                self._max_reconnects,
                delay,
            )
            with trio.move_on_after(delay):
                await self._closing_requested.wait()
            if self._closing:
                return
            worked = finished = False
            try:
                async with self._open() as stream:
                    conn = self._attach(stream)
                    await self._serve(conn)
                error, worked, finished = conn.error, conn.healthy, conn.finished
            except SttRejected as exc:
                if exc.status in FATAL_STATUSES:
                    self._lose(f"reconnect refused with HTTP {exc.status}", exc)
                    return
                error = exc
            except SttUnavailable as exc:
                error = exc

    def _open(self) -> AbstractAsyncContextManager[SttStream]:
        return self._open_stream(self._base_url, self._api_key, self._opts, **self._stream_kwargs)

    def _attach(self, stream: SttStream) -> _Connection:
        """Start a connection at the oldest buffered audio: that is where its replay begins."""
        ring = self._ring
        start = ring.start
        gap_from = max(self._finalized_until, self._lost_until)
        if self.request_ids and start > gap_from:
            self._count_lost(gap_from, start)
            logger.warning(
                "STT replay buffer was full: %.2f s of the segment will not be replayed",
                (start - gap_from) / self._bps,
            )
        if self.request_ids:
            logger.info(
                "Deepgram STT reconnected (%s): replaying %.2f s from %.2f s",
                stream.request_id or "-",
                (ring.end - start) / self._bps,
                start / self._bps,
            )
        conn = _Connection(stream, _Timeline(start, self._bps), cursor=start)
        self._conn = conn
        self.request_id = stream.request_id
        self.request_ids.append(stream.request_id)
        return conn

    def _count_lost(self, start: int, end: int) -> None:
        start = max(start, self._lost_until)
        if end > start:
            self._lost += end - start
            self._lost_until = end

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        lost = SttLost(reason)
        lost.__cause__ = cause
        self.lost = lost
        logger.error("%s (last error: %s)", lost, cause)

    async def _serve(self, conn: _Connection) -> None:
        """Read the connection (in this task) while its pump sends, until it fails or
        finishes: whichever of the two sees that first ends the other (``conn.scope``)."""
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn)
                    await self._read(conn)
        finally:
            self._sent_before += conn.sent
            self._conn = None

    async def _read(self, conn: _Connection) -> None:
        """Events from one connection, moved onto the link timeline, to the consumer."""
        try:
            async for event in conn.stream.events():
                await self._events.send(self._on_event(conn, event))
        except SttClosed as exc:
            conn.fail(exc)
            return
        if self._closing:
            conn.finish()
        else:
            conn.fail(SttClosed(1000, "closed by the server without CloseStream"))

    def _on_event(self, conn: _Connection, event: SttEvent) -> SttEvent:
        to_link = conn.timeline.to_link
        if isinstance(event, Transcript):
            if event.speech_final:
                self._speaking = False
            elif event.text and not self._speaking:
                self._speaking = True
                self._wake.set()  # a batch being held goes out now
            if event.is_final:
                end = round(to_link(event.start + event.duration) * self._bps)
                self._finalized_until = max(self._finalized_until, end)
                self._ring.release(min(end, conn.cursor))
                conn.healthy = True
            return dataclasses.replace(event, start=to_link(event.start))
        if isinstance(event, SpeechStarted):
            self._speaking = True
            self._wake.set()
            return SpeechStarted(timestamp=to_link(event.timestamp))
        if isinstance(event, UtteranceEnd):
            self._speaking = False
            return UtteranceEnd(last_word_end=to_link(event.last_word_end))
        self.metadata = event
        return event

    def _keepalive_due(self, conn: _Connection) -> float:
        """When the pump sends a KeepAlive if nothing else has gone out by then."""
        return conn.last_send + self._keepalive if self._keepalive else math.inf

    def _batch_due(self) -> float:
        """When the live batch being gathered must go out, full or not."""
        assert self._unsent_since is not None
        return self._unsent_since + (self._speech_wait if self._speaking else self._batch_wait)

    def _hold_batch(self, pending: int) -> bool:
        """Whether ``pending`` live bytes should wait for more before going out."""
        return (
            pending < (self._speech_batch if self._speaking else self._batch)
            and self._unsent_since is not None
            and self._finalize_at is None
            and not self._closing
            and trio.current_time() < self._batch_due()
        )

    async def _pump(self, conn: _Connection) -> None:
        """Send the buffer from the connection's cursor: replay first, then live audio; a
        KeepAlive when there was nothing to send for the keep-alive interval."""
        pacer = _Pacer(self._replay_rate, _PACING_SLACK_S)
        stream = conn.stream
        try:
            while True:
                ring = self._ring
                if conn.cursor < ring.start:
                    self._count_lost(conn.cursor, ring.start)
                    logger.warning(
                        "Deepgram STT fell behind: %.2f s of audio dropped unsent",
                        (ring.start - conn.cursor) / self._bps,
                    )
                    conn.timeline.jump(conn.sent, ring.start)
                    conn.cursor = ring.start
                if self._finalize_at is not None and conn.cursor >= self._finalize_at:
                    self._finalize_at = None
                    await stream.finalize()
                    conn.last_send = trio.current_time()
                elif conn.cursor < ring.end and self._hold_batch(ring.end - conn.cursor):
                    # A partial live batch: wait for more audio, for its deadline, or for
                    # something that needs it sent now (speech, Finalize, CloseStream). A
                    # keep-alive falling due first sends it: audio keeps the socket alive.
                    batch_due = self._batch_due()
                    with trio.move_on_at(min(batch_due, self._keepalive_due(conn))):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
                    else:
                        self._unsent_since = None  # deadline: send what there is
                elif conn.cursor < ring.end:
                    # A copy: if the cap drops these bytes while we wait, they still go out
                    # in place, and the next round notices the jump.
                    chunk = ring.read(conn.cursor, self._max_frame)
                    await pacer.ready(len(chunk) / self._bps)
                    await stream.send_audio(chunk)
                    conn.last_send = trio.current_time()
                    conn.cursor += len(chunk)
                    conn.sent += len(chunk)
                    if conn.cursor >= self._ring.end:
                        self._unsent_since = None
                elif self._closing:
                    await stream.close_stream(timeout=0)
                    await trio.sleep_forever()
                else:
                    # Caught up: live audio usually wakes this within 20 ms. The wait's
                    # deadline is re-armed every _IDLE_WAIT_S rather than set at the
                    # keep-alive, 4 s ahead: a deadline left unused stays in Trio's heap
                    # (with its cancel scope) until it passes, ~40 of them per call.
                    keepalive_due = self._keepalive_due(conn)
                    with trio.move_on_at(min(keepalive_due, trio.current_time() + _IDLE_WAIT_S)):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
                    elif trio.current_time() >= keepalive_due:
                        await stream.keep_alive()
                        conn.last_send = trio.current_time()
        except SttClosed as exc:
            conn.fail(exc)


@asynccontextmanager
async def open_stt_link(
    base_url: str,
    api_key: str,
    opts: SttOptions,
    *,
    replay_seconds: float = 10.0,
    max_reconnects: int = 3,
    replay_rate: float = 1.2,
    backoff: tuple[float, float] = (0.1, 1.0),
    open_stream: OpenStream = connect_stt,
    batch_seconds: float | None = None,
    speech_batch_seconds: float | None = None,
    keepalive_interval: float | None = KEEPALIVE_SECONDS,
    **stream_kwargs: Any,
) -> AsyncIterator[SttLink]:
    """Connect to Deepgram live STT and yield an ``SttLink`` that reconnects on drops.

    ``replay_seconds`` caps the audio kept for replay; ``replay_rate`` (at most 1.25) is how
    much faster than real time a replay is sent; ``batch_seconds`` (at most 0.1, 0 for no
    batching; default ``BATCH_SECONDS``) is how much live audio is gathered per message,
    ``speech_batch_seconds`` (at most ``batch_seconds``; default ``SPEECH_BATCH_SECONDS``)
    how much while the caller speaks; reconnect ``n`` waits ``min(backoff[0] * 2**(n-1), backoff[1])`` s; a KeepAlive goes out
    whenever nothing was sent for ``keepalive_interval`` s (``None``: never). Other keyword
    arguments go to ``open_stream`` (``connect_stt``: ``connect_timeout``, ...).

    Raises what the first connection raises (``SttRejected``, ``SttUnavailable``)
    unchanged. Leaving the block ends every task and closes the socket; call
    ``close_stream()`` first to wait for the last results. An exception from the block
    comes out unchanged, not wrapped in an exception group.
    """
    link = SttLink(
        base_url,
        api_key,
        opts,
        replay_seconds=replay_seconds,
        max_reconnects=max_reconnects,
        replay_rate=replay_rate,
        backoff=backoff,
        open_stream=open_stream,
        stream_kwargs=stream_kwargs,
        batch_seconds=batch_seconds,
        speech_batch_seconds=speech_batch_seconds,
        keepalive_interval=keepalive_interval,
    )
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(link._run)
        except BaseException as exc:
            # Raised outside the nursery so the caller gets it bare, not in a group.
            error = exc
        if error is None:
            try:
                yield link
            except BaseException as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    link._events.close_receiving()
    if error is not None:
        raise error
