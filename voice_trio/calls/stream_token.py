"""Stream tokens: proof that a media WebSocket belongs to a call we asked Telnyx to stream.

``streaming_start`` carries the token as ``stream_auth_token``; Telnyx sends it back as the
``x-telnyx-streaming-auth-token`` upgrade header and in the ``connected`` frame
(docs/protocols/telnyx.md). A query string on ``stream_url`` is read only as a fallback (a
stream started before this channel was used): nothing documents that Telnyx keeps one, and
Twilio is documented to drop them. Only a ``start`` whose call id matches a valid, unexpired
token opens any provider connection. The token is
``v1.<issued unix seconds>.<base64url HMAC-SHA256(secret, "v1|<call id>|<issued>")>``:
stateless, so any instance sharing ``SERVER_SECRET`` accepts it (DESIGN.md §4). A token is
good for one stream only: the first socket claims the call's stream in the shared store
(``CallStore.claim_stream``), and that claim outlives the token (``MAX_AGE_SECONDS`` +
``MAX_SKEW_SECONDS`` < ``store.records.EVENT_TTL``), so a replay is always refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs

VERSION = "v1"
# The socket comes seconds after streaming_start, or the call degrades after
# STREAM_CONNECT_TIMEOUT_MS (at most a minute): ten minutes is ample.
MAX_AGE_SECONDS = 600
MAX_SKEW_SECONDS = 60  # instances' clocks may disagree this much


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
    if not token.isascii():  # compare_digest refuses non-ASCII text with a TypeError
        raise StreamTokenError("malformed stream token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        raise StreamTokenError("malformed stream token")
    issued = int(parts[1])
    now = time.time() if now is None else now
    if not -MAX_SKEW_SECONDS <= now - issued <= MAX_AGE_SECONDS:
        raise StreamTokenError("stream token expired")
    if not hmac.compare_digest(parts[2], _mac(secret, call_control_id, issued)):
        raise StreamTokenError("stream token is not for this call")


def token_from_query(query_string: bytes) -> str | None:
    """``token=`` of a query string: the fallback channel (module docstring)."""
    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[0] if values else None


def presented(
    header: str | None, connected: str | None, query_string: bytes
) -> tuple[str | None, str]:
    """The token a media socket presents and the channel it came by: the upgrade header,
    else the ``connected`` frame, else the query string (the fallback); ``(None, "none")``."""
    for token, channel in ((header, "header"), (connected, "connected")):
        if token:
            return token, channel
    token = token_from_query(query_string)
    return (token, "query") if token else (None, "none")
