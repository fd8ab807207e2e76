"""Signed webhook delivery for the Telnyx simulator (``shared/docs/protocols/telnyx.md`` §2).

Every event is the v2 envelope ``{"data": {record_type, event_type, id, occurred_at,
payload}, "meta": {attempt, delivered_to}}``, POSTed as compact JSON with the headers
``telnyx-timestamp`` (UNIX seconds) and ``telnyx-signature-ed25519`` (base64 of the Ed25519
signature of ``f"{timestamp}|{raw_body}"``). The body is re-signed for every attempt because
``meta.attempt`` changes.

Delivery is in order per call: each call owns a :class:`CallWebhooks` queue drained by one
task, so ``call.hangup`` can never overtake ``call.answered``. A delivery that gets no 2xx
(or no answer within ``timeout_s``) is retried ``attempts`` times in all, waiting
``backoff_s * attempt`` in between, and then given up so one dead endpoint cannot stall the
call. Only loopback URLs are contacted unless ``allow_remote`` is set.

Faults (:class:`WebhookFaults`, counters of upcoming deliveries, sim-wide):
``duplicate`` delivers the same envelope (same ``data.id``) twice; ``reorder`` holds an event
back and delivers it after the next event of the same call (or after 250 ms); ``stale_timestamp``
and ``bad_signature`` first send an extra copy that is replayed with a timestamp 10 minutes old
or carries a corrupted signature (never retried), then the genuine delivery, so a server that
rejects them still sees the call go on.

Load balancing (``WebhookSender.round_robin``): given several URLs, every delivery attempt
goes to the next of them in turn instead of the call's webhook URL, as a load balancer in
front of several server instances would. A duplicate or a retry then lands on another
instance than the first copy (with two URLs, always).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
REORDER_HOLD_S = 0.25
STALE_BY_S = 600


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` part of a webhook envelope."""
    return {
        "record_type": "event",
        "event_type": event_type,
        "id": str(uuid.uuid4()),
        "occurred_at": utc_now(),
        "payload": payload,
    }


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSigner:
    """The sim's Ed25519 key pair; ``public_key_b64`` is the raw 32-byte key in base64."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()

    def headers(self, body: bytes, *, stale: bool = False, corrupt: bool = False) -> dict[str, str]:
        timestamp = str(int(time.time()) - (STALE_BY_S if stale else 0))
        signature = bytearray(self._key.sign(timestamp.encode() + b"|" + body))
        if corrupt:
            signature[0] ^= 0xFF
        return {
            "content-type": "application/json",
            "telnyx-timestamp": timestamp,
            "telnyx-signature-ed25519": base64.b64encode(bytes(signature)).decode(),
        }


@dataclass
class WebhookFaults:
    """How many upcoming deliveries get each fault (decremented as applied)."""

    duplicate: int = 0
    reorder: int = 0
    stale_timestamp: int = 0
    bad_signature: int = 0

    def take(self, name: str) -> bool:
        left = getattr(self, name)
        if left > 0:
            setattr(self, name, left - 1)
            return True
        return False


@dataclass(frozen=True, slots=True)
class Delivery:
    """One HTTP attempt, as recorded in ``WebhookSender.log``."""

    event_type: str
    event_id: str
    call_control_id: str | None
    url: str
    attempt: int
    status: int | None  # None: no HTTP answer
    error: str | None = None
    fault: str | None = None


@dataclass
class WebhookSender:
    """Sim-wide delivery: signs, POSTs, retries and records every attempt in ``log``."""

    signer: WebhookSigner
    attempts: int = 3
    backoff_s: float = 0.2
    timeout_s: float = 5.0
    allow_remote: bool = False
    faults: WebhookFaults = field(default_factory=WebhookFaults)
    log: deque[Delivery] = field(default_factory=lambda: deque(maxlen=5000))
    client: httpx.AsyncClient | None = None
    dropped: int = 0  # events that found a call's queue full
    round_robin: list[str] = field(default_factory=list)  # see the module docstring
    _next_url: int = 0

    def _route(self, url: str) -> str:
        if not self.round_robin:
            return url
        url = self.round_robin[self._next_url % len(self.round_robin)]
        self._next_url += 1
        return url

    async def deliver(self, url: str, data: dict[str, Any]) -> bool:
        """Deliver one event (with any faults due); True once a 2xx came back."""
        for fault in ("stale_timestamp", "bad_signature"):
            if self.faults.take(fault):
                await self._attempt(url, data, 1, fault=fault)
        copies = 2 if self.faults.take("duplicate") else 1
        ok = False
        for copy in range(copies):
            ok = await self._with_retries(url, data, "duplicate" if copy else None) or ok
        return ok

    async def _with_retries(self, url: str, data: dict[str, Any], fault: str | None) -> bool:
        for attempt in range(1, max(1, self.attempts) + 1):
            if await self._attempt(url, data, attempt, fault=fault):
                return True
            if attempt < self.attempts:
                await trio.sleep(self.backoff_s * attempt)
        return False

    async def _attempt(
        self, url: str, data: dict[str, Any], attempt: int, *, fault: str | None = None
    ) -> bool:
        url = self._route(url)
        body = json.dumps(
            {"data": data, "meta": {"attempt": attempt, "delivered_to": url}},
            separators=(",", ":"),
        ).encode()
        headers = self.signer.headers(
            body, stale=fault == "stale_timestamp", corrupt=fault == "bad_signature"
        )
        status: int | None = None
        error: str | None = None
        if not self.allow_remote and not is_loopback_url(url):
            error = "refused: not a loopback URL (set allow_remote)"
        elif self.client is None:
            error = "the simulator is not serving"
        else:
            try:
                response = await self.client.post(
                    url, content=body, headers=headers, timeout=self.timeout_s
                )
                status = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
        self.log.append(
            Delivery(
                data["event_type"],
                data["id"],
                data["payload"].get("call_control_id"),
                url,
                attempt,
                status,
                error,
                fault,
            )
        )
        if error:
            log.debug("webhook %s to %s failed: %s", data["event_type"], url, error)
        return status is not None and 200 <= status < 300


class CallWebhooks:
    """One call's webhooks: ``emit`` queues, ``run`` delivers them in order until ``close``."""

    def __init__(self, sender: WebhookSender, size: int = QUEUE_SIZE) -> None:
        self._sender = sender
        self._send, self._receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](size)

    def emit(self, url: str | None, data: dict[str, Any]) -> None:
        if url is None:
            return
        try:
            self._send.send_nowait((url, data))
        except trio.WouldBlock:
            # A call emits a handful of events a second; a full queue means the endpoint is
            # hopeless, so the newest event is dropped (and counted) rather than blocking.
            self._sender.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the call is over, or the simulator is shutting down

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Deliver until closed and drained."""
        held: tuple[str, dict[str, Any]] | None = None
        async with self._receive:
            while True:
                if held is None:
                    try:
                        item = await self._receive.receive()
                    except trio.EndOfChannel:
                        return
                    if self._sender.faults.take("reorder"):
                        held = item
                        continue
                    await self._sender.deliver(*item)
                    continue
                following: tuple[str, dict[str, Any]] | None = None
                drained = False
                with trio.move_on_after(REORDER_HOLD_S):
                    try:
                        following = await self._receive.receive()
                    except trio.EndOfChannel:
                        drained = True
                if following is not None:
                    await self._sender.deliver(*following)
                await self._sender.deliver(*held)
                held = None
                if drained:
                    return
