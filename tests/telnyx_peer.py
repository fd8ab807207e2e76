"""A small local HTTP peer standing in for Telnyx's REST API: it records every request and
answers with scripted responses (default 200 with the real success shapes)."""

from __future__ import annotations

import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from voice_trio.sim._serve import answer_lifespan


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class TelnyxPeer:
    requests: list[Recorded] = field(default_factory=list)
    scripted: deque[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=deque)
    arrived: trio.Event = field(default_factory=trio.Event)

    def fail_next(self, status: int, code: str, title: str, detail: str = "", headers=None) -> None:
        body = {"errors": [{"code": code, "title": title, "detail": detail}]}
        self.scripted.append((status, body, headers or {}))

    def commands(self, action: str) -> list[Recorded]:
        if action == "dial":
            return [r for r in self.requests if r.path == "/v2/calls"]
        return [r for r in self.requests if r.path.endswith(f"/actions/{action}")]

    async def wait_for(self, action: str, count: int = 1, timeout: float = 5.0) -> list[Recorded]:
        with trio.fail_after(timeout):
            while len(self.commands(action)) < count:
                self.arrived = trio.Event()
                await self.arrived.wait()
        return self.commands(action)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(
            Recorded(scope["method"], scope["path"], headers, json.loads(raw) if raw else {})
        )
        self.arrived.set()
        if self.scripted:
            status, body, extra = self.scripted.popleft()
        elif scope["path"] == "/v2/calls":
            status, extra = 200, {}
            body = {
                "data": {
                    "call_control_id": f"v3:{uuid.uuid4().hex}",
                    "call_leg_id": str(uuid.uuid4()),
                    "call_session_id": str(uuid.uuid4()),
                    "is_alive": False,
                    "record_type": "call",
                }
            }
        else:
            status, body, extra = 200, {"data": {"result": "ok"}}, {}
        payload = json.dumps(body).encode()
        out = [(b"content-type", b"application/json")]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})
