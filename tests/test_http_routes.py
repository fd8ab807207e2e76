import pytest
import trio
from conftest import make_settings, start_server
from test_store import ended, record

from voice_trio import __version__
from voice_trio.store import SqliteStore, StoreError


async def test_index_health_stats_and_metrics(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, make_settings())
    c = server.client
    index = (await c.get("/")).json()
    assert index["service"] == "voice-trio" and "WS /stream/media" in index["endpoints"]
    for path in ("/health", "/api/health"):
        r = await c.get(path)
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["version"] == __version__
        assert body["active_calls"] == 0 and body["mode"] == "media"
        assert body["uptime_seconds"] >= 0
        # Which process answered: one of several workers would say which.
        assert body["worker"] == "w1" and body["workers"] == 1
        assert body["instance_id"] == server.app.center.instance_id
    stats = (await c.get("/api/sessions/stats")).json()
    assert stats == {
        "active_sessions": 0,
        "total_calls": 0,
        "source": "store",
        "this_process": {"active_sessions": 0, "total_calls": 0},
        "uptime_seconds": stats["uptime_seconds"],
    }
    metrics = await c.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "voice_active_calls 0.0" in metrics.text
    assert "voice_event_loop_lag_seconds_bucket" in metrics.text
    server.stop.set()


async def test_stats_count_every_worker_and_instance_from_the_store(
    nursery: trio.Nursery, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls carried by other processes sharing the store (workers of this host, other
    hosts) are counted; when the store cannot answer, the numbers are this process's and
    the body says so."""
    path = tmp_path / "calls.sqlite3"
    server = await start_server(nursery, make_settings(SQLITE_PATH=str(path)))
    elsewhere = SqliteStore(path)  # another worker's view of the same store
    await elsewhere.open()
    try:
        await elsewhere.start_call(record("v3:live-on-w2"))
        await elsewhere.save_call(ended(record("v3:done-on-w2")), [])
    finally:
        await elsewhere.aclose()
    stats = (await server.client.get("/api/sessions/stats")).json()
    assert (stats["active_sessions"], stats["total_calls"], stats["source"]) == (1, 2, "store")
    assert stats["this_process"] == {"active_sessions": 0, "total_calls": 0}

    async def unavailable() -> None:
        raise StoreError("sqlite store calls.sqlite3: database is locked")

    monkeypatch.setattr(server.app.center.store, "count_calls", unavailable)
    stats = (await server.client.get("/api/sessions/stats")).json()
    assert (stats["active_sessions"], stats["total_calls"], stats["source"]) == (0, 0, "process")
    server.stop.set()


async def test_errors_are_json(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, make_settings())
    c = server.client
    r = await c.get("/nope")
    assert r.status_code == 404 and r.json()["reason"] == "no such route"
    r = await c.get("/api/call/initiate")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = await c.post("/api/call/initiate", content=b"x" * 300_000)
    assert r.status_code == 413 and r.json()["reason"] == "request body too large"
    server.stop.set()


async def test_api_token_is_required_when_set(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, make_settings(API_TOKEN="s3cret-token-0123456789"))
    c = server.client
    r = await c.get("/api/sessions/stats", headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert "s3cret-token" not in r.text
    r = await c.get("/api/sessions/stats", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await c.get(
        "/api/sessions/stats", headers={"Authorization": "Bearer s3cret-token-0123456789"}
    )
    assert r.status_code == 200
    health = await c.get("/api/health", headers={"Authorization": ""})
    assert health.status_code == 200  # health stays public
    server.stop.set()


async def test_without_a_token_the_api_is_closed_and_only_the_opt_in_opens_loopback(
    nursery: trio.Nursery,
) -> None:
    closed = await start_server(nursery, make_settings(API_TOKEN=""))
    r = await closed.client.get("/api/sessions/stats")
    assert r.status_code == 403 and "API_TOKEN is not set" in r.json()["reason"]
    closed.stop.set()
    local = await start_server(
        nursery, make_settings(API_TOKEN="", API_LOOPBACK_WITHOUT_TOKEN="true")
    )
    assert (await local.client.get("/api/sessions/stats")).status_code == 200
    local.stop.set()
