"""``/stream/media``: accept the Telnyx media WebSocket and hand it to the call domain.

Two ways to carry the socket, one call: with ``MEDIA_SOCKET=lean`` (the default) the
connection is taken from Hypercorn at the 101 and spoken by ``LeanWebSocket``; with
``asgi``, or where Hypercorn cannot hand it over (``compat.hypercorn.websocket_handover``
says None: an HTTP/2 connection, a Hypercorn release the handover was not checked
against), by ``AsgiWebSocket`` through Hypercorn's layers. Either way the call gets a
``media.call.MediaSocket`` and does the same.
"""

from __future__ import annotations

from typing import Protocol

from voice_trio.compat.hypercorn import websocket_handover
from voice_trio.instance.center import CallCenter
from voice_trio.media.call import MediaSocket, run_media_call
from voice_trio.web.lean_socket import open_lean_socket
from voice_trio.web.media_socket import AsgiWebSocket, Receive, Scope, Send


class ServedSocket(MediaSocket, Protocol):
    """A media socket as this module ends it."""

    close_code: int | None  # the peer's close code; None while the peer has not closed

    async def drain(self, timeout: float = 35.0) -> None: ...


async def serve_media_stream(
    center: CallCenter, scope: Scope, receive: Receive, send: Send
) -> None:
    handover = websocket_handover(scope) if center.settings.media_socket == "lean" else None
    if handover is None:
        through_hypercorn = AsgiWebSocket(scope, receive, send)
        if await through_hypercorn.accept():
            await carry_call(center, through_hypercorn)
        return
    raw = await handover.accept()
    if raw is None:
        return  # the client left before the 101
    async with open_lean_socket(raw, scope) as socket:
        await carry_call(center, socket)


async def carry_call(center: CallCenter, socket: ServedSocket) -> None:
    try:
        await run_media_call(center.services, center.fallback, socket)
    finally:
        peer_gone = socket.closed and socket.close_code is not None
        await socket.close(1001 if center.going_away.is_set() else 1000)
        if not peer_gone:
            await socket.drain()
