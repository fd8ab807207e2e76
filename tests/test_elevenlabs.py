"""ElevenLabs: the simulator against the protocol (raw trio-websocket), and the client
against the simulator. Protocol reference: docs/protocols/elevenlabs.md."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from functools import partial
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from voice_trio.audio import alaw_to_mulaw
from voice_trio.providers.deepgram.tts import TtsError
from voice_trio.providers.elevenlabs_tts import (
    AudioMessage,
    ElevenLabsError,
    ElevenLabsTTS,
    ErrorMessage,
    FinalMessage,
    parse_rejection,
    parse_server_message,
    stream_input_url,
)
from voice_trio.sim.deepgram_tts import TRAILING_SILENCE_MS
from voice_trio.sim.elevenlabs import ElevenLabsSim, serve
from voice_trio.sim.speech import decode_speech, silence

KEY = "el-secret"
VOICE = "voz-original-123"
AUTH = [(b"xi-api-key", KEY.encode())]
PHRASE = "Hola, ¿en qué le puedo ayudar?"


@pytest.fixture
async def el(nursery: trio.Nursery) -> AsyncIterator[tuple[ElevenLabsSim, str]]:
    sim = ElevenLabsSim(api_key=KEY, ms_per_char=20, ttfb_ms=5, speed=math.inf, chunk_bytes=400)
    base = await nursery.start(partial(serve, sim))
    yield sim, base


def ws_url(base: str, voice: str = VOICE, **overrides: str) -> str:
    params = {"model_id": "eleven_flash_v2_5", "output_format": "ulaw_8000", **overrides}
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"ws{base[len('http') :]}/v1/text-to-speech/{voice}/stream-input?{query}"


async def send_json(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def drain(ws: WebSocketConnection, timeout: float = 5) -> tuple[list[Any], CloseReason]:
    """Every message (JSON decoded) until the server closes."""
    messages: list[Any] = []
    with trio.fail_after(timeout):
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as closed:
                return messages, closed.reason
            assert isinstance(raw, str), "every server frame is a JSON text frame"
            messages.append(json.loads(raw))


def audio_of(messages: list[Any]) -> bytes:
    return b"".join(base64.b64decode(m["audio"]) for m in messages if m.get("audio"))


async def speak(url: str, *texts: str, headers: Any = AUTH, first: Any = None) -> Any:
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await send_json(ws, first or {"text": " "})
        for text in texts:
            await send_json(ws, {"text": text})
        await send_json(ws, {"text": ""})
        return await drain(ws)


# --- the simulator, spoken to directly -------------------------------------------------------


async def test_stream_input_message_shapes_and_final(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    first = {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}
    messages, reason = await speak(ws_url(base), "Hola, ¿en qué ", "le puedo ayudar? ", first=first)
    *audio, final = messages
    assert final == {"isFinal": True}
    assert reason.code == 1000
    assert audio and all(
        set(m) == {"audio", "isFinal", "normalizedAlignment", "alignment"} for m in audio
    )
    assert all(m["isFinal"] is None for m in audio)
    # Default alignment: with the first chunk only, times in ms from that chunk's start.
    aligned = audio[0]["alignment"]
    assert "".join(aligned["chars"]) == PHRASE
    assert aligned["charStartTimesMs"][:3] == [0, 20, 40]
    assert set(aligned["charDurationsMs"]) == {20}
    assert all(m["alignment"] is None for m in audio[1:])
    pcm = audio_of(audio)
    assert decode_speech(pcm) == PHRASE
    assert pcm.endswith(silence(TRAILING_SILENCE_MS))
    stream = sim.streams[0]
    assert stream.texts == ["Hola, ¿en qué ", "le puedo ayudar? ", ""]
    assert stream.final_sent and stream.close_code == 1000
    assert sim.characters == len(PHRASE)


async def test_key_may_come_in_the_first_message(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    for field in ("xi_api_key", "xi-api-key"):
        first = {"text": " ", field: KEY}
        messages, reason = await speak(ws_url(base), "Listo. ", headers=[], first=first)
        assert decode_speech(audio_of(messages)) == "Listo."
        assert reason.code == 1000
    assert sim.sockets_opened == 2


async def test_bad_or_missing_key_is_an_error_message_then_1008(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    cases = [([(b"xi-api-key", b"wrong")], {"text": " "}), ([], {"text": " "})]
    cases.append(([], {"text": " ", "xi_api_key": "wrong"}))
    for headers, first in cases:
        # The upgrade succeeds (the key may still come in the first message) ...
        async with open_websocket_url(ws_url(base), extra_headers=headers) as ws:
            await send_json(ws, first)
            messages, reason = await drain(ws)
        assert messages == [
            {"message": "Invalid API key", "error": "invalid_api_key", "code": 1008}
        ]
        assert (reason.code, reason.reason) == (1008, "Invalid API key")
    assert sim.rejected == 0 and sim.characters == 0


async def test_refused_upgrades_have_a_detail_body(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    cases = [
        (ws_url(base, output_format=None), 400, "invalid_output_format"),  # real default: MP3
        (ws_url(base, output_format="mp3_44100_128"), 400, "invalid_output_format"),
        (ws_url(base, model_id="eleven_v3"), 403, "model_not_allowed"),
        (ws_url(base, model_id="eleven_nope"), 400, "model_not_found"),
        (ws_url(base, model_id="eleven_multilingual_v2", language_code="es"), 400, None),
        (ws_url(base, inactivity_timeout="181"), 400, None),
        (ws_url(base).replace("stream-input", "stream"), 404, None),
    ]
    for url, status, code in cases:
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url, extra_headers=AUTH):
                pass
        assert info.value.status_code == status, url
        detail = json.loads(info.value.body or b"")["detail"]
        assert detail["message"]
        if code:
            assert detail["status"] == code
    assert sim.rejected == len(cases) and sim.sockets_opened == 0
    ok = ws_url(base, model_id="eleven_turbo_v2_5", language_code="es")
    messages, _ = await speak(ok, "Sí. ")
    assert decode_speech(audio_of(messages)) == "Sí."


async def test_fail_next_status_refuses_one_upgrade(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.fail_next = 429
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(base), extra_headers=AUTH):
            pass
    assert info.value.status_code == 429
    assert sim.fail_next is None
    messages, reason = await speak(ws_url(base), "Bien. ")
    assert reason.code == 1000 and decode_speech(audio_of(messages)) == "Bien."


async def test_inactivity_timeout_error_then_1008(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.inactivity_timeout_s = 0.3
    async with open_websocket_url(ws_url(base), extra_headers=AUTH) as ws:
        await send_json(ws, {"text": " "})
        for _ in range(4):  # a single space keeps the socket alive past the timeout
            await trio.sleep(0.15)
            await send_json(ws, {"text": " "})
        started = trio.current_time()
        messages, reason = await drain(ws)
    assert 0.2 < trio.current_time() - started < 1.0
    [error] = messages
    assert error["error"] == "input_timeout_exceeded" and error["code"] == 1008
    assert error["message"].startswith(
        "Have not received a new text input within the timeout of 0.3 seconds."
    )
    assert reason.code == 1008
    assert len(reason.reason.encode()) <= 123 and error["message"].startswith(reason.reason)
    # The URL's inactivity_timeout wins over the simulator's default.
    sim.inactivity_timeout_s = 20
    async with open_websocket_url(ws_url(base, inactivity_timeout="0.2"), extra_headers=AUTH) as ws:
        await send_json(ws, {"text": " "})
        messages, reason = await drain(ws, timeout=2)
    assert messages[0]["error"] == "input_timeout_exceeded" and reason.code == 1008


async def test_flush_speaks_now_and_keeps_the_socket(el: tuple[ElevenLabsSim, str]):
    _, base = el
    async with open_websocket_url(ws_url(base, auto_mode="false"), extra_headers=AUTH) as ws:
        await send_json(ws, {"text": " "})
        await send_json(ws, {"text": "Un momento. ", "flush": True})
        heard = b""
        with trio.fail_after(2):
            while decode_speech(heard) != "Un momento.":
                message = json.loads(await ws.get_message())
                assert not message.get("isFinal")
                heard += base64.b64decode(message["audio"])
        await send_json(ws, {"text": "Ya está. "})
        await send_json(ws, {"text": ""})
        messages, reason = await drain(ws)
    assert decode_speech(audio_of(messages)) == "Ya está."
    assert messages[-1] == {"isFinal": True} and reason.code == 1000


async def test_text_waits_for_the_chunk_schedule(el: tuple[ElevenLabsSim, str]):
    _, base = el
    first = {"text": " ", "generation_config": {"chunk_length_schedule": [50]}}
    async with open_websocket_url(ws_url(base), extra_headers=AUTH) as ws:
        await send_json(ws, first)
        await send_json(ws, {"text": "Corto. "})
        with trio.move_on_after(0.2) as waited:
            await ws.get_message()
        assert waited.cancelled_caught, "under the schedule's 50 characters: no audio yet"
        await send_json(ws, {"text": "Y ahora una frase bastante más larga que la anterior. "})
        with trio.fail_after(2):
            message = json.loads(await ws.get_message())
        assert message["audio"] and message["isFinal"] is None
        await send_json(ws, {"text": ""})
        rest, _ = await drain(ws)
    spoken = decode_speech(base64.b64decode(message["audio"]) + audio_of(rest))
    assert spoken == "Corto. Y ahora una frase bastante más larga que la anterior."


async def test_sync_alignment_and_alaw(el: tuple[ElevenLabsSim, str]):
    _, base = el
    url = ws_url(base, sync_alignment="true", output_format="alaw_8000")
    messages, _ = await speak(url, PHRASE + " ")
    audio = [m for m in messages if m.get("audio")]
    speech_chunks = math.ceil(len(PHRASE) * 20 * 8 / 400)  # the rest is the closing silence
    assert len(audio) > speech_chunks > 1
    assert all(m["alignment"] for m in audio[:speech_chunks])
    assert not any(m["alignment"] for m in audio[speech_chunks:])
    chars = [c for m in audio if m["alignment"] for c in m["alignment"]["chars"]]
    assert "".join(chars) == PHRASE
    assert decode_speech(alaw_to_mulaw(audio_of(messages))) == PHRASE


async def test_malformed_messages_close_1008(el: tuple[ElevenLabsSim, str]):
    _, base = el
    async with open_websocket_url(ws_url(base), extra_headers=AUTH) as ws:
        await send_json(ws, {"text": " "})
        await ws.send_message("not json")
        messages, reason = await drain(ws)
    assert messages[0]["error"] == "invalid_input_message" and reason.code == 1008
    first = {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}
    async with open_websocket_url(ws_url(base), extra_headers=AUTH) as ws:
        await send_json(ws, first)
        await send_json(ws, {"text": "Hola ", "voice_settings": {"stability": 0.9}})
        messages, reason = await drain(ws)
    assert messages == [] and reason.code == 1008 and "voice_settings" in reason.reason


async def test_fail_next_error_message(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.fail_next = "quota_exceeded"
    messages, reason = await speak(ws_url(base), "Hola. ")
    assert messages[0]["error"] == "quota_exceeded" and reason.code == 1008
    assert sim.fail_next is None


# --- pure protocol functions --------------------------------------------------------------------


def test_stream_input_url():
    url = stream_input_url("https://api.elevenlabs.io/", "a b/c", language_code="es")
    assert url == (
        "wss://api.elevenlabs.io/v1/text-to-speech/a%20b%2Fc/stream-input"
        "?model_id=eleven_flash_v2_5&output_format=ulaw_8000&language_code=es&auto_mode=true"
    )
    assert stream_input_url("http://127.0.0.1:8", "v").startswith("ws://127.0.0.1:8/v1/")
    with pytest.raises(ValueError):
        stream_input_url("ftp://x", "v")


def test_parse_server_message():
    audio = json.dumps({"audio": base64.b64encode(b"\x01\x02").decode(), "isFinal": None})
    assert parse_server_message(audio) == AudioMessage(b"\x01\x02")
    assert parse_server_message('{"isFinal": true}') == FinalMessage()
    assert parse_server_message('{"audio": null, "isFinal": true}') == FinalMessage()
    error = '{"message": "Invalid API key", "error": "invalid_api_key", "code": 1008}'
    assert parse_server_message(error) == ErrorMessage("invalid_api_key", "Invalid API key", 1008)
    for junk in ("nope", "[]", '{"audio": "%%%"}', '{"isFinal": null}', b"\x00"):
        assert parse_server_message(junk) is None
    rejected = parse_rejection(401, b'{"detail": {"status": "invalid_api_key", "message": "x"}}')
    assert (rejected.status, rejected.err_code, rejected.err_msg) == (401, "invalid_api_key", "x")
    assert not rejected.retryable
    assert parse_rejection(503, b"<html>").retryable


# --- the client against the simulator ----------------------------------------------------------


def client(base: str, **overrides: Any) -> ElevenLabsTTS:
    return ElevenLabsTTS(api_key=KEY, voice_id=VOICE, base_url=base, **overrides)


async def test_client_round_trip(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    tts = client(base, voice_settings={"stability": 0.5, "similarity_boost": 0.8})
    async with tts.synthesize(PHRASE) as audio:
        chunks = [chunk async for chunk in audio]
    assert len(chunks) > 1
    assert decode_speech(b"".join(chunks)) == PHRASE
    assert "".join(audio.spoken) == PHRASE and audio.bytes_received == len(b"".join(chunks))
    assert (tts.requests, tts.characters_sent) == (1, len(PHRASE))
    [stream] = sim.streams
    assert stream.options.voice_id == VOICE
    assert (stream.options.model_id, stream.options.output_format) == (
        "eleven_flash_v2_5",
        "ulaw_8000",
    )
    assert stream.options.auto_mode and stream.texts == [PHRASE + " ", ""]
    assert stream.final_sent and stream.close_code == 1000
    with trio.fail_after(1):
        await stream.done.wait()
    assert sim.sockets_active == 0


async def test_client_blank_text_opens_no_socket(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    tts = client(base)
    async with tts.synthesize("   ") as audio:
        assert [chunk async for chunk in audio] == []
    assert tts.requests == 0 and sim.sockets_opened == 0


async def test_client_cancelled_mid_stream_closes_the_socket(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.speed = 1.0  # real time: the sentence takes over a second to arrive
    tts = client(base)
    received = 0
    with trio.move_on_after(5) as barge_in:
        async with tts.synthesize(PHRASE * 2) as audio:
            async for chunk in audio:
                received += len(chunk)
                barge_in.cancel()
                cancelled_at = trio.current_time()
    assert trio.current_time() - cancelled_at < 0.1  # no close handshake is waited for
    assert barge_in.cancelled_caught and received == sim.chunk_bytes
    [stream] = sim.streams
    with trio.fail_after(0.5):
        await stream.done.wait()
    assert stream.client_left and stream.close_code is None and not stream.final_sent
    assert stream.audio_bytes < len(PHRASE * 2) * sim.ms_per_char * 8
    assert sim.sockets_active == 0


async def test_client_leaving_early_without_cancel_closes_the_socket(
    el: tuple[ElevenLabsSim, str],
):
    sim, base = el
    sim.speed = 1.0
    async with client(base).synthesize(PHRASE * 2) as audio:
        async for _ in audio:
            break
    [stream] = sim.streams
    with trio.fail_after(0.5):
        await stream.done.wait()
    assert stream.client_left and not stream.final_sent


async def test_client_bad_key_is_a_tts_error(el: tuple[ElevenLabsSim, str]):
    _, base = el
    tts = ElevenLabsTTS(api_key="wrong", voice_id=VOICE, base_url=base)
    with pytest.raises(TtsError) as info:
        async with tts.synthesize("Hola.") as audio:
            async for _ in audio:
                pass
    error = info.value
    assert isinstance(error, ElevenLabsError)
    assert (error.status, error.err_code, error.close_code) == (None, "invalid_api_key", 1008)
    assert not error.retryable and "Invalid API key" in str(error)


async def test_client_refused_upgrade_raises_on_entry(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.fail_next = 429
    entered = False
    with pytest.raises(ElevenLabsError) as info:
        async with client(base).synthesize("Hola."):
            entered = True
    assert not entered
    assert (info.value.status, info.value.err_code) == (429, "too_many_concurrent_requests")
    assert info.value.retryable
    with pytest.raises(ElevenLabsError) as info:
        async with client(base, model_id="eleven_v3").synthesize("Hola."):
            pass
    assert info.value.status == 403 and not info.value.retryable


async def test_client_error_message_and_abnormal_close(el: tuple[ElevenLabsSim, str]):
    sim, base = el
    sim.fail_next = "quota_exceeded"
    with pytest.raises(ElevenLabsError) as info:
        async with client(base).synthesize("Hola.") as audio:
            async for _ in audio:
                pass
    assert info.value.err_code == "quota_exceeded" and not info.value.retryable
    sim.close_after_chunks = 2
    received: list[bytes] = []
    with pytest.raises(ElevenLabsError) as info:
        async with client(base).synthesize(PHRASE) as audio:
            async for chunk in audio:
                received.append(chunk)
    assert len(received) == 2  # the audio before the close is still delivered
    assert (info.value.err_code, info.value.close_code) == ("closed", 1011)
    assert info.value.retryable


async def test_client_unreachable_server():
    tts = ElevenLabsTTS(api_key=KEY, voice_id=VOICE, base_url="http://127.0.0.1:9")
    with pytest.raises(ElevenLabsError) as info:
        async with tts.synthesize("Hola."):
            pass
    assert info.value.err_code in ("transport", "timeout") and info.value.retryable
