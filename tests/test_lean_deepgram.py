"""The lean Deepgram simulator against the reference one: the same requests must get the same
answers on the wire (handshakes, results, close codes, errors, TTS headers and audio)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from voice_trio.sim import deepgram
from voice_trio.sim.lean_deepgram import LeanDeepgram
from voice_trio.sim.reactor import Reactor
from voice_trio.sim.speech import encode_speech, silence

KEY = "dg-test-key"
LISTEN = (
    "/v1/listen?encoding=mulaw&sample_rate=8000&channels=1&model=nova-3&language=es"
    "&interim_results=true&utterance_end_ms=1000&vad_events=true&endpointing=300"
    "&punctuate=true"
)
SPEAK = "/v1/speak?model=aura-2-celeste-es&encoding=mulaw&sample_rate=8000&container=none"
AUTH = [(b"authorization", f"Token {KEY}".encode())]
KNOBS = {"ms_per_char": 20, "tts_ttfb_ms": 30.0, "no_audio_timeout_s": 0.5}


@dataclass
class Both:
    reference: str
    lean: str
    sim: LeanDeepgram


@pytest.fixture
async def both(nursery: trio.Nursery) -> AsyncIterator[Both]:
    reference = deepgram.DeepgramSim(api_key=KEY, **KNOBS)  # type: ignore[arg-type]
    url = await nursery.start(partial(deepgram.serve, reference))
    sim = LeanDeepgram(api_key=KEY, **KNOBS)  # type: ignore[arg-type]
    reactor = Reactor()
    lean = sim.serve(reactor)
    reactor.start()
    try:
        yield Both(url, lean, sim)
    finally:
        reactor.stop()
        await trio.to_thread.run_sync(reactor.join, 5)
        reactor.close()


def ws(url: str) -> str:
    return "ws" + url[len("http") :]


def without_ids(message: Any) -> Any:
    """A message minus what differs between two streams (ids, wall-clock stamps)."""
    if isinstance(message, dict):
        return {
            k: without_ids(v)
            for k, v in message.items()
            if k not in ("request_id", "created", "model_uuid", "models", "model_info")
        }
    if isinstance(message, list):
        return [without_ids(v) for v in message]
    return message


async def listen(
    base: str, chunks: list[bytes | str], **kw: Any
) -> tuple[list[Any], int | None, str, dict[str, str]]:
    """Send ``chunks`` (audio or text frames); the messages until the server closes, its
    code and reason, and the handshake's headers."""
    messages: list[Any] = []
    async with trio_websocket.open_websocket_url(ws(base) + LISTEN, **kw) as conn:
        headers = {k.decode().lower(): v.decode() for k, v in conn.handshake_headers}
        for chunk in chunks:
            await conn.send_message(chunk)
        try:
            with trio.fail_after(5):
                while True:
                    messages.append(json.loads(await conn.get_message()))
        except trio_websocket.ConnectionClosed:
            pass
        assert conn.closed is not None
        code, reason = conn.closed.code, conn.closed.reason or ""
    return messages, code, reason, headers


def speech_chunks() -> list[bytes | str]:
    audio = silence(300) + encode_speech("Hola, buenos días.", 40) + silence(1600)
    chunks: list[bytes | str] = [audio[i : i + 800] for i in range(0, len(audio), 800)]
    return [*chunks, json.dumps({"type": "Finalize"}), json.dumps({"type": "CloseStream"})]


async def test_live_transcription_is_the_reference_message_for_message(both: Both) -> None:
    ref = await listen(both.reference, speech_chunks(), extra_headers=AUTH)
    new = await listen(both.lean, speech_chunks(), extra_headers=AUTH)
    assert [m["type"] for m in new[0]] == [m["type"] for m in ref[0]]
    assert "Results" in [m["type"] for m in new[0]] and new[0][-1]["type"] == "Metadata"
    assert [without_ids(m) for m in new[0]] == [without_ids(m) for m in ref[0]]
    finals = [m for m in new[0] if m["type"] == "Results" and m["is_final"]]
    said = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals).split()
    assert said == ["Hola,", "buenos", "días."]
    assert new[1:3] == ref[1:3] == (1000, "")
    assert new[3]["dg-request-id"] and ref[3]["dg-request-id"]


async def test_the_token_subprotocol_is_selected_like_the_reference(both: Both) -> None:
    for base in (both.reference, both.lean):
        async with trio_websocket.open_websocket_url(
            ws(base) + LISTEN, subprotocols=["token", KEY]
        ) as conn:
            assert conn.subprotocol == "token"


async def test_refusals_are_the_reference_http_errors(both: Both) -> None:
    cases = [
        (LISTEN, [(b"authorization", b"Token wrong")], 401),
        ("/v1/listen?model=nope", AUTH, 400),
        ("/v1/other", AUTH, 404),
    ]
    for path, headers, status in cases:
        bodies = []
        for base in (both.reference, both.lean):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(
                    ws(base) + path, extra_headers=headers
                ):
                    pass
            assert refused.value.status_code == status
            found = {k.decode().lower(): v.decode() for k, v in refused.value.headers or ()}
            assert found["dg-error"] and found["dg-request-id"]
            body = json.loads(refused.value.body or b"{}")
            bodies.append(without_ids(body))
        assert bodies[0] == bodies[1]


async def test_idle_and_bad_text_closes_are_the_reference_codes(both: Both) -> None:
    for chunks, code, reason in (([], 1011, "NET-0001"), (["not json"], 1008, "DATA-0000")):
        ref = await listen(both.reference, chunks, extra_headers=AUTH)
        new = await listen(both.lean, chunks, extra_headers=AUTH)
        assert new[1:3] == ref[1:3] == (code, reason)


async def speak(base: str, path: str = SPEAK, **kw: Any) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=5) as client:
        started = time.monotonic()
        kw.setdefault("headers", {"Authorization": f"Token {KEY}"})
        response = await client.post(path, **kw)
        return response, time.monotonic() - started


async def test_speech_is_the_reference_audio_and_headers(both: Both) -> None:
    for path in (SPEAK, SPEAK.replace("&container=none", "")):  # raw and wav
        ref, ref_s = await speak(both.reference, path, json={"text": "Hola, ¿cómo está?"})
        new, new_s = await speak(both.lean, path, json={"text": "Hola, ¿cómo está?"})
        assert new.status_code == ref.status_code == 200
        assert new.content == ref.content and len(new.content) > 1000
        for name in ("content-type", "dg-model-name", "dg-model-uuid", "dg-char-count"):
            assert new.headers[name] == ref.headers[name], name
        assert new.headers["dg-request-id"]
        # Paced alike: the first byte after the TTFB, the rest at 4x real time.
        assert abs(new_s - ref_s) < 0.15, (new_s, ref_s)
    assert both.sim.tts_requests == 2 and both.sim.tts_characters == 2 * len("Hola, ¿cómo está?")


async def test_speech_errors_are_the_reference_errors(both: Both) -> None:
    cases: list[dict[str, Any]] = [
        {"json": {"text": "hola"}, "headers": {"Authorization": "Token wrong"}},
        {"json": {"text": ""}},
        {"content": b"hola", "headers": {"Authorization": f"Token {KEY}", "content-type": "x/y"}},
        {"json": {"text": "hola"}, "path": "/v1/speak?model=aura-2-celeste-es"},
        {"json": {"text": "hola"}, "path": "/v1/nothing"},
    ]
    for case in cases:
        path = case.pop("path", SPEAK)
        ref, _ = await speak(both.reference, path, **case)
        new, _ = await speak(both.lean, path, **case)
        assert new.status_code == ref.status_code >= 400, case
        assert without_ids(new.json()) == without_ids(ref.json()), case


async def test_one_connection_carries_several_requests(both: Both) -> None:
    async with httpx.AsyncClient(base_url=both.lean, trust_env=False, timeout=5) as client:
        for text in ("uno", "dos", "tres"):
            response = await client.post(
                SPEAK, json={"text": text}, headers={"Authorization": f"Token {KEY}"}
            )
            assert response.status_code == 200
    assert len(both.sim.connections) <= 1
