"""Who may use the operator console: its session cookie, CSRF tokens and the Origin check.

With ``API_TOKEN`` the operator signs in with it once; the cookie then holds a session
value signed with a key derived from the token (HMAC), never the token itself:
``<nonce>.<issued>.<signed-in flag>.<mac>``. It is checked by recomputing the MAC
(``hmac.compare_digest``) and refused after ``SESSION_SECONDS``; changing ``API_TOKEN``
signs every session out. Nothing is kept on the server, so every worker and instance with
the same token accepts it.

Without ``API_TOKEN`` the console follows ``/api``'s rule (``web.api.api_refusal``): closed,
unless ``API_LOOPBACK_WITHOUT_TOKEN=true`` and the client is on this machine. The session
is then unsigned-in (signed with the stream secret) and serves only to bind CSRF tokens.

Every POST carries the CSRF token of its session (a hidden ``csrf`` field, or the
``X-CSRF-Token`` header): ``HMAC(key, "csrf." + nonce)``, so a page of another site cannot
forge one. A POST whose ``Origin`` names another site is refused as well.

The cookie is ``HttpOnly`` (no script reads it) and ``SameSite=Strict``: a request started
by another site never carries it, not even a top-level link (Lax would let a cross-site GET
through; no GET here changes anything, but nothing needs it either, and an operator who
follows a link from a chat signs in again at worst).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "vt_console"
SESSION_SECONDS = 12 * 3600
KEY_LABEL = b"voice-trio console session v1"


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    nonce: str
    issued: int
    signed_in: bool


class ConsoleKeys:
    """Makes and checks session cookies and CSRF tokens with one key."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, KEY_LABEL, hashlib.sha256).digest()

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def new_session(
        self, *, signed_in: bool, now: float | None = None
    ) -> tuple[ConsoleSession, str]:
        """A fresh session (a new nonce: signing in never keeps the session it came with)
        and its cookie value."""
        session = ConsoleSession(secrets.token_urlsafe(18), int(now or time.time()), signed_in)
        body = f"{session.nonce}.{session.issued}.{int(signed_in)}"
        return session, f"{body}.{self._mac(body)}"

    def read(self, cookie: str | None, now: float | None = None) -> ConsoleSession | None:
        """The session a cookie holds; None if it is missing, forged or too old."""
        if not cookie or len(cookie) > 200:
            return None
        body, _, mac = cookie.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        nonce, issued, flag = parts
        if not issued.isdigit() or flag not in ("0", "1"):
            return None
        age = (now or time.time()) - int(issued)
        if not 0 <= age <= SESSION_SECONDS + 60:
            return None
        return ConsoleSession(nonce, int(issued), flag == "1")

    def csrf(self, session: ConsoleSession) -> str:
        return self._mac("csrf." + session.nonce)

    def csrf_ok(self, session: ConsoleSession, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(session).encode(), str(given).encode())

    def token_ok(self, expected: str, given: str) -> bool:
        """The API token typed into the sign-in form (compared in constant time)."""
        return hmac.compare_digest(expected.encode(), given.strip().encode())


def origin_refusal(origin: str | None, host: str) -> str | None:
    """Why a POST with this ``Origin`` is refused; None if it came from this site (or a
    client that sends no Origin: then the CSRF token alone decides)."""
    if origin is None:
        return None
    if origin == "null":
        return "the request came from an opaque origin"
    if urlsplit(origin).netloc.lower() != host.lower():
        return "the request came from another site"
    return None
