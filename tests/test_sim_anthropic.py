"""The Anthropic simulator against protocols/anthropic.md: raw HTTP, then the real SDK."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
import trio

from voice_trio.sim.anthropic import (
    AnthropicSim,
    Fault,
    Reply,
    add_arguments,
    default_reply,
    run_from_args,
    serve,
    split_deltas,
    validate,
)

V1 = "2023-06-01"
V2 = "2026-10-21"
HEADERS = {"x-api-key": "sk-test", "anthropic-version": V1}
FAREWELL_TOOLS = [
    {"name": "end_call", "description": "Cuelga", "input_schema": {"type": "object"}},
    {"name": "transfer_call", "description": "Transfiere", "input_schema": {"type": "object"}},
]


def body(text: str = "Hola, quiero una cita", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse strictly: every event is exactly `event: X`, `data: <json of type X>`, blank."""
    assert raw.endswith("\n\n")
    events = []
    for chunk in raw[:-2].split("\n\n"):
        name_line, data_line = chunk.split("\n")
        name = name_line.removeprefix("event: ")
        assert name_line == f"event: {name}"
        assert data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


def text_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and "text" in d["delta"]
    )


@pytest.fixture
def sim() -> AnthropicSim:
    return AnthropicSim(ttft=0.0, tokens_per_second=math.inf)


@pytest.fixture
async def base_url(sim: AnthropicSim, nursery: trio.Nursery) -> str:
    return await nursery.start(serve, sim)


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key="sk-test", max_retries=0, timeout=10
    ) as sdk:
        yield sdk


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"type", "error", "request_id"}
    assert payload["type"] == "error"
    assert set(payload["error"]) == {"type", "message"}
    assert payload["error"]["type"] == error_type
    assert payload["error"]["message"]
    assert payload["request_id"] == response.headers["request-id"]
    assert payload["request_id"].startswith("req_")
    return payload


# --- pure parts ---------------------------------------------------------------------------


def test_default_reply_quotes_the_last_user_text() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "primero"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "  Quiero   una cita "}]},
        ]
    }
    assert default_reply(request) == Reply(
        'Entendido, usted dijo: "Quiero una cita". ¿En qué más le puedo ayudar?'
    )


def test_default_reply_farewell_calls_end_call_only_when_offered() -> None:
    goodbye = default_reply(body("Bueno, ADIÓS", tools=FAREWELL_TOOLS))
    assert goodbye.tool_call == ("end_call", {"reason": "caller_said_goodbye"})
    assert goodbye.text
    for phrase in ("chao", "hasta luego", "eso es todo", "goodbye"):
        assert default_reply(body(phrase, tools=FAREWELL_TOOLS)).tool_call is not None
    assert default_reply(body("adiós")).tool_call is None


def test_default_reply_transfer_and_continuation() -> None:
    transfer = default_reply(body("Quiero hablar con una persona", tools=FAREWELL_TOOLS))
    assert transfer.tool_call is not None and transfer.tool_call[0] == "transfer_call"
    assert default_reply(body("transferir")).tool_call is None
    continuation = {
        "messages": [
            {"role": "user", "content": "hola"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}],
            },
        ]
    }
    reply = default_reply(continuation)
    assert reply.tool_call is None and "usted dijo" not in reply.text


def test_split_deltas_joins_back_on_word_boundaries() -> None:
    text = 'Entendido, usted dijo: "hola". ¿Algo más?'
    pieces = split_deltas(text, 2)
    assert "".join(pieces) == text
    assert pieces[0] == "Entendido, usted"
    assert all(len(p.split()) <= 2 for p in pieces)
    assert split_deltas("", 3) == []


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"model": None}, "model"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "audio"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
        ({"system": [{"type": "image"}]}, "system"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_validate_rejects(patch: dict[str, Any], fragment: str) -> None:
    request = {**body(), **patch}
    problem = validate({k: v for k, v in request.items() if v is not None}, V1)
    assert problem is not None and fragment in problem


# --- raw HTTP -----------------------------------------------------------------------------


async def test_stream_framing_and_canonical_order(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/messages", headers=HEADERS, json=body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["request-id"].startswith("req_")
    events = parse_sse(response.text)
    names = [n for n, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas > 3
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0][1]["message"]
    assert message["content"] == [] and message["stop_reason"] is None
    assert message["role"] == "assistant" and message["model"] == "claude-haiku-4-5"
    assert message["id"].startswith("msg_")
    assert message["usage"]["output_tokens"] == 1 and message["usage"]["input_tokens"] >= 4
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = text_of(events)
    assert text == 'Entendido, usted dijo: "Hola, quiero una cita". ¿En qué más le puedo ayudar?'
    assert all(
        len(d["delta"]["text"].split()) <= 3 for n, d in events if n == "content_block_delta"
    )
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == len(text.split())
    assert re.search(r'data: \{"type":"message_stop"\}\n\n$', response.text)


async def test_non_streaming_returns_the_whole_message(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/messages", headers=HEADERS, json=body("hola"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    message = response.json()
    assert message["type"] == "message" and message["stop_reason"] == "end_turn"
    assert message["content"] == [
        {"type": "text", "text": 'Entendido, usted dijo: "hola". ¿En qué más le puedo ayudar?'}
    ]
    assert message["usage"]["output_tokens"] == 10


@pytest.mark.parametrize(
    "auth",
    [{"x-api-key": "sk-test"}, {"authorization": "Bearer sk-test"}],
    ids=["x-api-key", "bearer"],
)
async def test_auth_variants_accepted(
    http: httpx.AsyncClient, sim: AnthropicSim, auth: dict[str, str]
) -> None:
    sim.api_key = "sk-test"
    response = await http.post(
        "/v1/messages", headers={**auth, "anthropic-version": V2}, json=body()
    )
    assert response.status_code == 200
    assert sim.requests[-1].auth == next(iter(auth)).replace("authorization", "bearer")


async def test_auth_rejected(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.api_key = "sk-test"
    no_key = await http.post("/v1/messages", headers={"anthropic-version": V1}, json=body())
    assert_error(no_key, 401, "authentication_error")
    wrong = {"authorization": "Bearer sk-nope", "anthropic-version": V1}
    assert_error(
        await http.post("/v1/messages", headers=wrong, json=body()), 401, "authentication_error"
    )
    # x-api-key wins over Authorization when both are present.
    both = {"x-api-key": "sk-nope", "authorization": "Bearer sk-test", "anthropic-version": V1}
    assert_error(
        await http.post("/v1/messages", headers=both, json=body()), 401, "authentication_error"
    )


@pytest.mark.parametrize("version", [V1, V2])
async def test_both_api_versions_accepted(http: httpx.AsyncClient, version: str) -> None:
    headers = {**HEADERS, "anthropic-version": version}
    assert (await http.post("/v1/messages", headers=headers, json=body())).status_code == 200


async def test_version_checks(http: httpx.AsyncClient) -> None:
    missing = {"x-api-key": "k"}
    assert_error(
        await http.post("/v1/messages", headers=missing, json=body()), 400, "invalid_request_error"
    )
    bad = {**HEADERS, "anthropic-version": "2024-01-01"}
    assert_error(
        await http.post("/v1/messages", headers=bad, json=body()), 400, "invalid_request_error"
    )
    hot = body(temperature=0.5)
    v2 = {**HEADERS, "anthropic-version": V2}
    payload = assert_error(
        await http.post("/v1/messages", headers=v2, json=hot), 400, "invalid_request_error"
    )
    assert "temperature" in payload["error"]["message"]
    assert (await http.post("/v1/messages", headers=HEADERS, json=hot)).status_code == 200


async def test_invalid_bodies_and_paths(http: httpx.AsyncClient) -> None:
    not_json = await http.post("/v1/messages", headers=HEADERS, content=b"{nope")
    assert_error(not_json, 400, "invalid_request_error")
    no_tokens = {k: v for k, v in body().items() if k != "max_tokens"}
    payload = assert_error(
        await http.post("/v1/messages", headers=HEADERS, json=no_tokens),
        400,
        "invalid_request_error",
    )
    assert "max_tokens" in payload["error"]["message"]
    assert_error(
        await http.post("/v1/complete", headers=HEADERS, json=body()), 404, "not_found_error"
    )
    assert_error(await http.get("/v1/messages", headers=HEADERS), 405, "invalid_request_error")


async def test_farewell_streams_text_then_end_call_tool_use(http: httpx.AsyncClient) -> None:
    request = body("Muchas gracias, adiós", stream=True, tools=FAREWELL_TOOLS)
    events = parse_sse((await http.post("/v1/messages", headers=HEADERS, json=request)).text)
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    tool = starts[1]["content_block"]
    assert tool["name"] == "end_call" and tool["input"] == {} and tool["id"].startswith("toolu_")
    pieces = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == 1
    ]
    assert len(pieces) > 1
    assert json.loads("".join(pieces)) == {"reason": "caller_said_goodbye"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert [n for n, _ in events][-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_max_tokens_truncates_and_drops_the_tool(http: httpx.AsyncClient) -> None:
    request = body("adiós", stream=True, tools=FAREWELL_TOOLS, max_tokens=3)
    events = parse_sse((await http.post("/v1/messages", headers=HEADERS, json=request)).text)
    assert text_of(events) == "Gracias por llamar."
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 3
    assert all(
        d["content_block"]["type"] == "text" for n, d in events if n == "content_block_start"
    )


async def test_stop_sequence(http: httpx.AsyncClient) -> None:
    request = body("hola", stop_sequences=["¿En qué"])
    message = (await http.post("/v1/messages", headers=HEADERS, json=request)).json()
    assert message["content"][0]["text"] == 'Entendido, usted dijo: "hola". '
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "¿En qué")


async def test_thinking_knob_leads_with_a_thinking_block(
    http: httpx.AsyncClient, sim: AnthropicSim
) -> None:
    sim.thinking = "El cliente quiere una cita."
    events = parse_sse(
        (await http.post("/v1/messages", headers=HEADERS, json=body(stream=True))).text
    )
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    kinds = [
        d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0
    ]
    assert kinds[-1] == "signature_delta" and set(kinds[:-1]) == {"thinking_delta"}
    disabled = body(thinking={"type": "disabled"})
    message = (await http.post("/v1/messages", headers=HEADERS, json=disabled)).json()
    assert [b["type"] for b in message["content"]] == ["text"]


async def test_prompt_caching_creates_then_reads(http: httpx.AsyncClient) -> None:
    # 4 200 words (tokens here): above Claude Haiku 4.5's minimum of 4 096.
    system = [
        {
            "type": "text",
            "text": "Eres una recepcionista " * 1400,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    first = (await http.post("/v1/messages", headers=HEADERS, json=body(system=system))).json()
    second = (
        await http.post("/v1/messages", headers=HEADERS, json=body("otra", system=system))
    ).json()
    assert first["usage"]["cache_creation_input_tokens"] == 4200
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert second["usage"]["cache_creation_input_tokens"] == 0
    assert second["usage"]["cache_read_input_tokens"] == 4200
    assert second["usage"]["input_tokens"] == first["usage"]["input_tokens"] - 3
    other = [{**system[0], "text": "Otro prompt " * 2100}]
    third = (await http.post("/v1/messages", headers=HEADERS, json=body(system=other))).json()
    assert third["usage"]["cache_creation_input_tokens"] == 4200
    plain = (await http.post("/v1/messages", headers=HEADERS, json=body())).json()
    assert (
        plain["usage"]["cache_creation_input_tokens"]
        == 0
        == plain["usage"]["cache_read_input_tokens"]
    )


def marked_system(words: int) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "palabra " * words, "cache_control": {"type": "ephemeral"}}]


async def test_a_prefix_below_the_models_minimum_is_not_cached(
    http: httpx.AsyncClient, sim: AnthropicSim
) -> None:
    """Claude Haiku 4.5 caches only prefixes of at least 4 096 tokens: a receptionist's
    persona of a few hundred is processed in full on every request, with no cache read."""
    short = body(system=marked_system(600))
    for _ in range(2):
        usage = (await http.post("/v1/messages", headers=HEADERS, json=short)).json()["usage"]
        assert usage["cache_creation_input_tokens"] == 0 == usage["cache_read_input_tokens"]
        assert usage["input_tokens"] == 600 + 4  # the whole prompt, every time
    assert not sim.prompt_cache
    assert sim.requests[-1].usage == {
        "input_tokens": 604,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    # The minimum is the model's: 1 100 tokens cache on Sonnet 4.5 (1 024), not on Haiku 4.5.
    prefix = marked_system(1100)
    sonnet = body(system=prefix, model="claude-sonnet-4-5-20250929")
    haiku = body(system=prefix, model="claude-haiku-4-5-20251001")
    for request, cached in ((sonnet, 1100), (haiku, 0)):
        for _ in range(2):
            await http.post("/v1/messages", headers=HEADERS, json=request)
        usage = (await http.post("/v1/messages", headers=HEADERS, json=request)).json()["usage"]
        assert usage["cache_read_input_tokens"] == cached, request["model"]
    # Longest prefix wins: Opus 4.5 (4 096) is not Opus 4 (1 024).
    assert sim.cache_minimum("claude-opus-4-5-20251101") == 4096
    assert sim.cache_minimum("claude-opus-4-20250514") == 1024
    assert sim.cache_minimum("claude-haiku-4-5") == 4096
    assert sim.cache_minimum("claude-haiku-5-5") == 1024  # not listed: the default


async def test_cache_minimums_and_the_short_prefix_answer_are_knobs(
    http: httpx.AsyncClient, sim: AnthropicSim
) -> None:
    """Where the sources disagree the simulator is told: a minimum per model, and whether a
    breakpoint below it is silently uncached (today's docs) or a 400 (the API in 2024)."""
    sim.cache_minimums["claude-haiku-4-5"] = 500
    request = body(system=marked_system(600))
    await http.post("/v1/messages", headers=HEADERS, json=request)
    usage = (await http.post("/v1/messages", headers=HEADERS, json=request)).json()["usage"]
    assert usage["cache_read_input_tokens"] == 600
    sim.cache_minimums["claude-haiku-4-5"] = 4096
    sim.short_cache_prefix = "error"
    answer = await http.post("/v1/messages", headers=HEADERS, json=request)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "at least 4096 tokens. Found: 600." in error["message"]
    assert (await http.post("/v1/messages", headers=HEADERS, json=body())).status_code == 200


async def test_http_faults_queue(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.inject(Fault.overloaded(), times=2)
    sim.inject(Fault.rate_limited(retry_after=7))
    sim.inject(Fault.server_error())
    assert sim.pending_faults == 4
    statuses = []
    for _ in range(5):
        response = await http.post("/v1/messages", headers=HEADERS, json=body(stream=True))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] == "7"
            assert_error(response, 429, "rate_limit_error")
        elif response.status_code == 529:
            assert (
                assert_error(response, 529, "overloaded_error")["error"]["message"] == "Overloaded"
            )
        elif response.status_code == 500:
            assert_error(response, 500, "api_error")
    assert statuses == [529, 529, 429, 500, 200]
    assert sim.status_counts == {529: 2, 429: 1, 500: 1, 200: 1}


async def test_faults_skip_invalid_requests(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.inject(Fault(status=529, should_retry=False))
    bad = await http.post("/v1/messages", headers=HEADERS, json=body(max_tokens=0))
    assert bad.status_code == 400 and sim.pending_faults == 1
    failed = await http.post("/v1/messages", headers=HEADERS, json=body())
    assert failed.status_code == 529 and failed.headers["x-should-retry"] == "false"


async def test_slow_start_delays_the_headers(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.inject(Fault.slow_start(0.2))
    started = trio.current_time()
    async with http.stream("POST", "/v1/messages", headers=HEADERS, json=body(stream=True)) as r:
        assert r.status_code == 200
        assert 0.2 <= trio.current_time() - started < 1.0


async def test_error_event_after_k_deltas(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.inject(Fault.stream_error(after_deltas=2))
    response = await http.post("/v1/messages", headers=HEADERS, json=body(stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert [n for n, _ in events].count("content_block_delta") == 2
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert "message_stop" not in response.text


async def test_stream_cut_drops_the_connection(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.inject(Fault.cut(after_deltas=1))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST", "/v1/messages", headers=HEADERS, json=body(stream=True)
        ) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                received += chunk
    events = parse_sse(received.decode())
    assert [n for n, _ in events].count("content_block_delta") == 1
    assert events[-1][0] == "content_block_delta"
    # The server is still fine afterwards.
    assert (await http.post("/v1/messages", headers=HEADERS, json=body())).status_code == 200


async def test_recording_and_custom_reply() -> None:
    sim = AnthropicSim(
        ttft=0,
        tokens_per_second=math.inf,
        history=3,
        reply_fn=lambda request: Reply(
            f"{len(request['messages'])} mensajes", ("lookup", {"q": 1})
        ),
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, sim)
        async with httpx.AsyncClient(base_url=url) as http:
            for i in range(5):
                headers = {**HEADERS, "x-stainless-retry-count": str(i)}
                response = await http.post("/v1/messages", headers=headers, json=body(f"n{i}"))
        nursery.cancel_scope.cancel()
    message = response.json()
    assert message["content"][0] == {"type": "text", "text": "1 mensajes"}
    assert message["content"][1]["input"] == {"q": 1} and message["stop_reason"] == "tool_use"
    assert sim.request_count == 5 and len(sim.requests) == 3
    last = sim.requests[-1]
    assert last.body["messages"][0]["content"] == "n4"
    assert (
        last.headers["anthropic-version"] == V1 and last.headers["x-stainless-retry-count"] == "4"
    )
    assert "x-api-key" not in last.headers and last.auth == "x-api-key"
    assert (last.method, last.path, last.status) == ("POST", "/v1/messages", 200)
    assert last.request_id == response.headers["request-id"]


async def test_ttft_and_token_rate(http: httpx.AsyncClient, sim: AnthropicSim) -> None:
    sim.ttft, sim.tokens_per_second = 0.15, 100.0
    stamps = []
    started = trio.current_time()
    async with http.stream("POST", "/v1/messages", headers=HEADERS, json=body(stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                stamps.append((line[7:], trio.current_time() - started))
    first_delta = next(t for name, t in stamps if name == "content_block_delta")
    assert stamps[0] == ("message_start", pytest.approx(0, abs=0.1))
    assert 0.15 <= first_delta < 0.4
    # 16 words at 100 tokens/s after the first 3-word delta: about 0.13 s more.
    assert 0.1 <= stamps[-1][1] - first_delta < 0.4


# --- through the real SDK -----------------------------------------------------------------


async def test_sdk_stream_text_and_final_message(
    client: anthropic.AsyncAnthropic, sim: AnthropicSim
) -> None:
    async with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=100,
        system="Eres una recepcionista.",
        messages=[{"role": "user", "content": "Quiero cambiar mi cita"}],
    ) as stream:
        chunks = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(chunks) > 2
    assert "".join(chunks) == final.content[0].text
    assert '"Quiero cambiar mi cita"' in final.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len("".join(chunks).split())
    assert final.usage.input_tokens > 0
    recorded = sim.requests[-1]
    assert recorded.auth == "bearer" and recorded.headers["anthropic-version"] == V2
    assert recorded.headers["x-stainless-async"] == "async:trio"
    assert recorded.body["stream"] is True


async def test_sdk_tool_use_block(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=100,
        tools=FAREWELL_TOOLS,
        messages=[{"role": "user", "content": "Eso es todo, gracias"}],
    ) as stream:
        final = await stream.get_final_message()
    tool = final.content[-1]
    assert isinstance(tool, anthropic.types.ToolUseBlock)
    assert (tool.name, tool.input) == ("end_call", {"reason": "caller_said_goodbye"})
    assert final.stop_reason == "tool_use"
    created = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        tools=FAREWELL_TOOLS,
        messages=[{"role": "user", "content": "Quiero hablar con una persona"}],
    )
    assert created.content[-1].type == "tool_use" and created.content[-1].name == "transfer_call"


async def test_sdk_overloaded_error(client: anthropic.AsyncAnthropic, sim: AnthropicSim) -> None:
    sim.inject(Fault.overloaded())
    with pytest.raises(anthropic.OverloadedError) as caught:
        async with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hola"}]
        ) as stream:
            await stream.get_final_message()
    assert caught.value.status_code == 529
    assert caught.value.request_id == sim.requests[-1].request_id


async def test_sdk_retries_honour_retry_after(base_url: str, sim: AnthropicSim) -> None:
    sim.inject(Fault.overloaded(retry_after=0.05))
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=1) as sdk:
        message = await sdk.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hola"}]
        )
    assert message.stop_reason == "end_turn"
    assert [r.headers["x-stainless-retry-count"] for r in sim.requests] == ["0", "1"]


async def test_sdk_mid_stream_error_event(
    client: anthropic.AsyncAnthropic, sim: AnthropicSim
) -> None:
    sim.inject(Fault.stream_error(after_deltas=1))
    chunks = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
        ) as stream:
            async for text in stream.text_stream:
                chunks.append(text)
    assert chunks == ["Entendido, usted dijo:"]
    assert caught.value.status_code == 200 and caught.value.type == "overloaded_error"
    assert not isinstance(caught.value, anthropic.OverloadedError)


async def test_sdk_stream_cut(client: anthropic.AsyncAnthropic, sim: AnthropicSim) -> None:
    # A cut stream surfaces httpx2's own error with anthropic 2.14 and is wrapped as
    # APIConnectionError by 2.17 (the lock's); pyproject allows both, and
    # providers/claude.py treats both as a connection failure. A cut non-streaming body is
    # wrapped by both.
    sim.inject(Fault.cut(after_deltas=2))
    chunks = []
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)):
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
        ) as stream:
            async for text in stream.text_stream:
                chunks.append(text)
    assert len(chunks) == 2
    sim.inject(Fault.cut(after_deltas=0))
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
        )


async def test_sdk_ttft_is_roughly_respected(
    client: anthropic.AsyncAnthropic, sim: AnthropicSim
) -> None:
    sim.ttft = 0.2
    started = trio.current_time()
    async with client.messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
    ) as stream:
        async for _ in stream.text_stream:
            first = trio.current_time() - started
            break
    # Never sooner than the TTFT; later only by what a busy machine adds to one request.
    assert 0.2 <= first < 2.0


async def test_cli_serves_and_announces(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cache = ["--cache-minimum", "claude-haiku-4-5=2", "--short-cache-prefix", "error"]
    args = parser.parse_args(
        ["--ttft-ms", "0", "--tokens-per-second", "0", "--api-key", "k", *cache]
    )
    assert args.cache_minimum == [("claude-haiku-4-5", 2)]
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-minimum", "claude-haiku-4-5"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_from_args, args)
        with trio.fail_after(5):
            # Polling: captured stdout offers nothing to wait on.
            while "listening" not in (out := capsys.readouterr().out):  # noqa: ASYNC110
                await trio.sleep(0.01)
        url = re.fullmatch(r"Anthropic simulator listening on (http://127\.0\.0\.1:\d+)\n", out)
        assert url is not None
        async with httpx.AsyncClient(base_url=url[1]) as http:
            headers = {**HEADERS, "x-api-key": "k"}
            assert (
                await http.post("/v1/messages", headers=headers, json=body())
            ).status_code == 200
        nursery.cancel_scope.cancel()


async def test_sdk_barge_in_cancels_cleanly(
    client: anthropic.AsyncAnthropic, sim: AnthropicSim, caplog: pytest.LogCaptureFixture
) -> None:
    sim.tokens_per_second = 30.0  # a 3-word delta every 0.1 s
    chunks = []
    with trio.CancelScope() as barge_in:  # cut at the first words, however slow they came
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
        ) as stream:
            async for text in stream.text_stream:
                chunks.append(text)
                barge_in.cancel()
    assert len(chunks) == 1
    await trio.sleep(0.1)
    sim.tokens_per_second = math.inf
    again = await client.messages.create(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "hola"}]
    )
    assert again.stop_reason == "end_turn"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
