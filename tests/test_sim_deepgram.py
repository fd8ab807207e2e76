"""The Deepgram simulator against the wire protocol (protocols/deepgram.md), with raw clients."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from voice_trio.audio import mulaw_to_alaw, mulaw_to_linear
from voice_trio.sim.deepgram import DeepgramSim, serve
from voice_trio.sim.deepgram_stt import ListenOptions, SttTranscriber
from voice_trio.sim.deepgram_tts import TRAILING_SILENCE_MS
from voice_trio.sim.speech import decode_speech, encode_speech, silence

KEY = "dg-test-key"
AUTH = [(b"Authorization", b"Token " + KEY.encode())]
PHRASE = "Hola, quiero una cita."
LISTEN = {
    "model": "nova-3",
    "language": "es",
    "encoding": "mulaw",
    "sample_rate": "8000",
    "channels": "1",
    "interim_results": "true",
    "endpointing": "300",
    "utterance_end_ms": "1000",
    "vad_events": "true",
    "punctuate": "true",
}
SPEAK = {"model": "aura-2-estrella-es", "encoding": "mulaw", "sample_rate": "8000"}


@pytest.fixture
async def dg(nursery: trio.Nursery) -> AsyncIterator[tuple[DeepgramSim, str]]:
    sim = DeepgramSim(tts_ttfb_ms=20, tts_speed=math.inf)
    base = await nursery.start(partial(serve, sim))
    yield sim, base


def ws_url(base: str, path: str, **params: str) -> str:
    return "ws" + base[len("http") :] + path + ("?" + urlencode(params) if params else "")


def listen_url(base: str, **overrides: str) -> str:
    return ws_url(base, "/v1/listen", **{**LISTEN, **overrides})


async def send_frames(ws: WebSocketConnection, audio: bytes, frame: int = 160) -> None:
    for pos in range(0, len(audio), frame):
        await ws.send_message(audio[pos : pos + frame])


async def drain(ws: WebSocketConnection, timeout: float = 5) -> tuple[list[Any], CloseReason]:
    """Every message (JSON decoded, binary as bytes) until the server closes."""
    messages: list[Any] = []
    with trio.fail_after(timeout):
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as closed:
                return messages, closed.reason
            messages.append(json.loads(message) if isinstance(message, str) else message)


async def transcribe(url: str, audio: bytes, frame: int = 160) -> tuple[list[Any], CloseReason]:
    async with open_websocket_url(url, extra_headers=AUTH) as ws:
        await send_frames(ws, audio, frame)
        await ws.send_message(json.dumps({"type": "CloseStream"}))
        return await drain(ws)


def results(messages: list[Any], **flags: bool) -> list[dict[str, Any]]:
    found = [m for m in messages if isinstance(m, dict) and m["type"] == "Results"]
    return [m for m in found if all(m.get(k) == v for k, v in flags.items())]


def transcript(message: dict[str, Any]) -> str:
    return message["channel"]["alternatives"][0]["transcript"]


def final_text(messages: list[Any]) -> str:
    return " ".join(t for m in results(messages, is_final=True) if (t := transcript(m)))


async def rejected(url: str, headers: list[tuple[bytes, bytes]] = AUTH) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers):
            pass
    return info.value


# --- STT handshake -------------------------------------------------------------------------


async def test_bad_or_missing_key_is_a_401_handshake_rejection(dg: tuple[DeepgramSim, str]):
    _, base = dg
    for headers in ([(b"Authorization", b"Token wrong")], []):
        error = await rejected(listen_url(base), headers)
        assert error.status_code == 401
        found = {k.decode().lower(): v.decode() for k, v in error.headers}
        assert found["dg-error"]
        body = json.loads(error.body or b"")
        assert body["err_code"] == "INVALID_AUTH"
        assert body["err_msg"] == "Invalid credentials."
        assert body["request_id"] == found["dg-request-id"]


async def test_unsupported_parameters_are_400(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    bad = [
        {"encoding": "opus"},
        {"encoding": "mulaw", "sample_rate": ""},
        {"model": "nova-9"},
        {"model": "nova-2-phonecall", "language": "es"},
        {"interim_results": "yes"},
    ]
    for params in bad:
        error = await rejected(listen_url(base, **params))
        assert error.status_code == 400, params
        assert any(k.lower() == b"dg-request-id" for k, _ in error.headers)
    missing_rate = ws_url(base, "/v1/listen", encoding="mulaw")
    assert (await rejected(missing_rate)).status_code == 400
    assert sim.stt_connections_opened == 0
    assert sim.stt_rejected == len(bad) + 1


async def test_token_bearer_and_subprotocol_auth_are_accepted(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    bearer = [(b"Authorization", b"Bearer " + KEY.encode())]
    async with open_websocket_url(listen_url(base), extra_headers=bearer) as ws:
        assert any(k.lower() == b"dg-request-id" for k, _ in ws.handshake_headers)
    async with open_websocket_url(listen_url(base), subprotocols=["token", KEY]) as ws:
        assert ws.subprotocol == "token"
    assert sim.stt_connections_opened == 2


# --- STT results -----------------------------------------------------------------------------


async def test_utterance_gives_interims_speech_final_and_utterance_end(
    dg: tuple[DeepgramSim, str],
):
    sim, base = dg
    audio = silence(200) + encode_speech(PHRASE) + silence(1500)
    messages, closed = await transcribe(listen_url(base), audio)

    assert messages[0] == {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.2}
    interims = results(messages, is_final=False)
    assert interims and all(PHRASE.startswith(transcript(m)) for m in interims)
    assert transcript(interims[0]) == "Hola, quiero una"

    (final,) = results(messages, speech_final=True)
    assert final["is_final"] is True and final["from_finalize"] is False
    assert final["channel_index"] == [0, 1] and final["start"] == 0.0
    speech_end = 0.2 + len(PHRASE) * 0.065
    assert speech_end + 0.3 <= final["duration"] <= speech_end + 0.32
    alternative = final["channel"]["alternatives"][0]
    assert alternative["transcript"] == PHRASE
    assert alternative["confidence"] == 0.99
    words = alternative["words"]
    assert [w["word"] for w in words] == ["hola", "quiero", "una", "cita"]
    assert [w["punctuated_word"] for w in words] == ["Hola,", "quiero", "una", "cita."]
    assert words[0] == {
        "word": "hola",
        "start": 0.2,
        "end": 0.525,
        "confidence": 0.99,
        "punctuated_word": "Hola,",
    }
    assert words[-1]["end"] == pytest.approx(speech_end)
    assert set(final["metadata"]) >= {"request_id", "model_info", "model_uuid"}

    utterance_end = next(m for m in messages if m["type"] == "UtteranceEnd")
    assert utterance_end == {
        "type": "UtteranceEnd",
        "channel": [0, 1],
        "last_word_end": round(speech_end, 3),
    }
    assert messages.index(utterance_end) > messages.index(final)

    metadata = messages[-1]
    assert metadata["type"] == "Metadata"
    assert set(metadata) >= {
        "transaction_key",
        "request_id",
        "sha256",
        "created",
        "duration",
        "channels",
    }
    assert metadata["duration"] == pytest.approx(len(audio) / 8000)
    assert metadata["request_id"] == final["metadata"]["request_id"]
    assert closed.code == 1000
    assert sim.stt_audio_seconds == [pytest.approx(len(audio) / 8000)]


async def test_results_are_the_same_however_the_audio_is_chunked(dg: tuple[DeepgramSim, str]):
    _, base = dg
    audio = silence(200) + encode_speech(PHRASE) + silence(1500)
    by_frame, _ = await transcribe(listen_url(base), audio)
    in_one_go, _ = await transcribe(listen_url(base), audio, frame=len(audio))
    strip = [{**m, "metadata": None} for m in by_frame[:-1]]
    assert strip == [{**m, "metadata": None} for m in in_one_go[:-1]]


async def test_finalize_flushes_pending_words(dg: tuple[DeepgramSim, str]):
    _, base = dg
    async with open_websocket_url(listen_url(base, endpointing="false"), extra_headers=AUTH) as ws:
        await send_frames(ws, encode_speech("Sí, claro."))
        await ws.send_message(json.dumps({"type": "Finalize"}))
        with trio.fail_after(5):
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "Results" and message["is_final"]:
                    break
    assert message["from_finalize"] is True and message["speech_final"] is False
    assert transcript(message) == "Sí, claro."


async def test_keepalive_and_zero_length_frame_close_like_closestream(
    dg: tuple[DeepgramSim, str],
):
    _, base = dg
    async with open_websocket_url(listen_url(base), extra_headers=AUTH) as ws:
        await send_frames(ws, encode_speech("Vale."))
        await ws.send_message(json.dumps({"type": "KeepAlive"}))
        await ws.send_message(b"")
        messages, closed = await drain(ws)
    assert final_text(messages) == "Vale."
    assert messages[-1]["type"] == "Metadata" and closed.code == 1000


async def test_alaw_and_linear16_give_the_same_transcript(dg: tuple[DeepgramSim, str]):
    _, base = dg
    mulaw = silence(100) + encode_speech(PHRASE) + silence(400)
    alaw_messages, _ = await transcribe(listen_url(base, encoding="alaw"), mulaw_to_alaw(mulaw))
    assert final_text(alaw_messages) == PHRASE
    pcm = struct.pack(f"<{len(mulaw)}h", *(mulaw_to_linear(b) for b in mulaw))
    pcm_messages, _ = await transcribe(listen_url(base, encoding="linear16"), pcm, frame=320)
    assert final_text(pcm_messages) == PHRASE


async def test_lost_or_corrupted_audio_shows_in_the_transcript(dg: tuple[DeepgramSim, str]):
    _, base = dg
    speech = encode_speech(PHRASE)
    lost = speech[:960] + speech[1120:]  # the frame holding the start of the "l"
    messages, _ = await transcribe(listen_url(base), lost + silence(500))
    assert final_text(messages) == "Hoa, quiero una cita."

    corrupted = bytearray(speech)
    corrupted[520 * 6 + 5] = 0x40  # a code-point nibble of the "q"
    messages, _ = await transcribe(listen_url(base), bytes(corrupted) + silence(500))
    (final,) = results(messages, speech_final=True)
    words = final["channel"]["alternatives"][0]["words"]
    assert words[1]["word"] == "\ufffduiero" and words[1]["confidence"] == 0.3
    assert words[0]["confidence"] == 0.99


async def test_long_speech_is_finalized_without_waiting_for_a_pause(
    dg: tuple[DeepgramSim, str],
):
    _, base = dg
    text = "uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince"
    messages, _ = await transcribe(listen_url(base), encode_speech(text) + silence(500))
    finals = results(messages, is_final=True)
    forced = [m for m in finals if transcript(m) and not m["speech_final"]]
    assert forced and forced[0]["duration"] <= 5.0
    assert final_text(messages) == text
    assert results(messages, speech_final=True)


async def test_silence_gives_occasional_empty_results(dg: tuple[DeepgramSim, str]):
    _, base = dg
    messages, _ = await transcribe(listen_url(base), silence(4500))
    empty = results(messages, is_final=True)
    assert [m["start"] for m in empty[:2]] == [0.0, 2.0]
    assert all(transcript(m) == "" for m in empty)
    assert not [m for m in messages if m["type"] in ("SpeechStarted", "UtteranceEnd")]


async def test_idle_stream_is_closed_1011_net_0001(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    sim.no_audio_timeout_s = 0.3
    async with open_websocket_url(listen_url(base), extra_headers=AUTH) as ws:
        await ws.send_message(silence(20))
        for _ in range(3):  # KeepAlive after audio keeps the stream open
            await trio.sleep(0.15)
            await ws.send_message(json.dumps({"type": "KeepAlive"}))
        start = trio.current_time()
        _, closed = await drain(ws)
    assert (closed.code, closed.reason) == (1011, "NET-0001")
    assert 0.25 <= trio.current_time() - start < 1.5
    assert sim.stt_streams[0].close_code == 1011

    async with open_websocket_url(listen_url(base), extra_headers=AUTH) as ws:
        start = trio.current_time()
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(10):  # but not before any audio arrived
                await trio.sleep(0.1)
                await ws.send_message(json.dumps({"type": "KeepAlive"}))
    assert info.value.reason.code == 1011
    assert trio.current_time() - start < 0.8


def test_transcriber_without_sockets():
    options = ListenOptions(endpointing_ms=300, utterance_end_ms=1000, vad_events=True)
    transcriber = SttTranscriber(options, "req-1")
    audio = encode_speech("Buenos días.") + silence(600) + encode_speech("Gracias.") + silence(400)
    out = []
    for pos in range(0, len(audio), 160):
        out += transcriber.feed(audio[pos : pos + 160])
    kinds = [m["type"] for m in out]
    assert kinds == ["SpeechStarted", "Results", "SpeechStarted", "Results"]
    assert [m["timestamp"] for m in out if m["type"] == "SpeechStarted"] == [0.0, 1.38]
    assert [transcript(m) for m in results(out, speech_final=True)] == ["Buenos días.", "Gracias."]
    assert not results(out, is_final=False)  # interim_results and UtteranceEnd are off
    end = transcriber.close()
    assert [m["type"] for m in end] == ["Results", "Metadata"]
    assert transcript(end[0]) == "" and end[0]["start"] + end[0]["duration"] == pytest.approx(
        len(audio) / 8000
    )
    assert end[-1]["duration"] == pytest.approx(len(audio) / 8000)


# --- TTS REST --------------------------------------------------------------------------------


async def speak(
    base: str, body: Any = None, *, params: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    query = {**SPEAK, "container": "none"} if params is None else params
    kwargs.setdefault("headers", {"Authorization": f"Token {KEY}"})
    async with httpx.AsyncClient() as client:
        if body is not None:
            kwargs["json"] = body
        return await client.post(f"{base}/v1/speak", params=query, **kwargs)


async def test_tts_rest_streams_mulaw_that_decodes_to_the_text(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    sim.tts_ttfb_ms, sim.tts_speed = 200, 8.0
    text = "Claro, le ayudo con eso."
    async with httpx.AsyncClient() as client:
        start = trio.current_time()
        request = client.stream(
            "POST",
            f"{base}/v1/speak",
            params={**SPEAK, "container": "none"},
            json={"text": text},
            headers={"Authorization": f"Token {KEY}"},
        )
        async with request as response:
            chunks = []
            async for chunk in response.aiter_raw():
                if not chunks:
                    first_byte = trio.current_time() - start
                chunks.append(chunk)
            total = trio.current_time() - start
    assert response.status_code == 200
    headers = response.headers
    assert headers["content-type"] == "audio/mulaw;rate=8000"
    assert headers["dg-model-name"] == "aura-2-estrella-es"
    assert headers["dg-model-uuid"] and headers["dg-request-id"]
    assert headers["dg-char-count"] == str(len(text))
    assert headers["transfer-encoding"] == "chunked"
    audio = b"".join(chunks)
    assert decode_speech(audio) == text and len(audio) == (len(text) * 65 + TRAILING_SILENCE_MS) * 8
    assert 0.19 <= first_byte < 0.6
    assert total >= 0.2 + (len(audio) / 8000 / 8.0) * 0.8
    assert (sim.tts_requests, sim.tts_characters) == (1, len(text))


async def test_tts_rest_formats(dg: tuple[DeepgramSim, str]):
    _, base = dg
    wav = await speak(base, {"text": "Hola."}, params={**SPEAK, "container": "wav"})
    assert wav.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and wav.content[8:16] == b"WAVEfmt "
    assert struct.unpack("<H", wav.content[20:22]) == (7,)
    assert decode_speech(wav.content[44:]) == "Hola."

    alaw = await speak(
        base, {"text": "Hola."}, params={**SPEAK, "encoding": "alaw", "container": "none"}
    )
    assert alaw.headers["content-type"] == "audio/alaw;rate=8000"
    assert alaw.content == mulaw_to_alaw(encode_speech("Hola.") + silence(TRAILING_SILENCE_MS))

    wide = await speak(
        base, {"text": "Hola."}, params={**SPEAK, "sample_rate": "16000", "container": "none"}
    )
    assert wide.headers["content-type"] == "audio/mulaw;rate=16000"
    assert len(wide.content) == 2 * len(encode_speech("Hola.") + silence(TRAILING_SILENCE_MS))

    plain = await speak(
        base,
        content=b"Buenas tardes.",
        headers={"Authorization": f"Token {KEY}", "Content-Type": "text/plain"},
    )
    assert decode_speech(plain.content) == "Buenas tardes."


@pytest.mark.parametrize(
    ("kwargs", "status", "err_code", "err_msg"),
    [
        ({"body": {"text": ""}}, 400, None, "Input text contains no characters."),
        ({"body": {"text": "a" * 2001}}, 413, None, None),
        (
            {
                "content": b"{not json",
                "headers": {"Authorization": f"Token {KEY}", "Content-Type": "application/json"},
            },
            400,
            "PAYLOAD_ERROR",
            None,
        ),
        (
            {
                "content": b"<t/>",
                "headers": {"Authorization": f"Token {KEY}", "Content-Type": "application/xml"},
            },
            415,
            None,
            None,
        ),
        (
            {"body": {"text": "x"}, "headers": {"Authorization": "Token nope"}},
            401,
            "INVALID_AUTH",
            "Invalid credentials.",
        ),
        (
            {"body": {"text": "x"}, "params": {**SPEAK, "model": "aura-2-nadie-es"}},
            400,
            None,
            "Bad Request: No such model/version combination found.",
        ),
        (
            {"body": {"text": "x"}, "params": {**SPEAK, "encoding": "linear16"}},
            400,
            "INVALID_QUERY_PARAMETER",
            None,
        ),
        (
            {"body": {"text": "x"}, "params": {**SPEAK, "sample_rate": "24000"}},
            400,
            "INVALID_QUERY_PARAMETER",
            None,
        ),
    ],
    ids=["empty", "too-long", "bad-json", "media-type", "auth", "voice", "linear16", "rate"],
)
async def test_tts_rest_errors(
    dg: tuple[DeepgramSim, str],
    kwargs: dict[str, Any],
    status: int,
    err_code: str | None,
    err_msg: str | None,
):
    _, base = dg
    options = dict(kwargs)
    response = await speak(base, options.pop("body", None), **options)
    assert response.status_code == status
    body = response.json()
    assert body["request_id"] == response.headers["dg-request-id"]
    assert body["err_code"] and body["err_msg"]
    assert err_code is None or body["err_code"] == err_code
    assert err_msg is None or body["err_msg"] == err_msg


# --- TTS WebSocket ---------------------------------------------------------------------------


async def next_json(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            message = await ws.get_message()
            if isinstance(message, str):
                return json.loads(message)


async def test_tts_socket_speak_flush_clear_close(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    async with open_websocket_url(ws_url(base, "/v1/speak", **SPEAK), extra_headers=AUTH) as ws:
        metadata = await next_json(ws)
        assert metadata["type"] == "Metadata" and metadata["model_name"] == "aura-2-estrella-es"
        assert {"request_id", "model_version", "model_uuid"} <= set(metadata)

        await ws.send_message(json.dumps({"type": "Speak", "text": "Hola."}))
        await ws.send_message(json.dumps({"type": "Speak", "text": " ¿Qué tal?"}))
        await ws.send_message(json.dumps({"type": "Flush"}))
        audio = b""
        with trio.fail_after(5):
            while isinstance(message := await ws.get_message(), bytes):
                audio += message
        assert json.loads(message) == {"type": "Flushed", "sequence_id": 0}
        assert decode_speech(audio) == "Hola. ¿Qué tal?"

        sim.tts_speed = 1.0  # real time: a long text is still playing when Clear arrives
        await ws.send_message(json.dumps({"type": "Speak", "text": "Texto largo. " * 20}))
        await ws.send_message(json.dumps({"type": "Flush"}))
        assert isinstance(await ws.get_message(), bytes)
        await ws.send_message(json.dumps({"type": "Clear"}))
        with trio.fail_after(2):
            while isinstance(message := await ws.get_message(), bytes):
                pass
        assert json.loads(message) == {"type": "Cleared", "sequence_id": 0}

        sim.tts_speed = math.inf
        await ws.send_message(json.dumps({"type": "Speak", "text": "Sí."}))
        await ws.send_message(json.dumps({"type": "Flush"}))
        audio = b""
        with trio.fail_after(5):
            while isinstance(message := await ws.get_message(), bytes):
                audio += message
        assert decode_speech(audio) == "Sí."  # nothing of the cleared text leaked
        assert json.loads(message) == {"type": "Flushed", "sequence_id": 2}

        await ws.send_message(json.dumps({"type": "Close"}))
        _, closed = await drain(ws)
    assert closed.code == 1000
    assert sim.tts_sockets == 1


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        (b"\x00\x01", 1003, "MESSAGE-0000"),
        (json.dumps({"type": "Speak", "text": "a" * 2001}), 1009, "BIG-0001"),
        ("not json", 1008, "DATA-0000"),
    ],
)
async def test_tts_socket_error_closes(
    dg: tuple[DeepgramSim, str], message: str | bytes, code: int, reason: str
):
    _, base = dg
    async with open_websocket_url(ws_url(base, "/v1/speak", **SPEAK), extra_headers=AUTH) as ws:
        await next_json(ws)
        await ws.send_message(message)
        _, closed = await drain(ws)
    assert (closed.code, closed.reason) == (code, reason)


async def test_tts_socket_refuses_too_many_flushes(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    sim.tts_flush_limit = 3
    async with open_websocket_url(ws_url(base, "/v1/speak", **SPEAK), extra_headers=AUTH) as ws:
        await next_json(ws)
        for _ in range(4):
            await ws.send_message(json.dumps({"type": "Flush"}))
        replies = [await next_json(ws) for _ in range(4)]
    assert [r["type"] for r in replies].count("Flushed") == 3
    (warning,) = [r for r in replies if r["type"] == "Warning"]
    assert warning["description"] and warning["code"]


async def test_tts_socket_handshake_errors(dg: tuple[DeepgramSim, str]):
    _, base = dg
    url = ws_url(base, "/v1/speak", **SPEAK)
    assert (await rejected(url, [(b"Authorization", b"Token x")])).status_code == 401
    bad_voice = ws_url(base, "/v1/speak", **{**SPEAK, "model": "aura-2-nadie-es"})
    assert (await rejected(bad_voice)).status_code == 400


# --- Fault knobs ------------------------------------------------------------------------------


async def test_fault_knobs(dg: tuple[DeepgramSim, str]):
    sim, base = dg
    sim.reject_next_stt = 429
    error = await rejected(listen_url(base))
    assert error.status_code == 429
    assert json.loads(error.body or b"")["err_code"] == "TOO_MANY_REQUESTS"
    assert sim.reject_next_stt is None

    sim.close_stt_after_s = 1.0
    async with open_websocket_url(listen_url(base), extra_headers=AUTH) as ws:
        try:
            await send_frames(ws, encode_speech(PHRASE) * 2)
        except ConnectionClosed:
            pass
        _, closed = await drain(ws)
    assert closed.code == 1011
    assert sim.stt_audio_seconds[-1] == pytest.approx(1.0)
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert sim.stt_connections_active == 0
    assert sim.stt_connections_opened == 1

    sim.tts_fail_next = 503
    assert (await speak(base, {"text": "Hola."})).status_code == 503
    assert (await speak(base, {"text": "Hola."})).status_code == 200
    assert sim.tts_requests == 2
