"""Corrections to trio-websocket 0.12's client, installed by ``voice_trio.compat.apply()``.

Both are about the TCP socket under a client connection that trio-websocket stops using
without closing: it stays open for as long as anything refers to the objects holding it
(an exception's traceback cycle until the garbage collector runs, a session object for as
long as the call), and is then closed by a finalizer with a ``ResourceWarning``. A provider
that refuses or closes on every call piles up descriptors meanwhile. docs/upstream.md has
the report of each, tests/test_compat.py the canaries.

1. **rejected_handshake_socket.** When the server answers the upgrade with an HTTP error
   (Deepgram's 401 for a wrong key, ElevenLabs refusing a voice), the connection's reader
   task raises ``ConnectionRejected`` and nobody closes the TCP stream: the socket stays
   open until the collector breaks the exception's reference cycle. The reader now closes
   its stream before the refusal leaves it (a patch, installed by ``apply()``).
2. **server_close_socket.** When the server closes the WebSocket first (Deepgram after
   ``CloseStream``, ElevenLabs after the last audio), the client, as RFC 6455 says, waits
   for the server's TCP close instead of closing its own end; the reader then stops at the
   end of the stream without closing it, and ``aclose()`` returns at once because the
   WebSocket is already closed. Nothing closes the socket. (The same when the TCP
   connection ends without a close handshake: the reader records 1006 and stops.)
   ``close_transport(ws)``, which the provider clients call when they are done with a
   connection, closes it. It reaches into ``WebSocketConnection._stream``, the one private
   attribute we touch, so it lives here, guarded by the releases it was checked against,
   and not at each call site.
"""

from __future__ import annotations

import functools

import trio
from trio_websocket import ConnectionRejected, WebSocketConnection

from voice_trio.compat._guard import Fix, active, replace


def _close_rejected_stream() -> None:
    original = WebSocketConnection._reader_task

    @functools.wraps(original)
    async def _reader_task(self: WebSocketConnection) -> None:
        try:
            await original(self)
        except ConnectionRejected:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
            raise

    replace(WebSocketConnection, "_reader_task", _reader_task)


async def close_transport(ws: WebSocketConnection) -> None:
    """Close the TCP socket under ``ws`` (fix 2), whatever state the WebSocket is in.

    Call it when done with a client connection, after leaving ``open_websocket``. Closing
    twice is harmless and never blocks; under TLS the TCP stream under it is closed.
    """
    if not active(SERVER_CLOSE_SOCKET):
        return
    stream = getattr(ws, "_stream", None)
    transport = getattr(stream, "transport_stream", stream)  # under TLS, the TCP stream
    if isinstance(transport, trio.SocketStream):
        with trio.CancelScope(shield=True):
            await transport.aclose()


# Checked against 0.12.2, the newest release (2025-02); the range moves only after the
# canaries in tests/test_compat.py have been run against a new one.
_FIRST = _LAST = "0.12.2"

REJECTED_HANDSHAKE_SOCKET = Fix(
    name="trio_websocket.rejected_handshake_socket",
    distribution="trio-websocket",
    first=_FIRST,
    last=_LAST,
    summary="a refused handshake (ConnectionRejected) leaves the client's TCP socket open"
    " for the garbage collector",
    install=_close_rejected_stream,
)
SERVER_CLOSE_SOCKET = Fix(
    name="trio_websocket.server_close_socket",
    distribution="trio-websocket",
    first=_FIRST,
    last=_LAST,
    summary="when the server closes first, the client never closes its TCP socket"
    " (aclose() returns early); close_transport() reaches into WebSocketConnection._stream",
)

FIXES = (REJECTED_HANDSHAKE_SOCKET, SERVER_CLOSE_SOCKET)
