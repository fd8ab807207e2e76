"""One correction to trio-websocket 0.12's client, applied when a provider module loads.

**A refused handshake leaves its socket open.** When the server answers the upgrade with
an HTTP error (Deepgram's 401 for a wrong key, ElevenLabs refusing a voice), the
connection's reader task raises ``ConnectionRejected`` and nobody closes the TCP stream:
the socket is freed only when the garbage collector breaks the exception's reference
cycle. With a bad key every call would pile up a descriptor until the next collection.
The reader now closes its stream before the refusal leaves it.
"""

from __future__ import annotations

import functools

import trio
from trio_websocket import ConnectionRejected, WebSocketConnection

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    original = WebSocketConnection._reader_task

    @functools.wraps(original)
    async def _reader_task(self: WebSocketConnection) -> None:
        try:
            await original(self)
        except ConnectionRejected:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
            raise

    WebSocketConnection._reader_task = _reader_task  # type: ignore[method-assign]
