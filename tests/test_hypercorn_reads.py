"""Hypercorn's read loop as corrected (``compat/hypercorn.py``, read_loop).

One cancel scope per connection whose deadline moves before each read: a peer silent for
the read timeout is closed, a peer that keeps talking is not, and a body larger than one
read (``READ_CHUNK``) arrives whole.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import trio
import trio_websocket
from hypercorn.config import Config
from hypercorn.trio import serve

from voice_trio import compat
from voice_trio.compat import hypercorn as compat_hypercorn
from voice_trio.sim._serve import answer_lifespan

READ_TIMEOUT = 0.4


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] == "http":
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": message["text"]})


async def start(nursery: trio.Nursery) -> tuple[str, trio.Event]:
    compat.apply()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.websocket_ping_interval = None
    config.read_timeout = READ_TIMEOUT
    stop = trio.Event()
    binds = await nursery.start(
        partial(serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    return binds[0], stop


async def test_a_silent_peer_is_closed_after_the_read_timeout(nursery: trio.Nursery) -> None:
    url, stop = await start(nursery)
    async with trio_websocket.open_websocket_url(url.replace("http", "ws") + "/") as ws:
        started = trio.current_time()
        with trio.fail_after(5):
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed:
                pass
        waited = trio.current_time() - started
    # The server's clock started at its last read, the handshake, a little before ours.
    assert READ_TIMEOUT - 0.1 <= waited < READ_TIMEOUT + 2
    stop.set()


async def test_a_peer_that_keeps_talking_stays_past_the_read_timeout(
    nursery: trio.Nursery,
) -> None:
    url, stop = await start(nursery)
    async with trio_websocket.open_websocket_url(url.replace("http", "ws") + "/") as ws:
        for i in range(8):  # 8 × 0.15 s = three read timeouts
            await ws.send_message(f"frame {i}")
            assert await ws.get_message() == f"frame {i}"
            await trio.sleep(0.15)
    stop.set()


async def test_a_body_larger_than_one_read_arrives_whole(nursery: trio.Nursery) -> None:
    url, stop = await start(nursery)
    body = b"x" * (compat_hypercorn.READ_CHUNK * 5 + 123)
    async with httpx.AsyncClient() as client:
        response = await client.post(url + "/upload", content=body)
    assert response.status_code == 200
    assert response.text == str(len(body))
    stop.set()
