"""``voice_trio.compat``: the version guard, ``apply()``, and a canary per upstream bug.

A canary runs the library's own code (``shipped``: what it was before any fix) and asserts
that the bug is still there. It fails, saying which fix to remove, on the first installed
release that no longer needs the fix; docs/upstream.md has each bug as a report. Next to
each canary, a test of the fix itself. All of it in virtual time or on a socket pair, apart
from one loopback Hypercorn server for the reason phrase.
"""

from __future__ import annotations

import inspect
import logging
import re
from functools import partial
from typing import Any

import h11
import hypercorn.protocol.h11 as hypercorn_h11
import pytest
import trio
import trio.testing
import trio_websocket
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio import tcp_server as hypercorn_tcp_server
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from trio_websocket import ConnectionRejected, WebSocketConnection

from voice_trio import compat
from voice_trio.compat import _guard
from voice_trio.compat import hypercorn as compat_hypercorn
from voice_trio.compat import trio_websocket as compat_ws
from voice_trio.compat._guard import Fix, check, installed_version, release, shipped
from voice_trio.sim._serve import answer_lifespan


def fixed_upstream(fix: Fix, what: str) -> str:
    version = installed_version(fix.distribution)
    return (
        f"upstream fixed {what} in {fix.distribution} {version}: remove compat fix {fix.name}"
        f" (voice_trio/compat/) and its report in docs/upstream.md"
    )


@pytest.fixture(autouse=True)
def applied() -> None:
    compat.apply()


# --- the guard ----------------------------------------------------------------------------


def test_release_reads_the_numeric_release() -> None:
    assert release("0.18.0") == release("0.18") == (0, 18)
    assert release("0.12.2") == (0, 12, 2)
    assert release("0.19.0rc1") == (0, 19)
    assert release("1.0.post2+local") == (1,)
    assert release("0.18.1") > release("0.18.0") > release("0.17.3")
    assert release("unknown") == ()


def test_every_fix_applies_to_the_installed_libraries() -> None:
    """Fails after an upgrade past a fix's checked releases: run the canaries below, then
    move the fix's ``last`` (bug still there) or remove the fix (canary failed)."""
    for fix in compat.FIXES:
        version = installed_version(fix.distribution)
        assert check(fix), (
            f"{fix.distribution} {version} is outside the releases compat fix {fix.name}"
            f" was checked against ({fix.first} to {fix.last})"
        )


def test_a_fix_outside_its_releases_is_not_installed_and_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    installed: list[str] = []
    old = Fix(
        name="test.too_old",
        distribution="hypercorn",
        first="0.1.0",
        last="0.2.0",
        summary="a bug of long ago",
        install=lambda: installed.append("too_old"),
    )
    monkeypatch.setattr(compat, "FIXES", (old,))
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(_guard, "_verdicts", {})
    with caplog.at_level(logging.WARNING, logger="voice_trio.compat"):
        compat.apply()
        compat.apply()
        assert not _guard.active(old)
    assert installed == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    version = installed_version("hypercorn")
    assert f"test.too_old not applied: hypercorn {version} is outside" in warnings[0]


def test_a_fix_known_to_be_fixed_upstream_is_skipped_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fix = Fix("test.fixed", "hypercorn", "0.1.0", "0.2.0", "gone", fixed_in="0.3.0")
    with caplog.at_level(logging.INFO, logger="voice_trio.compat"):
        assert not check(fix, "0.18.0")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert check(fix, "0.2.0") and check(fix, "0.1") and not check(fix, "0.0.9")


def test_a_missing_distribution_is_not_patched(caplog: pytest.LogCaptureFixture) -> None:
    fix = Fix("test.missing", "no-such-distribution-here", "1.0", "1.0", "nothing")
    with caplog.at_level(logging.WARNING, logger="voice_trio.compat"):
        assert not check(fix)
    assert "not installed" in caplog.text


def test_apply_is_idempotent_and_keeps_what_it_replaced() -> None:
    patched = (TCPServer._close, TCPServer._read_data, TCPServer.run, TaskGroup.spawn_app)
    compat.apply()
    assert (TCPServer._close, TCPServer._read_data, TCPServer.run, TaskGroup.spawn_app) == patched
    assert shipped(TCPServer, "_close") is TCPServer._close.__wrapped__  # type: ignore[attr-defined]
    assert shipped(TaskGroup, "spawn_app") is not TaskGroup.spawn_app
    assert shipped(hypercorn_h11, "h11") is h11
    assert shipped(WebSocketConnection, "_reader_task") is not WebSocketConnection._reader_task


# --- hypercorn.close_race -----------------------------------------------------------------


def bare_tcp_server() -> tuple[TCPServer, trio.socket.SocketType]:
    """A TCPServer with just what ``_close`` uses: its stream and its send lock."""
    ours, peer = trio.socket.socketpair()
    server = TCPServer.__new__(TCPServer)
    server.send_lock = trio.Lock()
    server.stream = trio.SocketStream(ours)  # type: ignore[assignment]
    return server, peer


def is_closed(server: TCPServer) -> bool:
    return server.stream.socket.fileno() == -1  # type: ignore[union-attr]


async def test_canary_hypercorn_close_ignores_the_send_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``_close`` shuts the stream while another task holds ``send_lock`` (as
    ``protocol_send`` does around ``send_all``), and ``protocol_send`` does not catch the
    ``BusyResourceError`` that overlap raises (tests/test_close_storm.py forces it)."""
    server, peer = bare_tcp_server()
    held = trio.Event()

    async def send_for_five_seconds() -> None:
        async with server.send_lock:
            held.set()
            await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_for_five_seconds)
        await held.wait()
        await shipped(TCPServer, "_close")(server)
        closed_under_the_lock = trio.current_time() < 5 and is_closed(server)
    peer.close()
    send_source = inspect.getsource(shipped(TCPServer, "protocol_send"))
    assert closed_under_the_lock and "BusyResourceError" not in send_source, fixed_upstream(
        compat_hypercorn.CLOSE_RACE, "the race of TCPServer._close with protocol_send"
    )


async def test_close_waits_for_the_send_lock_unless_it_holds_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, peer = bare_tcp_server()
    async with trio.open_nursery() as nursery:
        async with server.send_lock:
            nursery.start_soon(TCPServer._close, server)
            await trio.testing.wait_all_tasks_blocked()
            assert not is_closed(server)
    assert is_closed(server)
    server, peer = bare_tcp_server()
    async with server.send_lock:
        await TCPServer._close(server)  # protocol_send's own task: no deadlock
    assert is_closed(server)
    peer.close()


# --- hypercorn.reason_phrases -------------------------------------------------------------


async def accepting_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 1000})


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def status_line_of_an_upgrade(nursery: trio.Nursery) -> bytes:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.websocket_ping_interval = None
    stop = trio.Event()
    binds = await nursery.start(
        partial(serve, accepting_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    host, port = binds[0].removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(UPGRADE)
        reply = b""
        while b"\r\n" not in reply:
            reply += await stream.receive_some(1024)
    await stream.aclose()
    stop.set()
    return reply.split(b"\r\n", 1)[0]


async def test_canary_hypercorn_sends_no_reason_phrase(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hypercorn_h11, "h11", shipped(hypercorn_h11, "h11"))
    status = await status_line_of_an_upgrade(nursery)
    assert status == b"HTTP/1.1 101 ", fixed_upstream(
        compat_hypercorn.REASON_PHRASES, f"the empty reason phrase ({status!r})"
    )


async def test_responses_carry_the_standard_reason_phrase(nursery: trio.Nursery) -> None:
    assert await status_line_of_an_upgrade(nursery) == b"HTTP/1.1 101 Switching Protocols"


# --- hypercorn.finished_app_queue ---------------------------------------------------------


async def puts_after_the_app_returned(spawn_app: Any) -> bool:
    """True if putting messages for an ASGI app that has returned completes."""
    config = Config()
    config.max_app_queue_size = 1
    told: list[Any] = []

    async def returns_at_once(*_: Any) -> None:
        return

    async def send(message: Any) -> None:
        told.append(message)

    async with TaskGroup() as group:
        put = await spawn_app(group, returns_at_once, config, {"type": "websocket"}, send)
        await trio.testing.wait_all_tasks_blocked()
        assert told == [None]  # the app has returned
        with trio.move_on_after(10):
            for _ in range(3):  # one more than the queue holds
                await put({"type": "websocket.receive", "text": "late"})
            return True
    return False


async def test_canary_hypercorn_blocks_on_the_queue_of_a_finished_app(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """tests/test_hypercorn_overload.py shows what that does to a whole connection."""
    assert not await puts_after_the_app_returned(shipped(TaskGroup, "spawn_app")), fixed_upstream(
        compat_hypercorn.FINISHED_APP_QUEUE, "the put that blocks once the app has returned"
    )


async def test_messages_for_a_finished_app_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert await puts_after_the_app_returned(TaskGroup.spawn_app)


# --- hypercorn.read_loop ------------------------------------------------------------------


def test_canary_hypercorn_reads_with_a_fresh_timeout_and_64_kib_each_time() -> None:
    """A cost, not a wrong result, so the canary reads the loop's shape; its behaviour with
    the fix is in tests/test_hypercorn_reads.py."""
    source = inspect.getsource(shipped(TCPServer, "_read_data"))
    fresh_scope_per_read = re.search(r"while True:.*fail_after\(.*receive_some", source, re.S)
    assert fresh_scope_per_read and "MAX_RECV" in source, fixed_upstream(
        compat_hypercorn.READ_LOOP, "the per-read fail_after in TCPServer._read_data"
    )
    assert hypercorn_tcp_server.MAX_RECV == 2**16, fixed_upstream(
        compat_hypercorn.READ_LOOP, f"the 64 KiB reads (MAX_RECV={hypercorn_tcp_server.MAX_RECV})"
    )
    assert compat_hypercorn.READ_CHUNK < hypercorn_tcp_server.MAX_RECV


# --- hypercorn.connection_limits ----------------------------------------------------------


def test_canary_hypercorn_has_no_connection_limit() -> None:
    """Behaviour with the fix: tests/test_hostile_input.py (503 over either limit)."""
    settings = [
        name
        for name in dir(Config)
        if re.search(r"max_conn|connection_limit|concurren(t|cy)_conn|limit_conc", name)
    ]
    assert not settings, fixed_upstream(
        compat_hypercorn.CONNECTION_LIMITS, f"the missing connection limit ({settings})"
    )


# --- trio_websocket.rejected_handshake_socket ---------------------------------------------


async def refuse(stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some(4096)
    await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 7\r\n\r\nbad key")


async def rejected_client_stream() -> trio.SocketStream:
    """The client's stream after its handshake was refused with a 401."""
    ours, theirs = trio.socket.socketpair()
    client, server = trio.SocketStream(ours), trio.SocketStream(theirs)
    with pytest.RaisesGroup(ConnectionRejected):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse, server)
            await trio_websocket.wrap_client_stream(nursery, client, "localhost", "/")
    await server.aclose()
    return client


async def test_canary_trio_websocket_leaves_a_refused_socket_open(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    reader = shipped(WebSocketConnection, "_reader_task")
    monkeypatch.setattr(WebSocketConnection, "_reader_task", reader)
    client = await rejected_client_stream()
    left_open = client.socket.fileno() != -1
    await client.aclose()
    assert left_open, fixed_upstream(
        compat_ws.REJECTED_HANDSHAKE_SOCKET, "the socket left open by ConnectionRejected"
    )


async def test_a_refused_handshake_closes_its_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = await rejected_client_stream()
    assert client.socket.fileno() == -1


# --- trio_websocket.server_close_socket ---------------------------------------------------


async def closed_by_the_server() -> tuple[WebSocketConnection, trio.SocketStream]:
    """A client connection the server closed first, after the client's own aclose()."""
    ours, theirs = trio.socket.socketpair()
    client_stream = trio.SocketStream(ours)
    async with trio.open_nursery() as nursery:

        async def accept_and_close() -> None:
            server_stream = trio.SocketStream(theirs)
            request = await trio_websocket.wrap_server_stream(nursery, server_stream)
            server_ws = await request.accept()
            await server_ws.aclose(1000)

        nursery.start_soon(accept_and_close)
        ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/")
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
        await ws.aclose()
    return ws, client_stream


async def test_canary_trio_websocket_never_closes_the_socket_when_the_server_closed_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, stream = await closed_by_the_server()
    left_open = stream.socket.fileno() != -1
    await stream.aclose()
    assert left_open, fixed_upstream(
        compat_ws.SERVER_CLOSE_SOCKET, "the socket left open after a server's close"
    )


async def test_close_transport_closes_it(autojump_clock: trio.testing.MockClock) -> None:
    ws, stream = await closed_by_the_server()
    await compat_ws.close_transport(ws)
    assert stream.socket.fileno() == -1
    await compat_ws.close_transport(ws)  # twice: harmless


# --- hypercorn.websocket_handover ---------------------------------------------------------


async def scope_and_handover(nursery: trio.Nursery) -> tuple[dict[str, Any], object]:
    """The scope Hypercorn gives a WebSocket app, and what ``websocket_handover`` makes of
    it, for one upgrade answered the ASGI way."""
    seen: list[tuple[dict[str, Any], object]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        seen.append((scope, compat_hypercorn.websocket_handover(scope)))
        await accepting_app(scope, receive, send)

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.websocket_ping_interval = None
    stop = trio.Event()
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    async with trio_websocket.open_websocket_url(binds[0].replace("http", "ws") + "/") as ws:
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    stop.set()
    return seen[0]


async def test_canary_hypercorn_offers_no_way_to_take_a_websocket_connection(
    nursery: trio.Nursery,
) -> None:
    """A missing feature, not a bug: the handover is worth having (docs/benchmarks.md, "A
    lean media socket") for as long as an ASGI app can only have WebSocket messages one by
    one, through Hypercorn's layers. An extension in the scope that gave the app the
    connection (or a server setting for it) would make the fix unnecessary."""
    scope, _ = await scope_and_handover(nursery)
    extensions = set(scope["extensions"])
    settings = [
        name
        for name in dir(Config)
        if re.search(r"raw_(socket|stream|connection)|handover|takeover", name)
    ]
    assert extensions == {"websocket.http.response"} and not settings, fixed_upstream(
        compat_hypercorn.WEBSOCKET_HANDOVER,
        f"a way to take the connection ({extensions}, {settings})",
    )


async def test_a_websocket_upgrade_is_offered_to_the_app(nursery: trio.Nursery) -> None:
    _, handover = await scope_and_handover(nursery)
    assert isinstance(handover, compat_hypercorn.WebSocketHandover)
    # Elsewhere (tests/test_lean_socket.py has the wire): no handover for other scopes.
    assert compat_hypercorn.websocket_handover({"type": "http"}) is None
    assert compat_hypercorn.websocket_handover({"type": "websocket"}) is None  # no connection


async def test_without_the_read_loop_nothing_is_offered(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hypercorn's own loop, as on a release outside the fixes' range: the app carries the
    socket the ASGI way (tests/test_media_paths.py, on the real handler)."""
    monkeypatch.setattr(TCPServer, "_read_data", shipped(TCPServer, "_read_data"))
    _, handover = await scope_and_handover(nursery)
    assert handover is None


def test_the_handover_reaches_only_what_it_was_checked_against() -> None:
    """What of Hypercorn 0.18 the handover relies on (the version guard keeps it to the
    checked release; this says which names a new one must still have)."""
    from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
    from hypercorn.protocol.ws_stream import ASGIWebsocketState, Handshake, WSStream

    assert {"_accept", "app_send", "handle"} <= set(vars(WSStream))
    assert "extensions" in inspect.getsource(Handshake.__init__)
    assert "self.closed" in inspect.getsource(WSStream.app_send)
    assert ASGIWebsocketState.HANDSHAKE and "self.stream" in inspect.getsource(H11Protocol.__init__)
    assert "self.buffer" in inspect.getsource(H11WSConnection.__init__)
    assert {"_close", "_read_data", "protocol_send"} <= set(vars(TCPServer))
