"""Hypercorn 0.18's trio worker must never block on an ASGI app that has finished.

Hypercorn hands every incoming WebSocket message (and the final ``websocket.disconnect``)
to the app through a bounded channel (``max_app_queue_size``, 10). Its connection reader
``await``s the put. Once the app has returned, nobody reads that channel again; if the peer
still sends — a carrier that keeps streaming a few frames after our close, or any peer
while the server is too slow to keep up — the channel fills, the reader blocks on the put
forever, never sees the peer's close or the read timeout, and the connection's tasks and
socket stay for the life of the process. ``AsgiWebSocket.drain`` (reading until the
disconnect) hides this at normal speed, but a drain that times out or is cancelled
(overload, shutdown) leaks the connection; under a server slowed five times (tracemalloc)
most calls leaked this way (docs/benchmarks.md).

The fix: when the app task ends, its receiving end is closed, which wakes a put that is
already waiting, and every put after that drops its message instead of waiting. The reader
then carries on: it answers the close handshake, honours the read timeout, and the
connection ends normally. Messages for a finished app have no reader by definition, so
nothing is lost that could have been used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio import task_group as hypercorn_task_group
from hypercorn.trio.task_group import TaskGroup

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]


async def _spawn_app(
    self: TaskGroup,
    app: Any,
    config: Any,
    scope: Any,
    send: Callable[[Any], Awaitable[None]],
) -> Callable[[Any], Awaitable[None]]:
    app_send, app_receive = trio.open_memory_channel[Any](config.max_app_queue_size)

    async def app_finished_or_sending(message: Any) -> None:
        if message is None:
            # The app has returned (``_handle`` says so with ``None``). Close its receiving
            # end *before* Hypercorn reacts: that reaction closes the stream, which puts
            # ``websocket.disconnect`` — in this very task, so a full queue would deadlock
            # it. Closing wakes a put already waiting (BrokenResourceError) and makes every
            # later put fail at once instead of waiting for a reader that is gone.
            app_receive.close()
        await send(message)

    async def run_app() -> None:
        try:
            await hypercorn_task_group._handle(
                app,
                config,
                scope,
                app_receive.receive,
                app_finished_or_sending,
                trio.to_thread.run_sync,
                trio.from_thread.run,
            )
        finally:
            app_receive.close()

    async def put(message: Any) -> None:
        try:
            await app_send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the app has finished: nobody will ever read this message

    assert self._nursery is not None
    self._nursery.start_soon(run_app)
    return put
