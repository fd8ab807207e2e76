"""Every command the README shows, run as a user runs it: a subprocess in a fresh folder,
checked for what the user would see. A README command without a test here does not stay in
the README. (``make demo`` and ``make test`` are ``voice-trio demo`` and this suite.)

| README command                                          | test                              |
|---------------------------------------------------------|-----------------------------------|
| ``voice-trio demo`` (``make demo``), ``--wav call.wav`` | test_demo_…                       |
| ``voice-trio demo --console``; Ctrl-C                   | test_demo_console_…               |
| ``voice-trio sim all --write-env .env``, ``serve``,     | test_the_simulator_walk_…         |
| ``curl -X POST …/api/call/initiate`` with the token     |                                   |
| ``cp .env.example .env``; ``voice-trio check-config``   | test_check_config_…               |
| ``voice-trio serve``; SIGTERM                           | test_serve_…                      |
| ``voice-trio serve --workers 2`` (SERVER_SECRET, DATABASE_URL); SIGTERM | test_serve_with_workers_… |
| ``hypercorn -k trio -b … voice_trio.asgi:app`` (-w 2)   | test_hypercorn_…                  |
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path

import httpx
import psycopg
import pytest
import trio
from processes import BIN, Program, clean_env, free_port
from test_store import pg_dsn  # noqa: F401  (fixture: a fresh PostgreSQL database)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
UPGRADE = (
    b"GET /stream/media HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
DEFLATE = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"


def _run(tmp_path: Path, name: str, *args: str, **env: str) -> Program:
    return Program(list(args), cwd=tmp_path, env=clean_env(**env), log=tmp_path / f"{name}.log")


async def _health(port: int) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{port}/health")


async def test_demo_places_a_whole_call_and_writes_both_sides(tmp_path: Path) -> None:
    demo = _run(tmp_path, "demo", str(BIN / "voice-trio"), "demo", "--wav", "call.wav")
    try:
        assert await demo.wait(120) == 0, demo.output()[-4000:]
    finally:
        demo.kill()
    out = demo.output()
    assert "── Conversation, as the caller heard it ──" in out
    assert re.search(r"Voice-to-voice over \d turns: median \d+ ms", out), out[-2000:]
    assert "Barge-ins: 1" in out and out.rstrip().endswith("demo OK")
    with wave.open(str(tmp_path / "call.wav")) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        assert wav.getnframes() > 8000 * 10  # more than ten seconds of call


async def test_demo_console_keeps_the_server_up_for_the_console_until_ctrl_c(
    tmp_path: Path,
) -> None:
    demo = _run(tmp_path, "demo", str(BIN / "voice-trio"), "demo", "--console")
    try:
        found = await demo.wait_for(r"Operator console: (\S+) .*token: (\S+)\)", timeout=120)
        console, token = found.groups()
        assert "demo OK" in demo.output()
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            login = await client.get(console + "login")
            assert login.status_code == 200 and 'name="token"' in login.text
            api = {"Authorization": f"Bearer {token}"}
            calls = await client.get(console.replace("/console/", "/api/calls"), headers=api)
            [call] = calls.json()["calls"]
            ccid = call["call_control_id"]
            recording = console.replace("/console/", f"/api/calls/{ccid}/recording")
            wav = await client.get(recording, headers=api)
            assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
        assert await demo.stop(signal.SIGINT, timeout=30) == 0, demo.output()[-4000:]
    finally:
        demo.kill()
    assert "Stopping the demo server." in demo.output()


async def test_check_config_on_the_example_settings_names_what_is_missing(
    tmp_path: Path,
) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    check = _run(tmp_path, "check", str(BIN / "voice-trio"), "check-config")
    assert await check.wait(60) == 0, check.output()
    out = check.output()
    assert re.search(r"^TELNYX_API_KEY\s+\(unset\)\s+Telnyx API v2 key", out, re.M), out
    assert re.search(r"^AGENT_LANGUAGE\s+es\s", out, re.M)
    assert "media: missing TELNYX_API_KEY" in out
    assert "webhook signatures: missing TELNYX_PUBLIC_KEY" in out
    assert "api: missing API_TOKEN" in out


async def test_check_config_refuses_a_bad_setting_by_name(tmp_path: Path) -> None:
    check = _run(tmp_path, "check", str(BIN / "voice-trio"), "check-config", LOG_FORMAT="xml")
    assert await check.wait(60) == 2
    assert "Configuration error: LOG_FORMAT: expected one of human, json" in check.output()


async def test_the_simulator_walk_sim_all_serve_and_an_outbound_call(tmp_path: Path) -> None:
    port = free_port()
    sims = _run(
        tmp_path,
        "sims",
        str(BIN / "voice-trio"),
        "sim",
        "all",
        "--write-env",
        ".env",
        "--telnyx-port=0",
        "--deepgram-port=0",
        "--anthropic-port=0",
        f"--webhook-url=http://127.0.0.1:{port}/webhook/telnyx",
        "--ms-per-char=30",
    )
    server = None
    try:
        await sims.wait_for(r"Telnyx simulator listening on http://127\.0\.0\.1:\d+")
        await sims.wait_for(r"\(written to \.env\)")
        env_file = (tmp_path / ".env").read_text()
        assert f"WEBHOOK_BASE_URL=http://127.0.0.1:{port}\n" in env_file
        assert re.search(r"^TELNYX_PUBLIC_KEY=\S+$", env_file, re.M)
        # The walk's curl reads the token as the README says: sed -n 's/^API_TOKEN=//p' .env
        found = re.search(r"^API_TOKEN=(\S{16,})$", env_file, re.M)
        assert found, env_file
        token = found.group(1)

        check = _run(tmp_path, "check", str(BIN / "voice-trio"), "check-config")
        assert await check.wait(60) == 0
        assert "media: ready" in check.output() and "fallback: ready" in check.output()
        assert "api: ready" in check.output()

        server = _run(
            tmp_path, "serve", str(BIN / "voice-trio"), "serve", HOST="127.0.0.1", PORT=str(port)
        )
        await server.wait_for(rf"Server listening on 127\.0\.0\.1:{port} \(mode: media\)")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10
        ) as api:
            call = {"telefono": "+573001234567", "nombre": "Ana"}
            assert (await api.post("/api/call/initiate", json=call)).status_code == 401
            api.headers["Authorization"] = f"Bearer {token}"
            r = await api.post(
                "/api/call/initiate",
                json={"telefono": "+573001234567", "nombre": "Ana", "contexto": "Cita del viernes"},
            )
            assert r.status_code == 201, r.text
            ccid = r.json()["call_control_id"]
            bad = await api.post("/api/call/initiate", json={"telefono": "3001", "nombre": "A"})
            assert bad.status_code == 422 and bad.json()["field"] == "telefono"
            with trio.fail_after(90):
                while True:
                    record = await api.get(f"/api/calls/{ccid}")
                    if record.status_code == 200 and record.json()["call"]["status"] == "ended":
                        break
                    await trio.sleep(0.5)
        turns = record.json()["turns"]
        assert "Ana" in turns[0]["bot_text"], turns  # the greeting names her
        heard = " ".join(t["user_text"] or "" for t in turns)
        assert "cita con medicina general" in heard, turns
        log = server.output()
        for marker in ("📨 Webhook recibido", "Streaming Start requested", "🎤", "⚡", "💬", "🔊"):
            assert marker in log, marker
        assert await server.stop() == 0
        assert "Traceback" not in server.output()
    finally:
        if server is not None:
            server.kill()
        # Not Ctrl-C: a process started from a test worker may inherit SIGINT ignored.
        sims.kill()


async def test_serve_answers_health_upgrades_and_stops_on_sigterm(tmp_path: Path) -> None:
    server = _run(tmp_path, "serve", str(BIN / "voice-trio"), "serve", HOST="127.0.0.1", PORT="0")
    try:
        found = await server.wait_for(r"Server listening on 127\.0\.0\.1:(\d+)")
        port = int(found.group(1))
        assert re.search(
            r"^\[\d\d:\d\d:\d\d\.\d{3}\] INFO  \[-\] Server listening", server.output(), re.M
        )
        r = await _health(port)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        # The original checklist's raw curl upgrade request.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(UPGRADE)
        reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in reply
        await stream.aclose()
        assert await server.stop() == 0
        assert "Received SIGTERM, shutting down" in server.output()
    finally:
        server.kill()


async def test_serve_with_workers_shares_the_port_and_stops_on_sigterm(
    tmp_path: Path,
    pg_dsn: str,  # noqa: F811
) -> None:
    started: Program | None = None
    server = _run(
        tmp_path,
        "serve",
        str(BIN / "voice-trio"),
        "serve",
        "--workers",
        "2",
        HOST="127.0.0.1",
        PORT="0",
        SERVER_SECRET="a shared secret for every worker",
        DATABASE_URL=pg_dsn,
    )
    try:
        found = await server.wait_for(r"Starting 2 workers on 127\.0\.0\.1:(\d+)")
        port = int(found.group(1))
        for worker in ("w1", "w2"):
            await server.wait_for(rf"INFO  {worker} \[-\] Server listening on 127\.0\.0\.1:{port}")
        answered = {(await _health(port)).json()["worker"] for _ in range(12)}
        assert answered == {"w1", "w2"}  # each new connection goes to either worker
        # In the store each worker is named by the port PORT=0 picked, so that a worker
        # started again takes its predecessor's name (and ends its calls at once).
        with psycopg.connect(pg_dsn) as db:
            names = {name for (name,) in db.execute("SELECT name FROM instances")}
        assert {name.split(":", 1)[1] for name in names} == {f"{port}/w1", f"{port}/w2"}
        # The workers' SO_REUSEPORT group is this server's: a second one cannot join it.
        second = started = _run(
            tmp_path,
            "second",
            str(BIN / "voice-trio"),
            "serve",
            "--workers",
            "2",
            HOST="127.0.0.1",
            PORT=str(port),
            SERVER_SECRET="a shared secret for every worker",
            DATABASE_URL=pg_dsn,
        )
        assert await second.wait(30) == 1
        assert f"Cannot serve on 127.0.0.1:{port}: Address already in use" in second.output()
        assert "Worker w1 started" not in second.output()
        assert await server.stop() == 0
        out = server.output()
        assert out.count("Received SIGTERM, shutting down") == 2, out[-3000:]
        assert "Every worker has stopped" in out and "Traceback" not in out
    finally:
        server.kill()
        if started is not None and started.process.poll() is None:
            await started.stop()  # it got in after all: its workers stop with it


@pytest.mark.parametrize("workers", [1, 2])
async def test_hypercorn_serves_the_app_from_the_environment(tmp_path: Path, workers: int) -> None:
    port = free_port()
    server = _run(
        tmp_path,
        "hypercorn",
        str(BIN / "hypercorn"),
        "-k",
        "trio",
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{port}",
        "voice_trio.asgi:app",
        SERVER_SECRET="a shared secret for every worker",
    )
    try:
        for _ in range(workers):
            await server.wait_for(
                rf"(?s)(\[\d+\] \[INFO\] Running on http://127\.0\.0\.1:{port}.*){{{workers}}}"
            )
        pids = set(re.findall(r"\[(\d+)\] \[INFO\] Running on", server.output()))
        assert len(pids) == workers
        r = await _health(port)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        for _ in range(workers):
            await _media_socket_is_the_lean_one(port)
        # Each worker is its own instance in the store: one name each, or each start
        # would drop its siblings' rows and end their calls.
        db = sqlite3.connect(tmp_path / "voice_trio.sqlite3")
        try:
            names = [name for (name,) in db.execute("SELECT name FROM instances")]
        finally:
            db.close()
        assert len(set(names)) == workers, names
        assert {name.rsplit("/pid", 1)[-1] for name in names} == pids
        assert await server.stop() == 0
        assert "Traceback" not in server.output()
    finally:
        server.kill()


async def _media_socket_is_the_lean_one(port: int) -> None:
    """``/stream/media`` under the Hypercorn CLI: the lean socket took it at the 101 (no
    permessage-deflate, which Hypercorn would have negotiated), and a socket that cannot
    prove its call is refused with 1008, as under ``voice-trio serve``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(UPGRADE.replace(b"\r\n\r\n", b"\r\n" + DEFLATE + b"\r\n\r\n"))
    reply = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in reply:
            reply += await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-extensions" not in reply.lower()
    start = json.dumps({"event": "start", "start": {"call_control_id": "v3:stranger"}})
    payload, mask = start.encode(), b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    with trio.fail_after(10):
        while len(reply.split(b"\r\n\r\n", 1)[1]) < 4:
            reply += await stream.receive_some(4096)
    frame = reply.split(b"\r\n\r\n", 1)[1]
    assert frame[0] == 0x88 and frame[2:4] == (1008).to_bytes(2, "big"), frame
    await stream.aclose()


async def test_hypercorn_with_a_bad_setting_stops_and_names_it(tmp_path: Path) -> None:
    server = _run(
        tmp_path,
        "hypercorn",
        str(BIN / "hypercorn"),
        "-k",
        "trio",
        "-b",
        f"127.0.0.1:{free_port()}",
        "voice_trio.asgi:app",
        LOG_FORMAT="xml",
    )
    try:
        await server.wait(60)  # Hypercorn 0.18 reports a failed worker with exit code 0
        assert "Configuration error: LOG_FORMAT: expected one of human, json" in server.output()
    finally:
        server.kill()


def test_make_refuses_a_lock_that_does_not_match_pyproject(tmp_path: Path) -> None:
    """``make test`` installs only what uv.lock names, and says so when pyproject.toml has
    moved on without it (README: ``make lock`` refreshes it on purpose)."""
    uv = ROOT / ".tools" / "bin" / "uv"
    if not uv.exists():
        pytest.skip("no .tools/bin/uv: run the suite through make")
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    make = ["make", "-s", f"UV={uv}", f"PYTHON={sys.executable}", "install"]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('"python-dotenv>=1.0",', '"python-dotenv>=1.0",\n    "six",')
    )
    done = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock." in (
        done.stderr
    )
    assert not (tmp_path / ".venv" / ".installed").exists()
