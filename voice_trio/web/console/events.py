"""``GET /console/events``: the live calls as Server-Sent Events, from the call feed.

The first event, ``snapshot``, is every live call as the feed knows it; then one ``call``
event per feed event. A console that fell behind gets ``reload`` and the stream ends (its
transcript would have holes). The stream also ends when the server drains, so that it
never holds a shutdown up; the browser's EventSource reconnects by itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio

from voice_trio.calls.feed import CallFeed, LiveCallView

KEEP_ALIVE_SECONDS = 15.0  # a comment line, so idle proxies do not close the stream
POLL_SECONDS = 1.0  # how often a quiet stream looks whether the server drains


def view_json(view: LiveCallView) -> dict[str, Any]:
    return {
        "c": view.call_control_id,
        "nombre": view.nombre,
        "number": view.number,
        "direction": view.direction,
        "mode": view.mode,
        "started_at": view.started_at,
        "state": view.state,
        "transcript": list(view.transcript),
    }


def sse(event: str, data: Any) -> bytes:
    # json.dumps escapes newlines: one data line, whatever a caller said.
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def event_stream(feed: CallFeed, going_away: trio.Event) -> AsyncIterator[bytes]:
    with feed.watch() as (events, watcher):
        calls = sorted(feed.calls.values(), key=lambda v: v.started_at)
        yield sse("snapshot", [view_json(v) for v in calls])
        quiet = 0.0
        while not going_away.is_set():
            event: dict[str, Any] | None = None
            ended = False
            with trio.move_on_after(POLL_SECONDS):
                try:
                    event = await events.receive()
                except trio.EndOfChannel:
                    ended = True
            if ended:
                if watcher.lagging:
                    yield sse("reload", {"reason": "the console fell behind"})
                return
            if event is not None:
                quiet = 0.0
                yield sse("call", event)
                continue
            quiet += POLL_SECONDS
            if quiet >= KEEP_ALIVE_SECONDS:
                quiet = 0.0
                yield b": keep-alive\n\n"
