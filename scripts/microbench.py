"""Per-message CPU of the pieces a media frame passes through, in microseconds (timeit).

    .venv/bin/python scripts/microbench.py

Numbers for docs/benchmarks.md ("what stands in the way", "A lean media socket"): what one
inbound Telnyx media frame costs in each layer, and the two media socket paths side by
side. Single process, no sockets; run it on a quiet core (it reports the best of 5
repeats).

The two paths, each from bytes to the call and back, on a stream that hands out one frame
per ``receive_some`` and takes one per ``send_all``, each with one checkpoint, as a
socket's would (the system calls themselves are the same on both paths, and left out):

- **Hypercorn + ASGI** (``MEDIA_SOCKET=asgi``): the connection's reader (the compat read
  loop) feeds Hypercorn's H11 protocol, its WebSocket stream and wsproto, which put a dict
  per message on the app's queue (10, as Hypercorn's), which ``AsgiWebSocket.receive``
  reads in the app task; sending goes ``AsgiWebSocket.send_text`` → ``WSStream.app_send`` →
  wsproto → ``TCPServer.protocol_send``.
- **lean** (``MEDIA_SOCKET=lean``): ``LeanWebSocket.receive`` reads and parses in the app
  task; ``send_text`` frames and writes under the connection's lock.
"""

from __future__ import annotations

import json
import os
import struct
import time
import timeit
from base64 import b64encode
from collections.abc import Callable, Iterator
from typing import Any

import trio
import wsproto
from hypercorn.config import Config
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import ConnectionState
from wsproto.events import Request

from voice_trio import compat
from voice_trio.compat.hypercorn import RawWebSocket
from voice_trio.providers.telnyx.media import build_media, parse_frame
from voice_trio.web.lean_socket import LeanWebSocket
from voice_trio.web.media_socket import AsgiWebSocket
from voice_trio.wire.rfc6455 import FrameReader

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


def lean_reader_one(raw: bytes) -> Callable[[], object]:
    reader = FrameReader(256 * 1024)

    def one() -> object:
        reader.feed(raw)
        return reader.next_event()

    return one


UPGRADE = (
    b"GET /stream/media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FrameStream:
    """One frame per ``receive_some`` (then nothing more, the peer is still there), any
    bytes per ``send_all``; one checkpoint each, as a socket's own when the kernel has
    the bytes or the room."""

    def __init__(self, frames: Iterator[bytes]) -> None:
        self._frames = frames

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        frame = next(self._frames, None)
        if frame is None:
            await trio.sleep_forever()
        return frame

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class AppQueue:
    """Hypercorn's task group as far as one WebSocket upgrade needs it: the app's queue."""

    def __init__(self) -> None:
        self.put, self.get = trio.open_memory_channel[Any](10)
        self.app_send: Any = None

    async def spawn_app(self, app: Any, config: Any, scope: Any, send: Any) -> Any:
        self.app_send = send
        return self.put.send


async def asgi_path(frames: list[bytes]) -> tuple[float, float]:
    """µs per received and per sent frame through Hypercorn and ``AsgiWebSocket``."""
    compat.apply()
    config = Config()
    config.read_timeout = 30
    queue = AppQueue()
    server: Any = TCPServer.__new__(TCPServer)
    server.config, server.send_lock = config, trio.Lock()
    server.idle_task = TrioSingleTask()
    server.stream = FrameStream(iter([UPGRADE, *frames]))
    server.protocol = H11Protocol(
        None,  # type: ignore[arg-type]
        config,
        WorkerContext(None),
        queue,  # type: ignore[arg-type]
        ConnectionState({}),
        False,
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        server.protocol_send,
    )
    socket = AsgiWebSocket({}, queue.get.receive, lambda m: queue.app_send(m))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._read_data)  # the compat read loop
        assert await socket.accept()
        t0 = time.process_time()
        for _ in frames:
            await socket.receive()
        received = (time.process_time() - t0) / len(frames) * 1e6
        t0 = time.process_time()
        for _ in frames:
            await socket.send_text(FRAME)
        sent = (time.process_time() - t0) / len(frames) * 1e6
        nursery.cancel_scope.cancel()
    return received, sent


async def lean_path(frames: list[bytes]) -> tuple[float, float]:
    """µs per received and per sent frame through ``LeanWebSocket``."""
    raw = RawWebSocket(FrameStream(iter(frames)), trio.Lock(), b"", 256 * 1024)  # type: ignore[arg-type]
    socket = LeanWebSocket(raw, {})
    t0 = time.process_time()
    for _ in frames:
        await socket.receive()
    received = (time.process_time() - t0) / len(frames) * 1e6
    t0 = time.process_time()
    for _ in frames:
        await socket.send_text(FRAME)
    sent = (time.process_time() - t0) / len(frames) * 1e6
    return received, sent


def paths(messages: int = 20_000, repeat: int = 5) -> dict[str, tuple[float, float]]:
    """Best of ``repeat`` runs of each path, alternating."""
    frames = [masked_frame(FRAME.encode()) for _ in range(messages)]
    best_of: dict[str, list[tuple[float, float]]] = {"asgi": [], "lean": []}
    for _ in range(repeat):
        best_of["asgi"].append(trio.run(asgi_path, frames))
        best_of["lean"].append(trio.run(lean_path, frames))
    return {
        name: (min(r for r, _ in runs), min(s for _, s in runs)) for name, runs in best_of.items()
    }


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
        ("rfc6455.FrameReader: feed + next_event, one masked frame", best(lean_reader_one(raw))),
        ("parse_frame (json.loads + base64) of a media frame", best(lambda: parse_frame(FRAME))),
        ("build_media (base64 + concat), 100 ms of audio", best(lambda: build_media(AUDIO * 5))),
        (
            "ASGI event dict for one message",
            best(lambda: {"type": "websocket.receive", "text": FRAME, "bytes": None}),
        ),
        ("trio memory channel hop to another task", channel_hop(50_000)),
    ]
    measured = paths()
    for name, label in (("asgi", "Hypercorn + ASGI"), ("lean", "lean socket")):
        received, sent = measured[name]
        rows.append((f"{label}: one frame received, bytes to the call", received))
        rows.append((f"{label}: one frame sent, the call to bytes", sent))
    for name, value in rows:
        print(f"{value:8.2f}  {name}" if isinstance(value, float) else f"{value:8d}  {name}")


if __name__ == "__main__":
    main()
