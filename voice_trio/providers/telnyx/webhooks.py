"""Telnyx webhook verification and parsing (protocols/telnyx.md §2).

Verification follows Telnyx's own libraries, in their order: both headers present, the
timestamp within 300 s either way, the signature base64 of 64 bytes, then Ed25519 over
``f"{timestamp}|{raw_body}"`` with the raw bytes exactly as received.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TOLERANCE_SECONDS = 300
SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"

# Call Control events a voice agent's connection receives (protocols/telnyx.md §2). Metrics
# name these and put every other ``event_type`` under ``other``: a label per distinct
# string from the wire would let any sender grow ``/metrics`` without bound.
KNOWN_EVENTS = frozenset(
    {
        "call.initiated",
        "call.answered",
        "call.hangup",
        "call.bridged",
        "call.dtmf.received",
        "call.machine.detection.ended",
        "call.machine.greeting.ended",
        "call.machine.premium.detection.ended",
        "call.machine.premium.greeting.ended",
        "call.playback.started",
        "call.playback.ended",
        "call.speak.started",
        "call.speak.ended",
        "call.transcription",
        "call.transcription.partial",
        "streaming.started",
        "streaming.stopped",
        "streaming.failed",
    }
)


def event_label(event_type: str) -> str:
    """The metric label for an event type: itself if known, else ``other``."""
    return event_type if event_type in KNOWN_EVENTS else "other"


class WebhookRejected(ValueError):
    """The request is not a genuine, fresh Telnyx webhook."""


class WebhookInvalid(ValueError):
    """The body is not a Telnyx v2 event envelope."""


class WebhookVerifier:
    def __init__(self, public_key_b64: str, tolerance: int = TOLERANCE_SECONDS) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        self._tolerance = tolerance

    def verify(self, body: bytes, signature: str | None, timestamp: str | None, now: float) -> None:
        if not signature or not timestamp:
            raise WebhookRejected("missing signature headers")
        try:
            ts = int(timestamp)
        except ValueError:
            raise WebhookRejected("timestamp is not a number") from None
        if abs(now - ts) > self._tolerance:
            raise WebhookRejected("timestamp outside the 300 s window")
        try:
            raw_sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise WebhookRejected("signature is not base64") from None
        if len(raw_sig) != 64:
            raise WebhookRejected("signature is not 64 bytes")
        try:
            self._key.verify(raw_sig, timestamp.encode() + b"|" + body)
        except InvalidSignature:
            raise WebhookRejected("signature does not match") from None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: str
    event_type: str
    occurred_at: str
    payload: dict[str, Any]

    @property
    def call_control_id(self) -> str:
        return str(self.payload.get("call_control_id") or "")

    @property
    def client_state(self) -> str | None:
        value = self.payload.get("client_state")
        return value if isinstance(value, str) else None


def parse_webhook(body: bytes) -> WebhookEvent:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        raise WebhookInvalid("body is not JSON (or is nested too deeply)") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise WebhookInvalid("missing 'data' object (Telnyx v2 envelope)")
    event_type = data.get("event_type")
    event_id = data.get("id")
    payload = data.get("payload")
    if not isinstance(event_type, str) or not event_type:
        raise WebhookInvalid("missing data.event_type")
    if not isinstance(event_id, str) or not event_id:
        raise WebhookInvalid("missing data.id")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise WebhookInvalid("data.payload is not an object")
    return WebhookEvent(event_id, event_type, str(data.get("occurred_at") or ""), payload)


# Answering machine detection (protocols/telnyx.md §2.3): the verdict, then (for the modes
# that listen for it) the end of the machine's greeting.
AMD_DETECTION_EVENTS = frozenset(
    {"call.machine.detection.ended", "call.machine.premium.detection.ended"}
)
AMD_GREETING_EVENTS = frozenset(
    {"call.machine.greeting.ended", "call.machine.premium.greeting.ended"}
)
# Premium results are human_residence | human_business | machine | silence | fax_detected |
# not_sure; standard ones human | machine | not_sure. Only "machine" means a machine.
MACHINE_RESULTS = frozenset({"machine"})


def is_machine(event: WebhookEvent) -> bool:
    """A detection event that found an answering machine."""
    return (
        event.event_type in AMD_DETECTION_EVENTS
        and str(event.payload.get("result") or "") in MACHINE_RESULTS
    )


def dtmf_digit(event: WebhookEvent) -> str:
    """The key of a ``call.dtmf.received`` event ("" if it carries none)."""
    digit = event.payload.get("digit")
    return digit if isinstance(digit, str) else ""
