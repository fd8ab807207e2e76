"""Stream tokens: proof that a media WebSocket belongs to a call we asked Telnyx to stream.

``streaming_start`` puts ``?token=`` into ``stream_url``; Telnyx connects to that URL and
names the call in its ``start`` frame. Only a ``start`` whose call id matches a valid,
unexpired token opens any provider connection. The token is
``v1.<issued unix seconds>.<base64url HMAC-SHA256(secret, "v1|<call id>|<issued>")>``:
stateless, so any instance sharing ``SERVER_SECRET`` accepts it (DESIGN.md §4).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs

VERSION = "v1"
MAX_AGE_SECONDS = 3600  # the stream starts seconds after streaming_start; an hour is ample


class StreamTokenError(ValueError):
    """The token is missing, malformed, expired or not for this call."""


def _mac(secret: bytes, call_control_id: str, issued: int) -> str:
    digest = hmac.new(secret, f"{VERSION}|{call_control_id}|{issued}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


def issue(secret: bytes, call_control_id: str, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return f"{VERSION}.{issued}.{_mac(secret, call_control_id, issued)}"


def verify(
    secret: bytes, token: str | None, call_control_id: str, now: float | None = None
) -> None:
    if not token:
        raise StreamTokenError("no stream token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        raise StreamTokenError("malformed stream token")
    issued = int(parts[1])
    now = time.time() if now is None else now
    if not -60 <= now - issued <= MAX_AGE_SECONDS:
        raise StreamTokenError("stream token expired")
    if not hmac.compare_digest(parts[2], _mac(secret, call_control_id, issued)):
        raise StreamTokenError("stream token is not for this call")


def with_token(stream_url: str, token: str) -> str:
    separator = "&" if "?" in stream_url else "?"
    return f"{stream_url}{separator}token={token}"


def token_from_query(query_string: bytes) -> str | None:
    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[0] if values else None
