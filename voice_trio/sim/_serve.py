"""Serve a simulator's ASGI app with Hypercorn's trio worker on a loopback port."""

from __future__ import annotations

from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

# Idle keep-alive connections are closed after this long (Hypercorn's own default).
KEEP_ALIVE_SECONDS = 5.0


async def serve_asgi(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started`` gets the base URL (http://h:p)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.websocket_ping_interval = None
    never = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=never.wait))
        task_status.started(binds[0])


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Complete an ASGI app's start-up and shut-down; returns when the server shuts down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Any) -> bytes | None:
    """An HTTP request's whole body; None if the client went away before sending it."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)
