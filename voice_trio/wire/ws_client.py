"""A lean RFC 6455 client on a raw Trio stream: what the Deepgram STT socket speaks.

trio-websocket runs a reader task per connection and frames through wsproto; at 22 audio
messages a call-second its ``send_message`` was ~6 % of the server's CPU at 40 calls. Here,
as on the server side (``web.lean_socket``), the socket is read in the task that asks for
the next message (``receive``), through ``wire.rfc6455.FrameReader``, and each frame is
built whole (``rfc6455.masked_frame``, a fresh ``os.urandom(4)`` key) and written in one
``send_all``. Nothing is negotiated: no extension is offered (a server that names one
fails the handshake), no subprotocol.

- ``connect``: TCP (or TLS for ``wss://``, certificate and host name checked), the HTTP/1.1
  upgrade, ``Sec-WebSocket-Accept`` checked, all within ``connect_timeout``. A status other
  than 101 is ``HandshakeRejected`` with the response's headers and (bounded) body; anything
  else that goes wrong is ``HandshakeFailed``. Either way the socket is closed before the
  exception leaves.
- Reading answers control frames as they come: a ping by its pong, the server's close by an
  echo (unless we sent ours), after which the TCP connection is closed at once (the client
  may, once the handshake is over; trio-websocket waited for the server's and then left the
  socket open, ``compat/trio_websocket.py`` fix 2). A server that breaks the protocol
  (a masked frame, a message over ``max_message_size``...) gets a close frame with the code
  (1002, 1007, 1009) and the connection is closed; that code is then ``close_code``. The
  end of the TCP stream without a close frame is 1006.
- Sends from several tasks are serialised by a lock; each is shielded (a frame cut
  half-way cannot be taken back) but bounded: a send that times out or fails breaks the
  socket (1006, TCP closed). A send after the close raises ``WebSocketClosed``.
- ``aclose`` (always call it): our close frame if none went either way, the server's close
  awaited (the rest read and dropped) at most ``timeout`` s, then the TCP connection is
  closed; shielded, so it completes even in a cancelled task.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Final

import trio

from voice_trio.wire.fastio import FastIO
from voice_trio.wire.rfc6455 import (
    CLOSE_ABNORMAL,
    CLOSE_NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    ProtocolError,
    close_payload,
    masked_frame,
)

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
# A server's message (a Deepgram Results) is a kilobyte or two; more just takes more reads.
READ_CHUNK: Final = 16 * 1024
# A send waits this long for a server that stops reading, then the socket is given up.
SEND_TIMEOUT_SECONDS: Final = 10.0
# A close frame or a pong gets less: it is not worth waiting for.
CLOSE_SECONDS: Final = 1.0
# The response head of the upgrade, and how much of a refusal's body is kept.
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 16 * 1024

_urandom = os.urandom


class HandshakeFailed(Exception):
    """No WebSocket: unreachable, TLS failed, no answer in time, or a bad 101."""


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"the server refused the WebSocket upgrade: HTTP {status}")
        self.status = status
        self.headers = headers  # names in lower case
        self.body = body


class WebSocketClosed(Exception):
    """A send on a socket that is closed (or closing): its close code and reason."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"the WebSocket is closed: {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


def header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first value of ``name`` (lower case) in ``headers``, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


class ClientWebSocket:
    """One client WebSocket after the 101; obtained from ``connect``.

    ``receive`` must not be called by two tasks at once; sends may come from any task.
    """

    __slots__ = (
        "_close_sent",
        "_ended",
        "_io",
        "_over",
        "_reader",
        "_reading",
        "_send_lock",
        "_sent_code",
        "_stream",
        "_transport",
        "close_code",
        "close_reason",
        "closed",
        "headers",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        headers: list[tuple[str, str]],
        buffered: bytes = b"",
        max_message_size: int = 1 << 20,
    ) -> None:
        self._stream = stream
        # Under TLS the TCP stream: closing it needs no TLS exchange with a peer that may
        # be gone or silent.
        self._transport: trio.abc.Stream = getattr(stream, "transport_stream", stream)
        # Plain TCP: one write per frame, and reads that wait before they read.
        self._io = FastIO(stream)
        self.headers = headers  # the 101's, names in lower case
        self._reader = FrameReader(max_message_size, masked=False)
        if buffered:
            self._reader.feed(buffered)  # frames that came with the 101
        self._send_lock = trio.Lock()
        self.closed = False  # nothing more may be sent: a close went either way, or it broke
        self.close_code: int | None = None  # the server's, 1006 if it vanished, or our error's
        self.close_reason: str | None = None
        self._close_sent = False
        self._sent_code: int | None = None
        self._over = False  # nothing more is read: the TCP connection is closed
        self._reading = False
        self._ended: trio.Event | None = None  # made by ``aclose`` while another task reads

    async def send(self, message: str | bytes) -> None:
        """One text (``str``) or binary message, in one frame."""
        if self.closed:
            raise self._closed_error()
        if type(message) is str:
            data = masked_frame(OP_TEXT, message.encode("utf-8"), _urandom(4))
        else:
            data = masked_frame(OP_BINARY, message, _urandom(4))  # type: ignore[arg-type]
        await self._send(data, SEND_TIMEOUT_SECONDS, True)

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the socket has closed (``close_code`` says how)."""
        if self._over:
            return None
        if self._reading:
            raise trio.BusyResourceError("another task is reading this WebSocket")
        self._reading = True
        try:
            return await self._next_message()
        finally:
            self._reading = False

    async def aclose(self, timeout: float, code: int = 1000, reason: str = "") -> None:
        """Close: our close frame (unless one went either way), the server's close awaited
        for at most ``timeout`` s (what else it sends is dropped), then the TCP connection
        closed. Shielded: it runs to the end in a cancelled task too, within ``timeout``."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(timeout):
                if not self._close_sent and not self._over:
                    self.closed = True
                    self._close_sent = True
                    self._sent_code = code
                    frame = masked_frame(OP_CLOSE, close_payload(code, reason), _urandom(4))
                    await self._reply(frame, min(timeout, CLOSE_SECONDS))
                if self._reading:
                    # Another task is reading: it will see the server's close.
                    if not self._over:
                        self._ended = self._ended or trio.Event()
                        await self._ended.wait()
                else:
                    while not self._over:
                        await self.receive()
            await self._finish()

    def _closed_error(self) -> WebSocketClosed:
        if self.close_code is not None:
            return WebSocketClosed(self.close_code, self.close_reason)
        if self._sent_code is not None:
            return WebSocketClosed(self._sent_code, "closed by this client")
        return WebSocketClosed(CLOSE_ABNORMAL, None)

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
                if not self._close_sent and type(payload) is bytes:
                    await self._reply(masked_frame(OP_PONG, payload, _urandom(4)))
            elif opcode == OP_CLOSE:
                code, reason = reader.close or (CLOSE_NO_STATUS, "")
                self.close_code, self.close_reason = code, reason
                self.closed = True
                if not self._close_sent:
                    # Echo the code (none for a close without one); the handshake is then
                    # complete and the TCP connection may go (RFC 6455 §7.1.1).
                    self._close_sent = True
                    echo = close_payload(None if code == CLOSE_NO_STATUS else code)
                    await self._reply(masked_frame(OP_CLOSE, echo, _urandom(4)), CLOSE_SECONDS)
                await self._finish()
        return None

    async def _read(self) -> None:
        try:
            data = await self._io.receive(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""  # the connection broke, or a sender gave it up and closed it
        if data:
            self._reader.feed(data)
            return
        # The server vanished, mid-frame or between frames, without a close frame.
        self.closed = True
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
            self.close_reason = "the connection ended without a close frame"
        await self._finish()

    async def _fail(self, code: int, reason: str) -> None:
        """The server broke the protocol: tell it why, and close (RFC 6455 §7.1.7)."""
        self.closed = True
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if not self._close_sent:
            self._close_sent = True
            frame = masked_frame(OP_CLOSE, close_payload(code, reason), _urandom(4))
            await self._reply(frame, CLOSE_SECONDS)
        await self._finish()

    async def _reply(self, data: bytes, timeout: float = SEND_TIMEOUT_SECONDS) -> None:
        try:
            await self._send(data, timeout, False)
        except WebSocketClosed:
            pass  # the server is gone: what it was to be told no longer matters

    async def _send(self, data: bytes, timeout: float, message: bool) -> None:
        """Write ``data`` whole, never cut by a cancellation, within ``timeout`` s.

        On plain TCP the frame is first offered to the kernel in one non-blocking
        ``os.write`` on the socket (what ``send_all`` tries first too, without its
        per-call wrappers): it takes the whole frame unless the socket buffer is full,
        and a synchronous write cannot be cancelled half-way. Whatever it did not take
        goes through ``send_all`` in a shielded scope with the deadline. Over TCP that
        is 12 µs of CPU a send instead of 29 for the scope and ``send_all`` each time
        (docs/benchmarks.md, "A lean Deepgram STT client"); under TLS there is no
        shortcut.
        """
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled sender sends nothing
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case: a yield less than ``async with``
        except trio.WouldBlock:
            await lock.acquire()
        try:
            try:
                if self._over or (message and self.closed):  # it closed while we waited
                    raise self._closed_error()  # a close under way is not broken
                sent = self._io.write_now(data)
                if sent < len(data):
                    rest = memoryview(data)[sent:] if sent else data
                    with trio.CancelScope(shield=True, relative_deadline=timeout) as sending:
                        await self._stream.send_all(rest)
                    if sending.cancelled_caught:  # the frame may be cut: the stream is unusable
                        raise trio.BrokenResourceError("send timed out")
                    return
            finally:
                lock.release()
            await trio.lowlevel.cancel_shielded_checkpoint()  # it went out: not cancelled now
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self._over:
                self.closed = True
                if self.close_code is None:
                    self.close_code = CLOSE_ABNORMAL
                    self.close_reason = f"send failed: {exc!r}"
                await self._finish()
            raise self._closed_error() from exc

    async def _finish(self) -> None:
        """Nothing more is read or sent: the TCP connection is closed (a task blocked
        reading or sending on it wakes up with ``ClosedResourceError``)."""
        if self._over:
            return
        self._over = True
        self.closed = True
        with trio.CancelScope(shield=True):
            await self._transport.aclose()
        if self._ended is not None:
            self._ended.set()


def _target(url: str) -> tuple[bool, str, int, str, str]:
    """``(secure, host, port, Host header, request target)`` of a ws(s):// URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = scheme == "wss"
    default = 443 if secure else 80
    port = parts.port or default
    host = parts.hostname
    host_header = f"[{host}]" if ":" in host else host
    if port != default:
        host_header += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return secure, host, port, host_header, target


def _request(host: str, target: str, key: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_head(stream: trio.abc.Stream) -> tuple[int, list[tuple[str, str]], bytes]:
    """The response's status, headers (names in lower case) and the bytes after its head."""
    buffer = bytearray()
    while True:
        start = max(0, len(buffer) - 3)
        data = await stream.receive_some(4096)
        if not data:
            raise HandshakeFailed("the connection ended during the upgrade")
        buffer += data
        end = buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            break
        if len(buffer) > MAX_HEAD_BYTES:
            raise HandshakeFailed("the upgrade's response head is too long")
    lines = buffer[:end].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HandshakeFailed(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return int(code), headers, bytes(buffer[end + 4 :])


async def _read_body(
    stream: trio.abc.Stream, status: int, headers: list[tuple[str, str]], body: bytearray
) -> None:
    """A refusal's body into ``body`` (which holds what came with the head), up to
    ``MAX_BODY_BYTES``: by Content-Length, to the last chunk, or to the end of the stream."""
    if status < 200 or status in (204, 304):
        body.clear()
        return
    chunked = "chunked" in (header(headers, "transfer-encoding") or "").lower()
    length = header(headers, "content-length")
    want = MAX_BODY_BYTES
    if not chunked and length is not None and length.isdigit():
        want = min(int(length), MAX_BODY_BYTES)
    while len(body) < want and not (chunked and b"0\r\n\r\n" in body):
        data = await stream.receive_some(4096)
        if not data:
            break
        body += data
    if chunked:
        body[:] = _dechunk(bytes(body))
    del body[want:]


def _dechunk(data: bytes) -> bytes:
    """The payload of a chunked body, as far as it is whole."""
    out = bytearray()
    at = 0
    while (line_end := data.find(b"\r\n", at)) >= 0:
        try:
            size = int(data[at:line_end].split(b";")[0], 16)
        except ValueError:
            break
        if size <= 0:
            break
        out += data[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2
    return bytes(out)


async def _open(
    secure: bool, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> trio.abc.Stream:
    if secure:
        return await trio.open_ssl_over_tcp_stream(
            host,
            port,
            # Certificate and host name checked (server_hostname is ``host``).
            ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True,  # a TCP end without TLS close_notify is a plain end
        )
    return await trio.open_tcp_stream(host, port)


async def _close(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True):
        await getattr(stream, "transport_stream", stream).aclose()


async def connect(
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    connect_timeout: float,
    max_message_size: int = 1 << 20,
    ssl_context: ssl.SSLContext | None = None,
) -> ClientWebSocket:
    """Open a WebSocket to ``url`` (ws:// or wss://), sending ``headers`` with the upgrade.

    Raises ``HandshakeRejected`` for a status other than 101 (its body read within what is
    left of ``connect_timeout``), ``HandshakeFailed`` for anything else; the connection is
    closed before either leaves. The caller must ``aclose()`` the socket it gets.
    ``ssl_context`` (for wss://) defaults to ``ssl.create_default_context()``.
    """
    secure, host, port, host_header, target = _target(url)
    key = base64.b64encode(_urandom(16)).decode("ascii")
    request = _request(host_header, target, key, headers)
    deadline = trio.current_time() + connect_timeout
    stream: trio.abc.Stream | None = None
    try:
        with trio.move_on_at(deadline) as connecting:
            try:
                stream = await _open(secure, host, port, ssl_context)
                await stream.send_all(request)
                status, answer, rest = await _read_head(stream)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise HandshakeFailed(f"cannot open {url}: {exc!r}") from exc
        if connecting.cancelled_caught:
            raise HandshakeFailed(f"no WebSocket at {url} within {connect_timeout} s")
        assert stream is not None
        if status != 101:
            body = bytearray(rest)
            with trio.move_on_at(deadline):
                try:
                    await _read_body(stream, status, answer, body)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            raise HandshakeRejected(status, answer, bytes(body))
        _check_upgrade(answer, key)
    except BaseException:
        if stream is not None:
            await _close(stream)
        raise
    return ClientWebSocket(stream, answer, rest, max_message_size)


def _check_upgrade(headers: list[tuple[str, str]], key: str) -> None:
    """A 101 must name the upgrade and prove it read our key; nothing was offered, so
    nothing may be chosen (§4.1, the client's checks)."""
    if (header(headers, "upgrade") or "").lower() != "websocket":
        raise HandshakeFailed("the 101 does not upgrade to websocket")
    tokens = (header(headers, "connection") or "").lower().replace(",", " ").split()
    if "upgrade" not in tokens:
        raise HandshakeFailed("the 101 has no 'Connection: Upgrade'")
    if header(headers, "sec-websocket-accept") != accept_value(key):
        raise HandshakeFailed("the server's Sec-WebSocket-Accept does not match our key")
    for name in ("sec-websocket-extensions", "sec-websocket-protocol"):
        if header(headers, name):
            raise HandshakeFailed(f"the server chose {name} {header(headers, name)!r}, not offered")
