"""Deepgram STT and TTS clients against small in-test peers written from the protocol doc
(shared/docs/protocols/deepgram.md); the message examples below are the doc's own."""

from __future__ import annotations

import gc
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from conftest import count_fds

from voice_trio.providers.deepgram.stt import (
    SpeechStarted,
    SttClosed,
    SttMetadata,
    SttOptions,
    SttProtocolError,
    SttRejected,
    SttUnavailable,
    Transcript,
    UtteranceEnd,
    connect_stt,
    listen_url,
    open_stt,
    parse_stt_message,
)
from voice_trio.providers.deepgram.tts import DeepgramTTS, TtsError, parse_tts_error, speak_url
from voice_trio.sim._serve import serve_asgi

RESULTS_EXAMPLE = """{"type": "Results", "channel_index": [0, 1], "duration": 3.69, "start": 0.0,
 "is_final": true, "speech_final": true, "from_finalize": false,
 "channel": {"alternatives": [{"transcript": "Testing 123.", "confidence": 0.97866726,
   "words": [
     {"word": "testing", "start": 1.12, "end": 1.62, "confidence": 0.97866726, "punctuated_word": "Testing"},
     {"word": "123", "start": 1.76, "end": 1.8399999, "confidence": 0.73616695, "punctuated_word": "123."}]}]},
 "metadata": {"request_id": "0d2f1ddf-b9aa-40c9-a761-abcd8cf5734f",
   "model_info": {"name": "2-general-nova", "version": "2024-01-18.26916", "arch": "nova-3"},
   "model_uuid": "c0d1a568-ce81-4fea-97e7-bd45cb1fdf3c"}}"""
UTTERANCE_END_EXAMPLE = '{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 2.395}'
SPEECH_STARTED_EXAMPLE = '{"type": "SpeechStarted", "channel": [0, 1], "timestamp": 9.54}'
METADATA_EXAMPLE = """{"type": "Metadata", "transaction_key": "deprecated", "request_id": "8c8ebea9-dbec-45fa-a035-e4632cb05b5f",
 "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
 "created": "2024-08-29T22:37:55.202Z", "duration": 0.0, "channels": 0}"""
NET_0001 = (
    "Deepgram did not receive audio data or a text message within the timeout window. "
    "See https://dpgr.am/net0001"
)
FRAME = b"\xff" * 160  # 20 ms of mu-law silence


# --- pure parsing and URL building ---------------------------------------------------------


def test_parse_results_example() -> None:
    event = parse_stt_message(RESULTS_EXAMPLE)
    assert event == Transcript(
        text="Testing 123.",
        confidence=0.97866726,
        is_final=True,
        speech_final=True,
        from_finalize=False,
        start=0.0,
        duration=3.69,
        words=("Testing", "123."),
    )


def test_parse_other_examples() -> None:
    assert parse_stt_message(UTTERANCE_END_EXAMPLE) == UtteranceEnd(last_word_end=2.395)
    assert parse_stt_message(SPEECH_STARTED_EXAMPLE) == SpeechStarted(timestamp=9.54)
    assert parse_stt_message(METADATA_EXAMPLE) == SttMetadata(
        request_id="8c8ebea9-dbec-45fa-a035-e4632cb05b5f", duration=0.0
    )


def test_parse_interim_without_optional_flags_and_empty_transcript() -> None:
    msg = json.loads(RESULTS_EXAMPLE)
    for key in ("is_final", "speech_final", "from_finalize"):
        del msg[key]
    msg["channel"]["alternatives"][0].update(transcript="", words=[], confidence=0.0)
    event = parse_stt_message(json.dumps(msg))
    assert isinstance(event, Transcript)
    assert (event.text, event.is_final, event.speech_final, event.words) == ("", False, False, ())


def test_parse_ignores_unknown_types() -> None:
    assert parse_stt_message('{"type": "SomethingNew", "x": 1}') is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"channel": {}}', "missing field 'type'"),
        ('{"type": "Results", "start": 0, "duration": 1}', "missing field 'channel'"),
        ('{"type": "UtteranceEnd", "channel": [0, 1]}', "missing field 'last_word_end'"),
        ('{"type": "SpeechStarted", "timestamp": "soon"}', "must be a number"),
        ('{"type": "Metadata", "duration": 1.0}', "missing field 'request_id'"),
    ],
)
def test_parse_malformed_raises_with_reason(text: str, reason: str) -> None:
    with pytest.raises(SttProtocolError, match=reason):
        parse_stt_message(text)


def test_parse_results_missing_start_is_an_error() -> None:
    msg = json.loads(RESULTS_EXAMPLE)
    del msg["start"]
    with pytest.raises(SttProtocolError, match="'start'"):
        parse_stt_message(json.dumps(msg))


def test_listen_url_defaults_match_the_doc_example() -> None:
    url = listen_url("wss://api.deepgram.com", SttOptions())
    assert url == (
        "wss://api.deepgram.com/v1/listen?model=nova-3&language=es&encoding=mulaw"
        "&sample_rate=8000&channels=1&interim_results=true&endpointing=300"
        "&utterance_end_ms=1000&vad_events=true&punctuate=true&smart_format=false"
    )


def test_listen_url_options() -> None:
    opts = SttOptions(
        model="nova-2",
        language="es-419",
        interim_results=False,
        endpointing_ms=None,
        utterance_end_ms=None,
        vad_events=False,
        punctuate=False,
        smart_format=True,
        extra_params=(("no_delay", "true"), ("keyterm", "cita médica")),
    )
    url = listen_url("http://127.0.0.1:8080/", opts)
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("ws", "127.0.0.1:8080", "/v1/listen")
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query["endpointing"] == "false"
    assert "utterance_end_ms" not in query
    assert query["interim_results"] == query["vad_events"] == query["punctuate"] == "false"
    assert query["smart_format"] == query["no_delay"] == "true"
    assert query["keyterm"] == "cita médica"
    with pytest.raises(ValueError, match="interim_results"):
        SttOptions(interim_results=False)
    with pytest.raises(ValueError, match="base URL"):
        listen_url("ftp://example.com", SttOptions())


# --- live STT against a fake /v1/listen ----------------------------------------------------


@dataclass
class FakeListen:
    """A trio-websocket peer: checks the key, records frames, runs a per-test script."""

    script: Callable[[trio_websocket.WebSocketConnection, FakeListen], Awaitable[None]]
    api_key: str = "dg-test-key"
    targets: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    frames: list[str | bytes] = field(default_factory=list)
    frame_arrived: trio.Event = field(default_factory=trio.Event)
    disconnected: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.targets.append(request.path)
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.auth_headers.append(headers.get("authorization", ""))
        if headers.get("authorization") != f"Token {self.api_key}":
            body = (
                b'{"err_code":"INVALID_AUTH","err_msg":"Invalid credentials.","request_id":"r-401"}'
            )
            await request.reject(
                401,
                extra_headers=[
                    (b"dg-error", b"Invalid credentials."),
                    (b"dg-request-id", b"r-401"),
                ],
                body=body,
            )
            return
        ws = await request.accept(extra_headers=[(b"dg-request-id", b"req-fake-1")])
        try:
            await self.script(ws, self)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self.disconnected.set()

    async def next_frame(self, ws: trio_websocket.WebSocketConnection) -> str | bytes:
        frame = await ws.get_message()
        self.frames.append(frame)
        self.frame_arrived.set()
        self.frame_arrived = trio.Event()
        return frame


async def start_listen(nursery: trio.Nursery, fake: FakeListen) -> str:
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, fake.handle, "127.0.0.1", 0, None)
    )
    return f"ws://127.0.0.1:{server.port}"


async def conversation(ws: trio_websocket.WebSocketConnection, fake: FakeListen) -> None:
    """Answer two audio frames with the doc's messages; on CloseStream flush and close 1000."""
    audio = 0
    while True:
        frame = await fake.next_frame(ws)
        if isinstance(frame, bytes):
            audio += 1
            if audio == 2:
                for message in (SPEECH_STARTED_EXAMPLE, RESULTS_EXAMPLE, UTTERANCE_END_EXAMPLE):
                    await ws.send_message(message)
        elif json.loads(frame)["type"] == "CloseStream":
            final = json.loads(RESULTS_EXAMPLE)
            final["channel"]["alternatives"][0]["transcript"] = "Adiós."
            await ws.send_message(json.dumps(final))
            await ws.send_message(METADATA_EXAMPLE)
            await ws.aclose(1000)
            return


async def test_stt_stream_flow_and_close_stream(nursery: trio.Nursery) -> None:
    fake = FakeListen(conversation)
    base = await start_listen(nursery, fake)
    with trio.fail_after(5):
        async with open_stt(base, "dg-test-key", SttOptions(), keepalive_interval=None) as stt:
            assert stt.request_id == "req-fake-1"
            await stt.send_audio(b"")  # never sent: Deepgram closes on empty frames
            await stt.send_audio(FRAME)
            await stt.send_audio(FRAME)
            events = stt.events()
            first = [await anext(events) for _ in range(3)]
            metadata = await stt.close_stream(timeout=2)
            rest = [event async for event in events]
            await stt.send_audio(FRAME)  # ignored after CloseStream

    assert fake.auth_headers == ["Token dg-test-key"]
    target = urllib.parse.urlsplit(fake.targets[0])
    assert target.path == "/v1/listen"
    assert target.query == urllib.parse.urlsplit(listen_url(base, SttOptions())).query
    assert fake.frames == [FRAME, FRAME, '{"type": "CloseStream"}']

    assert first[0] == SpeechStarted(timestamp=9.54)
    assert isinstance(first[1], Transcript) and first[1].text == "Testing 123."
    assert first[2] == UtteranceEnd(last_word_end=2.395)
    assert [type(e) for e in rest] == [Transcript, SttMetadata]
    assert isinstance(rest[0], Transcript) and rest[0].text == "Adiós."
    assert metadata == rest[1]
    assert stt.close_code == 1000 and stt.closed
    assert stt.audio_bytes_sent == 320
    assert stt.audio_seconds == pytest.approx(0.04)


async def test_keepalive_is_a_text_frame_sent_only_when_idle(nursery: trio.Nursery) -> None:
    async def record(ws: trio_websocket.WebSocketConnection, fake: FakeListen) -> None:
        while True:
            await fake.next_frame(ws)

    fake = FakeListen(record)
    base = await start_listen(nursery, fake)
    with trio.fail_after(5):
        async with open_stt(base, "dg-test-key", SttOptions(), keepalive_interval=0.2) as stt:
            # Audio every 20 ms: the connection is never idle, so no KeepAlive.
            for _ in range(10):
                await stt.send_audio(FRAME)
                await trio.sleep(0.02)
            assert stt.keepalives_sent == 0
            while sum(isinstance(f, str) for f in fake.frames) < 2:
                await fake.frame_arrived.wait()
            assert stt.keepalives_sent >= 2
        await fake.disconnected.wait()  # leaving the block closed the socket

    texts = [f for f in fake.frames if isinstance(f, str)]
    assert texts[:2] == ['{"type": "KeepAlive"}'] * 2
    assert fake.frames[:10] == [FRAME] * 10


async def test_connect_stt_adds_no_task_and_is_read_by_its_consumer(
    nursery: trio.Nursery,
) -> None:
    """The bare stream (``SttLink``'s): events are read and parsed in the task iterating
    them, the socket has no task of its own, and nothing goes out unasked."""
    fake = FakeListen(conversation)
    base = await start_listen(nursery, fake)
    me = trio.lowlevel.current_task()
    before = {t for n in me.child_nurseries for t in n.child_tasks}
    with trio.fail_after(5):
        async with connect_stt(base, "dg-test-key", SttOptions()) as stt:
            spawned = [t.name for n in me.child_nurseries for t in n.child_tasks - before]
            assert spawned == []
            await stt.send_audio(FRAME)
            await stt.send_audio(FRAME)
            events = stt.events()
            first = [await anext(events) for _ in range(3)]
            assert await stt.close_stream(timeout=0) is None  # nobody reads: not seen yet
            rest = [event async for event in events]
    assert [type(e) for e in first] == [SpeechStarted, Transcript, UtteranceEnd]
    assert [type(e) for e in rest] == [Transcript, SttMetadata]
    assert stt.closed and stt.close_code == 1000 and stt.metadata == rest[1]
    assert stt.keepalives_sent == 0
    assert fake.frames == [FRAME, FRAME, '{"type": "CloseStream"}']


async def test_finalize_and_malformed_messages_are_dropped(nursery: trio.Nursery) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, fake: FakeListen) -> None:
        await fake.next_frame(ws)  # audio
        assert await fake.next_frame(ws) == '{"type": "Finalize"}'
        await ws.send_message("not json")
        await ws.send_message('{"type": "Results", "start": 0.0}')
        await ws.send_message(b"\x00\x01")
        flushed = json.loads(RESULTS_EXAMPLE)
        flushed.update(speech_final=False, from_finalize=True)
        await ws.send_message(json.dumps(flushed))
        await trio.sleep_forever()

    fake = FakeListen(script)
    base = await start_listen(nursery, fake)
    with trio.fail_after(5):
        async with open_stt(base, "dg-test-key", SttOptions()) as stt:
            await stt.send_audio(FRAME)
            await stt.finalize()
            event = await anext(stt.events())
    assert isinstance(event, Transcript) and event.from_finalize and not event.speech_final
    assert stt.dropped_messages == 3


async def test_abnormal_close_raises_stt_closed_after_pending_events(
    nursery: trio.Nursery,
) -> None:
    async def script(ws: trio_websocket.WebSocketConnection, fake: FakeListen) -> None:
        await fake.next_frame(ws)
        await ws.send_message(RESULTS_EXAMPLE)
        await ws.aclose(1011, NET_0001)

    fake = FakeListen(script)
    base = await start_listen(nursery, fake)
    received: list[Any] = []
    with trio.fail_after(5):
        async with open_stt(base, "dg-test-key", SttOptions()) as stt:
            await stt.send_audio(FRAME)
            with pytest.raises(SttClosed) as info:
                async for event in stt.events():
                    received.append(event)
            with pytest.raises(SttClosed):
                await stt.send_audio(FRAME)
            assert await stt.close_stream(timeout=1) is None
    assert (info.value.code, info.value.reason) == (1011, NET_0001)
    assert [type(e) for e in received] == [Transcript]
    assert stt.close_code == 1011


async def test_rejected_handshake_raises_stt_rejected(nursery: trio.Nursery) -> None:
    fake = FakeListen(conversation)
    base = await start_listen(nursery, fake)
    with trio.fail_after(5), pytest.raises(SttRejected) as info:
        async with open_stt(base, "wrong-key", SttOptions()):
            pytest.fail("connected with a wrong key")
    assert info.value.status == 401
    assert info.value.reason == "Invalid credentials."
    assert fake.auth_headers == ["Token wrong-key"]


async def test_unreachable_server_raises_stt_unavailable() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: the connection is refused
    with trio.fail_after(5), pytest.raises(SttUnavailable):
        async with open_stt(f"ws://127.0.0.1:{port}", "k", SttOptions()):
            pytest.fail("connected to a closed port")


async def test_block_errors_come_out_unwrapped_and_cancel_closes(nursery: trio.Nursery) -> None:
    async def idle(ws: trio_websocket.WebSocketConnection, fake: FakeListen) -> None:
        while True:
            await fake.next_frame(ws)

    fake = FakeListen(idle)
    base = await start_listen(nursery, fake)
    with trio.fail_after(5):
        with pytest.raises(ValueError, match="boom"):
            async with open_stt(base, "dg-test-key", SttOptions(), keepalive_interval=0.05):
                raise ValueError("boom")
        await fake.disconnected.wait()

        second = FakeListen(idle)
        base = await start_listen(nursery, second)
        with trio.move_on_after(0.1) as scope:
            async with open_stt(base, "dg-test-key", SttOptions(), keepalive_interval=0.05):
                await trio.sleep_forever()
        assert scope.cancelled_caught
        await second.disconnected.wait()


# --- Aura TTS against a fake /v1/speak -----------------------------------------------------


@dataclass
class FakeSpeak:
    """A raw ASGI ``POST /v1/speak`` that streams mu-law chunks or answers an error body."""

    chunks: list[bytes] = field(default_factory=lambda: [b"\x01" * 160, b"\x02" * 160, b"\x03"])
    delay: float = 0.01
    status: int = 200
    error_body: bytes = b""
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": dict(urllib.parse.parse_qsl(scope["query_string"].decode())),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "json": json.loads(body),
            }
        )
        if self.status != 200:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": self.error_body})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"audio/mulaw;rate=8000"),
                    (b"dg-request-id", b"tts-req-1"),
                ],
            }
        )
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await trio.sleep(self.delay)
            await send({"type": "http.response.body", "body": b""})
            nursery.cancel_scope.cancel()


def test_speak_url_and_error_parsing() -> None:
    assert speak_url("https://api.deepgram.com/", "aura-2-celeste-es") == (
        "https://api.deepgram.com/v1/speak?model=aura-2-celeste-es&encoding=mulaw"
        "&sample_rate=8000&container=none"
    )
    err = parse_tts_error(
        400,
        b'{"err_code":"Bad Request","err_msg":"Bad Request: No such model/version combination found."}',
    )
    assert (err.status, err.err_code, err.err_msg) == (
        400,
        "Bad Request",
        "Bad Request: No such model/version combination found.",
    )
    assert not err.retryable
    plain = parse_tts_error(503, b"Service Unavailable")
    assert (plain.err_code, plain.err_msg, plain.retryable) == (None, "Service Unavailable", True)


async def test_tts_streams_chunks(nursery: trio.Nursery) -> None:
    fake = FakeSpeak()
    base = await nursery.start(serve_asgi, fake)
    async with httpx.AsyncClient(timeout=5) as http:
        tts = DeepgramTTS(http, base, "dg-test-key")
        with trio.fail_after(5):
            async with tts.synthesize("Hola, ¿en qué puedo ayudarle?") as audio:
                chunks = [chunk async for chunk in audio]
            async with tts.synthesize("  ") as silent:
                assert [chunk async for chunk in silent] == []
    assert b"".join(chunks) == b"".join(fake.chunks)
    assert audio.request_id == "tts-req-1"
    assert tts.characters_sent == len("Hola, ¿en qué puedo ayudarle?")
    assert len(fake.requests) == 1  # blank text sends nothing
    request = fake.requests[0]
    assert (request["method"], request["path"]) == ("POST", "/v1/speak")
    assert request["query"] == {
        "model": "aura-2-celeste-es",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "container": "none",
    }
    assert request["headers"]["authorization"] == "Token dg-test-key"
    assert request["json"] == {"text": "Hola, ¿en qué puedo ayudarle?"}


async def test_tts_error_body_becomes_tts_error(nursery: trio.Nursery) -> None:
    fake = FakeSpeak(
        status=400,
        error_body=b'{"err_code":"INVALID_QUERY_PARAMETER","err_msg":"Unsupported audio format: x",'
        b'"request_id":"tts-err-1"}',
    )
    base = await nursery.start(serve_asgi, fake)
    async with httpx.AsyncClient(timeout=5) as http:
        tts = DeepgramTTS(http, base, "dg-test-key", model="aura-2-estrella-es")
        with trio.fail_after(5), pytest.raises(TtsError) as info:
            async with tts.synthesize("Hola"):
                pytest.fail("entered despite an error status")
    assert (info.value.status, info.value.err_code) == (400, "INVALID_QUERY_PARAMETER")
    assert info.value.err_msg == "Unsupported audio format: x"
    assert info.value.request_id == "tts-err-1"
    assert tts.characters_sent == 0
    assert fake.requests[0]["query"]["model"] == "aura-2-estrella-es"


# Leaving the block closes the response (the peer sees the disconnect); httpx's internal
# async generators, parked between chunks, are then only finalized by the collector.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_tts_cancel_mid_stream_closes_the_response(nursery: trio.Nursery) -> None:
    fake = FakeSpeak(chunks=[b"\x05" * 160] * 200, delay=0.02)
    base = await nursery.start(serve_asgi, fake)
    async with httpx.AsyncClient(timeout=5) as http:
        tts = DeepgramTTS(http, base, "dg-test-key")
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as scope:
                async with tts.synthesize("Una respuesta larga.") as audio:
                    async for _chunk in audio:
                        await trio.sleep_forever()  # parked between chunks, as in barge-in
            assert scope.cancelled_caught
            await fake.disconnected.wait()

            fake.chunks, fake.disconnected = [b"\x06" * 160], trio.Event()
            async with tts.synthesize("Otra.") as audio:
                assert [chunk async for chunk in audio] == [b"\x06" * 160]
    assert audio.bytes_received == 160


async def test_tts_unreachable_is_a_transport_tts_error() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with httpx.AsyncClient(timeout=5) as http:
        tts = DeepgramTTS(http, f"http://127.0.0.1:{port}", "k")
        with trio.fail_after(5), pytest.raises(TtsError) as info:
            async with tts.synthesize("Hola"):
                pytest.fail("connected to a closed port")
    assert info.value.status is None and info.value.retryable


async def test_a_rejected_handshake_closes_its_socket_at_once(nursery: trio.Nursery) -> None:
    """A refused connection's socket is closed before ``SttRejected`` leaves (trio-websocket
    left it to the garbage collector), so a wrong key on every call does not pile up
    descriptors between collections."""
    fake = FakeListen(conversation)
    base = await start_listen(nursery, fake)
    gc.disable()
    try:
        await trio.sleep(0.05)
        before = count_fds()
        for _ in range(10):
            with trio.fail_after(5), pytest.raises(SttRejected):
                async with open_stt(base, "wrong-key", SttOptions()):
                    pytest.fail("connected with a wrong key")
        await trio.sleep(0.2)  # the fake server closes its side
        assert count_fds() == before
    finally:
        gc.enable()
