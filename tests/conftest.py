from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from telnyx_peer import TelnyxPeer

from voice_trio.calls import stream_token
from voice_trio.config import Settings
from voice_trio.server import reserve_listener
from voice_trio.server import serve as serve_voice
from voice_trio.sim._serve import serve_asgi
from voice_trio.sim.lab import Lab, open_lab
from voice_trio.web.dispatch import VoiceApp, build_app


class Signer:
    """Signs webhooks the way Telnyx does (Ed25519 over ``timestamp|body``)."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_b64 = base64.b64encode(raw).decode()

    def headers(self, body: bytes, ts: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if ts is None else ts)
        sig = self.key.sign(stamp.encode() + b"|" + body)
        return {
            "telnyx-signature-ed25519": base64.b64encode(sig).decode(),
            "telnyx-timestamp": stamp,
            "content-type": "application/json",
        }


def webhook_body(event_type: str, ccid: str, **payload: Any) -> bytes:
    data = {
        "record_type": "event",
        "event_type": event_type,
        "id": str(uuid.uuid4()),
        "occurred_at": "2026-11-25T10:00:00.000Z",
        "payload": {
            "call_control_id": ccid,
            "call_leg_id": str(uuid.uuid4()),
            "call_session_id": str(uuid.uuid4()),
            "connection_id": "1684641123236054244",
            "client_state": None,
            **payload,
        },
    }
    return json.dumps({"data": data, "meta": {"attempt": 1}}).encode()


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
async def telnyx_peer(nursery: trio.Nursery) -> AsyncIterator[tuple[TelnyxPeer, str]]:
    peer = TelnyxPeer()
    base = await nursery.start(partial(serve_asgi, peer))
    yield peer, base


API_TOKEN = "test-api-token-0123456789"


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: every provider on loopback, and an ``API_TOKEN``, which
    ``start_server``'s client sends (``API_TOKEN=""`` for a server without one)."""
    env = {
        "API_TOKEN": API_TOKEN,
        "TELNYX_API_KEY": "KEY_telnyx_secret_123",
        "TELNYX_CONNECTION_ID": "1684641123236054244",
        "TELNYX_PHONE_NUMBER": "+5716000000",
        "WEBHOOK_BASE_URL": "https://agent.example.com",
        "ANTHROPIC_API_KEY": "sk-ant-test-secret",
        "DEEPGRAM_API_KEY": "dg-test-secret",
        "HOST": "127.0.0.1",
        "PORT": "0",
        # Every provider on loopback: tests never send traffic anywhere else.
        "TELNYX_API_BASE": "http://127.0.0.1:9/v2",
        "DEEPGRAM_API_BASE": "http://127.0.0.1:9",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
        "SQLITE_PATH": ":memory:",
        "DRAIN_TIMEOUT": "0",
        # Tests that sign their webhooks set TELNYX_PUBLIC_KEY; the others post them bare.
        "ALLOW_UNSIGNED_WEBHOOKS": "true",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(env, env_file=None)


@dataclass
class LiveServer:
    app: VoiceApp
    base: str
    client: httpx.AsyncClient
    stop: trio.Event

    @property
    def ws_base(self) -> str:
        return "ws" + self.base[len("http") :]

    def media_url(self, call_control_id: str) -> str:
        """The stream URL with this call's stream token in its query string: the fallback
        channel (``media_headers`` gives the documented one)."""
        token = stream_token.issue(self.app.center.stream_secret, call_control_id)
        return f"{self.ws_base}/stream/media?token={token}"

    def media_headers(self, call_control_id: str) -> list[tuple[bytes, bytes]]:
        """The upgrade header Telnyx sends with this call's stream token."""
        token = stream_token.issue(self.app.center.stream_secret, call_control_id)
        return [(b"x-telnyx-streaming-auth-token", token.encode())]


async def start_server(
    nursery: trio.Nursery, settings: Settings | dict[str, Any], listener: Any = None
) -> LiveServer:
    """Serve the app on an ephemeral loopback port (or on ``listener``, reserved beforehand
    with ``reserve_listener``). Given a dict of overrides, the settings are made here so that
    WEBHOOK_BASE_URL can name the server's own port."""
    listener = listener or reserve_listener("127.0.0.1")
    port = listener.getsockname()[1]
    if isinstance(settings, dict):
        overrides = {"WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}", **settings}
        settings = make_settings(**overrides)
    app = build_app(settings)
    stop = trio.Event()

    async def trigger() -> None:
        await stop.wait()

    base = await nursery.start(
        partial(serve_voice, settings, app=app, listener=listener, shutdown_trigger=trigger)
    )
    auth = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    client = httpx.AsyncClient(base_url=base, timeout=10, headers=auth)
    return LiveServer(app, base, client, stop)


FAST_SPEECH_MS = 25  # ms per character of simulated speech in end-to-end tests


@pytest.fixture
async def lab(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Lab:
    """Every simulator, with short but realistic-shaped provider delays. Idle keep-alive
    connections close quickly, so leak checks see the pools settle within a second."""
    monkeypatch.setattr("voice_trio.sim._serve.KEEP_ALIVE_SECONDS", 0.5)
    return await open_lab(nursery, ms_per_char=FAST_SPEECH_MS, llm_ttft=0.05, tts_ttfb_ms=20)


async def start_lab_server(
    nursery: trio.Nursery, lab: Lab, listener: Any = None, **overrides: Any
) -> LiveServer:
    server = await start_server(nursery, {**lab.server_env(), **overrides}, listener)
    lab.telnyx.default_webhook_url = server.app.center.settings.webhook_url
    return server


def task_names() -> list[str]:
    """Names of every live Trio task in this run (the whole task tree)."""

    def walk(task: trio.lowlevel.Task) -> list[str]:
        return [task.name] + [
            x for n in task.child_nurseries for t in n.child_tasks for x in walk(t)
        ]

    return sorted(walk(trio.lowlevel.current_root_task()))


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the simulator lab runs calls in real time: it is ``e2e`` (left out
    of ``make check``). Tests that run processes are marked in their own files."""
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
