"""``voice-trio serve --workers 2``: two server processes on one port, as a user runs them.

The supervisor runs as a subprocess pointed at this process's simulators and a fresh
PostgreSQL database; calls are placed by the simulated carrier, so which worker carries a
call is the kernel's choice, read back from ``/metrics`` and the store. The 40-call spread
and the per-worker numbers are in scripts/loadtest.py and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from test_drain_process import _caller, _commands, _server_env
from test_store import pg_dsn  # noqa: F401  (fixture: a fresh PostgreSQL database)

from voice_trio.server import reserve_listener
from voice_trio.sim.caller import ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

pytestmark = pytest.mark.e2e

SECRET = "one secret for every worker's stream tokens"
DRAIN_TIMEOUT_S = 2
SERVE = [sys.executable, "-m", "voice_trio.cli", "--env-file", "/nonexistent", "serve"]


class Workers:
    """The supervisor of two workers, its output in ``tmp_path / "server.log"``."""

    def __init__(self, process: trio.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.base = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 40) -> re.Match[str]:
        with trio.move_on_after(timeout):
            while (found := re.search(pattern, self.output())) is None:
                assert self.process.poll() is None, self.output()[-4000:]
                await trio.sleep(0.05)
            return found
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    async def fresh_get(self, path: str, **headers: str) -> httpx.Response:
        """A GET on a new connection, which any worker may accept."""
        async with httpx.AsyncClient(base_url=self.base, trust_env=False, timeout=10) as c:
            return await c.get(path, headers=headers)

    async def metrics(self) -> dict[str, float]:
        text = (await self.fresh_get("/metrics")).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    async def active_by_worker(self) -> dict[str, float]:
        rows = await self.metrics()
        return {w: rows.get(f'voice_active_calls{{worker="{w}"}}', 0.0) for w in ("w1", "w2")}


async def start_workers(lab: Any, tmp_path: Path, dsn: str) -> Workers:
    with reserve_listener("127.0.0.1") as probe:
        port = probe.getsockname()[1]
    lab.telnyx.default_webhook_url = f"http://127.0.0.1:{port}/webhook/telnyx"
    env = _server_env(lab, port, tmp_path) | {"SERVER_SECRET": SECRET, "DATABASE_URL": dsn}
    # The callers stay silent on purpose: on a busy machine these tests outlast the default
    # 2 x 10 s of silence, and the calls must end by the drain, not by a silence goodbye.
    env["SILENCE_TIMEOUT_MS"] = "60000"
    env["TMPDIR"] = str(tmp_path)  # the metrics directory, even if the supervisor is killed
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [*SERVE, "--workers", "2"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a process group of its own, signalled as a whole
        )
    workers = Workers(process, port, log)
    for name in ("w1", "w2"):
        await workers.wait_for(rf"INFO  {name} \[-\] Server listening on 127\.0\.0\.1:{port}")
    return workers


def long_call(lab: Any, index: int) -> tuple[ScriptedCaller, str]:
    party = _caller([WaitForBot(min_ms_silence=300), Wait(30_000)], f"long-{index}")
    call = lab.telnyx.place_inbound_call(f"+5730000002{index:02d}", OUR_NUMBER, party)
    return party, call.call_control_id


async def greeted(parties: list[ScriptedCaller], timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        for party in parties:  # every greeting has been heard in full
            while not party.results.bot_turns or (  # noqa: ASYNC110
                party.results.bot_turns[-1].ended_at is None
            ):
                await trio.sleep(0.05)


async def place_until_both_carry(lab: Any, workers: Workers, nursery: trio.Nursery) -> list:
    """Long calls, placed until each worker carries at least one (at most 8)."""
    placed: list[tuple[ScriptedCaller, str]] = []
    for index in range(8):
        placed.append(long_call(lab, index))
        nursery.start_soon(placed[-1][0].run)
        await trio.sleep(0.2)
        if index >= 3:
            await greeted([party for party, _ in placed])
            await trio.sleep(1.2)  # both workers publish their gauges every second
            if all(n > 0 for n in (await workers.active_by_worker()).values()):
                break
    with trio.fail_after(10):  # every worker has published its calls since
        while sum((await workers.active_by_worker()).values()) != len(placed):  # noqa: ASYNC110
            await trio.sleep(0.2)
    return placed


def holders(dsn: str) -> dict[str, tuple[str, str, str | None]]:
    """Call id -> (worker that holds it, status, end reason), from the shared store."""
    with psycopg.connect(dsn) as db:
        rows = db.execute(
            "SELECT c.call_control_id, coalesce(i.name, '?'), c.status, c.end_reason "
            "FROM calls c LEFT JOIN instances i ON i.instance_id = c.holder"
        ).fetchall()
    return {ccid: (name.rsplit("/", 1)[-1], status, reason) for ccid, name, status, reason in rows}


async def stop(workers: Workers) -> int:
    if workers.process.poll() is None:
        workers.process.kill()
    return await workers.process.wait()


async def test_two_workers_share_the_port_and_drain_every_call_on_sigterm(
    nursery,
    lab,
    tmp_path,
    pg_dsn,  # noqa: F811
) -> None:
    workers = await start_workers(lab, tmp_path, pg_dsn)
    try:
        async with trio.open_nursery() as callers:
            placed = await place_until_both_carry(lab, workers, callers)
            calls = len(placed)
            active = await workers.active_by_worker()
            assert active["w1"] >= 1 and active["w2"] >= 1, (active, workers.output()[-3000:])
            assert sum(active.values()) == calls

            # Any worker answers for the whole deployment and the whole host.
            for _ in range(6):
                auth = lab.api_auth["Authorization"]
                stats = (await workers.fresh_get("/api/sessions/stats", Authorization=auth)).json()
                assert (stats["active_sessions"], stats["source"]) == (calls, "store"), stats
                rows = await workers.metrics()
                for name in ("w1", "w2"):
                    assert any(k.startswith('voice_worker_info{pid="') for k in rows)
                    assert rows[f'process_open_fds{{worker="{name}"}}'] > 0
                assert (
                    sum(v for k, v in rows.items() if k.startswith("voice_active_calls")) == calls
                )
            seen = {(await workers.fresh_get("/health")).json()["worker"] for _ in range(10)}
            assert seen == {"w1", "w2"}
            # The workers' rows in the store have names of their own (host:port/w1, …).
            assert {worker for worker, _, _ in holders(pg_dsn).values()} == {"w1", "w2"}

            # As systemd's default KillMode and a terminal's Ctrl-C do: the whole group.
            # Workers take their signals from the supervisor alone, so it counts once.
            os.killpg(workers.process.pid, signal.SIGTERM)
            sigterm_at = time.monotonic()
            await trio.sleep(0.5)
            async with httpx.AsyncClient(
                base_url=workers.base, trust_env=False, headers=lab.api_auth
            ) as api:
                for _ in range(4):  # whichever worker answers is draining
                    r = await api.post(
                        "/api/call/initiate", json={"telefono": "+573001112233", "nombre": "Ana"}
                    )
                    assert r.status_code == 503 and r.json()["error"] == "draining", r.text
            with trio.fail_after(DRAIN_TIMEOUT_S + 15):
                for party, _ in placed:
                    while party.results.hangup_by is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            callers.cancel_scope.cancel()
        with trio.fail_after(15):
            code = await workers.process.wait()
    finally:
        await stop(workers)
    output = workers.output()
    assert code == 0, output[-4000:]
    assert time.monotonic() - sigterm_at < DRAIN_TIMEOUT_S + 12
    assert "Traceback" not in output, output[-4000:]
    assert "again" not in output, output[-3000:]
    for name in ("w1", "w2"):
        assert f"INFO  {name} [-] Received SIGTERM, shutting down" in output, output[-3000:]
        assert re.search(rf"Worker {name} \(pid \d+\) exited with code 0", output)
    # Each call: DRAIN_TIMEOUT, then a goodbye and exactly one hang-up, and its record.
    records = holders(pg_dsn)
    for party, ccid in placed:
        assert party.results.hangup_by == "bot", party.name
        assert "Gracias por llamar." in party.results.bot_turns[-1].text, party.name
        assert len(_commands(lab, ccid, "hangup")) == 1, party.name
        assert records[ccid][1:] == ("ended", "drain"), records[ccid]
        goodbye_at = party.results.bot_turns[-1].started_at
        assert goodbye_at - party.results.bot_turns[0].started_at > DRAIN_TIMEOUT_S
    assert not list(tmp_path.glob("voice-trio-metrics-*"))  # removed at the end


async def test_a_killed_worker_is_started_again_and_only_its_calls_are_lost(
    nursery,
    lab,
    tmp_path,
    pg_dsn,  # noqa: F811
) -> None:
    """kill -9 of one worker: the supervisor logs it and starts it again; the calls it
    carried are ended (``server_lost``) when it is back, its sibling's go on. Then kill -9
    of the supervisor: the workers drain and stop on their own."""
    workers = await start_workers(lab, tmp_path, pg_dsn)
    live: list[int] = []
    try:
        async with trio.open_nursery() as callers:
            placed = await place_until_both_carry(lab, workers, callers)
            rows = await workers.metrics()
            pids = {
                m.group(2): int(m.group(1))
                for k in rows
                if (m := re.match(r'voice_worker_info\{pid="(\d+)",worker="(w\d)"\}', k))
            }
            held = holders(pg_dsn)
            on_w1 = [ccid for _, ccid in placed if held[ccid][0] == "w1"]
            on_w2 = [ccid for _, ccid in placed if held[ccid][0] == "w2"]
            assert on_w1 and on_w2, held

            os.kill(pids["w1"], signal.SIGKILL)
            await workers.wait_for(
                rf"ERROR main \[-\] Worker w1 \(pid {pids['w1']}\) was killed by SIGKILL"
                r" after [\d.]+ s, while no signal came: starting it again"
            )
            found = await workers.wait_for(
                r"(?s)starting it again.*INFO  main \[-\] Worker w1 started \(pid (\d+)\)"
            )
            assert int(found.group(1)) != pids["w1"]
            await workers.wait_for(r"(?s)starting it again.*INFO  w1 \[-\] Server listening")
            with trio.fail_after(10):
                while any(holders(pg_dsn)[ccid][1] != "ended" for ccid in on_w1):  # noqa: ASYNC110
                    await trio.sleep(0.2)
            after = holders(pg_dsn)
            for ccid in on_w1:
                assert after[ccid][2] == "server_lost", after[ccid]
            for ccid in on_w2:  # the sibling's calls are untouched and still talking
                assert after[ccid][1] == "active", after[ccid]
            for party, ccid in placed:
                if ccid in on_w2:
                    assert party.results.hangup_by is None, party.name
            rows = await workers.metrics()
            assert f'voice_worker_info{{pid="{pids["w2"]}",worker="w2"}}' in rows
            assert f'voice_worker_info{{pid="{pids["w1"]}",worker="w1"}}' not in rows

            # The supervisor itself killed: its workers drain as for SIGTERM, and stop.
            live = [pids["w2"], int(found.group(1))]
            workers.process.kill()
            await workers.process.wait()
            with trio.fail_after(DRAIN_TIMEOUT_S + 15):
                for party, ccid in placed:
                    while ccid in on_w2 and party.results.hangup_by is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            callers.cancel_scope.cancel()
        with trio.fail_after(15):
            while any(running(pid) for pid in live):  # noqa: ASYNC110
                await trio.sleep(0.1)
    finally:
        await stop(workers)
        for pid in live:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    output = workers.output()
    assert output.count("The supervisor is gone, shutting down") == 2, output[-3000:]
    final = holders(pg_dsn)
    for party, ccid in placed:
        if ccid in on_w2:
            assert "Gracias por llamar." in party.results.bot_turns[-1].text, party.name
            assert len(_commands(lab, ccid, "hangup")) == 1, party.name
            assert final[ccid][1:] == ("ended", "drain"), final[ccid]


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited orphan may linger as a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
