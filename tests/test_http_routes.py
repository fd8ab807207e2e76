import trio
from conftest import make_settings, start_server

from voice_trio import __version__


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
    stats = (await c.get("/api/sessions/stats")).json()
    assert set(stats) == {"active_sessions", "total_calls", "uptime_seconds"}
    metrics = await c.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "voice_active_calls 0.0" in metrics.text
    assert "voice_event_loop_lag_seconds_bucket" in metrics.text
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
