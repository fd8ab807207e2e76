"""The lean WebSocket client under Deepgram STT (``wire/ws_client.py``), on the wire.

A raw TCP peer sees the client's bytes exactly and sends what a server may (and may not):
masking, ping/pong, fragments, the close handshake both ways, refusals, a server that
vanishes or never answers. Then the client against standard servers (trio-websocket's,
TLS included), and the send path under a peer that stops reading.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
import trio_websocket
from conftest import count_fds
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from voice_trio.providers.deepgram.stt import (
    SpeechStarted,
    SttClosed,
    SttOptions,
    SttRejected,
    SttUnavailable,
    Transcript,
    connect_stt,
)
from voice_trio.wire import ws_client
from voice_trio.wire.rfc6455 import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    close_frame,
    frame,
    text_frame,
)
from voice_trio.wire.ws_client import ClientWebSocket, WebSocketClosed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RESULTS = (
    '{"type": "Results", "start": 0.0, "duration": 1.0, "is_final": true, "speech_final": true,'
    ' "channel": {"alternatives": [{"transcript": "Hola.", "confidence": 0.9,'
    ' "words": [{"word": "hola", "punctuated_word": "Hola."}]}]}}'
)
SPEECH_STARTED = '{"type": "SpeechStarted", "timestamp": 0.5}'
CHUNK = b"\x7f" * 1600  # 100 ms of mu-law


class Peer:
    """One accepted connection, from the server's side: its request, its raw bytes."""

    def __init__(self, stream: trio.SocketStream, head: bytes, rest: bytes) -> None:
        self.stream = stream
        self.head = head.decode("latin-1")
        self.wire = bytearray(rest)  # every byte the client sent after the request head
        self.reader = FrameReader(2**63)  # a server's reader: the client's frames are masked
        self.reader.feed(rest)
        self.eof = trio.Event()  # the client's end of the stream was read
        self.done = trio.Event()  # the script is over and the server's socket closed

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    def accept_value(self) -> str:
        key = self.header("sec-websocket-key") or ""
        return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()

    async def accept(self, extra: bytes = b"", accept: str | None = None) -> None:
        await self.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept or self.accept_value()}\r\n".encode()
            + b"dg-request-id: raw-1\r\n\r\n"
            + extra
        )

    async def next_frame(self) -> tuple[int, str | bytes] | None:
        """The client's next frame (None at the end of the stream)."""
        while (event := self.reader.next_event()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof.set()
                return None
            self.wire += data
            self.reader.feed(data)
        return event

    async def until_eof(self) -> list[tuple[int, str | bytes]]:
        frames = []
        while (event := await self.next_frame()) is not None:
            frames.append(event)
        return frames


Script = Callable[[Peer], Awaitable[None]]


async def raw_server(nursery: trio.Nursery, script: Script) -> tuple[str, list[Peer]]:
    """A TCP server running ``script`` on each connection, once its request head is in."""
    peers: list[Peer] = []

    async def handle(stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        peer = Peer(stream, head, rest)
        peers.append(peer)
        try:
            async with stream:
                await script(peer)
        finally:
            peer.done.set()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"ws://127.0.0.1:{port}", peers


def close_code(payload: str | bytes) -> int:
    assert isinstance(payload, bytes)
    return struct.unpack("!H", payload[:2])[0]


# --- the handshake ----------------------------------------------------------------------


async def test_the_upgrade_request_and_the_masked_frames_on_the_wire(nursery: trio.Nursery) -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.until_eof()

    base, peers = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k-1", SttOptions()) as stt:
            assert stt.request_id == "raw-1"
            await stt.send_audio(CHUNK)
            await stt.keep_alive()
            await stt.send_audio(CHUNK[:160])
            await stt.send_audio(bytes(70000))  # a 64-bit length
        await peers[0].done.wait()
    peer = peers[0]
    request_line = peer.head.split("\r\n")[0]
    assert request_line.startswith("GET /v1/listen?model=nova-3&") and request_line.endswith(
        " HTTP/1.1"
    )
    port = base.rsplit(":", 1)[1]
    assert peer.header("host") == f"127.0.0.1:{port}"
    assert peer.header("authorization") == "Token k-1"
    assert peer.header("sec-websocket-version") == "13"
    assert peer.header("upgrade") == "websocket" and peer.header("connection") == "Upgrade"
    assert len(base64.b64decode(peer.header("sec-websocket-key") or "")) == 16
    assert peer.header("sec-websocket-extensions") is None  # no permessage-deflate offered

    # Parse the raw bytes by hand: every frame FIN, masked, a key of its own.
    wire, keys, messages = bytes(peer.wire), [], []
    while wire:
        first, second = wire[0], wire[1]
        assert first & 0x80 and second & 0x80
        size, at = second & 0x7F, 2
        if size == 126:
            size, at = struct.unpack("!H", wire[2:4])[0], 4
        elif size == 127:
            size, at = struct.unpack("!Q", wire[2:10])[0], 10
        key = wire[at : at + 4]
        body = wire[at + 4 : at + 4 + size]
        keys.append(key)
        messages.append((first & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(body))))
        wire = wire[at + 4 + size :]
    assert messages == [
        (OP_BINARY, CHUNK),
        (OP_TEXT, b'{"type": "KeepAlive"}'),
        (OP_BINARY, CHUNK[:160]),
        (OP_BINARY, bytes(70000)),
        (OP_CLOSE, struct.pack("!H", 1000)),  # leaving the block
    ]
    assert len(set(keys)) == len(keys)
    assert stt.audio_bytes_sent == 1600 + 160 + 70000 and stt.keepalives_sent == 1


async def test_frames_that_came_with_the_101_are_the_first_messages(
    nursery: trio.Nursery,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.accept(extra=text_frame(SPEECH_STARTED) + text_frame(RESULTS)[:10])
        await trio.sleep(0.05)
        await peer.stream.send_all(text_frame(RESULTS)[10:])
        await peer.until_eof()

    base, _ = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            events = stt.events()
            assert await anext(events) == SpeechStarted(timestamp=0.5)
            second = await anext(events)
    assert isinstance(second, Transcript) and second.text == "Hola."


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            b"HTTP/1.1 401 Unauthorized\r\ndg-error: Invalid credentials.\r\n"
            b'dg-request-id: r-1\r\nContent-Length: 13\r\n\r\n{"err":"no"}\n',
            "Invalid credentials.",
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 400\r\n\r\n"
            + b"x" * 400,
            "x" * 300,
        ),
        (
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nNo su\r\n11\r\nch model (nova-9)\r\n0\r\n\r\n",
            "No such model (nova-9)",
        ),
    ],
)
async def test_a_refusal_is_stt_rejected_and_its_socket_is_closed(
    nursery: trio.Nursery, answer: bytes, reason: str
) -> None:
    status = int(answer.split(b" ")[1])

    async def script(peer: Peer) -> None:
        await peer.stream.send_all(answer[:40])
        await trio.sleep(0.02)  # the body in a later segment: it is read by its length
        await peer.stream.send_all(answer[40:])
        await peer.until_eof()  # the client closes its socket; the server sees the end

    base, peers = await raw_server(nursery, script)
    before = count_fds()
    with trio.fail_after(5), pytest.raises(SttRejected) as info:
        async with connect_stt(base, "k", SttOptions()):
            pytest.fail("connected despite the refusal")
    assert (info.value.status, info.value.reason) == (status, reason)
    with trio.fail_after(2):
        await peers[0].eof.wait()  # the client closed its socket before raising
        await peers[0].done.wait()
    assert count_fds() == before  # no descriptor left behind, not even for the collector


async def test_a_wrong_accept_or_an_extension_is_stt_unavailable(nursery: trio.Nursery) -> None:
    async def wrong_accept(peer: Peer) -> None:
        await peer.accept(accept=base64.b64encode(b"x" * 20).decode())
        await peer.until_eof()

    async def extension(peer: Peer) -> None:
        await peer.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {peer.accept_value()}\r\n".encode()
            + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        await peer.until_eof()

    for script, match in ((wrong_accept, "Accept"), (extension, "extensions")):
        base, peers = await raw_server(nursery, script)
        with trio.fail_after(5), pytest.raises(SttUnavailable, match=match):
            async with connect_stt(base, "k", SttOptions()):
                pytest.fail("connected despite a bad 101")
        with trio.fail_after(2):
            await peers[0].done.wait()


async def test_a_server_that_never_answers_the_upgrade_is_stt_unavailable(
    nursery: trio.Nursery,
) -> None:
    async def silent(peer: Peer) -> None:
        await peer.until_eof()

    base, peers = await raw_server(nursery, silent)
    with trio.fail_after(2), pytest.raises(SttUnavailable, match=r"within 0\.2 s"):
        async with connect_stt(base, "k", SttOptions(), connect_timeout=0.2):
            pytest.fail("connected to a silent server")
    with trio.fail_after(2):
        await peers[0].done.wait()


# --- reading ----------------------------------------------------------------------------


async def test_a_ping_gets_its_pong_and_fragments_are_joined(nursery: trio.Nursery) -> None:
    pong = trio.Event()
    got: list[tuple[int, str | bytes]] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        raw = RESULTS.encode()
        await peer.stream.send_all(
            bytes((OP_TEXT, 40))
            + raw[:40]  # no FIN: a first fragment
            + frame(OP_PING, b"are you there")
            + bytes((0, 126))
            + struct.pack("!H", len(raw) - 40 - 7)
            + raw[40:-7]
            + frame(0, raw[-7:])
        )
        got.append(await peer.next_frame() or (0, b""))
        pong.set()
        got.extend(await peer.until_eof())

    base, peers = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            event = await anext(stt.events())
            await pong.wait()
    with trio.fail_after(2):
        await peers[0].done.wait()
    assert isinstance(event, Transcript) and event.text == "Hola."
    assert got[0] == (OP_PONG, b"are you there")
    assert got[1][0] == OP_CLOSE


async def test_a_masked_server_frame_fails_the_socket_with_1002(nursery: trio.Nursery) -> None:
    got: list[tuple[int, str | bytes]] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send_all(
            text_frame(SPEECH_STARTED) + bytes((0x81, 0x80 | 2)) + b"\x01\x02\x03\x04hi"
        )
        got.extend(await peer.until_eof())

    base, peers = await raw_server(nursery, script)
    received = []
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            with pytest.raises(SttClosed) as info:
                async for event in stt.events():
                    received.append(event)
            with pytest.raises(SttClosed):
                await stt.send_audio(CHUNK)
        await peers[0].done.wait()
    assert received == [SpeechStarted(timestamp=0.5)]
    assert info.value.code == 1002 and stt.close_code == 1002
    assert [op for op, _ in got] == [OP_CLOSE]  # one close, with the code; then the end
    assert close_code(got[0][1]) == 1002


async def test_a_message_over_the_limit_fails_with_1009(nursery: trio.Nursery) -> None:
    got: list[tuple[int, str | bytes]] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        # Only the header of a 2 MiB message: the client fails before any payload.
        await peer.stream.send_all(bytes((0x81, 127)) + struct.pack("!Q", 2 << 20))
        got.extend(await peer.until_eof())

    base, peers = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            with pytest.raises(SttClosed) as info:
                await anext(stt.events())
        await peers[0].done.wait()
    assert info.value.code == 1009
    assert close_code(got[0][1]) == 1009


async def test_a_server_close_1011_comes_after_earlier_events_and_is_echoed(
    nursery: trio.Nursery,
) -> None:
    got: list[tuple[int, str | bytes]] = []
    net_0001 = "NET-0001"

    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.next_frame()  # some audio
        await peer.stream.send_all(text_frame(RESULTS) + close_frame(1011, net_0001))
        got.extend(await peer.until_eof())  # the echo, then the client closes TCP

    base, peers = await raw_server(nursery, script)
    received = []
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions(), disconnect_timeout=30) as stt:
            await stt.send_audio(CHUNK)
            with pytest.raises(SttClosed) as info:
                async for event in stt.events():
                    received.append(event)
            with trio.fail_after(1):  # closed by the client at once, not at the block's end
                await peers[0].done.wait()
    assert [type(e) for e in received] == [Transcript]
    assert (info.value.code, info.value.reason) == (1011, net_0001)
    assert stt.closed and stt.close_code == 1011
    assert [(op, close_code(p)) for op, p in got] == [(OP_CLOSE, 1011)]


async def test_a_server_that_vanishes_is_1006(nursery: trio.Nursery) -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send_all(text_frame(SPEECH_STARTED) + text_frame(RESULTS)[:20])
        # ... and the connection ends mid-frame, without a close frame.

    base, _ = await raw_server(nursery, script)
    received = []
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            with pytest.raises(SttClosed) as info:
                async for event in stt.events():
                    received.append(event)
            with pytest.raises(SttClosed) as sending:
                await stt.send_audio(CHUNK)
    assert received == [SpeechStarted(timestamp=0.5)]
    assert info.value.code == 1006 and sending.value.code == 1006


async def test_a_normal_close_ends_the_events_and_close_stream_returns(
    nursery: trio.Nursery,
) -> None:
    got: list[tuple[int, str | bytes]] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        assert await peer.next_frame() == (OP_TEXT, '{"type": "CloseStream"}')
        metadata = '{"type": "Metadata", "request_id": "r", "duration": 1.5}'
        await peer.stream.send_all(text_frame(metadata) + close_frame(1000))
        got.extend(await peer.until_eof())

    base, peers = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:
            await stt.close_stream(timeout=0)
            events = [e async for e in stt.events()]
            assert await stt.close_stream(timeout=0) == stt.metadata
        await peers[0].done.wait()
    assert stt.metadata is not None and stt.metadata.duration == 1.5
    assert events == [stt.metadata] and stt.close_code == 1000
    assert [(op, close_code(p)) for op, p in got] == [(OP_CLOSE, 1000)]


# --- leaving the block -------------------------------------------------------------------


async def test_leaving_sends_1000_and_closes_within_the_timeout_though_the_server_is_mute(
    nursery: trio.Nursery,
) -> None:
    got: list[tuple[int, str | bytes]] = []

    async def mute(peer: Peer) -> None:
        await peer.accept()
        got.extend(await peer.until_eof())  # reads, never answers the close

    base, peers = await raw_server(nursery, mute)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions(), disconnect_timeout=0.3):
            leaving = trio.current_time()
        left = trio.current_time()
        await peers[0].done.wait()
    assert 0.3 <= left - leaving < 0.45  # waited for the server's close, no longer
    assert trio.current_time() - left < 0.1  # and had closed the socket when it left
    assert [(op, close_code(p)) for op, p in got] == [(OP_CLOSE, 1000)]

    # The same when the block is cancelled, and its error comes out unchanged otherwise.
    base, peers = await raw_server(nursery, mute)
    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            async with connect_stt(base, "k", SttOptions(), disconnect_timeout=0.3):
                await trio.sleep_forever()
        assert scope.cancelled_caught
        await peers[0].done.wait()  # the close frame and the socket's end, though cancelled
        with pytest.raises(ValueError, match="boom"):
            async with connect_stt(base, "k", SttOptions(), disconnect_timeout=0.3):
                raise ValueError("boom")
        for peer in peers:
            await peer.done.wait()
        assert len(peers) == 2
    assert [(op, close_code(p)) for op, p in got] == [(OP_CLOSE, 1000)] * 3


async def test_closing_waits_for_the_servers_close_and_then_closes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """On a mock clock, over an in-memory stream: the server answers our close 0.5 s late
    (a message first, which is dropped); the client waits for it, then closes at once."""
    client, server = trio.testing.memory_stream_pair()
    ws = ClientWebSocket(client, [])
    reader = FrameReader(2**63)
    answered_at: list[float] = []

    async def slow_server() -> None:
        while (event := reader.next_event()) is None:
            reader.feed(await server.receive_some())
        assert event == (OP_CLOSE, struct.pack("!H", 1000))
        await trio.sleep(0.5)
        await server.send_all(text_frame(RESULTS) + close_frame(1000))
        answered_at.append(trio.current_time())
        assert await server.receive_some() == b""  # the end: the client closed

    nursery.start_soon(slow_server)
    await ws.aclose(2)
    assert trio.current_time() - answered_at[0] < 0.01
    assert ws.close_code == 1000 and ws.closed
    with pytest.raises(WebSocketClosed):
        await ws.send("late")

    # A server that never answers: the close is given up after the timeout.
    client, server = trio.testing.memory_stream_pair()
    ws = ClientWebSocket(client, [])
    started = trio.current_time()
    await ws.aclose(2)
    assert trio.current_time() - started == pytest.approx(2)
    assert ws.close_code is None  # the server never closed
    assert b"\x88" in await server.receive_some()  # our close went out
    assert await server.receive_some() == b""


# --- against standard servers ---------------------------------------------------------------


async def echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except trio_websocket.ConnectionClosed:
        pass


async def round_trip(url: str, **kwargs: object) -> None:
    ws = await ws_client.connect(url, [("X-Test", "1")], connect_timeout=5, **kwargs)  # type: ignore[arg-type]
    try:
        messages: list[str | bytes] = ["hola", "ñandú " * 3000, b"", b"\x00\xff" * 40000, "fin"]
        for message in messages:
            await ws.send(message)
        assert [await ws.receive() for _ in messages] == messages
    finally:
        await ws.aclose(1)
    assert ws.close_code == 1000  # trio-websocket's answer to our close


async def test_round_trip_through_trio_websocket(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None)
    )
    with trio.fail_after(5):
        await round_trip(f"ws://127.0.0.1:{server.port}/echo")


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_round_trip_over_tls_and_the_host_name_is_checked(
    nursery: trio.Nursery, tmp_path: object
) -> None:
    cert, key = self_signed()
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"  # type: ignore[operator]
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, server_context)
    )
    client_context = ssl.create_default_context(cadata=cert.decode())
    with trio.fail_after(5):
        await round_trip(f"wss://localhost:{server.port}/", ssl_context=client_context)
        with pytest.raises(ws_client.HandshakeFailed):  # the certificate names localhost
            await ws_client.connect(
                f"wss://127.0.0.1:{server.port}/", connect_timeout=5, ssl_context=client_context
            )
        with pytest.raises(ws_client.HandshakeFailed):  # and no default CA signed it
            await ws_client.connect(f"wss://localhost:{server.port}/", connect_timeout=5)


# --- sending --------------------------------------------------------------------------------


async def test_sends_from_many_tasks_are_never_interleaved(nursery: trio.Nursery) -> None:
    got: list[tuple[int, str | bytes]] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        got.extend(await peer.until_eof())

    base, peers = await raw_server(nursery, script)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions()) as stt:

            async def sender(n: int) -> None:
                for _ in range(20):
                    await stt.send_audio(bytes([n]) * 100_000)  # bigger than a socket buffer

            async with trio.open_nursery() as senders:
                for n in range(1, 6):
                    senders.start_soon(sender, n)
        await peers[0].done.wait()
    audio = [payload for op, payload in got if op == OP_BINARY]
    assert len(audio) == 100
    assert all(p == p[:1] * 100_000 for p in audio)


async def test_a_send_that_times_out_breaks_the_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that stops reading: the send is given up after its timeout, the socket is
    closed (1006) and every later send raises at once."""
    client, server = trio.testing.lockstep_stream_pair()
    ws = ClientWebSocket(client, [])
    started = trio.current_time()
    with pytest.raises(WebSocketClosed) as info:
        await ws.send(CHUNK)  # nobody reads the other end
    assert trio.current_time() - started == pytest.approx(ws_client.SEND_TIMEOUT_SECONDS)
    assert info.value.code == 1006 and ws.closed
    with pytest.raises(WebSocketClosed):
        await ws.send("more")
    assert await ws.receive() is None
    await ws.aclose(1)
    await server.aclose()


async def test_a_send_to_a_server_that_stops_reading_gives_up_after_its_timeout(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TCP: the socket buffer fills, the write is partial, the rest waits in the
    shielded, bounded ``send_all``; at its deadline the socket is broken (1006) and closed."""
    monkeypatch.setattr(ws_client, "SEND_TIMEOUT_SECONDS", 0.2)

    async def stops_reading(peer: Peer) -> None:
        await peer.accept()
        await trio.sleep(2)  # reads nothing meanwhile
        await peer.stream.receive_some(1)  # ... then sees the client gone
        while await peer.stream.receive_some(1 << 20):
            pass

    base, peers = await raw_server(nursery, stops_reading)
    with trio.fail_after(5):
        async with connect_stt(base, "k", SttOptions(), disconnect_timeout=0.1) as stt:
            with pytest.raises(SttClosed) as info:
                while True:
                    await stt.send_audio(bytes(256 * 1024))
            with pytest.raises(SttClosed):
                await stt.send_audio(CHUNK)
        await peers[0].done.wait()
    assert info.value.code == 1006


async def test_a_send_queued_behind_our_close_is_refused_without_breaking_the_close(
    nursery: trio.Nursery,
) -> None:
    """One send is under way, a second waits for the lock, then the socket is closed: the
    second is refused (the close frame was decided first), and the close handshake still
    completes: the server gets the first frame whole, then our close, and answers it."""
    client, server = trio.testing.lockstep_stream_pair()
    ws = ClientWebSocket(client, [])
    reader = FrameReader(2**63)
    frames: list[tuple[int, str | bytes]] = []
    refused: list[WebSocketClosed] = []

    async def second() -> None:
        try:
            await ws.send("second")
        except WebSocketClosed as exc:
            refused.append(exc)

    async def serve() -> None:
        await trio.sleep(0.05)  # everyone is queued by now
        while not frames or frames[-1][0] != OP_CLOSE:
            reader.feed(await server.receive_some())
            while (event := reader.next_event()) is not None:
                frames.append(event)
        await server.send_all(close_frame(1000))
        while await server.receive_some():
            pass

    nursery.start_soon(ws.send, b"first" * 1000)  # blocks in send_all until the server reads
    await trio.sleep(0.01)
    nursery.start_soon(second)
    await trio.sleep(0.01)
    nursery.start_soon(serve)
    with trio.fail_after(2):
        await ws.aclose(1)
    assert frames == [(OP_BINARY, b"first" * 1000), (OP_CLOSE, struct.pack("!H", 1000))]
    assert [(e.code, e.reason) for e in refused] == [(1000, "closed by this client")]
    assert ws.close_code == 1000  # the server's answer, read: not a broken socket (1006)
