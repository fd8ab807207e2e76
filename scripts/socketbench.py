"""The media socket's server CPU on real loopback sockets, both paths, in seconds.

    .venv/bin/python scripts/socketbench.py [--streams 40] [--seconds 5] [--runs 3]

What ``microbench.py`` measures per layer, here with the kernel, epoll and Hypercorn's
whole connection around it: a Hypercorn server (the compat fixes applied, the server's
read timeout) in this process, whose app carries each WebSocket on the lean socket or
through Hypercorn (``AsgiWebSocket``) and does what the call does with a frame
(``parse_frame``); ``--streams`` clients in a child process, each sending a Telnyx media
frame (160 bytes of audio) every 20 ms and getting 100 ms of audio back every fifth, as a
carrier streaming a call that the bot answers. The two paths alternate, ``--runs`` times
each; the server's CPU time (this process's, the clients' is not in it) is per inbound
frame and per stream-second. Not a load test of the whole server: no STT, no Claude.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from base64 import b64encode
from functools import partial
from statistics import median
from typing import Any

import trio
import trio_websocket
from hypercorn.config import Config
from hypercorn.trio import serve

from voice_trio import compat
from voice_trio.compat.hypercorn import websocket_handover
from voice_trio.providers.telnyx.media import build_media, parse_frame
from voice_trio.sim._serve import answer_lifespan
from voice_trio.web.lean_socket import LeanWebSocket
from voice_trio.web.media_socket import AsgiWebSocket

FRAME = json.dumps(
    {
        "event": "media",
        "sequence_number": "4",
        "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": ""},
        "stream_id": "32de0dea-53cb-4b21-89a4-9f44fd53d5c1",
    }
).replace('"payload": ""', '"payload": "' + b64encode(os.urandom(160)).decode() + '"')
BOT_AUDIO = build_media(os.urandom(800))  # 100 ms, as Playback sends it


class MediaEcho:
    """The media socket's part of a call: parse every frame, answer every fifth."""

    def __init__(self, lean: bool) -> None:
        self.lean = lean
        self.frames = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        handover = websocket_handover(scope) if self.lean else None
        if handover is not None:
            raw = await handover.accept()
            if raw is None:
                return
            try:
                await self.carry(LeanWebSocket(raw, scope))
            finally:
                raw.release()
            return
        socket = AsgiWebSocket(scope, receive, send)
        if await socket.accept():
            await self.carry(socket)

    async def carry(self, socket: LeanWebSocket | AsgiWebSocket) -> None:
        while (message := await socket.receive()) is not None:
            parse_frame(message)
            self.frames += 1
            if self.frames % 5 == 0 and not socket.closed:
                await socket.send_text(BOT_AUDIO)


async def one_run(lean: bool, streams: int, seconds: float) -> tuple[float, int]:
    """Server CPU seconds and inbound frames for one run of the clients."""
    compat.apply()
    app = MediaEcho(lean)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.websocket_ping_interval = None
    config.read_timeout = 30
    config.websocket_max_message_size = 256 * 1024
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        serving = partial(serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        binds = await nursery.start(serving)
        url = binds[0].replace("http://", "ws://") + "/stream/media"
        command = [sys.executable, __file__, "--clients", url, str(streams), str(seconds)]
        cpu = time.process_time()
        await trio.run_process(command)
        cpu = time.process_time() - cpu
        stop.set()
    return cpu, app.frames


async def clients(url: str, streams: int, seconds: float) -> None:
    async def stream(start: float) -> None:
        async with trio_websocket.open_websocket_url(url) as ws:

            async def listen() -> None:
                while True:
                    await ws.get_message()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                for n in range(round(seconds * 50)):
                    await trio.sleep_until(start + n * 0.02)
                    await ws.send_message(FRAME)
                nursery.cancel_scope.cancel()

    start = trio.current_time() + 0.5
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(stream, start + 0.02 * i / streams)


def main() -> None:
    if sys.argv[1:2] == ["--clients"]:
        url, streams, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        trio.run(clients, url, streams, seconds)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"asgi": [], "lean": []}
    for _ in range(args.runs):
        for name in ("asgi", "lean"):
            cpu, frames = trio.run(one_run, name == "lean", args.streams, args.seconds)
            assert frames == args.streams * round(args.seconds * 50), f"{frames} frames arrived"
            per_frame = cpu / max(frames, 1) * 1e6
            per_stream_second = cpu / (args.streams * args.seconds) * 1e3
            results[name].append((per_frame, per_stream_second))
            print(
                f"{name:5}  {frames:6d} frames  {cpu:6.2f} s CPU  {per_frame:6.1f} us/frame"
                f"  {per_stream_second:5.2f} ms per stream-second"
            )
    for name, runs in results.items():
        print(
            f"median {name:5}  {median(f for f, _ in runs):6.1f} us/frame"
            f"  {median(s for _, s in runs):5.2f} ms per stream-second"
        )


if __name__ == "__main__":
    main()
