"""``wire.rfc6455``: the framing of the lean media socket and of the lean Deepgram client,
byte for byte (RFC 6455 §5).

Each rule on its own, then the reader against wsproto (what Hypercorn uses, and the
client side of trio-websocket) on random and mutated byte streams split at random points,
in both roles (a server reading a client's masked frames, a client reading a server's
unmasked ones): it must only ever raise its own ``ProtocolError``, never emit what wsproto
would not, and fail with wsproto's close code.
"""

from __future__ import annotations

import os
import struct

import pytest
import wsproto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from voice_trio.wire.rfc6455 import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    ProtocolError,
    close_frame,
    close_payload,
    frame,
    masked_frame,
    parse_close,
    text_frame,
)

UNLIMITED = 2**63


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x1f\x2e\x3d\x4c",
    length_bytes: int | None = None,
) -> bytes:
    """A frame as a client sends it; ``length_bytes`` (0, 2, 8) forces the length's form."""
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 0x10000 else 8
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    flag = 0x80 if mask is not None else 0
    if length_bytes == 0:
        head += bytes([flag | size])
    elif length_bytes == 2:
        head += bytes([flag | 126]) + struct.pack("!H", size)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", size)
    if mask is None:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def events_of(
    data: bytes, max_size: int = UNLIMITED, *, masked: bool = True
) -> list[tuple[int, str | bytes]]:
    reader = FrameReader(max_size, masked=masked)
    reader.feed(data)
    out = []
    while (event := reader.next_event()) is not None:
        out.append(event)
    return out


def error_of(data: bytes, max_size: int = UNLIMITED, *, masked: bool = True) -> int:
    with pytest.raises(ProtocolError) as failed:
        events_of(data, max_size, masked=masked)
    return failed.value.code


# --- what is accepted -----------------------------------------------------------------


def test_a_masked_text_frame_is_its_text() -> None:
    text = '{"event": "media", "media": {"payload": "' + "A" * 300 + '"}} ñ'
    assert events_of(client_frame(OP_TEXT, text.encode())) == [(OP_TEXT, text)]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_every_length_form_carries_its_payload(size: int) -> None:
    payload = os.urandom(size)
    assert events_of(client_frame(OP_BINARY, payload)) == [(OP_BINARY, payload)]


def test_a_frame_in_pieces_as_small_as_a_byte() -> None:
    stream = client_frame(OP_TEXT, b"hola") + client_frame(OP_BINARY, b"\x00\xff" * 100)
    reader = FrameReader(UNLIMITED)
    got = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (event := reader.next_event()) is not None:
            got.append(event)
    assert got == [(OP_TEXT, "hola"), (OP_BINARY, b"\x00\xff" * 100)]


def test_fragments_are_joined_with_control_frames_between_them() -> None:
    text = "una frase en tres partes, ñandú"
    raw = text.encode()
    cut = raw.index("ñ".encode()) + 1  # a character split between two fragments
    stream = (
        client_frame(OP_TEXT, raw[:5], fin=False)
        + client_frame(OP_PING, b"are you there")
        + client_frame(0, raw[5:cut], fin=False)
        + client_frame(OP_PONG, b"")
        + client_frame(0, raw[cut:])
        + client_frame(OP_BINARY, b"ab", fin=False)
        + client_frame(0, b"cd")
    )
    assert events_of(stream) == [
        (OP_PING, b"are you there"),
        (OP_PONG, b""),
        (OP_TEXT, text),
        (OP_BINARY, b"abcd"),
    ]


def test_a_close_frame_is_the_last_event() -> None:
    stream = client_frame(OP_CLOSE, struct.pack("!H", 1001) + "adiós".encode()) + client_frame(
        OP_TEXT, b"after the close"
    )
    reader = FrameReader(UNLIMITED)
    reader.feed(stream)
    assert reader.next_event() == (OP_CLOSE, struct.pack("!H", 1001) + "adiós".encode())
    assert reader.close == (1001, "adiós")
    assert reader.next_event() is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (1005, "")),
        (struct.pack("!H", 1000), (1000, "")),
        (struct.pack("!H", 1013) + b"later", (1013, "later")),
        (struct.pack("!H", 3000), (3000, "")),
        (struct.pack("!H", 4999) + b"x", (4999, "x")),
    ],
)
def test_close_payloads_a_peer_may_send(payload: bytes, expected: tuple[int, str]) -> None:
    assert parse_close(payload) == expected


# --- what fails, and with which code -----------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (client_frame(OP_TEXT, b"hi", mask=None), 1002),  # unmasked
        (client_frame(OP_TEXT, b"hi", rsv=4), 1002),  # RSV1: nothing was negotiated
        (client_frame(OP_TEXT, b"hi", rsv=2), 1002),
        (client_frame(OP_TEXT, b"hi", rsv=1), 1002),
        *[(client_frame(op, b"hi"), 1002) for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
        (client_frame(OP_PING, b"x", fin=False), 1002),  # a fragmented control frame
        (client_frame(OP_PING, b"x" * 126), 1002),  # a control frame over 125 bytes
        (client_frame(0, b"orphan"), 1002),  # a continuation of nothing
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_BINARY, b"x" * 100, length_bytes=2), 1002),  # not its shortest form
        (client_frame(OP_BINARY, b"x" * 200, length_bytes=8), 1002),
        (b"\x82\xff" + b"\x80" + b"\x00" * 7 + b"mask", 1002),  # 64-bit length, top bit set
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (client_frame(OP_TEXT, "ñ".encode()[:1]), 1007),  # a character cut at the end
        (client_frame(OP_CLOSE, b"\x03"), 1002),  # a 1-byte close payload
        (client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xc3"), 1007),  # reason not UTF-8
    ],
)
def test_each_violation_fails_with_its_code(stream: bytes, code: int) -> None:
    assert error_of(stream) == code


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2000, 2999, 5000])
def test_close_codes_a_peer_may_not_send(code: int) -> None:
    assert error_of(client_frame(OP_CLOSE, struct.pack("!H", code))) == 1002


def test_invalid_utf8_fails_at_the_fragment_that_has_it() -> None:
    reader = FrameReader(UNLIMITED)
    reader.feed(client_frame(OP_TEXT, b"ok so far", fin=False))
    assert reader.next_event() is None
    reader.feed(client_frame(0, b"\xc0\xaf", fin=False))  # an overlong "/": never UTF-8
    with pytest.raises(ProtocolError) as failed:
        reader.next_event()
    assert failed.value.code == 1007


def test_a_message_too_big_fails_on_its_header_before_its_payload_arrives() -> None:
    reader = FrameReader(1000)
    reader.feed(client_frame(OP_TEXT, b"x" * 1001)[:8])  # header and mask only
    with pytest.raises(ProtocolError) as failed:
        reader.next_event()
    assert failed.value.code == 1009
    assert events_of(client_frame(OP_TEXT, b"x" * 1000), 1000) == [(OP_TEXT, "x" * 1000)]


def test_fragments_count_towards_the_message_size() -> None:
    stream = client_frame(OP_BINARY, b"x" * 600, fin=False) + client_frame(0, b"y" * 401)
    assert error_of(stream, 1000) == 1009
    big_ping = client_frame(OP_BINARY, b"x" * 600, fin=False) + client_frame(OP_PING, b"p" * 125)
    assert events_of(big_ping + client_frame(0, b"y" * 400), 1000) == [
        (OP_PING, b"p" * 125),
        (OP_BINARY, b"x" * 600 + b"y" * 400),
    ]


# --- what the server sends -----------------------------------------------------------


def wsproto_client() -> wsproto.WSConnection:
    """A client that has completed its handshake, to read what the server sends."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/")))
    next(server.events())
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    next(client.events())
    return client


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_read_back_whole_in_wsproto(size: int) -> None:
    client = wsproto_client()
    text = "ñ" * (size // 2) + "a" * (size % 2)
    data = os.urandom(size)
    client.receive_data(text_frame(text) + frame(OP_BINARY, data))
    events = list(client.events())
    assert [type(e) for e in events] == [TextMessage, BytesMessage]
    assert events[0].data == text and events[1].data == data


def test_a_close_frame_keeps_its_reason_within_125_bytes_cut_on_a_character() -> None:
    wire = close_frame(1008, "ñ" * 100)
    assert len(wire) == 2 + 125 - 1  # 61 two-byte characters fit in 123 bytes, not 61.5
    client = wsproto_client()
    client.receive_data(wire)
    [closed] = list(client.events())
    assert isinstance(closed, CloseConnection)
    assert (closed.code, closed.reason) == (1008, "ñ" * 61)
    assert close_frame(None) == b"\x88\x00"


# --- against wsproto, on random and mutated streams -------------------------------------


def wsproto_outcome(
    data: bytes, *, client: bool = False
) -> tuple[list[tuple[int, object]], int | None]:
    """wsproto's parse of ``data`` (as a server, or as a ``client``): its events (messages
    joined) and the code it failed with, or None if it ran out of bytes (or closed)."""
    protocol = FrameProtocol(client=client, extensions=[])
    protocol.receive_bytes(data)
    events: list[tuple[int, object]] = []
    parts: list[bytes | str] = []
    try:
        for got in protocol.received_frames():
            if got.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION):
                parts.append(got.payload)  # type: ignore[arg-type]
                if got.message_finished:
                    joined = "".join(parts) if got.opcode is Opcode.TEXT else b"".join(parts)  # type: ignore[arg-type]
                    events.append((int(got.opcode), joined))
                    parts = []
            else:
                events.append((int(got.opcode), got.payload))
    except ParseFailed as failed:
        return events, int(failed.code)
    return events, None


def our_outcome(
    chunks: list[bytes], *, masked: bool = True
) -> tuple[list[tuple[int, object]], int | None]:
    reader = FrameReader(UNLIMITED, masked=masked)
    events: list[tuple[int, object]] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (event := reader.next_event()) is not None:
                opcode, payload = event
                events.append((opcode, reader.close if opcode == OP_CLOSE else payload))
    except ProtocolError as failed:
        return events, failed.code
    return events, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def assert_agrees_with_wsproto(data: bytes, cuts: list[int], *, client: bool = False) -> None:
    """As a server (``client=False``: masked frames expected) or as a client."""
    ours, our_error = our_outcome(split(data, cuts), masked=not client)
    whole, whole_error = our_outcome([data], masked=not client)
    assert (ours, our_error) == (whole, whole_error), "the outcome depends on how bytes arrive"
    theirs, their_error = wsproto_outcome(data, client=client)
    # Never an event wsproto would not have given, in the same order.
    assert ours == theirs[: len(ours)]
    if our_error is not None:
        # Failed where wsproto fails, with its code; or earlier in the frame than wsproto,
        # which waits for payload bytes before checking a continuation.
        assert theirs == ours and their_error in (our_error, None)
    else:
        # Out of bytes: so is wsproto, or it has read into a text frame still incomplete
        # (it decodes partial frames) and found it is not UTF-8.
        assert theirs == ours and their_error in (None, 1007)


frame_specs = st.tuples(
    st.sampled_from([OP_TEXT, OP_BINARY, 0, OP_PING, OP_PONG, OP_CLOSE]) | st.integers(0, 15),
    st.booleans() | st.just(True),  # fin
    st.sampled_from([0, 0, 0, 0, 1, 2, 4]),  # rsv
    st.booleans() | st.just(True) | st.just(True),  # masked
    st.binary(max_size=140)
    | st.text(max_size=60).map(str.encode)
    | st.integers(1000, 4999).map(lambda c: struct.pack("!H", c)),
    st.sampled_from([None, None, None, 2, 8]),  # the length's form
)


def build(spec: tuple[int, bool, int, bool, bytes, int | None], mask: bytes) -> bytes:
    opcode, fin, rsv, masked, payload, length_bytes = spec
    if length_bytes is not None and length_bytes < (2 if len(payload) >= 126 else 0):
        length_bytes = None
    return client_frame(
        opcode, payload, fin=fin, rsv=rsv, mask=mask if masked else None, length_bytes=length_bytes
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(frame_specs, max_size=8),
    mask=st.binary(min_size=4, max_size=4),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    client=st.booleans(),
)
def test_frame_sequences_agree_with_wsproto(specs, mask: bytes, cuts: list[int], client) -> None:
    """Mostly masked frames: as a server, mostly valid; as a client, mostly a 1002."""
    assert_agrees_with_wsproto(b"".join(build(s, mask) for s in specs), cuts, client=client)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(frame_specs, max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_server_frame_sequences_agree_with_wsproto_as_a_client(specs, cuts: list[int]) -> None:
    """The same frames unmasked, read by the client: what a server sends, well or badly."""
    data = b"".join(build((*s[:3], False, *s[4:]), b"") for s in specs)
    assert_agrees_with_wsproto(data, cuts, client=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(frame_specs, min_size=1, max_size=6),
    mask=st.binary(min_size=4, max_size=4),
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 1000), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_mutated_streams_agree_with_wsproto(specs, mask: bytes, mutations, cuts) -> None:
    client = not specs[0][3]  # the first frame unmasked: read them as a client
    data = bytearray(
        b"".join(build(s if not client else (*s[:3], False, *s[4:]), mask) for s in specs)
    )
    for kind, where, value in mutations:
        at = where % (len(data) + 1)
        if kind == "insert":
            data[at:at] = bytes([value])
        elif at < len(data):
            if kind == "flip":
                data[at] ^= value or 0x80
            else:
                del data[at]
    assert_agrees_with_wsproto(bytes(data), cuts, client=client)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    client=st.booleans(),
)
def test_random_bytes_agree_with_wsproto(data: bytes, cuts: list[int], client: bool) -> None:
    assert_agrees_with_wsproto(data, cuts, client=client)


# --- the client's side: what wsproto's server sends, and what it reads from us -----------


def wsproto_pair() -> tuple[wsproto.WSConnection, wsproto.WSConnection]:
    """A server and a client past their handshake."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/")))
    next(server.events())
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    next(client.events())
    return server, client


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_masked_frames_are_masked_and_read_back_in_wsproto(size: int) -> None:
    server, _ = wsproto_pair()
    payload = os.urandom(size)
    key = os.urandom(4)
    wire = masked_frame(OP_BINARY, payload, key)
    assert wire[1] & 0x80, "the mask bit is set"
    at = 2 + (0 if size < 126 else 2 if size < 0x10000 else 8)
    assert wire[at : at + 4] == key
    masked = wire[at + 4 :]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(masked)) == payload
    text = "ñ" * (size // 2) + "a" * (size % 2)
    server.receive_data(wire + masked_frame(OP_TEXT, text.encode(), key[::-1]))
    events = list(server.events())
    assert [type(e) for e in events] == [BytesMessage, TextMessage]
    assert events[0].data == payload and events[1].data == text
    # And the server-side reader of this module reads them too.
    assert events_of(wire) == [(OP_BINARY, payload)]


def test_a_client_close_frame_reads_back_in_wsproto() -> None:
    server, _ = wsproto_pair()
    server.receive_data(masked_frame(OP_CLOSE, close_payload(1000, "adiós"), b"\x01\x02\x03\x04"))
    [closed] = list(server.events())
    assert isinstance(closed, CloseConnection) and (closed.code, closed.reason) == (1000, "adiós")
    assert close_payload(None) == b""


def test_the_client_reader_takes_unmasked_frames_and_refuses_masked_ones() -> None:
    unmasked = client_frame(OP_TEXT, b"hola", mask=None) + client_frame(OP_PING, b"p", mask=None)
    assert events_of(unmasked, masked=False) == [(OP_TEXT, "hola"), (OP_PING, b"p")]
    assert error_of(client_frame(OP_TEXT, b"hola"), masked=False) == 1002
    assert error_of(unmasked) == 1002  # and the server's refuses unmasked ones


server_messages = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(max_size=300), st.integers(0, 3)),
        st.tuples(st.just("bytes"), st.binary(max_size=300), st.integers(0, 3)),
        st.tuples(st.just("ping"), st.binary(max_size=125), st.just(0)),
        st.tuples(st.just("pong"), st.binary(max_size=125), st.just(0)),
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=server_messages,
    close=st.none()
    | st.tuples(st.integers(1000, 1003) | st.integers(3000, 4999), st.text(max_size=30)),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
def test_the_client_reader_parses_whatever_a_wsproto_server_sends(messages, close, cuts) -> None:
    """Messages (some in fragments), pings and pongs and a close, as wsproto's server frames
    them: the client's reader gives back each message whole, the control frames in order."""
    server, _ = wsproto_pair()
    wire = b""
    expected: list[tuple[int, object]] = []
    for kind, data, parts in messages:
        if kind in ("ping", "pong"):
            event = Ping(payload=data) if kind == "ping" else wsproto.events.Pong(payload=data)
            wire += server.send(event)
            expected.append((OP_PING if kind == "ping" else OP_PONG, data))
            continue
        cut = [len(data) * i // (parts + 1) for i in range(1, parts + 1)]
        pieces = [data[a:b] for a, b in zip([0, *cut], [*cut, len(data)], strict=True)]
        for i, piece in enumerate(pieces):
            message: Message[object] = (
                TextMessage(data=piece, message_finished=i == len(pieces) - 1)  # type: ignore[arg-type]
                if kind == "text"
                else BytesMessage(data=piece, message_finished=i == len(pieces) - 1)  # type: ignore[arg-type]
            )
            wire += server.send(message)
        expected.append((OP_TEXT if kind == "text" else OP_BINARY, data))
    if close is not None:
        wire += server.send(CloseConnection(code=close[0], reason=close[1]))
        expected.append((OP_CLOSE, (close[0], close[1])))
    ours, error = our_outcome(split(wire, cuts), masked=False)
    assert error is None
    assert ours == expected
