"""Graceful drain of a real ``voice-trio serve`` process with calls in flight.

The server runs in its own process, pointed at the simulators of this one (as the load test
does). SIGTERM: the API answers 503 with a reason, inbound calls are rejected, a call that
ends within DRAIN_TIMEOUT ends on its own, the others hear a goodbye and are hung up once;
every call is on file; the process exits 0.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from conftest import FAST_SPEECH_MS

from voice_trio.config import Settings
from voice_trio.server import reserve_listener
from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

DRAIN_TIMEOUT_S = 2
LONG_CALLS = 3


def _server_env(lab, port: int, tmp_path) -> dict[str, str]:
    """This environment minus any voice-trio setting of the developer's shell, plus the lab."""
    names: set[str] = set()
    for f in dataclasses.fields(Settings):
        names.add(f.metadata["env"])
        names.update(f.metadata.get("aliases", ()))
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(lab.server_env())
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
            "SQLITE_PATH": str(tmp_path / "calls.sqlite3"),
            "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S),
            "LOG_FORMAT": "human",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _caller(script, name: str) -> ScriptedCaller:
    return ScriptedCaller(
        script,
        ms_per_char=FAST_SPEECH_MS,
        turn_gap_ms=300,
        timeout_s=30,
        hang_up_when_done=False,
        name=name,
    )


def _commands(lab, ccid: str, action: str) -> list:
    return [r for r in lab.telnyx.requests if r.path == f"/v2/calls/{ccid}/actions/{action}"]


async def test_sigterm_drains_calls_in_flight_and_exits_zero(nursery, lab, tmp_path) -> None:
    process, port = await _start_server(lab, tmp_path, DRAIN_TIMEOUT_S)
    try:
        await _drain_with_calls_in_flight(lab, port, process, tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    output = (tmp_path / "server.log").read_text()
    assert "Received SIGTERM, shutting down" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


async def _drain_with_calls_in_flight(lab, port: int, process, tmp_path) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(
        base_url=base, timeout=5, trust_env=False, headers=lab.api_auth
    ) as api:
        # Three calls that would go on for a long time, and one that ends within the drain.
        long_calls = [
            _caller([WaitForBot(min_ms_silence=300), Wait(20_000)], f"long-{i}")
            for i in range(LONG_CALLS)
        ]
        short_call = _caller(
            [WaitForBot(min_ms_silence=300), Wait(800), Say("Gracias.", 100), HangUp()], "short"
        )
        parties = [*long_calls, short_call]
        sim_calls = [
            lab.telnyx.place_inbound_call(f"+57300000000{i}", OUR_NUMBER, party)
            for i, party in enumerate(parties)
        ]
        async with trio.open_nursery() as callers:
            for party in parties:
                callers.start_soon(party.run)
            await _greetings_heard(parties)
            assert (await api.get("/health")).json()["active_calls"] == len(parties)

            process.send_signal(signal.SIGTERM)
            sigterm_at = time.monotonic()
            await trio.sleep(0.3)
            r = await api.post(
                "/api/call/initiate", json={"telefono": "+573001112233", "nombre": "Ana"}
            )
            assert r.status_code == 503 and r.json()["error"] == "draining", r.text
            # A load balancer's health check sends no new work here.
            health = await api.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            refused = lab.telnyx.place_inbound_call("+573009998877", OUR_NUMBER)
            with trio.fail_after(5):
                while not _commands(lab, refused.call_control_id, "reject"):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert _commands(lab, refused.call_control_id, "answer") == []

            with trio.fail_after(DRAIN_TIMEOUT_S + 10):
                for party in parties:
                    while party.results.hangup_by is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            callers.cancel_scope.cancel()

        with trio.fail_after(10):
            code = await process.wait()
    assert code == 0
    assert time.monotonic() - sigterm_at < DRAIN_TIMEOUT_S + 8

    # The short call finished by itself during the drain: no goodbye, no hang-up from us.
    assert short_call.results.hangup_by == "caller"
    assert _commands(lab, sim_calls[-1].call_control_id, "hangup") == []
    # The others were given DRAIN_TIMEOUT, then a goodbye and exactly one hang-up each.
    for party, sim_call in zip(long_calls, sim_calls, strict=False):
        assert party.results.hangup_by == "bot", party.name
        assert "Gracias por llamar." in party.results.bot_turns[-1].text, party.name
        assert len(_commands(lab, sim_call.call_control_id, "hangup")) == 1, party.name
        ended_after = party.results.bot_turns[-1].started_at - party.results.bot_turns[0].started_at
        assert ended_after > DRAIN_TIMEOUT_S, party.name

    # Every call is on file, ended, with its reason and its turns.
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    try:
        rows = dict(
            db.execute("SELECT call_control_id, end_reason FROM calls WHERE status = 'ended'")
        )
        turns = dict(db.execute("SELECT call_control_id, count(*) FROM call_turns GROUP BY 1"))
    finally:
        db.close()
    for sim_call in sim_calls[:-1]:
        assert rows[sim_call.call_control_id] == "drain"
        assert turns[sim_call.call_control_id] >= 2  # greeting and goodbye
    assert rows[sim_calls[-1].call_control_id] == "caller_hangup"


SERVE = [sys.executable, "-m", "voice_trio.cli", "--env-file", "/nonexistent", "serve"]


async def _start_server(
    lab,
    tmp_path,
    drain_timeout: int,
    port: int | None = None,
    command: Callable[[int], list[str]] = lambda port: SERVE,
):
    """A server process on the lab, once it answers ``/health``; killed if it never does.
    A port picked here may be taken by another test's server before ours binds it (the
    suite runs in parallel): then another port is picked."""
    if port is not None:
        return await _start_server_once(lab, tmp_path, drain_timeout, port, command)
    for attempt in range(3):
        try:
            return await _start_server_once(lab, tmp_path, drain_timeout, None, command)
        except AssertionError:
            if attempt == 2 or "Address already in use" not in _server_log(tmp_path):
                raise


def _server_log(tmp_path) -> str:
    return (tmp_path / "server.log").read_text(errors="replace")


async def _start_server_once(lab, tmp_path, drain_timeout: int, port, command):
    if port is None:
        with reserve_listener("127.0.0.1") as probe:
            port = probe.getsockname()[1]
    lab.telnyx.default_webhook_url = f"http://127.0.0.1:{port}/webhook/telnyx"
    env = _server_env(lab, port, tmp_path) | {"DRAIN_TIMEOUT": str(drain_timeout)}
    with (tmp_path / "server.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            command(port),
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as api:
            with trio.fail_after(60):
                while process.poll() is None:
                    try:
                        if (await api.get("/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)
        assert process.poll() is None, (tmp_path / "server.log").read_text()
    except BaseException:
        process.kill()  # a server that did not come up is not left running
        await process.wait()
        raise
    return process, port


async def _greetings_heard(parties) -> None:
    """Until every party has heard the greeting in full."""
    with trio.fail_after(30):
        for party in parties:
            while not party.results.bot_turns or (  # noqa: ASYNC110
                party.results.bot_turns[-1].ended_at is None
            ):
                await trio.sleep(0.05)


async def _calls_in_progress(lab, count: int):
    parties = [
        _caller([WaitForBot(min_ms_silence=300), Wait(60_000)], f"long-{i}") for i in range(count)
    ]
    sim_calls = [
        lab.telnyx.place_inbound_call(f"+57300000001{i}", OUR_NUMBER, party)
        for i, party in enumerate(parties)
    ]
    return parties, sim_calls


def _end_reasons(tmp_path) -> dict[str, str]:
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    try:
        return dict(
            db.execute("SELECT call_control_id, end_reason FROM calls WHERE status = 'ended'")
        )
    finally:
        db.close()


@pytest.mark.parametrize(
    ("signals", "said_last", "end_reason"),
    [
        # A second signal skips the rest of DRAIN_TIMEOUT: goodbyes at once.
        (2, "Gracias por llamar.", "drain"),
        # A third skips the goodbyes too: every call is hung up at once, and still recorded.
        (3, None, "shutdown"),
    ],
)
async def test_further_signals_shorten_the_drain_but_every_call_is_hung_up_and_recorded(
    nursery, lab, tmp_path, signals: int, said_last: str | None, end_reason: str
) -> None:
    process, _ = await _start_server(lab, tmp_path, drain_timeout=60)
    try:
        parties, sim_calls = await _calls_in_progress(lab, 2)
        async with trio.open_nursery() as callers:
            for party in parties:
                callers.start_soon(party.run)
            await _greetings_heard(parties)
            first_at = time.monotonic()
            for _ in range(signals):
                process.send_signal(signal.SIGTERM)
                await trio.sleep(0.3)
            with trio.fail_after(12):
                for party in parties:
                    while party.results.hangup_by is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            callers.cancel_scope.cancel()
        with trio.fail_after(15):
            code = await process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    output = (tmp_path / "server.log").read_text()
    assert code == 0, output[-3000:]
    assert time.monotonic() - first_at < 15  # far less than DRAIN_TIMEOUT's 60 s
    assert output.count("Received SIGTERM again") == signals - 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    reasons = _end_reasons(tmp_path)
    for party, sim_call in zip(parties, sim_calls, strict=True):
        assert party.results.hangup_by == "bot", party.name
        assert len(_commands(lab, sim_call.call_control_id, "hangup")) == 1, party.name
        last = party.results.bot_turns[-1].text
        if said_last:
            assert said_last in last, party.name
        else:
            assert "Gracias por llamar." not in last, party.name
        assert reasons[sim_call.call_control_id] == end_reason


async def test_a_killed_servers_calls_are_ended_at_the_next_start(nursery, lab, tmp_path) -> None:
    """kill -9 leaves the record of a live call ``active``; the next start on the same host
    and port ends it as ``server_lost``, so ``/api/calls`` never shows a ghost call."""
    process, port = await _start_server(lab, tmp_path, drain_timeout=0)
    parties, sim_calls = await _calls_in_progress(lab, 1)
    restarted = None
    try:
        async with trio.open_nursery() as callers:
            callers.start_soon(parties[0].run)
            with trio.fail_after(15):
                while not parties[0].results.bot_turns:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            process.kill()  # SIGKILL: nothing of the drain runs
            await process.wait()
            callers.cancel_scope.cancel()
        ccid = sim_calls[0].call_control_id
        db = sqlite3.connect(tmp_path / "calls.sqlite3")
        try:
            (status,) = db.execute(
                "SELECT status FROM calls WHERE call_control_id = ?", (ccid,)
            ).fetchone()
        finally:
            db.close()
        assert status == "active"  # the ghost the next start must end

        restarted, _ = await _start_server(lab, tmp_path, drain_timeout=0, port=port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, headers=lab.api_auth
        ) as api:
            call = (await api.get(f"/api/calls/{ccid}")).json()["call"]
            active = (await api.get("/api/calls", params={"status": "active"})).json()
        assert (call["status"], call["end_reason"]) == ("ended", "server_lost")
        assert call["ended_at"] is not None
        assert ccid not in [c["call_control_id"] for c in active["calls"]]
        assert (
            "ended (server_lost): the server that held it stopped"
            in (tmp_path / "server.log").read_text()
        )
    finally:
        for proc in (process, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
                await proc.wait()


async def test_under_hypercorns_own_command_line_a_stop_still_hangs_calls_up(
    nursery, lab, tmp_path
) -> None:
    """``hypercorn … voice_trio.asgi:app`` has no drain of ours: Hypercorn cuts connections
    after its graceful timeout. A call cut that way is still hung up and recorded."""
    hypercorn = [str(Path(sys.executable).parent / "hypercorn"), "-k", "trio"]
    process, _ = await _start_server(
        lab,
        tmp_path,
        drain_timeout=0,
        command=lambda port: [
            *hypercorn,
            "--graceful-timeout",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "voice_trio.asgi:app",
        ],
    )
    try:
        parties, sim_calls = await _calls_in_progress(lab, 1)
        async with trio.open_nursery() as callers:
            callers.start_soon(parties[0].run)
            with trio.move_on_after(15):
                while not parties[0].results.bot_turns:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert parties[0].results.bot_turns, (tmp_path / "server.log").read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                while parties[0].results.hangup_by is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert parties[0].results.hangup_by, (tmp_path / "server.log").read_text()[-3000:]
            callers.cancel_scope.cancel()
        with trio.fail_after(15):
            code = await process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    output = (tmp_path / "server.log").read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    ccid = sim_calls[0].call_control_id
    assert parties[0].results.hangup_by == "bot"
    assert len(_commands(lab, ccid, "hangup")) == 1
    assert _end_reasons(tmp_path)[ccid] == "shutdown"
