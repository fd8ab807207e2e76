"""A store outage never harms a call (docs/reliability.md, "Store outage").

The outage is real: the SQLite connection is switched to ``PRAGMA query_only``, so every
write fails in the driver ("attempt to write a readonly database") and comes out of the
store as ``StoreError``, as a full disk or a lost database server would. Calls run and end
exactly as they would otherwise; what could not be saved is logged and counted in
``voice_store_errors_total``. Records are retried within the save bound, not buffered
(:mod:`voice_trio.store.outage`)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from conftest import start_lab_server
from test_fallback import PATIENT, caller, commands, heard_reply_to, wait_for

from voice_trio.sim.caller import HangUp, Say, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER
from voice_trio.store import StoreError
from voice_trio.store import outage as store_outage

FALLBACK = {"USE_MEDIA_STREAMS": "false"}
SCRIPT = [
    WaitForBot(min_ms_silence=300),
    Say("Quiero una cita para el lunes.", 100),
    WaitForBot(min_ms_silence=300),
    Wait(300),
    HangUp(),
]


@pytest.fixture
async def lab(lab, monkeypatch):
    lab.telnyx.speak_ms_per_char = lab.deepgram.ms_per_char = 10
    lab.telnyx.transcription_silence_ms = 250
    monkeypatch.setattr(store_outage, "RETRY_DELAYS_S", (0.05, 0.1))
    return lab


def store_down(server, down: bool = True) -> None:
    server.app.center.store.conn.execute(f"PRAGMA query_only = {'ON' if down else 'OFF'}")


def metric(text: str, operation: str) -> float:
    prefix = f'voice_store_errors_total{{operation="{operation}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def metrics_once(server, ready) -> str:
    with trio.fail_after(8):
        while not ready(text := (await server.client.get("/metrics")).text):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return text


def not_saved(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and "Call record not saved" in r.getMessage()
    ]


async def test_a_media_call_runs_and_ends_normally_while_the_store_is_down(
    nursery, lab, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    server = await start_lab_server(nursery, lab, SQLITE_PATH=str(tmp_path / "calls.db"))
    store_down(server)
    party = caller(SCRIPT)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()

    # The call was not harmed: greeted, answered, and ended by the caller, once.
    assert not results.errors and not results.timed_out
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert results.hangup_by == "caller" and commands(lab, "hangup") == []
    # The record is given up after the call left the registry (retries, then the bound).
    metrics = await metrics_once(server, lambda m: metric(m, "save_call") > 0)
    assert 'voice_calls_total{end_reason="caller_hangup",mode="media"} 1.0' in metrics
    # The failure is visible: logged at ERROR (with the call id) and counted.
    assert metric(metrics, "start_call") == 1.0 and metric(metrics, "save_call") == 1.0
    assert not_saved(caplog)
    assert server.app.center.store.backend == "sqlite"
    # Not buffered: once the store is back, the next call's record is kept, not this one's.
    store_down(server, False)
    assert await server.app.center.store.get_call(sim_call.call_control_id) is None
    party = caller(SCRIPT)
    second = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    record, _ = await server.app.center.store.get_call(second.call_control_id)
    assert record.end_reason == "caller_hangup"
    server.stop.set()


async def test_a_fallback_call_goes_on_from_memory_when_the_store_fails_mid_call(
    nursery, lab, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    server = await start_lab_server(
        nursery, lab, SQLITE_PATH=str(tmp_path / "calls.db"), **FALLBACK
    )
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 100),
            WaitForBot(min_ms_silence=300),
            Say("Eso es todo, gracias. Adiós.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1500),
        ],
        hang_up_when_done=False,
    )
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(lambda: party.results.bot_turns)  # the greeting is playing
        store_down(server)
    results = party.results
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()

    assert not results.errors and not results.timed_out
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    metrics = await metrics_once(server, lambda m: metric(m, "save_call") > 0)
    assert 'voice_calls_total{end_reason="agent_ended",mode="fallback"} 1.0' in metrics
    assert metric(metrics, "save_state") >= 1.0 and metric(metrics, "save_call") == 1.0
    assert any("the call goes on here" in r.getMessage() for r in caplog.records)
    assert not_saved(caplog)
    assert not server.app.center.fallback.shared.pinned(sim_call.call_control_id)
    server.stop.set()


async def test_a_write_that_fails_for_a_moment_is_retried_within_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []

    async def save_call(record: str) -> str:
        attempts.append(trio.current_time())
        if len(attempts) < 3:
            raise StoreError("sqlite store calls.db: database is locked")
        return record

    failures: list[str] = []
    assert await store_outage.keep(save_call, "r", on_failure=failures.append) == "r"
    assert len(attempts) == 3 and not failures


async def test_a_write_that_keeps_failing_is_given_up_counted_and_never_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def save_call() -> None:
        raise StoreError("postgres store db:5432/voice: connection refused")

    failures: list[str] = []
    with trio.CancelScope() as scope:
        scope.cancel()  # the call is being torn down: the write is shielded from that
        assert await store_outage.keep(save_call, on_failure=failures.append) is None
    assert failures == ["save_call"]
    started = trio.current_time()
    assert await store_outage.keep(save_call, on_failure=failures.append, first=True) is None
    assert trio.current_time() - started < store_outage.START_TIMEOUT_S  # one try only
    assert failures == ["save_call", "save_call"]

    async def hangs() -> None:
        await trio.sleep_forever()

    assert await store_outage.keep(hangs, on_failure=failures.append) is None
    assert failures[-1] == "hangs"
