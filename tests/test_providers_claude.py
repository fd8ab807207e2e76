"""ClaudeClient against a small in-test Messages API peer that streams the SSE events of
shared/docs/protocols/anthropic.md §2 and answers its error bodies (§3)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from voice_trio.providers.claude import ClaudeClient, LlmError, LlmUsage, TextDelta, ToolCall
from voice_trio.sim._serve import serve_asgi

API_KEY = "sk-ant-test"
MODEL = "claude-haiku-4-5"
HISTORY = [{"role": "user", "content": "Hola, quiero cambiar mi cita."}]
SYSTEM_BLOCKS = [
    {
        "type": "text",
        "text": "Eres un agente telefónico amable.",
        "cache_control": {"type": "ephemeral"},
    }
]
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

Send = Callable[[dict[str, Any]], Awaitable[None]]


def sse(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def message_start(input_tokens: int = 11, cache_read: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": 1}
    if cache_read:
        usage["cache_read_input_tokens"] = cache_read
        usage["cache_creation_input_tokens"] = 0
    return {
        "type": "message_start",
        "message": {
            "id": "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }


def text_block(index: int, *parts: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
        {"type": "ping"},
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": p},
            }
            for p in parts
        ),
        {"type": "content_block_stop", "index": index},
    ]


def message_end(stop_reason: str, output_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]


@dataclass
class Scripted:
    """One answer: a status, a JSON error body, or SSE events sent ``delay`` s apart."""

    status: int = 200
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    delay: float = 0.0
    first_byte_delay: float = 0.0


@dataclass
class FakeMessages:
    """A raw ASGI ``POST /v1/messages``; answers are taken from ``script`` in order."""

    script: deque[Scripted] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(
            {
                "path": scope["path"],
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "json": json.loads(body),
            }
        )
        answer = self.script.popleft()
        await trio.sleep(answer.first_byte_delay)
        headers = [(b"request-id", f"req_{len(self.requests)}".encode()), *answer.headers]
        if answer.error is not None:
            payload = json.dumps({**answer.error, "request_id": "req_err"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(b"content-type", b"application/json"), *headers],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), *headers],
            }
        )
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            for event in answer.events:
                await send({"type": "http.response.body", "body": sse(event), "more_body": True})
                await trio.sleep(answer.delay)
            await send({"type": "http.response.body", "body": b""})
            nursery.cancel_scope.cancel()


async def start_fake(nursery: trio.Nursery, *answers: Scripted) -> tuple[FakeMessages, str]:
    fake = FakeMessages(script=deque(answers))
    base = await nursery.start(serve_asgi, fake)
    return fake, base


def client(base: str, **overrides: Any) -> ClaudeClient:
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": base, "model": MODEL, "timeout": 5.0}
    return ClaudeClient(**(options | overrides))


async def test_text_deltas_usage_and_request_shape(nursery: trio.Nursery) -> None:
    events = [
        message_start(input_tokens=11, cache_read=2048),
        *text_block(0, "Claro,", " le ayudo", " con eso."),
        *message_end("end_turn", 6),
    ]
    fake, base = await start_fake(nursery, Scripted(events=events))
    with trio.fail_after(5):
        async with client(base, max_tokens=120) as claude:
            async with claude.stream_reply(SYSTEM_BLOCKS, HISTORY) as reply:
                deltas = [delta async for delta in reply]
    assert deltas == [TextDelta("Claro,"), TextDelta(" le ayudo"), TextDelta(" con eso.")]
    assert reply.text == "Claro, le ayudo con eso."
    assert reply.done and reply.stop_reason == "end_turn" and reply.tool_calls == []
    assert reply.usage == LlmUsage(
        input_tokens=11,
        output_tokens=6,
        cache_read_input_tokens=2048,
        cache_creation_input_tokens=0,
    )
    assert reply.request_id == "req_1"
    assert reply.assistant_content() == [{"type": "text", "text": "Claro, le ayudo con eso."}]

    request = fake.requests[0]
    assert request["path"] == "/v1/messages"
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert request["headers"]["anthropic-version"]
    assert request["json"]["model"] == MODEL
    assert request["json"]["max_tokens"] == 120
    assert request["json"]["stream"] is True
    assert request["json"]["system"] == SYSTEM_BLOCKS
    assert request["json"]["messages"] == HISTORY
    assert "tools" not in request["json"]


async def test_tool_use_is_collected(nursery: trio.Nursery) -> None:
    tool = {
        "name": "end_call",
        "description": "Cuelga la llamada.",
        "input_schema": {"type": "object", "properties": {"reason": {"type": "string"}}},
    }
    events = [
        message_start(),
        *text_block(0, "Gracias por llamar."),
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "end_call",
                "input": {},
            },
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"reason": "desp'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": 'edida"}'},
        },
        {"type": "content_block_stop", "index": 1},
        *message_end("tool_use", 25),
    ]
    fake, base = await start_fake(nursery, Scripted(events=events))
    with trio.fail_after(5):
        async with client(base) as claude:
            async with claude.stream_reply("Sistema.", HISTORY, tools=[tool]) as reply:
                deltas = [delta.text async for delta in reply]
    assert deltas == ["Gracias por llamar."]
    assert reply.stop_reason == "tool_use"
    assert reply.tool_calls == [
        ToolCall(name="end_call", input={"reason": "despedida"}, id="toolu_01")
    ]
    assert reply.assistant_content()[1] == {
        "type": "tool_use",
        "id": "toolu_01",
        "name": "end_call",
        "input": {"reason": "despedida"},
    }
    assert reply.usage.output_tokens == 25
    assert fake.requests[0]["json"]["tools"] == [tool]
    assert fake.requests[0]["json"]["system"] == "Sistema."


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (529, "overloaded_error", True),
        (429, "rate_limit_error", True),
        (500, "api_error", True),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
    ],
)
async def test_http_errors_map_to_llm_error(
    nursery: trio.Nursery, status: int, error_type: str, retryable: bool
) -> None:
    error = {"type": "error", "error": {"type": error_type, "message": "nope"}}
    headers = [(b"retry-after", b"2")] if status == 429 else []
    fake, base = await start_fake(nursery, Scripted(status=status, error=error, headers=headers))
    with trio.fail_after(5), pytest.raises(LlmError) as info:
        async with client(base) as claude:
            async with claude.stream_reply("Sistema.", HISTORY):
                pytest.fail("entered despite an error status")
    err = info.value
    assert (err.status, err.kind, err.retryable, err.during_stream) == (
        status,
        error_type,
        retryable,
        False,
    )
    assert err.request_id == "req_1"
    assert err.retry_after == (2.0 if status == 429 else None)
    assert len(fake.requests) == 1  # the SDK did not retry on its own


async def test_error_event_mid_stream_is_retryable(nursery: trio.Nursery) -> None:
    events = [
        message_start(),
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Cla"}},
        OVERLOADED,
    ]
    _, base = await start_fake(nursery, Scripted(events=events))
    got: list[str] = []
    with trio.fail_after(5):
        async with client(base) as claude:
            with pytest.raises(LlmError) as info:
                async with claude.stream_reply("Sistema.", HISTORY) as reply:
                    async for delta in reply:
                        got.append(delta.text)
    assert got == ["Cla"]
    err = info.value
    assert (err.status, err.kind, err.retryable, err.during_stream) == (
        None,
        "overloaded_error",
        True,
        True,
    )
    assert not reply.done


async def test_cut_off_stream_is_an_incomplete_stream_error(nursery: trio.Nursery) -> None:
    events = [message_start(), *text_block(0, "Claro, le")]  # no message_delta / message_stop
    _, base = await start_fake(nursery, Scripted(events=events))
    with trio.fail_after(5):
        async with client(base) as claude:
            with pytest.raises(LlmError) as info:
                async with claude.stream_reply("Sistema.", HISTORY) as reply:
                    _ = [delta async for delta in reply]
    assert (info.value.kind, info.value.retryable, info.value.during_stream) == (
        "incomplete_stream",
        True,
        True,
    )
    assert reply.text == "Claro, le" and not reply.done


async def test_cancel_mid_stream_closes_and_client_still_works(nursery: trio.Nursery) -> None:
    slow = [message_start(), *text_block(0, *(f" palabra{i}" for i in range(100)))]
    quick = [message_start(), *text_block(0, "Sí."), *message_end("end_turn", 2)]
    fake, base = await start_fake(
        nursery, Scripted(events=slow, delay=0.02), Scripted(events=quick)
    )
    got: list[str] = []
    with trio.fail_after(5):
        async with client(base) as claude:
            with trio.move_on_after(0.3) as barge_in:
                async with claude.stream_reply("Sistema.", HISTORY) as reply:
                    async for delta in reply:
                        got.append(delta.text)
                        if len(got) == 2:
                            await trio.sleep_forever()  # parked, e.g. waiting on TTS
            assert barge_in.cancelled_caught
            await fake.disconnected.wait()  # the HTTP response was closed
            assert reply.text == " palabra0 palabra1" and reply.usage.input_tokens == 11

            async with claude.stream_reply("Sistema.", HISTORY) as again:
                assert [d.text async for d in again] == ["Sí."]
    assert len(fake.requests) == 2


async def test_timeout_and_connection_errors_are_retryable(nursery: trio.Nursery) -> None:
    _, base = await start_fake(nursery, Scripted(events=[], first_byte_delay=3.0))
    with trio.fail_after(5):
        async with client(base, timeout=0.3) as claude:
            with pytest.raises(LlmError) as timed_out:
                async with claude.stream_reply("Sistema.", HISTORY):
                    pytest.fail("no response was expected in time")
    assert (timed_out.value.status, timed_out.value.kind, timed_out.value.retryable) == (
        None,
        "timeout",
        True,
    )

    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with trio.fail_after(5):
        async with client(f"http://127.0.0.1:{port}") as claude:
            with pytest.raises(LlmError) as refused:
                async with claude.stream_reply("Sistema.", HISTORY):
                    pytest.fail("connected to a closed port")
    assert (refused.value.status, refused.value.kind, refused.value.retryable) == (
        None,
        "connection",
        True,
    )


async def test_usage_sink_gets_each_report_by_kind_without_double_counting(
    nursery: trio.Nursery,
) -> None:
    """message_delta repeats the input side cumulatively: the sink sees increases only, so
    what it adds up is what the API reported (no cache read it did not report)."""
    delta_with_input = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 6, "input_tokens": 11, "cache_read_input_tokens": 4200},
    }
    events = [
        message_start(input_tokens=11, cache_read=4200),
        *text_block(0, "Claro."),
        delta_with_input,
        {"type": "message_stop"},
    ]
    _, base = await start_fake(nursery, Scripted(events=events))
    seen: list[LlmUsage] = []
    with trio.fail_after(5):
        async with client(base, usage_sink=seen.append) as claude:
            async with claude.stream_reply(SYSTEM_BLOCKS, HISTORY) as reply:
                _ = [delta async for delta in reply]
    assert seen == [
        LlmUsage(input_tokens=11, output_tokens=1, cache_read_input_tokens=4200),
        LlmUsage(output_tokens=5),
    ]
    assert reply.usage == LlmUsage(11, 6, 4200, 0)
