"""Hypercorn never blocks on a finished ASGI app (``compat/hypercorn.py``, finished_app_queue).

The app accepts, waits a moment, closes and returns, without reading, while the peer keeps
sending: more messages than Hypercorn's app queue holds (10), then its close. As shipped,
Hypercorn's reader blocks on the full queue of the finished app forever: the close is never
read and the connection's tasks stay. With the fix the messages are dropped and the
connection ends.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import trio
import trio_websocket
from conftest import task_names
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.task_group import TaskGroup

from voice_trio import compat
from voice_trio.compat._guard import shipped
from voice_trio.sim._serve import answer_lifespan

MESSAGES = 200


async def finished_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await trio.sleep(0.5)  # the peer floods meanwhile: the app queue (10) fills up
    await send({"type": "websocket.close", "code": 1000})


def connection_tasks() -> int:
    return sum(1 for name in task_names() if "TCPServer" in name or "_run_handler" in name)


async def flood_and_close(nursery: trio.Nursery, patience: float = 5) -> bool:
    """True if the connection ended within ``patience`` s after the peer's close."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.websocket_ping_interval = None
    stop = trio.Event()
    binds = await nursery.start(
        partial(serve, finished_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    url = binds[0].replace("http://", "ws://")
    before = connection_tasks()
    host, port = url[5:].split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/")
    for i in range(MESSAGES):
        try:
            await ws.send_message(f"frame {i}")
        except trio_websocket.ConnectionClosed:
            break
    with trio.move_on_after(min(2, patience)):
        await ws.aclose()
    ended = False
    with trio.move_on_after(patience):
        while connection_tasks() > before:  # noqa: ASYNC110
            await trio.sleep(0.05)
        ended = True
    await stream.aclose()
    stop.set()
    return ended


async def test_a_finished_app_never_blocks_the_connection(nursery: trio.Nursery) -> None:
    compat.apply()
    assert await flood_and_close(nursery)


async def test_without_the_fix_the_connection_is_stuck(nursery, monkeypatch) -> None:
    """Hypercorn as shipped: if this ever passes the connection, the fix may go. (Fixed,
    the connection ends within milliseconds: a second is plenty to tell.)"""
    monkeypatch.setattr(TaskGroup, "spawn_app", shipped(TaskGroup, "spawn_app"))
    assert not await flood_and_close(nursery, patience=1)
