"""RFC 6455 framing without extensions: what the lean media socket (server) and the lean
Deepgram client (``providers/websocket.py``) speak.

Pure code over bytes, no socket: ``FrameReader`` turns the bytes a peer sent into whole
messages and control frames (a client's, which must be masked, or with ``masked=False`` a
server's, which must not be), ``frame``/``text_frame``/``close_frame`` build what a server
sends and ``masked_frame`` what a client sends. Nothing is negotiated on the sockets that
use it (no permessage-deflate, no subprotocol), so a reserved bit is always a protocol
error.

Every check is the one wsproto (what Hypercorn uses) makes, in the same order, with the
same close code; tests/test_rfc6455.py holds the two side by side on random and mutated
byte streams. On top of wsproto, a message over ``max_message_size`` fails with 1009 as
soon as a frame header announces it, before its payload is buffered (Hypercorn counts the
bytes as they arrive).

The common frame, a masked text frame of a few hundred bytes in one read, costs one
``del`` on the buffer, one big-integer XOR for the unmasking and one ``decode``; see
docs/benchmarks.md ("A lean media socket").
"""

from __future__ import annotations

from codecs import getincrementaldecoder
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005  # the peer's close frame had no code (never sent)
CLOSE_ABNORMAL: Final = 1006  # the connection ended without a close frame (never sent)
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009

# Codes a peer may send (RFC 6455 §7.4; wsproto's set): the registered ones below 3000 that
# are not reserved for local use, and every code from 3000 to 4999.
_PEER_CODES_BELOW_3000 = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013}
)
_MAX_CONTROL_PAYLOAD = 125


class ProtocolError(Exception):
    """The peer broke RFC 6455: the connection fails with ``code`` (1002, 1007, 1009)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unmask(masked: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """XOR ``masked`` with the 4-byte ``key`` repeated: one big-integer operation, which
    measured faster than wsproto's four strided ``bytes.translate`` (docs/benchmarks.md)."""
    size = len(masked)
    if not size:
        return b""
    words = (size + 3) >> 2
    keys = int.from_bytes(key * words, "little")
    return (int.from_bytes(masked, "little") ^ keys).to_bytes(words << 2, "little")[:size]


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a peer's close frame (1005 and "" for an empty one)."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not (code in _PEER_CODES_BELOW_3000 or 3000 <= code <= 4999):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """A peer's frames in, events out: ``(OP_TEXT, str)`` and ``(OP_BINARY, bytes)`` for
    whole messages (fragments joined), ``(OP_PING | OP_PONG | OP_CLOSE, payload)`` for
    control frames, which may come between the fragments of a message.

    ``next_event`` returns None until the buffer holds the next whole frame, and raises
    ``ProtocolError`` as soon as the bytes so far break the protocol; after a close frame
    it returns None for good (RFC 6455 §5.5.1: nothing follows it). The payload of a close
    frame has been checked; ``close`` holds its code and reason.

    ``masked`` (the default): the frames are a client's, which must be masked (§5.1, what
    a server reads); ``masked=False``: a server's, which must not be (what a client reads).
    Either mistake fails with 1002.
    """

    __slots__ = (
        "_buffer",
        "_chunks",
        "_decoder",
        "_key_size",
        "_mask_bit",
        "_max",
        "_opcode",
        "_size",
        "_texts",
        "close",
    )

    def __init__(self, max_message_size: int, *, masked: bool = True) -> None:
        self._buffer = bytearray()
        self._max = max_message_size
        self._mask_bit = 0x80 if masked else 0
        self._key_size = 4 if masked else 0
        self._opcode = 0  # OP_TEXT or OP_BINARY while a fragmented message is open
        self._texts: list[str] = []  # a fragmented text message so far, decoded
        self._chunks: list[bytes] = []  # a fragmented binary message so far
        self._size = 0
        self._decoder = getincrementaldecoder("utf-8")()
        self.close: tuple[int, str] | None = None

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_event(self) -> tuple[int, str | bytes] | None:
        buf = self._buffer
        while self.close is None:
            have = len(buf)
            if have < 2:
                return None
            first = buf[0]
            second = buf[1]
            opcode = first & 0x0F
            size = second & 0x7F
            at = 2
            if opcode & 0x08:
                if opcode > OP_PONG:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
                if not first & 0x80:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if size > _MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
            elif opcode > OP_BINARY:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            elif size == 126:
                if have < 4:
                    return None
                size = buf[2] << 8 | buf[3]
                if size < 126:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
                at = 4
            elif size == 127:
                if have < 10:
                    return None
                size = int.from_bytes(buf[2:10], "big")
                if size < 0x10000:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
                if size >> 63:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length with its top bit set")
                at = 10
            if first & 0x70:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bit set (nothing negotiated)")
            if second & 0x80 != self._mask_bit:
                if self._mask_bit:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "server frame masked")
            if not opcode & 0x08:
                if opcode == OP_CONTINUATION:
                    if not self._opcode:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation of no message")
                elif self._opcode:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if self._size + size > self._max:
                    raise ProtocolError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
            key_end = at + self._key_size
            end = key_end + size
            if have < end:
                return None
            if key_end == at:
                payload = bytes(buf[at:end])
            else:
                payload = _unmask(buf[key_end:end], buf[at:key_end])
            del buf[:end]
            fin = first & 0x80
            if opcode == OP_TEXT and fin:
                try:
                    return OP_TEXT, payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
            if opcode == OP_BINARY and fin:
                return OP_BINARY, payload
            if opcode & 0x08:
                if opcode == OP_CLOSE:
                    self.close = parse_close(payload)
                return opcode, payload
            self._fragment(opcode, payload, size)
            if fin:
                return self._message()
        return None

    def _fragment(self, opcode: int, payload: bytes, size: int) -> None:
        if opcode != OP_CONTINUATION:
            self._opcode = opcode
            self._size = 0
            self._decoder.reset()
        self._size += size
        if self._opcode == OP_TEXT:
            try:
                self._texts.append(self._decoder.decode(payload))  # fails at the first bad one
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
        else:
            self._chunks.append(payload)

    def _message(self) -> tuple[int, str | bytes]:
        opcode = self._opcode
        self._opcode = self._size = 0
        if opcode == OP_TEXT:
            try:
                self._texts.append(self._decoder.decode(b"", final=True))
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
            text = "".join(self._texts)
            self._texts.clear()
            return OP_TEXT, text
        data = b"".join(self._chunks)
        self._chunks.clear()
        return OP_BINARY, data


def frame(opcode: int, payload: bytes) -> bytes:
    """One whole server frame (FIN, unmasked): a header and ``payload``, in one object so
    that it goes out in one write."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 0x10000:
        return bytes((0x80 | opcode, 126, size >> 8, size & 0xFF)) + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def text_frame(text: str) -> bytes:
    return frame(OP_TEXT, text.encode("utf-8"))


def close_payload(code: int | None, reason: str = "") -> bytes:
    """A close frame's payload: none for ``None`` (the answer to a close without a code),
    else the code and as much of ``reason`` as fits in 123 bytes, cut on a character."""
    if code is None:
        return b""
    said = reason.encode("utf-8")[: _MAX_CONTROL_PAYLOAD - 2]
    said = said.decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + said


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server's close frame (see ``close_payload``)."""
    return frame(OP_CLOSE, close_payload(code, reason))


def masked_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One whole client frame (FIN, masked with the 4-byte ``key``), in one object.

    RFC 6455 §5.3: the key must be fresh for each frame and unpredictable, from a strong
    source of entropy; the caller passes ``os.urandom(4)`` (0.3 µs, a tenth of masking
    100 ms of mu-law audio; docs/benchmarks.md, "A lean Deepgram STT client").
    """
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 0x10000:
        head = bytes((0x80 | opcode, 0x80 | 126, size >> 8, size & 0xFF))
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + key + _unmask(payload, key)  # XOR: masking is unmasking
