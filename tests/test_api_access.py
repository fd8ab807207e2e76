"""Who may call ``/api/*`` (DESIGN.md §6): a bearer token with ``API_TOKEN``; without it,
nobody, unless ``API_LOOPBACK_WITHOUT_TOKEN=true`` opens it to clients on this machine; a
warning at start-up either way. ``test_api_proxy.py`` does the same through a real nginx.

The non-loopback clients are made up: the ASGI app is called directly with a scope whose
``client`` is a documentation address (203.0.113.0/24), so no traffic leaves the machine."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
from conftest import make_settings, start_server
from werkzeug.datastructures import Headers

from voice_trio.forwarded import is_loopback
from voice_trio.web.api import api_refusal
from voice_trio.web.dispatch import build_app

OUTSIDE = ("203.0.113.5", 1234)
LOOPBACK = ("127.0.0.1", 40000)
TOKEN = "s3cret-token-0123456789"
NO_TOKEN = {"API_TOKEN": ""}
LOOPBACK_ONLY = {"API_TOKEN": "", "API_LOOPBACK_WITHOUT_TOKEN": "true"}


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


async def test_without_a_token_the_api_is_closed_even_to_loopback_403() -> None:
    app = build_app(make_settings(**NO_TOKEN))
    for client in (OUTSIDE, LOOPBACK, None):  # None: a Unix socket, a proxy that hides it
        for path in ("/api/sessions/stats", "/api/calls"):
            status, _, body = await asgi_get(app, path, client)
            assert status == 403, (client, path)
            assert body["error"] == "forbidden" and "API_TOKEN is not set" in body["reason"]
            assert "API_LOOPBACK_WITHOUT_TOKEN" in body["reason"]
        # Health stays public, and the rest of the server is not /api.
        assert (await asgi_get(app, "/api/health", client))[0] == 200
        assert (await asgi_get(app, "/health", client))[0] == 200


async def test_the_loopback_opt_in_serves_this_machine_only() -> None:
    app = build_app(make_settings(**LOOPBACK_ONLY))
    status, _, body = await asgi_get(app, "/api/sessions/stats", LOOPBACK)
    assert status == 200 and body["active_sessions"] == 0
    for client in (OUTSIDE, None):
        status, _, body = await asgi_get(app, "/api/sessions/stats", client)
        assert status == 403 and "only clients on this machine" in body["reason"], client


async def test_with_the_opt_in_a_local_proxy_that_names_its_client_is_believed() -> None:
    app = build_app(make_settings(**LOOPBACK_ONLY))
    elsewhere = {
        "X-Forwarded-For": "198.51.100.7",
        "Forwarded": "for=198.51.100.7;proto=https",
        "X-Real-IP": "198.51.100.7",
    }
    for header, value in elsewhere.items():
        status, _, body = await asgi_get(app, "/api/sessions/stats", LOOPBACK, {header: value})
        assert status == 403 and body["error"] == "forbidden", header
    # The proxy serving a client on this machine: still this machine.
    local = await asgi_get(app, "/api/sessions/stats", LOOPBACK, {"X-Forwarded-For": "127.0.0.1"})
    assert local[0] == 200
    # A forged "I am loopback" header from outside grants nothing.
    forged = await asgi_get(app, "/api/sessions/stats", OUTSIDE, {"X-Forwarded-For": "127.0.0.1"})
    assert forged[0] == 403


def test_caddy_default_headers_are_enough_for_the_rule() -> None:
    """Caddy's ``reverse_proxy`` sends X-Forwarded-For (the client it saw, replacing one the
    client sent unless told to trust it), X-Forwarded-Proto and X-Forwarded-Host."""
    settings = make_settings(**LOOPBACK_ONLY)
    caddy = Headers(
        {
            "X-Forwarded-For": "198.51.100.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "agent.example.com",
        }
    )
    refusal = api_refusal(settings, "/api/call/initiate", caddy, "127.0.0.1")
    assert refusal is not None and refusal[0] == 403
    # Caddy dialling over IPv6 loopback is not in the default FORWARDED_ALLOW_IPS: its
    # headers are not believed, and a request someone forwarded is not served.
    refusal = api_refusal(settings, "/api/call/initiate", caddy, "::1")
    assert refusal is not None and refusal[0] == 403
    caddy["X-Forwarded-For"] = "127.0.0.1"  # curl on the proxy's own machine, this one
    assert api_refusal(settings, "/api/call/initiate", caddy, "127.0.0.1") is None


async def test_with_a_token_every_client_needs_it_401() -> None:
    app = build_app(make_settings(API_TOKEN=TOKEN, API_LOOPBACK_WITHOUT_TOKEN="true"))
    for client in (OUTSIDE, LOOPBACK):
        status, headers, body = await asgi_get(app, "/api/sessions/stats", client)
        assert status == 401 and body["error"] == "unauthorized"
        assert headers["www-authenticate"] == "Bearer"
        assert TOKEN not in json.dumps(body)
        for wrong in ("Bearer wrong", f"Basic {TOKEN}", TOKEN, "Bearer"):
            got = await asgi_get(app, "/api/sessions/stats", client, {"Authorization": wrong})
            assert got[0] == 401, wrong
        ok = await asgi_get(
            app, "/api/sessions/stats", client, {"Authorization": f"Bearer {TOKEN}"}
        )
        assert ok[0] == 200
        scheme_any_case = await asgi_get(
            app, "/api/sessions/stats", client, {"Authorization": f"bearer {TOKEN}"}
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
    closed, local = make_settings(**NO_TOKEN), make_settings(**LOOPBACK_ONLY)
    token_settings = make_settings(API_TOKEN=TOKEN)
    none = Headers()
    assert api_refusal(closed, "/webhook/telnyx", none, "203.0.113.5") is None
    assert api_refusal(closed, "/api/health", none, "203.0.113.5") is None
    assert api_refusal(closed, "/api/call/initiate", none, "127.0.0.1")[0] == 403
    assert api_refusal(local, "/api/call/initiate", none, "127.0.0.1") is None
    assert api_refusal(local, "/api/call/initiate", none, "203.0.113.5")[0] == 403
    assert api_refusal(token_settings, "/api/call/initiate", none, "127.0.0.1")[0] == 401
    bearer = Headers({"Authorization": f"Bearer {TOKEN}"})
    assert api_refusal(token_settings, "/api/calls", bearer, None) is None


async def test_a_refused_request_is_logged_with_the_client_a_trusted_proxy_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_trio")
    proxy = ("10.1.2.3", 5555)
    app = build_app(make_settings(**LOOPBACK_ONLY, FORWARDED_ALLOW_IPS="10.0.0.0/8"))
    chain = {"X-Forwarded-For": "192.0.2.44, 10.9.9.9"}  # a client, then another proxy of ours
    assert (await asgi_get(app, "/api/calls", proxy, chain))[0] == 403
    assert "🚫 GET /api/calls refused (403 forbidden): client 192.0.2.44 via 10.1.2.3" in (
        caplog.text
    )
    caplog.clear()
    # From a peer that is not a trusted proxy, the header is not what the log believes.
    assert (await asgi_get(app, "/api/calls", OUTSIDE, chain))[0] == 403
    assert "client 203.0.113.5 (forwarding headers from an untrusted peer not believed)" in (
        caplog.text
    )
    assert "192.0.2.44" not in caplog.text


async def test_start_up_says_how_the_api_is_reachable(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_trio")

    async def warnings_at_start(**settings: str) -> list[str]:
        caplog.clear()
        server = await start_server(nursery, make_settings(**settings))
        server.stop.set()
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    (closed,) = [w for w in await warnings_at_start(**NO_TOKEN) if "API_TOKEN" in w]
    assert "API_TOKEN is not set: /api/* is closed (403)" in closed
    (opened,) = [w for w in await warnings_at_start(**LOOPBACK_ONLY) if "API_TOKEN" in w]
    assert "API_LOOPBACK_WITHOUT_TOKEN=true" in opened and "X-Forwarded-For" in opened
    assert not [w for w in await warnings_at_start(API_TOKEN=TOKEN) if "API_" in w]
