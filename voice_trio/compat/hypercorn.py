"""Corrections to Hypercorn 0.18's trio worker, installed by ``voice_trio.compat.apply()``.

Each is a ``Fix`` in ``FIXES`` (guarded by the Hypercorn releases it was checked against);
docs/upstream.md has the report of each bug, tests/test_compat.py the canary that fails
once the installed Hypercorn no longer has it.

1. **close_race** (research/trio-stack.md, gotcha 11). ``TCPServer._close`` calls
   ``send_eof`` without the connection's ``send_lock`` while ``protocol_send`` may be inside
   ``send_all`` for the close-frame reply. Trio refuses the overlap with
   ``BusyResourceError``, which ``protocol_send`` does not catch, and the error escapes far
   enough to end every connection of the process. Taking ``send_lock`` in ``_close`` (unless
   this task already holds it) serialises the two.
2. **reason_phrases.** Hypercorn writes ``HTTP/1.1 101`` with an empty reason; clients and
   checklists that look for ``101 Switching Protocols`` get the standard phrase.
3. **finished_app_queue: a finished app never blocks its connection.** Hypercorn hands
   every incoming WebSocket message (and the final ``websocket.disconnect``) to the app
   through a bounded channel (``max_app_queue_size``, 10) and ``await``s the put. Once the
   app has returned nobody reads that channel; if the peer still sends (a carrier streaming
   a few frames after our close, or any peer while the server is too slow to keep up) the
   channel fills, the reader blocks on the put forever, never sees the peer's close or the
   read timeout, and the connection's tasks and socket stay for the life of the process.
   ``AsgiWebSocket.drain`` hides this at normal speed, but a drain that times out or is
   cancelled (overload, shutdown) leaked the connection; under a server slowed five times
   most calls leaked this way (docs/benchmarks.md). When the app task ends its receiving
   end is now closed, which wakes a put already waiting, and every later put drops its
   message: the reader answers the close handshake, honours the read timeout, and the
   connection ends normally. Messages for a finished app have no reader, so nothing is lost.
4. **read_loop: a leaner read loop.** Hypercorn enters a fresh ``fail_after(read_timeout)``
   for every read and asks the kernel for up to 64 KiB each time. On a media socket that is
   a new cancel scope 50 times a second per call (4.4 % of the server's CPU in the round 2
   profile), and a 64 KiB ``bytes`` allocated and shrunk per read. The loop now keeps one
   cancel scope per connection and moves its deadline before each read (the same read
   timeout, never counting time spent handing data to the protocol), and reads up to
   ``READ_CHUNK``: a media frame is ~300 bytes, a large request body just takes more reads.
5. **connection_limits.** Hypercorn serves every connection it accepts; a client opening
   thousands (or holding each with a body sent a byte at a time) takes the descriptors and
   memory of every call. With ``ConnectionLimits`` on the config (``server.py`` sets it from
   ``MAX_CONNECTIONS`` and ``MAX_CONNECTIONS_PER_CLIENT``) a connection over either limit
   is answered ``503`` with a JSON reason and closed before any protocol work. The per-client
   count is by peer address: behind a proxy, or for Telnyx's media servers, one address
   carries many clients, which is why its default is high. (How long a request may take is
   bounded elsewhere: its head by Hypercorn's ``keep_alive_timeout``, which runs until the
   head is complete, and its body by Quart's ``BODY_TIMEOUT``, ``REQUEST_TIMEOUT`` here.)
6. **websocket_handover: the bytes of an upgraded connection, for the app** (a feature,
   not a bug; it rides on fix 4's read loop). Hypercorn carries every WebSocket message
   through four layers (its protocol and stream classes, wsproto's events, the ASGI queue
   to the app task, a dict per message). ``websocket_handover(scope)`` lets an ASGI app
   take one HTTP/1.1 WebSocket connection out of them instead: ``accept()`` stops the
   connection's reader (it was waiting for bytes the client may not send before the 101),
   sends Hypercorn's own 101 — the same headers, access log line and reason phrase, minus
   any ``permessage-deflate``, which is not negotiated — and returns a ``RawWebSocket``:
   the Trio stream, the connection's send lock and Hypercorn's limits. The connection's
   reader task stays as its watchdog: it closes a connection that waits for bytes longer
   than ``read_timeout`` (one deadline per connection, as fix 4), and closes it the
   Hypercorn way (``_close``) once the app calls ``release()``. Everything before the
   handler runs is untouched: connection limits (fix 5), Hypercorn's own 400/404 answers
   to a bad upgrade, the app's refusal before accepting. docs/architecture.md ("The lean
   media socket") has what the app side does with it.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import types
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import hypercorn.protocol.h11 as hypercorn_h11
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio import task_group as hypercorn_task_group
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import WebsocketAcceptEvent

from voice_trio.compat._guard import Fix, active, replace

READ_CHUNK = 16 * 1024


@dataclass
class ConnectionLimits:
    """Open connections, counted per peer address (fix 5, connection_limits, above)."""

    total: int
    per_client: int
    on_refused: Callable[[str], None] = lambda reason: None
    _open: Counter[str] = field(default_factory=Counter, init=False)
    _count: int = field(default=0, init=False)

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client``; the reason it is refused, if it is."""
        if self._count >= self.total:
            return "too_many_connections"
        if self._open[client] >= self.per_client:
            return "too_many_connections_from_client"
        self._open[client] += 1
        self._count += 1
        return None

    def release(self, client: str) -> None:
        self._count -= 1
        self._open[client] -= 1
        if not self._open[client]:
            del self._open[client]

    @property
    def open(self) -> int:
        return self._count


def _refusal(reason: str) -> bytes:
    body = json.dumps(
        {"error": reason, "reason": "the server has as many connections as it takes; retry"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _limit_connections() -> None:
    original = TCPServer.run

    @functools.wraps(original)
    async def run(self: TCPServer) -> None:
        limits: ConnectionLimits | None = getattr(self.config, "connection_limits", None)
        if limits is None:
            await original(self)
            return
        try:
            client = str(self.stream.socket.getpeername()[0])
        except (AttributeError, OSError):
            client = "-"
        refused = limits.admit(client)
        if refused is None:
            try:
                await original(self)
            finally:
                limits.release(client)
            return
        limits.on_refused(refused)
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(_refusal(refused))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.stream.aclose()

    replace(TCPServer, "run", run)


def _serialise_close() -> None:
    original = TCPServer._close

    @functools.wraps(original)  # ``__wrapped__`` keeps the original for the race test
    async def _close(self: TCPServer) -> None:
        lock: trio.Lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await original(self)
            return
        with trio.CancelScope(shield=True):
            async with lock:
                await original(self)

    replace(TCPServer, "_close", _close)


def _with_reason(event_type: Any) -> Any:
    def build(*, status_code: int, headers: Any, **kwargs: Any) -> Any:
        if "reason" not in kwargs:
            try:
                kwargs["reason"] = HTTPStatus(status_code).phrase.encode()
            except ValueError:
                pass
        return event_type(status_code=status_code, headers=headers, **kwargs)

    return build


def _add_reason_phrases() -> None:
    shim = types.SimpleNamespace(**{n: getattr(h11, n) for n in dir(h11) if not n.startswith("__")})
    shim.Response = _with_reason(h11.Response)
    shim.InformationalResponse = _with_reason(h11.InformationalResponse)
    replace(hypercorn_h11, "h11", shim)


class _AppQueue:
    """The ASGI app's receive queue (fix 3), which the handover (fix 6) can empty: a
    connection taken out of Hypercorn never puts to it again, and its app never receives
    from it, so the channel (~2 KB, holding ``websocket.connect``) need not last the call."""

    __slots__ = ("_receive", "_send")

    def __init__(self, size: int) -> None:
        self._send: trio.MemorySendChannel[Any] | None
        self._receive: trio.MemoryReceiveChannel[Any] | None
        self._send, self._receive = trio.open_memory_channel[Any](size)

    async def put(self, message: Any) -> None:
        send = self._send
        if send is None:
            await trio.lowlevel.checkpoint()
            return  # handed over: nobody will ever read this message
        try:
            await send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the app has finished: nobody will ever read this message

    async def receive(self) -> Any:
        receive = self._receive
        if receive is None:
            await trio.sleep_forever()  # handed over: Hypercorn sends the app nothing more
        assert receive is not None
        return await receive.receive()

    def close_receiving(self) -> None:
        if self._receive is not None:
            self._receive.close()

    def release(self) -> None:
        """The connection was handed over: drop the channel and what it holds."""
        self.close_receiving()
        self._send = self._receive = None


async def _spawn_app(
    self: TaskGroup,
    app: Any,
    config: Any,
    scope: Any,
    send: Callable[[Any], Awaitable[None]],
) -> Callable[[Any], Awaitable[None]]:
    queue = _AppQueue(config.max_app_queue_size)

    async def app_finished_or_sending(message: Any) -> None:
        if message is None:
            # The app has returned (``_handle`` says so with ``None``). Close its receiving
            # end *before* Hypercorn reacts: that reaction closes the stream, which puts
            # ``websocket.disconnect`` — in this very task, so a full queue would deadlock
            # it. Closing wakes a put already waiting (BrokenResourceError) and makes every
            # later put fail at once instead of waiting for a reader that is gone.
            queue.close_receiving()
        await send(message)

    async def run_app() -> None:
        try:
            await hypercorn_task_group._handle(
                app,
                config,
                scope,
                queue.receive,
                app_finished_or_sending,
                trio.to_thread.run_sync,
                trio.from_thread.run,
            )
        finally:
            queue.close_receiving()

    assert self._nursery is not None
    self._nursery.start_soon(run_app)
    return queue.put


async def _read_data(self: TCPServer) -> None:
    timeout = self.config.read_timeout or math.inf
    connection = _Connection(self)
    # The app tasks this loop spawns (through protocol.handle) inherit a copy of this
    # task's context: that is how ``websocket_handover`` finds its connection. A weak
    # reference, as tasks those tasks start (background work) may outlive the connection.
    _CONNECTION.set(weakref.ref(connection))
    with trio.CancelScope() as reading:
        connection.reading = reading
        while True:
            reading.deadline = trio.current_time() + timeout
            try:
                data = await self.stream.receive_some(READ_CHUNK)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            reading.deadline = math.inf
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
    if await connection.reader_stopped():
        await connection.watch(timeout)
        return
    await self.protocol.handle(Closed())


class _Reading(enum.Enum):
    READING = enum.auto()  # the reader feeds Hypercorn's protocol
    TAKING = enum.auto()  # an app asked for the connection; the reader is being stopped
    STOPPED = enum.auto()  # the reader has stopped and waits for the app's 101 (or not)
    HANDED_OVER = enum.auto()  # the bytes are the app's; the reader is its watchdog
    HYPERCORN = enum.auto()  # the reader has ended; Hypercorn closes as it always did


@dataclass(eq=False)
class RawWebSocket:
    """An upgraded connection after the 101, handed to the app (fix 6): from here on its
    bytes are the app's, in both directions, until ``release()``.

    The app sends whole frames under ``send_lock`` (Hypercorn's ``_close`` takes it too,
    fix 1), and sets ``waiting_since`` to ``trio.current_time()`` while it waits for bytes
    (``math.inf`` otherwise): the watchdog closes the connection once that wait has lasted
    Hypercorn's ``read_timeout``, which the app then sees as a closed stream.
    """

    stream: trio.abc.Stream
    send_lock: trio.Lock
    buffered: bytes  # what the client sent after the request head and before the 101
    max_message_size: int  # Hypercorn's websocket_max_message_size
    waiting_since: float = math.inf
    released: trio.Event = field(default_factory=trio.Event)

    def release(self) -> None:
        """The app is done with the connection: it is closed (at once, by its own task)."""
        self.released.set()


class _Connection:
    """One TCP connection's reader, as the handover sees it."""

    __slots__ = ("__weakref__", "_decided", "_stopped", "raw", "reading", "server", "state")

    def __init__(self, server: TCPServer) -> None:
        self.server = server
        self.reading: trio.CancelScope | None = None  # the read loop's, while it runs
        self.state = _Reading.READING
        # The two sides of a handover meet on these: made when an app asks for the
        # connection (``take``), dropped once it is decided. Most connections are never
        # asked, and a handed-over one need not keep them for the whole call.
        self._stopped: trio.Event | None = None
        self._decided: trio.Event | None = None
        self.raw: RawWebSocket | None = None

    async def take(self) -> None:
        """An app asks for the connection: stop the reader, and wait until it has."""
        self.state = _Reading.TAKING
        self._stopped, self._decided = trio.Event(), trio.Event()
        assert self.reading is not None
        self.reading.cancel()  # the reader waits for bytes: a no-op to interrupt
        await self._stopped.wait()

    async def reader_stopped(self) -> bool:
        """The reader's loop has ended: True if the connection is now the app's."""
        if self.state is not _Reading.TAKING:
            self.state = _Reading.HYPERCORN
            return False
        self.state = _Reading.STOPPED
        assert self._stopped is not None and self._decided is not None
        self._stopped.set()
        await self._decided.wait()
        self._stopped = self._decided = None
        return self.raw is not None

    @property
    def undecided(self) -> bool:
        return self.state is _Reading.TAKING or self.state is _Reading.STOPPED

    def decide(self, raw: RawWebSocket | None) -> None:
        self.raw = raw
        self.state = _Reading.HANDED_OVER if raw is not None else _Reading.HYPERCORN
        assert self._decided is not None
        self._decided.set()

    async def watch(self, timeout: float) -> None:
        """Until the app releases the connection, or waits for bytes longer than
        ``timeout``; then close it. One wake-up per ``timeout`` at most while it is busy."""
        raw = self.raw
        assert raw is not None
        deadline = trio.current_time() + timeout
        while True:
            with trio.move_on_at(deadline):
                await raw.released.wait()
                break
            now = trio.current_time()
            if now >= raw.waiting_since + timeout:
                break  # as Hypercorn's read timeout: no close frame, the peer is silent
            deadline = min(raw.waiting_since, now) + timeout
        await self.server._close()


_CONNECTION: ContextVar[weakref.ref[_Connection] | None] = ContextVar(
    "hypercorn_connection", default=None
)


class WebSocketHandover:
    """The offer of one WebSocket upgrade's connection to the app (fix 6)."""

    def __init__(self, connection: _Connection, stream: WSStream) -> None:
        self._connection = connection
        self._stream = stream

    async def accept(self) -> RawWebSocket | None:
        """Send the 101 and hand the connection over; None if it ended first (the client
        left, or Hypercorn answered the request itself): then nothing was sent."""
        connection, ws = self._connection, self._stream
        if connection.state is not _Reading.READING or connection.reading is None:
            return None
        await connection.take()
        try:
            if ws.closed or ws.state is not ASGIWebsocketState.HANDSHAKE:
                return None
            ws.handshake.extensions = None  # nobody here speaks permessage-deflate
            # Hypercorn's own 101 (and access log line), as for an ASGI accept.
            await ws.app_send(
                WebsocketAcceptEvent(type="websocket.accept", subprotocol=None, headers=[])
            )
            if ws.closed:  # the 101 found the client gone (Hypercorn saw the stream close)
                return None
            # Hypercorn's stream is done: the app's end (None) and the connection's close
            # are no business of its any more (no 500, no close frame of its own).
            ws.closed = True
            protocol = self._connection.server.protocol.protocol
            early = protocol.connection if isinstance(protocol, H11Protocol) else None
            raw = RawWebSocket(
                stream=self._connection.server.stream,
                send_lock=self._connection.server.send_lock,
                buffered=bytes(early.buffer) if isinstance(early, H11WSConnection) else b"",
                max_message_size=self._connection.server.config.websocket_max_message_size,
            )
            # What Hypercorn built to speak WebSocket on this stream (wsproto's connection,
            # the handshake with an h11 connection of its own, the app's queue) is never
            # used again: a closed stream ignores every event and message, and the app
            # reads the socket itself. Dropped here, not held for the whole call.
            del ws.connection, ws.handshake
            app_queue = getattr(ws.app_put, "__self__", None)
            if isinstance(app_queue, _AppQueue):
                app_queue.release()
            connection.decide(raw)
            return raw
        finally:
            if connection.undecided:
                connection.decide(None)


def websocket_handover(scope: Mapping[str, Any]) -> WebSocketHandover | None:
    """The handover for this WebSocket request (fix 6), or None where Hypercorn must carry
    it: HTTP/2, a request that is not the connection's current upgrade, a Hypercorn
    release the fix was not checked against, or its read loop not installed (fix 4)."""
    if scope.get("type") != "websocket" or not (active(WEBSOCKET_HANDOVER) and active(READ_LOOP)):
        return None
    reference = _CONNECTION.get()
    connection = reference() if reference is not None else None
    if connection is None or connection.state is not _Reading.READING:
        return None
    protocol = getattr(connection.server, "protocol", None)
    h11_protocol = getattr(protocol, "protocol", None)
    if not isinstance(h11_protocol, H11Protocol):
        return None
    ws = h11_protocol.stream
    if not isinstance(ws, WSStream) or getattr(ws, "scope", None) is not scope:
        return None
    return WebSocketHandover(connection, ws)


def _install_spawn_app() -> None:
    replace(TaskGroup, "spawn_app", _spawn_app)


def _install_read_data() -> None:
    # Reads the module global when applied: scripts/bench/variant_serve.py swaps it back.
    replace(TCPServer, "_read_data", _read_data)


# Checked against 0.18.0, the newest release (2025-11); the range moves only after the
# canaries in tests/test_compat.py have been run against a new one.
_FIRST = _LAST = "0.18.0"

CLOSE_RACE = Fix(
    name="hypercorn.close_race",
    summary="TCPServer._close calls send_eof without send_lock, racing protocol_send's"
    " send_all into a BusyResourceError that ends every connection",
    install=_serialise_close,
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)
REASON_PHRASES = Fix(
    name="hypercorn.reason_phrases",
    summary="HTTP/1.1 responses go out with an empty reason phrase (HTTP/1.1 101 )",
    install=_add_reason_phrases,
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)
FINISHED_APP_QUEUE = Fix(
    name="hypercorn.finished_app_queue",
    summary="once the ASGI app has returned, a full app queue blocks the connection's"
    " reader forever",
    install=_install_spawn_app,
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)
READ_LOOP = Fix(
    name="hypercorn.read_loop",
    summary="TCPServer._read_data enters a fresh fail_after and reads 64 KiB per read",
    install=_install_read_data,
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)
CONNECTION_LIMITS = Fix(
    name="hypercorn.connection_limits",
    summary="no limit on open connections, in total or per client",
    install=_limit_connections,
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)

WEBSOCKET_HANDOVER = Fix(
    name="hypercorn.websocket_handover",
    summary="no way for an ASGI app to take an upgraded WebSocket connection's bytes; every"
    " message crosses Hypercorn's protocol layers, wsproto and the app queue",
    install=None,  # ``websocket_handover`` checks it; the read loop (fix 4) does the rest
    distribution="hypercorn",
    first=_FIRST,
    last=_LAST,
)

FIXES = (
    CLOSE_RACE,
    REASON_PHRASES,
    FINISHED_APP_QUEUE,
    READ_LOOP,
    CONNECTION_LIMITS,
    WEBSOCKET_HANDOVER,
)
