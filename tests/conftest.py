from __future__ import annotations

import base64
import json
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
from hypercorn.config import Config
from hypercorn.trio import serve
from telnyx_peer import TelnyxPeer

from voice_trio.asgi import VoiceApp, build_app
from voice_trio.config import Settings
from voice_trio.sim._serve import serve_asgi


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


def make_settings(**overrides: Any) -> Settings:
    env = {
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


async def start_server(nursery: trio.Nursery, settings: Settings) -> LiveServer:
    app = build_app(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1
    stop = trio.Event()

    async def trigger() -> None:
        await stop.wait()
        await app.center.shut_down(2.0)

    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=trigger))
    client = httpx.AsyncClient(base_url=binds[0], timeout=10)
    return LiveServer(app, binds[0], client, stop)
