"""The operator console over plain HTTP (no browser): sign-in, the session cookie, CSRF and
Origin checks, the loopback rule without ``API_TOKEN``, security headers, and escaping of
everything a caller or a contact list can put in a page. ``test_console_browser.py``
drives the same pages in Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import LiveServer, make_settings, start_server
from test_api_access import LOOPBACK, LOOPBACK_ONLY, NO_TOKEN, OUTSIDE

from voice_trio.store import CallRecord, TurnEntry
from voice_trio.web.console.access import COOKIE, ConsoleKeys, origin_refusal
from voice_trio.web.dispatch import build_app

TOKEN = "console-token-0123456789"
EVIL = "<script>alert('x')</script>"


async def serve(nursery: trio.Nursery, tmp_path: Path, **env: Any) -> LiveServer:
    settings = {"API_TOKEN": TOKEN, "SQLITE_PATH": str(tmp_path / "calls.sqlite3"), **env}
    server = await start_server(nursery, settings)
    server.client.headers.pop("Authorization", None)  # a browser has no bearer token
    return server


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in as a browser does; the CSRF token of the signed-in session."""
    form = await client.get("/console/login")
    assert form.status_code == 200
    r = await client.post(
        "/console/login", data={"csrf": csrf_of(form.text), "token": TOKEN, "next": "/console/"}
    )
    assert r.status_code == 302 and r.headers["location"] == "/console/"
    page = await client.get("/console/")
    assert page.status_code == 200
    return csrf_of(page.text)


async def test_the_console_wants_a_sign_in_and_keeps_no_token_in_its_cookie(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await serve(nursery, tmp_path)
    client = server.client
    r = await client.get("/console/calls")
    assert r.status_code == 302 and r.headers["location"].startswith("/console/login?next=")
    cookie = r.headers["set-cookie"]  # a session to bind the sign-in form's CSRF token
    form = await client.get("/console/login")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    wrong = await client.post(
        "/console/login", data={"csrf": csrf_of(form.text), "token": "guess", "next": "/"}
    )
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    csrf = await sign_in(client)
    value = client.cookies[COOKIE]
    assert TOKEN not in value and csrf not in value
    page = await client.get("/console/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # A cookie whose MAC does not match is no session.
    client.cookies.clear()
    client.cookies.set(COOKIE, value[:-4] + "0000")
    assert (await client.get("/console/")).status_code == 302
    # The API does not take the console's cookie: its routes want the bearer token still.
    assert (await client.get("/api/calls")).status_code == 401
    server.stop.set()


async def test_a_post_without_its_csrf_token_or_from_another_site_is_refused_403(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await serve(nursery, tmp_path)
    client = server.client
    csrf = await sign_in(client)
    call = {"telefono": "+573001234567", "nombre": "Ana"}
    missing = await client.post("/console/call", data=call)
    assert missing.status_code == 403 and "CSRF token is missing or wrong" in missing.text
    forged = await client.post("/console/call", data={**call, "csrf": "0" * 64})
    assert forged.status_code == 403
    other_site = await client.post(
        "/console/call", data={**call, "csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert other_site.status_code == 403 and "another site" in other_site.text
    hangup = await client.post("/console/calls/v3:nope/hangup", data={})
    assert hangup.status_code == 403
    # The same forms with the token go through: an unknown call is the API's 404, told back.
    ok = await client.post("/console/calls/v3:nope/hangup", data={"csrf": csrf})
    assert ok.status_code == 302 and "hangup+refused+%28404%29" in ok.headers["location"]
    server.stop.set()


async def test_placing_a_call_uses_the_api_s_validation(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await serve(nursery, tmp_path)
    csrf = await sign_in(server.client)
    r = await server.client.post(
        "/console/call", data={"csrf": csrf, "telefono": "3001234567", "nombre": EVIL}
    )
    assert r.status_code == 422
    assert "telefono: must be an E.164 phone number" in r.text
    assert EVIL not in r.text and "&lt;script&gt;" in r.text  # the form comes back, escaped
    server.stop.set()


async def test_what_callers_and_contact_lists_say_is_escaped(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await serve(nursery, tmp_path)
    client = server.client
    await sign_in(client)
    center = server.app.center
    center.registry.feed.publish(
        {"k": "start", "c": "v3:evil", "nombre": EVIL, "number": "+573001234567", "mode": "media"}
    )
    center.registry.feed.publish({"k": "caller", "c": "v3:evil", "text": EVIL})
    live = (await client.get("/console/")).text
    assert EVIL not in live and live.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") == 2
    record = CallRecord(
        "v3:evil",
        direction="outbound",
        from_number="+5716000000",
        to_number="+573001234567",
        nombre=EVIL,
        contexto=EVIL,
    )
    record.status, record.end_reason = "ended", "caller_hangup"
    turn = TurnEntry(0, user_text=EVIL, bot_text=EVIL, heard_text="<scr", interrupted=True)
    turn.t0, turn.t1, turn.t2, turn.t3, turn.t4, turn.t5 = 1000, 1010, 1300, 1320, 1400, 1410
    assert center.store is not None
    await center.store.save_call(record, [turn])
    for path in ("/console/calls", "/console/calls/v3:evil"):
        page = await client.get(path)
        assert page.status_code == 200 and EVIL not in page.text and "<scr" not in page.text
    page = (await client.get("/console/calls/v3:evil")).text
    assert page.count('class="stage"') == 5 and "410 ms" in page  # the waterfall: t0..t5
    history = await client.get("/console/calls", params={"end_reason": "caller_hangup"})
    assert "v3:evil" in history.text
    none = await client.get("/console/calls", params={"end_reason": "transferred"})
    assert "v3:evil" not in none.text
    server.stop.set()


async def test_the_event_stream_starts_with_a_snapshot(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await serve(nursery, tmp_path)
    await sign_in(server.client)
    feed = server.app.center.registry.feed
    feed.publish({"k": "start", "c": "v3:a", "nombre": "Ana", "mode": "media"})
    async with server.client.stream("GET", "/console/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        assert await anext(lines) == "event: snapshot"
        assert '"nombre":"Ana"' in await anext(lines)
        feed.publish({"k": "caller", "c": "v3:a", "text": "hola\nsegunda línea"})
        assert await anext(lines) == ""
        assert await anext(lines) == "event: call"
        data = await anext(lines)
        assert data.startswith("data: ") and "hola\\nsegunda" in data
    server.stop.set()


async def console_get(
    app: Any, client: tuple[str, int], headers: dict[str, str] | None = None
) -> int:
    """A GET of /console/ straight into the ASGI app from ``client``: its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/console/",
        "raw_path": b"/console/",
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
    return next(m for m in sent if m["type"] == "http.response.start")["status"]


async def test_without_a_token_the_console_follows_the_api_s_loopback_rule() -> None:
    closed = build_app(make_settings(**NO_TOKEN))
    assert await console_get(closed, LOOPBACK) == 403
    local = build_app(make_settings(**LOOPBACK_ONLY))
    assert await console_get(local, LOOPBACK) == 200
    assert await console_get(local, OUTSIDE) == 403
    # A proxy on this machine that names a client elsewhere: that client is refused.
    assert await console_get(local, LOOPBACK, {"X-Forwarded-For": "198.51.100.7"}) == 403


def test_session_values_and_csrf_tokens_are_bound_to_the_key() -> None:
    keys, others = ConsoleKeys(b"one secret"), ConsoleKeys(b"another secret")
    session, cookie = keys.new_session(signed_in=True, now=1000)
    assert keys.read(cookie, now=1001) == session
    assert others.read(cookie, now=1001) is None
    assert keys.read(cookie, now=1000 + 13 * 3600) is None  # too old
    assert keys.csrf_ok(session, keys.csrf(session))
    assert not others.csrf_ok(session, keys.csrf(session))
    assert not keys.csrf_ok(session, None)
    assert origin_refusal(None, "a.example") is None
    assert origin_refusal("https://a.example", "a.example") is None
    assert origin_refusal("https://b.example", "a.example") is not None
    assert origin_refusal("null", "a.example") is not None


@pytest.mark.parametrize("path", ["/console/static/console.js", "/console/static/console.css"])
async def test_static_files_are_served_without_a_session(
    nursery: trio.Nursery, tmp_path: Path, path: str
) -> None:
    server = await serve(nursery, tmp_path)
    r = await server.client.get(path)
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    server.stop.set()
