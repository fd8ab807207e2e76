"""RFC 6455, as little of it as the lean simulators need: the opening handshake of a client
and of a server, frames both ways (a client's masked, a server's not). Pure functions over
bytes, no sockets.

Masking. RFC 6455 §5.3 makes masking a client's duty (a MUST, not a SHOULD): "When preparing
a masked frame, the client MUST pick a fresh masking key from the set of allowed 32-bit
values. The masking key needs to be unpredictable; thus, the masking key MUST be derived
from a strong source of entropy". A fixed key per connection, or the zero key, would still
be *accepted* by any server (it must unmask with whatever key the frame carries and cannot
tell a reused key from a random one), but it is not what the RFC asks of a client, and it
would let a load test pass against a server that mishandles real keys. The cost of doing it
right is small: :class:`MaskKeys` hands out 4-byte keys from a buffer of ``os.urandom``
(one system call per 1 024 frames), and :func:`masked_frame` XORs the payload as one big
integer (about 1.5 µs for a 400-byte media frame here). Servers must not mask (§5.1):
:func:`server_frame`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MAX_MESSAGE = 16 * 1024 * 1024  # bigger server messages are a protocol error here


class WebSocketError(Exception):
    """The peer broke the protocol (or refused the upgrade); ``str()`` says how."""


def new_key() -> str:
    """A ``Sec-WebSocket-Key``: 16 random bytes in base64 (§4.1)."""
    return base64.b64encode(os.urandom(16)).decode()


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(host: str, target: str, key: str, headers: list[tuple[str, str]]) -> bytes:
    """The opening handshake (§4.1) for ``target`` (path and query) on ``host`` (host:port)."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_upgrade_response(buffer: bytes, key: str) -> tuple[int, bytes] | None:
    """``(status, rest)`` once ``buffer`` holds the whole response head (None before):
    ``rest`` is what followed the head (the first frames). Raises :class:`WebSocketError`
    for a 101 without the right ``Sec-WebSocket-Accept``; any other status is returned for
    the caller to report."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > 65536:
            raise WebSocketError("the upgrade response head is too long")
        return None
    head = buffer[:end].decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise WebSocketError(f"not an HTTP response: {head[0][:80]!r}")
    status = int(parts[1])
    if status == 101:
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != accept_value(key):
            raise WebSocketError("the server's Sec-WebSocket-Accept does not match the key")
    return status, buffer[end + 4 :]


class MaskKeys:
    """Fresh, unpredictable 4-byte masking keys (§5.3), drawn from ``os.urandom`` in bulk."""

    def __init__(self, batch: int = 1024) -> None:
        self._size = 4 * batch
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(self._size), 0
        self._at = at + 4
        return self._pool[at : at + 4]


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the key repeated (§5.3); the same call unmasks."""
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def masked_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One whole (FIN) client frame: header, masking key, masked payload (§5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:123]


def close_code(payload: bytes) -> int | None:
    """The status code of a close frame's payload (None: the frame carried none)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One whole (FIN) server frame: header and payload, unmasked (§5.1)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def upgrade_response(key: str, headers: list[tuple[str, str]]) -> bytes:
    """A server's ``101 Switching Protocols`` for the client's ``Sec-WebSocket-Key``."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_value(key)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class FrameReader:
    """Frames out of a byte stream: ``feed`` returns the whole messages (text and binary,
    fragments joined) and control frames, as ``(opcode, payload)``, in order.

    ``from_client``: the frames are a client's, which must be masked and are unmasked here;
    otherwise they are a server's, which must not be (§5.1). Either mistake raises
    :class:`WebSocketError`.
    """

    from_client: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _fragments: list[bytes] = field(default_factory=list)
    _fragment_opcode: int = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        at = 0
        size = len(buffer)
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            masked = bool(second & 0x80)
            if masked != self.from_client:
                who = "client" if self.from_client else "server"
                raise WebSocketError(f"a {who} frame that is {'' if masked else 'not '}masked")
            length = second & 0x7F
            start = at + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            if length > MAX_MESSAGE:
                raise WebSocketError(f"a frame of {length} bytes")
            key = b""
            if masked:
                if size - start < 4:
                    break
                key = bytes(buffer[start : start + 4])
                start += 4
            end = start + length
            if end > size:
                break
            payload = bytes(buffer[start:end])
            if masked:
                payload = mask(payload, key)
            at = end
            self._take(first, payload, out)
        if at:
            del buffer[:at]
        return out

    def _take(self, first: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        fin = first & 0x80
        opcode = first & 0x0F
        if opcode >= 0x8:  # control frames are never fragmented and may come in between
            out.append((opcode, payload))
        elif opcode == OP_CONTINUATION:
            if not self._fragments:
                raise WebSocketError("a continuation frame with nothing to continue")
            self._fragments.append(payload)
            if fin:
                out.append((self._fragment_opcode, b"".join(self._fragments)))
                self._fragments = []
        elif fin:
            out.append((opcode, payload))
        else:
            self._fragment_opcode = opcode
            self._fragments = [payload]
