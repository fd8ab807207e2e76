"""``/api`` behind a real nginx on this machine (Debian's package: ``apt-get install nginx``).

nginx's bare ``proxy_pass`` sends the request on from 127.0.0.1 with HTTP/1.0, ``Host`` of
the upstream and no header naming the client: to the server it is ``curl`` on this machine.
So without ``API_TOKEN`` the API must be closed to loopback too, and the loopback opt-in
(``API_LOOPBACK_WITHOUT_TOKEN``) holds only when the proxy names its client
(``proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for``).

Every connection stays on 127.0.0.1. A client "elsewhere" is played by a request that
carries ``X-Forwarded-For: 203.0.113.5`` into nginx: nginx appends the peer it saw
(127.0.0.1, a trusted proxy address by default), exactly what a client at 203.0.113.5
behind one more proxy of ours would look like.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from conftest import make_settings, start_server
from processes import free_port
from real_nginx import needs_nginx, running_nginx

pytestmark = needs_nginx

TOKEN = "proxy-test-token-0123456789"
ELSEWHERE = {"X-Forwarded-For": "203.0.113.5"}
CLOSED = {"API_TOKEN": ""}
LOOPBACK_ONLY = {"API_TOKEN": "", "API_LOOPBACK_WITHOUT_TOKEN": "true"}
ADD_X_FORWARDED_FOR = "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"

SITE = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            {directives}
        }}
    }}
"""


@asynccontextmanager
async def nginx_in_front(
    tmp_path: Path, upstream: str, directives: str = ""
) -> AsyncIterator[httpx.AsyncClient]:
    """nginx on an ephemeral loopback port proxying to ``upstream``; a client of it."""
    port = free_port()
    upstream_port = upstream.rsplit(":", 1)[1]
    site = SITE.format(port=port, upstream=upstream_port, directives=directives)
    async with (
        running_nginx(tmp_path, site, [port]),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10
        ) as client,
    ):
        yield client


async def test_behind_a_bare_proxy_pass_the_api_without_a_token_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery, make_settings(**CLOSED))
    async with nginx_in_front(tmp_path, server.base) as proxy:
        health = await proxy.get("/api/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"  # nginx works
        r = await proxy.get("/api/sessions/stats")
        assert r.status_code == 403 and "API_TOKEN is not set" in r.json()["reason"]
        r = await proxy.post("/api/call/initiate", json={"telefono": "+573001234567"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    server.stop.set()


async def test_behind_nginx_the_token_opens_the_api(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery, make_settings(API_TOKEN=TOKEN))
    async with nginx_in_front(tmp_path, server.base) as proxy:
        r = await proxy.get("/api/sessions/stats")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await proxy.get("/api/sessions/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["active_sessions"] == 0
    server.stop.set()


async def test_the_loopback_opt_in_holds_only_when_nginx_names_the_client(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_trio")
    server = await start_server(nursery, make_settings(**LOOPBACK_ONLY))
    async with nginx_in_front(tmp_path, server.base, ADD_X_FORWARDED_FOR) as proxy:
        r = await proxy.get("/api/sessions/stats", headers=ELSEWHERE)
        assert r.status_code == 403 and "only clients on this machine" in r.json()["reason"]
        assert "refused (403 forbidden): client 203.0.113.5 via 127.0.0.1" in caplog.text
        # A client on this machine through the same proxy is on this machine.
        assert (await proxy.get("/api/sessions/stats")).status_code == 200
    # The limit, and why the opt-in is not the default: a bare proxy_pass adds nothing and
    # passes on what the client sent; a client elsewhere that sends nothing is served, as
    # indistinguishable from curl on this machine as this request is.
    async with nginx_in_front(tmp_path, server.base) as bare:
        assert (await bare.get("/api/sessions/stats")).status_code == 200
    server.stop.set()
