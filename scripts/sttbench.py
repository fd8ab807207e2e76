"""The Deepgram STT socket before and after the lean client: CPU per send, memory per socket.

    .venv/bin/python scripts/sttbench.py [--old-rev REV]

"Before" is ``providers/deepgram/stt.py`` as it was on trio-websocket, loaded from git
(``REV``, default the last commit before the switch); "after" is the current one. Both are
driven through the same surface (``SttStream.send_audio``, ``connect_stt``):

- **CPU µs per ``send_audio``** of a 1600-byte chunk (100 ms of mu-law, what ``SttLink``
  sends ~10 times a second), best of 5 runs of 20 000 sends (process time, system calls
  included): on a stream that takes each
  ``send_all`` with one checkpoint and drops it (as scripts/microbench.py: the system
  calls are the same on both paths and left out), and over loopback TCP to a server in a
  child process that reads and drops (system calls included).
- **KB per connection**: ``tracemalloc`` around opening 20 ``connect_stt`` sockets to that
  server (the client's allocations only: the server runs in the child).

About half a minute of CPU; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import importlib.util
import subprocess
import sys
import textwrap
import time
import tracemalloc
import types
from contextlib import AsyncExitStack
from typing import Any

import trio
import trio_websocket

from voice_trio.providers.deepgram import stt as new_stt
from voice_trio.wire.ws_client import ClientWebSocket

CHUNK = b"\x7f" * 1600
SENDS = 20_000
REPEAT = 5
CONNECTIONS = 20
OLD_REV = "ba243cd"  # the last commit whose stt.py runs on trio-websocket
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# A raw WebSocket server: answers the upgrade, reads and drops frames, answers a close.
SERVER = textwrap.dedent(
    """
    import base64, hashlib, sys, trio
    from voice_trio.wire.rfc6455 import OP_CLOSE, FrameReader, close_frame

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    async def handle(stream):
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        head, _, rest = head.partition(b"\\r\\n\\r\\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\\r\\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
            b"Connection: Upgrade\\r\\nSec-WebSocket-Accept: " + accept + b"\\r\\n\\r\\n"
        )
        reader = FrameReader(2**63)
        data = rest
        async with stream:
            while True:
                reader.feed(data)
                while (event := reader.next_event()) is not None:
                    if event[0] == OP_CLOSE:
                        await stream.send_all(close_frame(1000))
                        return
                data = await stream.receive_some(1 << 20)
                if not data:
                    return

    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(handle, listeners)

    trio.run(main)
    """
)


class NullStream(trio.abc.Stream):
    """Answers the client's upgrade with a 101, then takes every ``send_all`` with one
    checkpoint and drops it; nothing more is ever received."""

    def __init__(self, *, answered: bool = False) -> None:
        self._request = b""
        self._asked = trio.Event()
        self._answered = answered  # True: no upgrade to answer (the socket is made after it)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._answered:
            self._request += bytes(data)
            if b"\r\n\r\n" in self._request:
                self._asked.set()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._answered:
            await self._asked.wait()
            self._answered = True
            key = next(
                line.split(b":", 1)[1].strip()
                for line in self._request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def load_old(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:voice_trio/providers/deepgram/stt.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("old_stt", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_stt"] = module
    exec(compile(source, "old_stt.py", "exec"), module.__dict__)
    return module


async def timed_sends(stream: Any) -> float:
    """CPU µs per send (this process's user + system time: over TCP, time spent waiting
    for the reader in the other process to make room is not counted)."""
    send = stream.send_audio
    started = time.process_time()
    for _ in range(SENDS):
        await send(CHUNK)
    return (time.process_time() - started) / SENDS * 1e6


async def null_old(old: types.ModuleType) -> float:
    async with trio.open_nursery() as nursery:
        stream = NullStream()
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "x", "/v1/listen")  # type: ignore[arg-type]
        result = await timed_sends(old.SttStream(ws, old.SttOptions()))
        nursery.cancel_scope.cancel()
    return result


async def null_new() -> float:
    ws = ClientWebSocket(NullStream(answered=True), [])
    return await timed_sends(new_stt.SttStream(ws, new_stt.SttOptions()))


async def tcp_sends(module: types.ModuleType, base: str) -> float:
    async with module.connect_stt(base, "k", module.SttOptions(), disconnect_timeout=1) as stt:
        return await timed_sends(stt)


async def per_connection(module: types.ModuleType, base: str) -> float:
    """KB the client allocates per open connection (tracemalloc, 20 at once)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        async with AsyncExitStack() as stack:
            for _ in range(CONNECTIONS):
                await stack.enter_async_context(
                    module.connect_stt(base, "k", module.SttOptions(), disconnect_timeout=1)
                )
            await trio.sleep(0.05)  # readers, where there are, parked
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / CONNECTIONS / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rev", default=OLD_REV)
    old = load_old(parser.parse_args().old_rev)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert server.stdout is not None
        base = f"ws://127.0.0.1:{int(server.stdout.readline())}"
        results: dict[str, list[float]] = {}
        for _ in range(REPEAT):
            for name, run in (
                ("null stream, trio-websocket", lambda: trio.run(null_old, old)),
                ("null stream, lean client", lambda: trio.run(null_new)),
                ("loopback TCP, trio-websocket", lambda: trio.run(tcp_sends, old, base)),
                ("loopback TCP, lean client", lambda: trio.run(tcp_sends, new_stt, base)),
            ):
                results.setdefault(name, []).append(run())
        for name, runs in results.items():
            print(f"{min(runs):8.2f} µs  send_audio(1600 B), {name}")
        for name, module in (("trio-websocket", old), ("lean client", new_stt)):
            kb = min(trio.run(per_connection, module, base) for _ in range(3))
            print(f"{kb:8.1f} KB  per open connection, {name}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
