"""The Telnyx media socket without Hypercorn's per-message layers: RFC 6455 spoken here.

After the 101, Hypercorn hands the connection's bytes to the app (``compat.hypercorn``,
fix 6 ``websocket_handover``). ``LeanWebSocket`` reads them in the task that asks for the
next message — the call's own — so a frame goes from ``receive_some`` through
``rfc6455.FrameReader`` to the call with no other task, queue or per-message dict; and it
writes each frame whole, in one ``send_all``. What it offers the call is what
``AsgiWebSocket`` offers (``media.call.MediaSocket``), so the call does not know which one
carries it.

What stays the same as on the ASGI path: the read timeout (the connection's watchdog,
one deadline per connection), the message size limit (Hypercorn's), no close frame when
the peer went silent or vanished (the call sees 1006). What is ours: control frames are
answered as they are read (a ping by its pong, a close by its echo), and a client that
breaks the protocol gets a close frame with the reason's code (1002, 1007, 1009) before
the connection is closed, where Hypercorn closed without one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from voice_trio.compat.hypercorn import RawWebSocket
from voice_trio.observability import WIRE
from voice_trio.web.media_socket import Scope, ScopeFacts, SocketClosed
from voice_trio.wire.fastio import FastIO
from voice_trio.wire.rfc6455 import (
    CLOSE_ABNORMAL,
    CLOSE_NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    ProtocolError,
    close_frame,
    frame,
    text_frame,
)

# A media frame is ~400 bytes on the wire; a larger message just takes more reads.
READ_CHUNK = 16 * 1024
# A send waits this long for a peer that stops reading, then the socket is given up: a
# frame cut half-way cannot be taken back, so sends are shielded, but not for ever.
SEND_TIMEOUT_SECONDS = 10.0
# A close frame gets less: it is the last word, and the call is over or ending.
CLOSE_SECONDS = 1.0


class LeanWebSocket(ScopeFacts):
    """One media WebSocket after the 101, on the bytes of its connection.

    ``receive`` must not be called by two tasks at once (the call reads from one task at a
    time); sends may come from any task, and are serialised with the replies ``receive``
    sends to control frames.
    """

    def __init__(self, raw: RawWebSocket, scope: Scope, keeper: trio.Nursery | None = None) -> None:
        self.scope = scope
        self._keeper = keeper  # where ``done_reading`` starts the reading without the call
        self._kept: trio.Event | None = None  # set once that reading has ended
        self._raw = raw
        self._stream = raw.stream
        self._io = FastIO(raw.stream)
        self._send_lock = raw.send_lock
        self._reader = FrameReader(raw.max_message_size)
        self._reader.feed(raw.buffered)
        self.closed = False  # nothing more may be sent: a close went either way, or it broke
        self.close_code: int | None = None  # the peer's: its close code, 1006 if it vanished
        self._close_sent = False
        self._over = False  # nothing more will be read: the connection is being closed
        # Reads are at least this far apart (seconds): the call sets it while nothing in
        # the caller's audio is time-critical, so one wake-up reads several frames.
        self.read_gap = 0.0
        self._last_read = trio.current_time()
        # After a read held back by ``read_gap``: when its bytes began to arrive (the read
        # before it); None when they were read as they came.
        self.gathered_since: float | None = None

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the peer has closed (or broke the protocol, or
        vanished), or once we have closed."""
        if self.closed or self._kept is not None:
            return None
        message = await self._next_message()
        if message is not None:
            WIRE.carrier_in += 1
        return message

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise SocketClosed
        await self._send(text_frame(text))
        WIRE.carrier_out += 1

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame even while the caller is being cancelled (bounded); what
        the peer still sends is read by ``drain``."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
            await self._send_close(code, reason)

    def done_reading(self) -> None:
        """The call reads no more: from now on the socket reads (and drops) what the peer
        still sends, answering its ping or close at once, in the keeper's task."""
        if self._keeper is None or self._kept is not None or self._over:
            return
        self.read_gap = 0.0  # the peer's close is answered at once
        self._kept = trio.Event()
        self._keeper.start_soon(self._keep_reading, self._kept)

    async def drain(self, timeout: float = 35.0) -> None:
        """After our close: read (and drop) what the peer still sends until its close
        frame or its end, bounded; then the connection is closed."""
        with trio.move_on_after(timeout):
            if self._kept is not None:
                await self._kept.wait()  # the keeper reads: wait for it to end
            while not self._over:
                await self._next_message()
        self._finish()

    async def _keep_reading(self, kept: trio.Event) -> None:
        try:
            while not self._over:
                await self._next_message()
        finally:
            kept.set()

    async def _next_message(self) -> str | bytes | None:
        reader = self._reader
        while not self._over:
            try:
                event = reader.next_event()
            except ProtocolError as error:
                await self._fail(error.code, error.reason)
                return None
            if event is None:
                await self._read()
                continue
            opcode, payload = event
            if opcode <= OP_BINARY:
                return payload
            if opcode == OP_PING:
                if not self._close_sent and isinstance(payload, bytes):
                    await self._reply(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code, _ = reader.close or (CLOSE_NO_STATUS, "")
                self.close_code = code
                self.closed = True
                if not self._close_sent:
                    # Echo the code (none for a close without one); the handshake is then
                    # complete, and the server closes the connection first (RFC 6455 §7.1.1).
                    await self._reply(close_frame(None if code == CLOSE_NO_STATUS else code))
                self._finish()
        return None

    async def _read(self) -> None:
        raw = self._raw
        likely_ready = False
        self.gathered_since = None
        if self.read_gap:
            due = self._last_read + self.read_gap
            if due > trio.current_time():
                await trio.sleep_until(due)
                likely_ready = True
                self.gathered_since = self._last_read
        raw.waiting_since = trio.current_time()  # the watchdog's read timeout runs
        try:
            data = await self._io.receive(READ_CHUNK, likely_ready=likely_ready)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""  # the watchdog closed a silent peer's connection, or it broke
        finally:
            raw.waiting_since = math.inf
        if data:
            WIRE.carrier_reads += 1
            self._last_read = trio.current_time()
            self._reader.feed(data)
            return
        # The peer vanished, mid-frame or between frames, without a close frame.
        self.closed = True
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        self._finish()

    async def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: tell it why, and close (RFC 6455 §7.1.7)."""
        self.closed = True
        await self._send_close(code, reason)
        self._finish()

    async def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        await self._reply(close_frame(code, reason), CLOSE_SECONDS)

    async def _reply(self, data: bytes, timeout: float = SEND_TIMEOUT_SECONDS) -> None:
        try:
            await self._send(data, timeout)
        except SocketClosed:
            pass  # the peer is gone: what it was to be told no longer matters

    async def _send(self, data: bytes, timeout: float = SEND_TIMEOUT_SECONDS) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled sender sends nothing
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case: a yield less than ``async with``
        except trio.WouldBlock:
            await lock.acquire()
        try:
            try:
                # Usually the kernel takes the frame at once and nothing here waits (nor
                # is a deadline set: each would stay in Trio's deadline heap for its 10 s);
                # when it does not, the rest is sent shielded and bounded: a frame cut
                # half-way cannot be taken back.
                sent = self._io.write_now(data)
                if sent < len(data):
                    rest = memoryview(data)[sent:] if sent else data
                    with trio.CancelScope(shield=True, relative_deadline=timeout) as sending:
                        await self._stream.send_all(rest)
                    if sending.cancelled_caught:  # the frame may be cut: the stream is unusable
                        raise trio.BrokenResourceError("send timed out")
            finally:
                lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = True
            self._finish()
            raise SocketClosed from exc

    def _finish(self) -> None:
        """Nothing more is read or sent: the connection's own task closes it."""
        self._over = True
        self._raw.release()


@asynccontextmanager
async def open_lean_socket(raw: RawWebSocket, scope: Scope) -> AsyncIterator[LeanWebSocket]:
    """The socket on ``raw`` for the block; on leaving it, the connection is released
    (Hypercorn closes it) and the socket's own reading, if the call left it one, ends."""
    async with trio.open_nursery() as keeper:
        try:
            yield LeanWebSocket(raw, scope, keeper)
        finally:
            raw.release()
            keeper.cancel_scope.cancel()
