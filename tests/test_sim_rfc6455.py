"""The lean simulators' RFC 6455 framing against wsproto (what Hypercorn and trio-websocket
use): each side must read what the other writes."""

from __future__ import annotations

import os

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from voice_trio.sim import rfc6455
from voice_trio.sim.rfc6455 import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameReader,
    MaskKeys,
    WebSocketError,
    masked_frame,
    server_frame,
)


def test_accept_value_is_the_rfc_example() -> None:
    assert rfc6455.accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_every_frame_gets_a_fresh_random_key() -> None:
    keys = MaskKeys(batch=8)
    drawn = [keys.next() for _ in range(40)]  # across several refills of the pool
    assert all(len(k) == 4 for k in drawn)
    assert len(set(drawn)) >= 39  # random 32-bit keys: a repeat is a 1-in-a-million event
    frame = masked_frame(OP_TEXT, b"same", drawn[0])
    assert frame[1] & 0x80 and frame[2:6] == drawn[0] and frame[6:] != b"same"


@pytest.mark.parametrize("size", [0, 5, 125, 126, 400, 65535, 65536, 70000])
def test_a_server_reads_our_masked_frames(size: int) -> None:
    server = Connection(ConnectionType.SERVER)
    text = ("é" * size)[:size]
    data = os.urandom(size)
    keys = MaskKeys()
    server.receive_data(masked_frame(OP_TEXT, text.encode(), keys.next()))
    server.receive_data(masked_frame(OP_BINARY, data, keys.next()))
    server.receive_data(masked_frame(OP_CLOSE, rfc6455.close_payload(1000), keys.next()))
    events = list(server.events())
    assert isinstance(events[0], TextMessage) and events[0].data == text
    assert isinstance(events[1], BytesMessage) and events[1].data == data
    assert isinstance(events[2], CloseConnection) and events[2].code == 1000


def test_we_read_a_server_and_a_client() -> None:
    server = Connection(ConnectionType.SERVER)
    out = server.send(TextMessage(data="hola")) + server.send(BytesMessage(data=b"\x00" * 300))
    out += server.send(CloseConnection(code=1011, reason="NET-0001"))
    reader = FrameReader()
    messages = reader.feed(out[:3]) + reader.feed(out[3:])  # split anywhere
    assert messages[:2] == [(OP_TEXT, b"hola"), (OP_BINARY, b"\x00" * 300)]
    assert messages[2][0] == OP_CLOSE and rfc6455.close_code(messages[2][1]) == 1011
    client = Connection(ConnectionType.CLIENT)
    masked = client.send(TextMessage(data="x" * 200)) + client.send(BytesMessage(data=b"ab"))
    assert FrameReader(from_client=True).feed(masked) == [(OP_TEXT, b"x" * 200), (OP_BINARY, b"ab")]


def test_fragments_are_joined_and_control_frames_pass_between_them() -> None:
    client = Connection(ConnectionType.CLIENT)
    parts = client.send(TextMessage(data="ab", message_finished=False))
    parts += client.send(Ping(payload=b"p"))
    parts += client.send(TextMessage(data="cd", message_finished=True))
    messages = FrameReader(from_client=True).feed(parts)
    assert [op for op, _ in messages] == [OP_PING, OP_TEXT]
    assert messages[1][1] == b"abcd"


def test_masking_is_checked_both_ways() -> None:
    with pytest.raises(WebSocketError):
        FrameReader().feed(masked_frame(OP_TEXT, b"x", b"abcd"))  # a masked server frame
    with pytest.raises(WebSocketError):
        FrameReader(from_client=True).feed(server_frame(OP_TEXT, b"x"))  # an unmasked client


def test_our_server_frames_and_upgrade_satisfy_a_client() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    request = ws.send(Request(host="h", target="/v1/listen"))
    key = next(
        line.split(b":", 1)[1].strip().decode()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    ws.receive_data(rfc6455.upgrade_response(key, [("dg-request-id", "r-1")]))
    events = list(ws.events())
    assert isinstance(events[0], AcceptConnection)
    assert (b"dg-request-id", b"r-1") in events[0].extra_headers
    ws.receive_data(server_frame(OP_TEXT, b'{"type":"Results"}'))
    ws.receive_data(server_frame(OP_CLOSE, rfc6455.close_payload(1000)))
    events = list(ws.events())
    assert isinstance(events[0], TextMessage) and events[0].data == '{"type":"Results"}'
    assert isinstance(events[1], CloseConnection) and events[1].code == CloseReason.NORMAL_CLOSURE
