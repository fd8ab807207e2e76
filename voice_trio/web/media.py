"""``/stream/media``: accept the Telnyx media WebSocket and hand it to the call domain."""

from __future__ import annotations

from voice_trio.instance.center import CallCenter
from voice_trio.media.call import run_media_call
from voice_trio.web.media_socket import AsgiWebSocket, Receive, Scope, Send


async def serve_media_stream(
    center: CallCenter, scope: Scope, receive: Receive, send: Send
) -> None:
    socket = AsgiWebSocket(scope, receive, send)
    if not await socket.accept():
        return
    try:
        await run_media_call(center.services, center.fallback, socket)
    finally:
        peer_gone = socket.closed and socket.close_code is not None
        await socket.close(1001 if center.going_away.is_set() else 1000)
        if not peer_gone:
            await socket.drain()
