"""A lean ASGI WebSocket for ``/stream/media``.

The media stream carries 50 frames a second per call in each direction, so it bypasses
Quart's WebSocket stack (a blinker signal and an extra channel hop per message) and talks
ASGI directly. It also avoids Quart-Trio cancelling the handler with frames still queued
when the peer closes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from voice_trio.observability import WIRE

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class SocketClosed(Exception):
    """The peer is gone; nothing more can be sent."""


class ScopeFacts:
    """What the upgrade request said (its ASGI ``scope``), the same on either socket path."""

    scope: Scope

    @property
    def path(self) -> str:
        return str(self.scope.get("path", ""))

    @property
    def query_string(self) -> bytes:
        return bytes(self.scope.get("query_string", b""))

    @property
    def client_host(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.scope.get("headers", []):
            if k.lower() == key:
                return bytes(v).decode("latin-1")
        return None


class AsgiWebSocket(ScopeFacts):
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._send_lock = trio.Lock()
        self.closed = False
        self.close_code: int | None = None
        self.read_gap = 0.0  # not offered here: Hypercorn reads as frames come
        self.gathered_since: float | None = None

    async def accept(self) -> bool:
        """Complete the upgrade (101); False if the client left before it."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self.closed = True
            return False
        await self._send({"type": "websocket.accept"})
        return True

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the peer has closed."""
        if self.closed:
            return None
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            WIRE.carrier_in += 1
            text = message.get("text")
            return text if text is not None else message.get("bytes") or b""
        self.closed = True
        self.close_code = message.get("code", 1005)
        return None

    def done_reading(self) -> None:
        """Nothing to do: Hypercorn's reader answers the peer's close on its own."""

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise SocketClosed
        async with self._send_lock:
            try:
                await self._send({"type": "websocket.send", "text": text})
                WIRE.carrier_out += 1
            except Exception as exc:  # the server reports a gone peer in several ways
                self.closed = True
                raise SocketClosed from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame even while the caller is being cancelled (bounded)."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            async with self._send_lock:
                try:
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                except Exception:
                    pass  # the peer is already gone: the socket is closed either way

    async def drain(self, timeout: float = 35.0) -> None:
        """After closing, read what the peer still sends until it disconnects (bounded).

        Hypercorn hands incoming frames to the app through a bounded queue; an app that
        stops reading leaves the connection's reader blocked on that queue, so the close
        is never seen and the socket and its tasks stay forever. A slow peer may take a
        while (the server's read timeout, 30 s, bounds it); shutdown may cancel the wait."""
        with trio.move_on_after(timeout):
            while True:
                message = await self._receive()
                if message["type"] == "websocket.disconnect":
                    return
