"""Per-message CPU of the pieces a media frame passes through, in microseconds (timeit).

    .venv/bin/python scripts/microbench.py

Numbers for docs/benchmarks.md ("what stands in the way"): what one inbound Telnyx media
frame costs in each layer, and what a leaner layer would cost instead. Single process, no
sockets; run it on a quiet core (it reports the best of 5 repeats).
"""

from __future__ import annotations

import json
import os
import struct
import time
import timeit
from base64 import b64encode
from collections.abc import Callable

import trio
import wsproto
from wsproto.events import Request

from voice_trio.providers.telnyx.media import build_media, parse_frame

AUDIO = os.urandom(160)
FRAME = json.dumps(
    {
        "event": "media",
        "sequence_number": "4",
        "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "5",
            "payload": b64encode(AUDIO).decode(),
        },
        "stream_id": "32de0dea-53cb-4b21-89a4-9f44fd53d5c1",
    }
)
NUMBER = 20_000


def best(stmt: Callable[[], object], number: int = NUMBER) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def masked_frame(payload: bytes) -> bytes:
    """A client-to-server text frame (FIN, opcode 1, masked), as the carrier sends it."""
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    )
    key = int.from_bytes(mask * (n // 4 + 1), "big") >> (8 * (4 - n % 4) if n % 4 else 0)
    body = (int.from_bytes(payload, "big") ^ (key & ((1 << (8 * n)) - 1))).to_bytes(n, "big")
    return header + mask + body


def wsproto_server() -> wsproto.WSConnection:
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="x", target="/")))
    for event in server.events():
        if isinstance(event, Request):
            client.receive_data(server.send(wsproto.events.AcceptConnection()))
            list(client.events())
    return server


def lean_parse(data: bytes) -> str:
    """The least a server must do per frame: header, unmask (one big-int XOR), decode."""
    n = data[1] & 0x7F
    at = 2
    if n == 126:
        n = struct.unpack_from("!H", data, 2)[0]
        at = 4
    mask = data[at : at + 4]
    body = data[at + 4 : at + 4 + n]
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(body, "big") ^ key).to_bytes(n, "big").decode()


def channel_hop(messages: int) -> float:
    """A message through a trio memory channel to another task (the ASGI queue hop)."""

    async def main() -> float:
        send, recv = trio.open_memory_channel[object](10)

        async def consume() -> None:
            async for _ in recv:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            t0 = time.process_time()
            for i in range(messages):
                await send.send(i)
            await send.aclose()
            return (time.process_time() - t0) / messages * 1e6

    return trio.run(main)


def main() -> None:
    raw = masked_frame(FRAME.encode())
    server = wsproto_server()

    def wsproto_one() -> None:
        server.receive_data(raw)
        for _ in server.events():
            pass

    rows = [
        ("frame size (bytes on the wire)", len(raw)),
        ("wsproto: receive_data + events, one masked frame", best(wsproto_one)),
        ("lean parse: header + unmask + decode", best(lambda: lean_parse(raw))),
        ("parse_frame (json.loads + base64) of a media frame", best(lambda: parse_frame(FRAME))),
        ("build_media (base64 + concat), 100 ms of audio", best(lambda: build_media(AUDIO * 5))),
        (
            "ASGI event dict for one message",
            best(lambda: {"type": "websocket.receive", "text": FRAME, "bytes": None}),
        ),
        ("trio memory channel hop to another task", channel_hop(50_000)),
    ]
    for name, value in rows:
        print(f"{value:8.2f}  {name}" if isinstance(value, float) else f"{value:8d}  {name}")


if __name__ == "__main__":
    main()
