"""The request to an operator's tool, as its backend sees it: signed over the exact bytes,
bounded by the tool's timeout, retried only where allowed, and always an answer for Claude."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import trio

from voice_trio.providers.tool_http import ToolClient, sign
from voice_trio.sim._serve import answer_lifespan, serve_asgi
from voice_trio.tools_file import HttpToolSpec

SECRET = "a-tools-secret-of-32-characters!"


class Backend:
    """A tool endpoint whose answers the test scripts: (status, body bytes, delay) per path."""

    def __init__(self) -> None:
        self.answers: dict[str, list[tuple[int, bytes, float]]] = {}
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["path"], headers, body))
        queue = self.answers.get(scope["path"]) or [(200, b'{"ok": true}', 0.0)]
        status, answer, delay = queue.pop(0) if len(queue) > 1 else queue[0]
        await trio.sleep(delay)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": answer})


def tool(base: str, path: str, **changes: Any) -> HttpToolSpec:
    fields: dict[str, Any] = {
        "name": path.strip("/"),
        "description": "d",
        "input_schema": {"type": "object"},
        "endpoint": base + path,
        "timeout": 1.0,
        **changes,
    }
    return HttpToolSpec(**fields)


async def test_the_request_is_signed_over_the_bytes_sent(nursery: trio.Nursery) -> None:
    backend = Backend()
    base = await nursery.start(serve_asgi, backend)
    body = {"call_control_id": "v3:c", "tool": "slots", "input": {"día": "lunes"}, "caller": {}}
    async with httpx.AsyncClient() as http:
        outcome = await ToolClient(http, SECRET, 4000).call(tool(base, "/slots"), body, "toolu_1")
    assert outcome.status == "ok" and outcome.content == '{"ok":true}' and not outcome.is_error
    path, headers, raw = backend.seen[0]
    assert path == "/slots" and json.loads(raw) == body
    assert headers["content-type"] == "application/json"
    assert headers["x-voice-trio-tool-call"] == "toolu_1"
    timestamp = headers["x-voice-trio-timestamp"]
    assert abs(int(timestamp) - time.time()) < 5
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
    assert headers["x-voice-trio-signature"] == "v1=" + expected.hexdigest()
    assert sign(SECRET, int(timestamp), raw) == headers["x-voice-trio-signature"]


async def test_every_failure_is_an_error_result(nursery: trio.Nursery) -> None:
    backend = Backend()
    base = await nursery.start(serve_asgi, backend)
    backend.answers = {
        "/slow": [(200, b"{}", 5.0)],
        "/down": [(503, b"maintenance", 0.0)],
        "/text": [(200, b"not json", 0.0)],
        "/huge": [(200, json.dumps({"x": "y" * 1_000_000}).encode(), 0.0)],
    }
    async with httpx.AsyncClient() as http:
        client = ToolClient(http, SECRET, 4000)
        started = trio.current_time()
        slow = await client.call(tool(base, "/slow", timeout=0.3), {}, "t1")
        assert slow.status == "timeout" and slow.http_status is None
        assert json.loads(slow.content) == {"error": "timeout", "after_s": 0.3}
        assert trio.current_time() - started < 1.5  # bounded by the tool's timeout
        down = await client.call(tool(base, "/down"), {}, "t2")
        assert down.is_error and down.http_status == 503 and down.attempts == 1
        assert json.loads(down.content) == {"error": "http 503", "body": "maintenance"}
        text = await client.call(tool(base, "/text"), {}, "t3")
        assert text.is_error and "not JSON" in text.content
        huge = await client.call(tool(base, "/huge"), {}, "t4")
        assert huge.status == "ok" and len(huge.content) < 4100
        assert huge.content.endswith("characters]") and "truncated" in huge.content
        refused = await client.call(tool("http://127.0.0.1:1", "/x"), {}, "t5")
        assert refused.is_error and refused.http_status is None


async def test_a_retry_only_where_the_tool_allows_it(nursery: trio.Nursery) -> None:
    backend = Backend()
    base = await nursery.start(serve_asgi, backend)
    backend.answers = {"/flaky": [(502, b"", 0.0), (200, b'{"slots": []}', 0.0)]}
    async with httpx.AsyncClient() as http:
        client = ToolClient(http, SECRET, 4000)
        once = await client.call(tool(base, "/flaky"), {}, "toolu_a")
        assert once.is_error and once.attempts == 1
        backend.answers = {"/flaky": [(502, b"", 0.0), (200, b'{"slots": []}', 0.0)]}
        again = await client.call(tool(base, "/flaky", retry=True), {}, "toolu_b")
    assert again.status == "ok" and again.attempts == 2
    ids = [h["x-voice-trio-tool-call"] for _, h, _ in backend.seen]
    assert ids == ["toolu_a", "toolu_b", "toolu_b"]  # a retry carries the same id
