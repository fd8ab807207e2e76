"""The lean media socket on the wire: Hypercorn's handover (``compat/hypercorn.py``, fix 6)
and ``web.lean_socket.LeanWebSocket``, against standard clients (trio-websocket) and a raw
one that writes and reads exact bytes.

The server here is Hypercorn with the compat fixes and an echo app on the handed-over
connection; tests/test_media_paths.py runs the real media handler on both paths.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import task_names
from hypercorn.config import Config
from hypercorn.trio import serve
from test_rfc6455 import client_frame

from voice_trio import compat
from voice_trio.compat.hypercorn import websocket_handover
from voice_trio.sim._serve import answer_lifespan
from voice_trio.web.lean_socket import LeanWebSocket
from voice_trio.wire.rfc6455 import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

MAX_MESSAGE = 4096
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


class EchoServer:
    """Hypercorn with an app that echoes text on a handed-over connection, and records how
    each socket ended. ``/asgi`` is answered through Hypercorn (the ASGI accept)."""

    def __init__(self) -> None:
        self.ended: list[int | None] = []  # each socket's close_code, as the app saw it
        self.lean = 0
        self.port = 0
        self.stop = trio.Event()
        self.hold_accept = trio.Event()
        self.hold_accept.set()
        self.accepted: list[bool] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] == "http":
            length = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": length})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        handover = websocket_handover(scope)
        if scope["path"] == "/asgi" or handover is None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        await self.hold_accept.wait()
        raw = await handover.accept()
        self.accepted.append(raw is not None)
        if raw is None:
            return
        self.lean += 1
        socket = LeanWebSocket(raw, scope)
        try:
            while (message := await socket.receive()) is not None:
                if message == "close-me":
                    await socket.close(4000, "bye")
                    await socket.drain()
                elif message == "burst":
                    async with trio.open_nursery() as nursery:
                        for task in range(4):
                            nursery.start_soon(self.send_many, socket, task)
                elif isinstance(message, str):
                    await socket.send_text(message)
                else:
                    await socket.send_text(f"binary {message.hex()}")
        finally:
            self.ended.append(socket.close_code)
            raw.release()

    @staticmethod
    async def send_many(socket: LeanWebSocket, task: int) -> None:
        for i in range(50):
            await socket.send_text(f"task {task} frame {i} " + "x" * (i * 40))

    async def start(self, nursery: trio.Nursery, read_timeout: float | None = None) -> None:
        compat.apply()
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.websocket_ping_interval = None
        config.websocket_max_message_size = MAX_MESSAGE
        config.read_timeout = read_timeout  # type: ignore[assignment]
        binds = await nursery.start(
            partial(serve, self.app, config, shutdown_trigger=self.stop.wait)  # type: ignore[arg-type]
        )
        self.port = int(binds[0].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/media"


@pytest.fixture
async def echo(nursery: trio.Nursery) -> EchoServer:
    server = EchoServer()
    await server.start(nursery)
    return server


def upgrade(path: str = "/media", extra: bytes = b"") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n".encode()
        + b"Connection: Upgrade\r\nSec-WebSocket-Key: "
        + KEY
        + b"\r\nSec-WebSocket-Version: 13\r\n"
        + extra
        + b"\r\n"
    )


class RawClient:
    """A client that writes exact bytes and reads the server's frames one by one."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending = b""
        self.head = b""

    @classmethod
    async def connect(cls, port: int, request: bytes | None = None) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(upgrade() if request is None else request)
        with trio.fail_after(5):
            while b"\r\n\r\n" not in client.pending:
                chunk = await client.stream.receive_some(4096)
                assert chunk, client.pending
                client.pending += chunk
        client.head, client.pending = client.pending.split(b"\r\n\r\n", 1)
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self, size: int) -> bool:
        while len(self.pending) < size:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return False
            self.pending += chunk
        return True

    async def frame(self) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload); None at the end of the stream."""
        with trio.fail_after(5):
            if not await self._fill(2):
                assert not self.pending, self.pending
                return None
            first, second = self.pending[0], self.pending[1]
            assert first & 0x80 and not first & 0x70 and not second & 0x80  # FIN, unmasked
            size, at = second & 0x7F, 2
            if size == 126:
                await self._fill(4)
                size, at = struct.unpack("!H", self.pending[2:4])[0], 4
            elif size == 127:
                await self._fill(10)
                size, at = struct.unpack("!Q", self.pending[2:10])[0], 10
            assert await self._fill(at + size)
            payload = self.pending[at : at + size]
            self.pending = self.pending[at + size :]
            return first & 0x0F, payload

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (it sends nothing more)."""
        return await self.frame() is None


async def close_reply(client: RawClient) -> tuple[int, bytes]:
    got = await client.frame()
    assert got is not None and got[0] == OP_CLOSE, got
    return struct.unpack("!H", got[1][:2])[0], got[1][2:]


# --- the handshake -------------------------------------------------------------------------


def headers_of(head: bytes) -> dict[bytes, bytes]:
    lines = head.split(b"\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}


async def test_the_101_is_hypercorns_without_extensions(echo: EchoServer) -> None:
    offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    offer += b"Sec-WebSocket-Protocol: telnyx, other\r\n"
    lean = await RawClient.connect(echo.port, upgrade("/media", offer))
    asgi = await RawClient.connect(echo.port, upgrade("/asgi", offer))
    assert lean.head.split(b"\r\n")[0] == b"HTTP/1.1 101 Switching Protocols"
    ours, hypercorns = headers_of(lean.head), headers_of(asgi.head)
    assert ours[b"sec-websocket-accept"] == ACCEPT
    # The same headers Hypercorn sends for an ASGI accept, but no permessage-deflate; and,
    # as there, no subprotocol chosen.
    assert b"sec-websocket-extensions" in hypercorns
    del hypercorns[b"sec-websocket-extensions"]
    assert ours.keys() == hypercorns.keys()
    assert {k: v for k, v in ours.items() if k != b"date"} == {
        k: v for k, v in hypercorns.items() if k != b"date"
    }
    assert echo.lean == 1
    for client in (lean, asgi):
        await client.stream.aclose()


async def test_hypercorn_still_refuses_a_bad_upgrade_itself(echo: EchoServer) -> None:
    request = upgrade().replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
    client = await RawClient.connect(echo.port, request)
    assert client.head.startswith(b"HTTP/1.1 400 ")
    assert echo.lean == 0
    await client.stream.aclose()


async def test_an_upgrade_after_a_request_on_the_same_connection(echo: EchoServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", echo.port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        response = b""
        while not response.endswith(b"\r\n\r\nok"):
            response += await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 200 OK")
    client = RawClient(stream)
    await stream.send_all(upgrade())
    await client._fill(1)
    while b"\r\n\r\n" not in client.pending:
        await client._fill(len(client.pending) + 1)
    client.head, client.pending = client.pending.split(b"\r\n\r\n", 1)
    assert client.head.startswith(b"HTTP/1.1 101 Switching Protocols")
    await client.send(client_frame(OP_TEXT, b"again"))
    assert await client.frame() == (OP_TEXT, b"again")
    await stream.aclose()


async def test_a_client_gone_before_the_accept_gets_nothing(echo: EchoServer) -> None:
    echo.hold_accept = trio.Event()
    stream = await trio.open_tcp_stream("127.0.0.1", echo.port)
    await stream.send_all(upgrade())
    await trio.sleep(0.1)
    await stream.aclose()
    await trio.sleep(0.1)
    echo.hold_accept.set()
    with trio.fail_after(5):
        while not echo.accepted:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.accepted == [False] and echo.lean == 0


# --- messages ----------------------------------------------------------------------------


async def test_text_and_binary_with_trio_websocket(echo: EchoServer) -> None:
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        for text in ("hola", "ñandú " * 100, "x" * 3000):
            await ws.send_message(text)
            assert await ws.get_message() == text
        await ws.send_message(b"\x00\x01\xff")
        assert await ws.get_message() == "binary 0001ff"


async def test_fragments_with_control_frames_between_them(echo: EchoServer) -> None:
    client = await RawClient.connect(echo.port)
    await client.send(
        client_frame(OP_TEXT, b"frag", fin=False)
        + client_frame(OP_PING, b"ping-1")
        + client_frame(0, "mentos ñ".encode()[:-1], fin=False)
        + client_frame(OP_PONG, b"unasked")  # ignored
        + client_frame(0, "mentos ñ".encode()[-1:])
        + client_frame(OP_BINARY, b"\x01", fin=False)
        + client_frame(0, b"\x02")
    )
    assert await client.frame() == (OP_PONG, b"ping-1")
    assert await client.frame() == (OP_TEXT, "fragmentos ñ".encode())
    assert await client.frame() == (OP_TEXT, b"binary 0102")
    await client.stream.aclose()


async def test_a_ping_gets_a_pong_with_its_payload(echo: EchoServer) -> None:
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        with trio.fail_after(5):
            await ws.ping(b"are you there?")  # returns when the matching pong came
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_PING, b"\x00" * 125))
    assert await client.frame() == (OP_PONG, b"\x00" * 125)
    await client.stream.aclose()


async def test_frames_sent_from_several_tasks_arrive_whole(echo: EchoServer) -> None:
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        await ws.send_message("burst")
        got = [await ws.get_message() for _ in range(200)]
    for task in range(4):
        mine = [m for m in got if m.startswith(f"task {task} ")]
        assert mine == [f"task {task} frame {i} " + "x" * (i * 40) for i in range(50)]


# --- closing ------------------------------------------------------------------------------


async def test_the_client_closes_with_a_code_and_a_reason(echo: EchoServer) -> None:
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_CLOSE, struct.pack("!H", 4001) + "colgó".encode()))
    assert await close_reply(client) == (4001, b"")  # the code echoed
    assert await client.closed_by_server()  # and the server closes the TCP connection first
    await client.stream.aclose()
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        await ws.aclose(1001, "going away")
    assert ws.closed is not None and ws.closed.code == 1001
    with trio.fail_after(5):
        while len(echo.ended) < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.ended == [4001, 1001]


async def test_a_close_without_a_code_is_answered_without_one(echo: EchoServer) -> None:
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_CLOSE, b""))
    assert await client.frame() == (OP_CLOSE, b"")
    assert await client.closed_by_server()
    await client.stream.aclose()
    with trio.fail_after(5):
        while not echo.ended:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.ended == [1005]


async def test_the_server_closes_with_a_code_and_a_reason(echo: EchoServer) -> None:
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        await ws.send_message("close-me")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(5):
                await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.reason) == (4000, "bye")
    with trio.fail_after(5):
        while not echo.ended:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.ended == [4000]  # trio-websocket echoes the code; the drain read it


async def test_after_its_close_the_server_drains_until_the_clients_close(
    echo: EchoServer,
) -> None:
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_TEXT, b"close-me"))
    assert await close_reply(client) == (4000, b"bye")
    await client.send(client_frame(OP_TEXT, b"still talking") + client_frame(OP_PING, b"p"))
    await trio.sleep(0.1)
    assert not echo.ended  # still draining; nothing answered after the close (no pong)
    await client.send(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    assert await client.closed_by_server()
    await client.stream.aclose()


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (client_frame(OP_TEXT, b"hola", mask=None), 1002),
        (client_frame(OP_TEXT, b"hola", rsv=4), 1002),
        (client_frame(0x3, b"hola"), 1002),
        (client_frame(0xB, b"hola"), 1002),
        (client_frame(OP_TEXT, b"\xed\xa0\x80"), 1007),  # a UTF-16 surrogate: not UTF-8
        (client_frame(OP_TEXT, b"ok", fin=False) + client_frame(0, b"\xff"), 1007),
        (client_frame(OP_BINARY, b"x" * (MAX_MESSAGE + 1))[:8], 1009),  # the header is enough
        (client_frame(OP_CLOSE, struct.pack("!H", 1006)), 1002),
    ],
)
async def test_a_client_that_breaks_the_protocol_gets_its_code_and_is_closed(
    echo: EchoServer, sent: bytes, code: int
) -> None:
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_TEXT, b"before") + sent)
    assert await client.frame() == (OP_TEXT, b"before")
    assert (await close_reply(client))[0] == code
    assert await client.closed_by_server()
    await client.stream.aclose()
    with trio.fail_after(5):
        while not echo.ended:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.ended == [None]  # the client never closed: the call sees a lost stream


async def test_trio_websocket_sees_1009_for_a_message_too_big(echo: EchoServer) -> None:
    async with trio_websocket.open_websocket_url(echo.url) as ws:
        await ws.send_message("x" * MAX_MESSAGE)
        assert len(await ws.get_message()) == MAX_MESSAGE
        await ws.send_message("x" * (MAX_MESSAGE + 1))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(5):
                await ws.get_message()
    assert closed.value.reason.code == 1009


@pytest.mark.parametrize("cut", [1, 2, 5, 9, 20])
async def test_a_peer_that_vanishes_mid_frame(echo: EchoServer, cut: int) -> None:
    before = len([n for n in task_names() if "TCPServer" in n])
    client = await RawClient.connect(echo.port)
    await client.send(client_frame(OP_TEXT, b"a whole frame"))
    assert await client.frame() == (OP_TEXT, b"a whole frame")
    await client.send(client_frame(OP_TEXT, b"x" * 300)[:cut])
    await client.stream.aclose()
    with trio.fail_after(5):
        while not echo.ended:  # noqa: ASYNC110
            await trio.sleep(0.01)
        while len([n for n in task_names() if "TCPServer" in n]) > before:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert echo.ended == [1006]


# --- the read timeout: one deadline per connection ---------------------------------------


async def test_a_silent_peer_is_closed_after_the_read_timeout(nursery: trio.Nursery) -> None:
    server = EchoServer()
    await server.start(nursery, read_timeout=0.4)
    client = await RawClient.connect(server.port)
    await client.send(client_frame(OP_TEXT, b"one"))
    assert await client.frame() == (OP_TEXT, b"one")
    started = trio.current_time()
    assert await client.closed_by_server()  # no close frame: as Hypercorn does
    assert 0.3 <= trio.current_time() - started < 2
    await client.stream.aclose()
    with trio.fail_after(5):
        while not server.ended:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert server.ended == [1006]


async def test_a_peer_that_keeps_talking_stays_past_the_read_timeout(
    nursery: trio.Nursery,
) -> None:
    server = EchoServer()
    await server.start(nursery, read_timeout=0.4)
    async with trio_websocket.open_websocket_url(server.url) as ws:
        for i in range(8):  # 8 × 0.15 s = three read timeouts
            await ws.send_message(f"frame {i}")
            assert await ws.get_message() == f"frame {i}"
            await trio.sleep(0.15)


async def test_time_spent_away_from_reading_is_not_idleness(nursery: trio.Nursery) -> None:
    """The call may be busy (say, writing its record) between two reads: only the time it
    waits for bytes counts towards the read timeout."""

    async def slow_reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        handover = websocket_handover(scope)
        assert handover is not None
        raw = await handover.accept()
        assert raw is not None
        socket = LeanWebSocket(raw, scope)
        try:
            await trio.sleep(1.0)  # 2.5 read timeouts without reading
            while (message := await socket.receive()) is not None:
                await socket.send_text(message)
        finally:
            raw.release()

    compat.apply()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.read_timeout = 0.4  # type: ignore[assignment]
    config.accesslog = None
    stop = trio.Event()
    binds = await nursery.start(partial(serve, slow_reader, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    async with trio_websocket.open_websocket_url(binds[0].replace("http", "ws") + "/") as ws:
        await ws.send_message("sent at once, read a second later")
        with trio.fail_after(3):
            assert await ws.get_message() == "sent at once, read a second later"
    stop.set()


async def test_many_sockets_leave_no_task_behind(echo: EchoServer) -> None:
    before = task_names()
    for i in range(20):
        async with trio_websocket.open_websocket_url(echo.url) as ws:
            await ws.send_message(f"{i}")
            assert await ws.get_message() == f"{i}"
            if i % 2:
                await ws.aclose(4000 + i)
    with trio.fail_after(5):
        while len(echo.ended) < 20 or task_names() != before:  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert echo.ended.count(1000) == 10


async def test_a_read_gap_gathers_frames_into_one_read(nursery: trio.Nursery) -> None:
    """With ``read_gap`` set, the socket reads at most once per gap: frames sent meanwhile
    are handed out together after it, each saying since when its bytes were arriving; a
    control frame waits for that read too, and with the gap back at 0 reads are at once."""
    seen: list[tuple[str, float | None, float]] = []
    reads: list[float] = []

    async def gathering(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        handover = websocket_handover(scope)
        assert handover is not None
        raw = await handover.accept()
        assert raw is not None
        socket = LeanWebSocket(raw, scope)
        io = socket._io

        class CountedIO:
            async def receive(self, max_bytes: int, *, likely_ready: bool = False) -> bytes:
                data = await io.receive(max_bytes, likely_ready=likely_ready)
                reads.append(trio.current_time())
                return data

            send = io.send
            write_now = io.write_now

        socket._io = CountedIO()  # type: ignore[assignment]
        try:
            while (message := await socket.receive()) is not None:
                assert isinstance(message, str)
                seen.append((message, socket.gathered_since, trio.current_time()))
                socket.read_gap = 0.3 if message == "gather" else socket.read_gap
                if message == "at once":
                    socket.read_gap = 0.0
                await socket.send_text(message)
        finally:
            raw.release()

    compat.apply()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    binds = await nursery.start(partial(serve, gathering, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    port = int(binds[0].rsplit(":", 1)[1])
    client = await RawClient.connect(port)
    await client.send(client_frame(OP_TEXT, b"gather"))
    assert await client.frame() == (OP_TEXT, b"gather")
    first_read = reads[-1]
    for i in range(5):
        await client.send(client_frame(OP_TEXT, f"frame {i}".encode()))
        await trio.sleep(0.02)
    await client.send(client_frame(OP_PING, b"p"))
    await client.send(client_frame(OP_TEXT, b"at once"))
    with trio.fail_after(5):
        replies = [await client.frame() for _ in range(7)]
    assert (OP_PONG, b"p") in replies
    gathered = [s for s in seen if s[0].startswith("frame")] + [seen[-1]]
    assert [s[0] for s in gathered] == [f"frame {i}" for i in range(5)] + ["at once"]
    # One read, 0.3 s after the one before it, brought all six and the ping.
    since = {s[1] for s in gathered}
    assert len(since) == 1 and since.pop() == pytest.approx(first_read, abs=0.01)
    assert min(s[2] for s in gathered) >= first_read + 0.3
    assert len([t for t in reads if t > first_read]) == 1
    # With the gap back at 0, the next frame is read as it comes and says so.
    sent = trio.current_time()
    await client.send(client_frame(OP_TEXT, b"late"))
    assert await client.frame() == (OP_TEXT, b"late")
    assert seen[-1][0] == "late" and seen[-1][1] is None
    assert seen[-1][2] - sent < 0.25
    await client.stream.aclose()
    stop.set()
