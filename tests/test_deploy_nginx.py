"""The nginx site of docs/deploy.md, run by a real nginx in front of the server.

The site is read out of the guide (``deploy_guide``) with only its ports, certificate
paths and upstream addresses changed, and served over TLS with a certificate made here.
Through it: ``/health``, a signed webhook, the API with its bearer token, ``/metrics``
open to this machine only, the WebSocket upgrade on ``wss://…/stream/media``, a whole
simulated call whose webhooks and media stream both come through nginx (the simulated
Telnyx trusts the test's certificate), and the same call with the guide's several-hosts
upstream in front of two instances sharing one store and one ``SERVER_SECRET``.

A client "elsewhere" connects from 127.0.0.2 (still this machine's loopback): nginx sees
that address and must name it in ``X-Forwarded-For``, which is what the server logs.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from conftest import LiveServer, Signer, start_lab_server, start_server, webhook_body
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deploy_guide import nginx_site_here
from processes import free_port
from prometheus_client import generate_latest
from real_nginx import needs_nginx, running_nginx

from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER, Lab

pytestmark = [pytest.mark.e2e, needs_nginx]

PATIENT = "+573001234567"
ELSEWHERE = "127.0.0.2"


@dataclass
class Certificate:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_certificate(directory: Path) -> Certificate:
    """A self-signed certificate for agent.example.com and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("agent.example.com"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(directory / "fullchain.pem", directory / "privkey.pem")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass
class Site:
    """The guide's site running here: its public https base, its http port, its logs."""

    base: str
    http_port: int
    https_port: int
    tls: Certificate
    prefix: Path | None = None

    @property
    def ws_base(self) -> str:
        return "wss" + self.base[len("https") :]

    def client(self, *, source: str = "127.0.0.1", **kw: object) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(verify=self.tls.client_context(), local_address=source)
        return httpx.AsyncClient(
            base_url=self.base, transport=transport, trust_env=False, timeout=10, **kw
        )

    def access_log(self) -> str:
        assert self.prefix is not None
        return (self.prefix / "access.log").read_text()


def plan_site(tmp_path: Path) -> Site:
    """Ports and certificate first: the server must know its public URL before it starts."""
    https_port = free_port()
    return Site(
        f"https://127.0.0.1:{https_port}", free_port(), https_port, make_certificate(tmp_path)
    )


@asynccontextmanager
async def serving(tmp_path: Path, site: Site, *servers: LiveServer) -> AsyncIterator[Site]:
    upstreams = [int(s.base.rsplit(":", 1)[1]) for s in servers]
    config = nginx_site_here(
        upstreams=upstreams,
        http_port=site.http_port,
        https_port=site.https_port,
        cert=site.tls.cert,
        key=site.tls.key,
    )
    async with running_nginx(tmp_path, config, [site.http_port, site.https_port]) as prefix:
        site.prefix = prefix
        yield site


def counter(metrics: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{inner}}} " if labels else f"{name} "
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


def metrics_of(server: LiveServer) -> str:
    return generate_latest(server.app.center.metrics.registry).decode()


def accepted_webhooks(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("voice_webhooks_total{") and 'outcome="accepted"' in line
    )


async def close_code(ws: trio_websocket.WebSocketConnection) -> int | None:
    try:
        with trio.fail_after(10):
            await ws.get_message()
    except trio_websocket.ConnectionClosed as closed:
        return closed.reason.code if closed.reason else None
    raise AssertionError("the server sent something to a stream it should refuse")


async def test_the_guides_site_serves_webhooks_the_api_and_the_media_socket_over_tls(
    nursery: trio.Nursery, tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    site = plan_site(tmp_path)
    server = await start_server(
        nursery,
        {
            "WEBHOOK_BASE_URL": site.base,
            "TELNYX_PUBLIC_KEY": signer.public_b64,
            "ALLOW_UNSIGNED_WEBHOOKS": "false",
        },
    )
    token = server.app.center.settings.api_token
    async with (
        serving(tmp_path, site, server),
        site.client() as proxy,
        site.client(source=ELSEWHERE) as elsewhere,
    ):
        health = await proxy.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.http_version == "HTTP/1.1"
        async with httpx.AsyncClient(trust_env=False) as plain:
            moved = await plain.get(f"http://127.0.0.1:{site.http_port}/health")
        assert moved.status_code == 301 and moved.headers["location"].startswith("https://")

        # A signed webhook reaches the server with its body and signature intact ...
        body = webhook_body("call.hangup", "v3:not-here", hangup_cause="normal_clearing")
        r = await proxy.post("/webhook/telnyx", content=body, headers=signer.headers(body))
        assert r.status_code == 200 and r.json()["status"] == "received"
        # ... and one altered on the way is refused by the server, not by nginx.
        forged = body.replace(b"normal_clearing", b"call_rejected")
        r = await proxy.post("/webhook/telnyx", content=forged, headers=signer.headers(body))
        assert r.status_code == 401 and r.json()["error"] == "invalid_signature"

        auth = {"Authorization": f"Bearer {token}"}
        r = await elsewhere.get("/api/sessions/stats", headers=auth)
        assert r.status_code == 200 and r.json()["active_sessions"] == 0
        r = await elsewhere.get("/api/sessions/stats")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        # The address nginx saw, forwarded in X-Forwarded-For and believed from 127.0.0.1.
        assert f"refused (401 unauthorized): client {ELSEWHERE} via 127.0.0.1" in caplog.text

        metrics = await proxy.get("/metrics")
        assert metrics.status_code == 200
        assert counter(metrics.text, "voice_webhooks_total", event_type="call.hangup",
                       outcome="accepted") == 1  # fmt: skip
        assert (await elsewhere.get("/metrics")).status_code == 403  # not the monitoring net

        # The upgrade reaches the media handler: 101, then a stream that cannot prove its
        # call is closed 1008 by the server.
        async with trio_websocket.open_websocket_url(
            f"{site.ws_base}/stream/media", ssl_context=site.tls.client_context()
        ) as ws:
            await ws.send_message(json.dumps({"event": "connected", "version": "1.0.0"}))
            start = {
                "event": "start",
                "sequence_number": "1",
                "stream_id": "s-1",
                "start": {
                    "call_control_id": "v3:not-a-call",
                    "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                },
            }
            await ws.send_message(json.dumps(start))
            assert await close_code(ws) == 1008
        assert counter(metrics_of(server), "voice_stream_rejected_total", reason="bad_token") == 1
    log = site.access_log()
    assert '"GET /stream/media HTTP/1.1" 101' in log
    server.stop.set()


@asynccontextmanager
async def trusting_the_site(lab: Lab, site: Site, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The simulated Telnyx trusts the site's certificate, as the real one trusts a public
    CA's: its webhook client verifies against it, and so does the carrier's ``wss://``
    connection (trio-websocket builds the default context, which reads SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(site.tls.cert))
    original = lab.telnyx.webhooks.client
    async with httpx.AsyncClient(verify=site.tls.client_context(), trust_env=False) as client:
        lab.telnyx.webhooks.client = client
        try:
            yield
        finally:
            lab.telnyx.webhooks.client = original


def patient() -> ScriptedCaller:
    return ScriptedCaller(
        [WaitForBot(300), Say("Quiero una cita para el lunes.", 100), WaitForBot(300), HangUp()],
        ms_per_char=25,
        turn_gap_ms=300,
        timeout_s=30,
    )


async def test_a_whole_call_through_the_guides_site(
    nursery: trio.Nursery,
    lab: Lab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voice_trio")
    site = plan_site(tmp_path)
    server = await start_lab_server(nursery, lab, WEBHOOK_BASE_URL=site.base)
    async with serving(tmp_path, site, server), trusting_the_site(lab, site, monkeypatch):
        party = patient()
        call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
        results = await party.run()
        with trio.fail_after(10):
            await server.app.center.registry.wait_until_empty()
    assert not results.errors and not results.timed_out
    # Carried by the media stream (no fallback to Telnyx speak): STT heard the caller.
    assert lab.deepgram.stt_connections_opened == 1
    assert not [r for r in lab.telnyx.requests if r.path.endswith("/speak")]
    assert "Le habla Sofía" in results.bot_turns[0].text
    assert 'usted dijo: "Quiero una cita para el lunes."' in results.bot_turns[1].text
    assert call.streams[0].params.url.startswith(f"{site.ws_base}/stream/media")
    assert any("token by header" in m for m in caplog.messages)  # the header crossed nginx
    log = site.access_log()
    assert '"GET /stream/media HTTP/1.1" 101' in log
    assert '"POST /webhook/telnyx HTTP/1.1" 200' in log
    server.stop.set()


async def test_several_hosts_behind_the_guides_upstream_need_no_sticky_sessions(
    nursery: trio.Nursery, lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances sharing a store and a secret behind the several-hosts upstream: the
    call's webhooks are spread over both, its stream lands on one, and it goes through."""
    site = plan_site(tmp_path)
    shared = {
        "WEBHOOK_BASE_URL": site.base,
        "SERVER_SECRET": "one-secret-for-every-instance-0123456789",
        "SQLITE_PATH": str(tmp_path / "calls.sqlite3"),
    }
    servers = [await start_lab_server(nursery, lab, **shared) for _ in range(2)]
    async with serving(tmp_path, site, *servers), trusting_the_site(lab, site, monkeypatch):
        party = patient()
        lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
        results = await party.run()
        with trio.fail_after(10):
            for server in servers:
                await server.app.center.registry.wait_until_empty()
    assert not results.errors and not results.timed_out
    assert 'usted dijo: "Quiero una cita para el lunes."' in results.bot_turns[1].text
    webhooks = [accepted_webhooks(metrics_of(s)) for s in servers]
    assert all(n > 0 for n in webhooks), webhooks  # both instances had some of the call's
    calls = [s.app.center.registry.total_calls for s in servers]
    assert sorted(calls) == [0, 1], calls  # its stream ran on one, once
    for server in servers:
        server.stop.set()
