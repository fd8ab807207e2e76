"""Reads and writes on a Trio socket stream without Trio's per-call sandwich.

``SocketStream.receive_some`` tries ``recv`` first, and when nothing is there yet (the
usual case for a socket that carries 20 ms frames) it waits for readiness and calls
``recv`` again: two system calls, an exception and an async context manager per frame.
``send_all`` always ends with a yield to the scheduler, even when the kernel took every
byte at once. On a path that runs ~50 times a second per call that machinery is most of
the cost of the I/O itself.

:class:`FastIO` does the same with less when the stream is a plain ``trio.SocketStream``
(the only kind a media or STT connection has without TLS): a read waits for readiness
*first* (or tries first, when the caller knows bytes are likely there) and then calls
``os.read`` once; a write calls ``os.write`` at once and only falls back to
``send_all`` for what the kernel did not take. Any other stream (TLS) goes through its
own ``receive_some`` / ``send_all`` unchanged.

What stays Trio's: cancellation (the wait is a checkpoint; a write that completes at once
is not a schedule point, which is fine for its callers — each one blocks on a read, a
sleep or an event between writes), the closing of a socket under a waiting reader
(``ClosedResourceError``), and errors as ``BrokenResourceError`` / ``ClosedResourceError``,
as a stream would raise them. The descriptor is looked up on every operation, never kept:
a socket closed meanwhile has none, and a number kept could by then name another call's
socket.
"""

from __future__ import annotations

import errno
import os

import trio

__all__ = ["FastIO"]


class FastIO:
    """Fast reads and writes on ``stream`` (see the module doc); one reader at a time,
    writers serialised by the caller."""

    __slots__ = ("_socket", "_stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        # Only a plain socket stream has a descriptor whose bytes are the connection's.
        self._socket = stream.socket if type(stream) is trio.SocketStream else None

    async def receive(self, max_bytes: int, *, likely_ready: bool = False) -> bytes:
        """Up to ``max_bytes``; ``b""`` at the end of the stream. ``likely_ready`` (bytes
        have probably arrived: the caller slept on purpose) tries the read before waiting."""
        sock = self._socket
        if sock is None:
            return bytes(await self._stream.receive_some(max_bytes))
        if likely_ready:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = _read(sock, max_bytes)
            if data is not None:
                return data
        while True:
            if sock.fileno() < 0:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("the socket was closed")
            try:
                await trio.lowlevel.wait_readable(sock)
            except OSError as exc:  # the descriptor went bad under the wait
                raise _stream_error(exc) from exc
            data = _read(sock, max_bytes)
            if data is not None:
                return data

    def write_now(self, data: bytes) -> int:
        """Hand ``data`` to the kernel now, without waiting: the bytes it took (0 for a
        stream that is not a plain socket, or a full socket buffer). A synchronous write
        cannot be cut half-way by a cancellation; the caller sends the rest."""
        sock = self._socket
        if sock is None:
            return 0
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def send(self, data: bytes) -> None:
        """All of ``data``; what the kernel does not take at once is sent by the stream."""
        sent = self.write_now(data)
        if sent < len(data):
            await self._stream.send_all(memoryview(data)[sent:] if sent else data)


def _read(sock: trio.socket.SocketType, max_bytes: int) -> bytes | None:
    """What ``recv`` returns now, or None when nothing is there yet."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
