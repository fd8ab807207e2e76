"""``wire.fastio.FastIO``: the same bytes and errors as a Trio stream, with fewer system
calls. Real loopback sockets; a memory stream for the fall-back path."""

from __future__ import annotations

import socket as stdlib_socket
import struct

import pytest
import trio
import trio.testing

from voice_trio.wire.fastio import FastIO


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_reads_what_the_peer_wrote_and_the_end_of_the_stream() -> None:
    ours, peer = await socket_pair()
    io = FastIO(ours)
    async with trio.open_nursery() as nursery:

        async def write_later() -> None:
            await trio.sleep(0.05)
            await peer.send_all(b"hello")
            await trio.sleep(0.05)
            await peer.aclose()

        nursery.start_soon(write_later)
        with trio.fail_after(5):
            assert await io.receive(100) == b"hello"  # waited for it
            assert await io.receive(100) == b""  # the peer closed
    await ours.aclose()


async def test_a_likely_ready_read_with_nothing_there_waits() -> None:
    ours, peer = await socket_pair()
    io = FastIO(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_after, peer, 0.05, b"late")
        with trio.fail_after(5):
            assert await io.receive(100, likely_ready=True) == b"late"
    await peer.send_all(b"there")
    await trio.sleep(0.02)
    assert await io.receive(100, likely_ready=True) == b"there"
    await ours.aclose()
    await peer.aclose()


async def _send_after(stream: trio.SocketStream, delay: float, data: bytes) -> None:
    await trio.sleep(delay)
    await stream.send_all(data)


async def test_a_socket_closed_under_a_waiting_reader_wakes_it() -> None:
    ours, peer = await socket_pair()
    io = FastIO(ours)
    async with trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.sleep(0.05)
            await ours.aclose()

        nursery.start_soon(close_soon)
        with trio.fail_after(5), pytest.raises(trio.ClosedResourceError):
            await io.receive(100)
    with pytest.raises(trio.ClosedResourceError):
        await io.receive(100)
    with pytest.raises(trio.ClosedResourceError):
        await io.send(b"x")
    await peer.aclose()


async def test_a_reset_connection_is_a_broken_stream() -> None:
    ours, peer = await socket_pair()
    # Closing with unread bytes and SO_LINGER 0 resets the connection.
    peer.socket.setsockopt(
        stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    await ours.send_all(b"unread")
    await peer.aclose()
    io = FastIO(ours)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still be taken
            await io.send(b"x" * 1000)
    await ours.aclose()


async def test_a_send_larger_than_the_kernel_takes_arrives_whole_and_in_order() -> None:
    ours, peer = await socket_pair()
    io = FastIO(ours)
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than a socket buffer
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def read_all() -> None:
            while len(received) < 2 * len(payload) + 5:
                chunk = await peer.receive_some(65536)
                assert chunk
                received.extend(chunk)

        nursery.start_soon(read_all)
        with trio.fail_after(10):
            await io.send(payload)
            await io.send(b"small")
            await io.send(payload)
    assert bytes(received) == payload + b"small" + payload
    await ours.aclose()
    await peer.aclose()


async def test_another_kind_of_stream_goes_through_its_own_methods() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    io = FastIO(ours)
    await io.send(b"through send_all")
    assert await peer.receive_some(100) == b"through send_all"
    await peer.send_all(b"back")
    assert await io.receive(100) == b"back"


async def test_write_now_takes_what_the_kernel_takes_and_never_waits() -> None:
    ours, peer = await socket_pair()
    io = FastIO(ours)
    assert io.write_now(b"abc") == 3
    assert await peer.receive_some(10) == b"abc"
    big = b"x" * (16 * 1024 * 1024)  # more than any socket buffer: a part is taken
    taken = io.write_now(big)
    assert 0 < taken < len(big)
    assert io.write_now(big) == 0  # the buffer is full: nothing, and no wait
    await ours.aclose()
    await peer.aclose()
    # Not a plain socket: nothing is written now, all goes through send_all.
    memory, _ = trio.testing.memory_stream_pair()
    assert FastIO(memory).write_now(b"abc") == 0
