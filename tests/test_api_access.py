"""Who may call ``/api/*`` (DESIGN.md §6): a bearer token with ``API_TOKEN``; without it,
loopback clients only, and a warning at start-up.

The non-loopback clients are made up: the ASGI app is called directly with a scope whose
``client`` is a documentation address (203.0.113.0/24), so no traffic leaves the machine."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
from conftest import make_settings, start_server

from voice_trio.web.api import api_refusal, is_loopback
from voice_trio.web.dispatch import build_app

OUTSIDE = ("203.0.113.5", 1234)
LOOPBACK = ("127.0.0.1", 40000)


async def asgi_get(
    app: Any, path: str, client: tuple[str, int] | None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One HTTP GET straight into the ASGI app: (status, headers, JSON body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"agent.example.com")]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": client,
        "server": ("127.0.0.1", 3000),
        "extensions": {},
    }
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(5):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, json.loads(body)


async def test_without_a_token_a_client_from_elsewhere_is_refused_403() -> None:
    app = build_app(make_settings())
    for path in ("/api/sessions/stats", "/api/calls"):
        status, _, body = await asgi_get(app, path, OUTSIDE)
        assert status == 403, path
        assert body["error"] == "forbidden" and "API_TOKEN" in body["reason"]
    status, _, body = await asgi_get(app, "/api/sessions/stats", LOOPBACK)
    assert status == 200 and body["active_sessions"] == 0
    # Health stays public, and the rest of the server is not /api.
    assert (await asgi_get(app, "/api/health", OUTSIDE))[0] == 200
    assert (await asgi_get(app, "/health", OUTSIDE))[0] == 200
    # No address at all (a Unix socket, a proxy that hides it) is not loopback either.
    assert (await asgi_get(app, "/api/sessions/stats", None))[0] == 403


async def test_a_request_forwarded_by_a_local_proxy_is_not_a_loopback_client() -> None:
    app = build_app(make_settings())
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        status, _, body = await asgi_get(
            app, "/api/sessions/stats", LOOPBACK, {header: "198.51.100.7"}
        )
        assert status == 403 and body["error"] == "forbidden", header
    # A forged "I am loopback" header from outside grants nothing.
    status, _, _ = await asgi_get(
        app, "/api/sessions/stats", OUTSIDE, {"X-Forwarded-For": "127.0.0.1"}
    )
    assert status == 403


async def test_with_a_token_every_client_needs_it_401() -> None:
    app = build_app(make_settings(API_TOKEN="s3cret-token"))
    for client in (OUTSIDE, LOOPBACK):
        status, headers, body = await asgi_get(app, "/api/sessions/stats", client)
        assert status == 401 and body["error"] == "unauthorized"
        assert headers["www-authenticate"] == "Bearer"
        assert "s3cret-token" not in json.dumps(body)
        for wrong in ("Bearer wrong", "Basic s3cret-token", "s3cret-token", "Bearer"):
            got = await asgi_get(app, "/api/sessions/stats", client, {"Authorization": wrong})
            assert got[0] == 401, wrong
        ok = await asgi_get(
            app, "/api/sessions/stats", client, {"Authorization": "Bearer s3cret-token"}
        )
        assert ok[0] == 200
        scheme_any_case = await asgi_get(
            app, "/api/sessions/stats", client, {"Authorization": "bearer s3cret-token"}
        )
        assert scheme_any_case[0] == 200


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1%eth0", False),
        ("203.0.113.5", False),
        ("::ffff:203.0.113.5", False),
        ("10.0.0.1", False),
        ("localhost", False),  # a name is not an address
        ("", False),
        (None, False),
    ],
)
def test_what_counts_as_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_the_policy_is_a_plain_function() -> None:
    open_settings, token_settings = make_settings(), make_settings(API_TOKEN="t")
    assert api_refusal(open_settings, "/webhook/telnyx", {}, "203.0.113.5") is None
    assert api_refusal(open_settings, "/api/health", {}, "203.0.113.5") is None
    assert api_refusal(open_settings, "/api/call/initiate", {}, "203.0.113.5")[0] == 403
    assert api_refusal(token_settings, "/api/call/initiate", {}, "127.0.0.1")[0] == 401
    assert api_refusal(token_settings, "/api/calls", {"Authorization": "Bearer t"}, None) is None


async def test_start_up_warns_when_the_api_is_open(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_trio")
    server = await start_server(nursery, make_settings())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("API_TOKEN is not set" in w for w in warnings)
    server.stop.set()
    caplog.clear()
    server = await start_server(nursery, make_settings(API_TOKEN="t"))
    assert not any("API_TOKEN" in r.getMessage() for r in caplog.records)
    server.stop.set()
