"""The server as a user runs it: ``voice-trio serve`` in its own process."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import trio

UPGRADE = (
    b"GET /stream/media HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@pytest.fixture
def served(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELNYX_", "API_TOKEN"))}
    env.update({"HOST": "127.0.0.1", "PORT": "0", "LOG_FORMAT": "human"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "voice_trio.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 20
    port = None
    while time.monotonic() < deadline and port is None:
        line = proc.stderr.readline()
        lines.append(line)
        found = re.search(r"Server listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
    assert port, "".join(lines)
    yield proc, port, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_serve_answers_health_upgrades_and_stops_on_sigterm(served) -> None:
    proc, port, lines = served
    assert re.match(r"^\[\d\d:\d\d:\d\d\.\d{3}\] INFO  \[-\] Server listening on", lines[-1])
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # The original checklist's raw curl upgrade request.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(UPGRADE)
    reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in reply
    await stream.aclose()
    proc.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(proc.wait, 15) == 0
    rest = proc.stderr.read()
    assert "Received SIGTERM, shutting down" in rest
