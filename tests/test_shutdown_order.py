"""The end of a server, in order: webhook reactions still running finish (within a bounded
grace) before the store and the clients close, and a webhook that comes after that point is
refused with 503 — unclaimed, so Telnyx's retry is not taken for a duplicate."""

from __future__ import annotations

import json
import logging
import sqlite3

import trio
from conftest import make_settings, start_server, webhook_body

from voice_trio.instance import center as center_module


def _settings(peer_base: str, signer, tmp_path):
    return make_settings(
        TELNYX_API_BASE=peer_base + "/v2",
        TELNYX_PUBLIC_KEY=signer.public_b64,
        SQLITE_PATH=str(tmp_path / "calls.sqlite3"),
    )


def _slow_state_reads(monkeypatch, store, delay: float, done: list[str]) -> None:
    """The store answers state reads slowly, as it does on a busy machine."""
    real = store.load_state

    async def load_state(call_control_id: str):
        await trio.sleep(delay)
        state = await real(call_control_id)
        done.append(call_control_id)
        return state

    monkeypatch.setattr(store, "load_state", load_state)


def _problems(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_hangup_in_the_last_moments_of_a_drain_is_handled_before_the_store_closes(
    telnyx_peer, signer, tmp_path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    _, base = telnyx_peer
    reads: list[str] = []
    async with trio.open_nursery() as serving:
        server = await start_server(serving, _settings(base, signer, tmp_path))
        _slow_state_reads(monkeypatch, server.app.center.store, 0.5, reads)
        body = webhook_body("call.hangup", "v3:late", hangup_cause="normal_clearing")
        r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
        assert r.status_code == 200 and r.json() == {"status": "received"}
        server.stop.set()  # no call to drain: the server stops while the reaction runs
        await server.client.aclose()
    # The server has returned: the reaction finished first, and nothing failed.
    assert reads == ["v3:late"]
    assert _problems(caplog) == [], caplog.text
    assert "StoreError" not in caplog.text


async def test_background_work_gets_a_bounded_grace_then_is_cancelled(
    telnyx_peer, signer, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(center_module, "BACKGROUND_GRACE_SECONDS", 0.3)
    _, base = telnyx_peer
    reads: list[str] = []
    async with trio.open_nursery() as serving:
        server = await start_server(serving, _settings(base, signer, tmp_path))
        _slow_state_reads(monkeypatch, server.app.center.store, 60, reads)
        body = webhook_body("call.hangup", "v3:stuck", hangup_cause="normal_clearing")
        r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
        assert r.status_code == 200
        server.stop.set()
        await server.client.aclose()
        with trio.fail_after(10):
            await server.app.center.stop()  # what the server's own shutdown awaits
    assert reads == []  # cut at the end of the grace, without an error
    assert _problems(caplog) == [], caplog.text


async def test_a_webhook_after_stop_has_begun_gets_503_and_is_not_claimed(
    nursery, telnyx_peer, signer, tmp_path, caplog
) -> None:
    _, base = telnyx_peer
    server = await start_server(nursery, _settings(base, signer, tmp_path))
    center = server.app.center
    still_running = trio.Event()
    center.spawn(still_running.wait)  # a reaction in its grace keeps stop() waiting
    nursery.start_soon(center.stop)
    await trio.sleep(0.05)
    assert not center.accepting_work

    body = webhook_body("call.hangup", "v3:after", hangup_cause="normal_clearing")
    r = await server.client.post("/webhook/telnyx", content=body, headers=signer.headers(body))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"error": "shutting_down", "reason": "the server is shutting down"}
    still_running.set()
    with trio.fail_after(5):
        await center.stop()
    event_id = json.loads(body)["data"]["id"]
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    try:
        seen = db.execute("SELECT count(*) FROM webhook_events WHERE event_id = ?", (event_id,))
        assert seen.fetchone() == (0,)
    finally:
        db.close()
    assert center.seen_events.first_time(event_id)  # not remembered here either
    server.stop.set()
