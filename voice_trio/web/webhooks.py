"""``POST /webhook/telnyx``: verify, parse, de-duplicate, acknowledge, hand over.

De-duplication asks this instance's memory first, then the store (``claim_event``), which
every instance shares: a retry or duplicate landing on another instance is still recognised.
If the store cannot answer, this instance's memory decides alone."""

from __future__ import annotations

import logging
import time
from typing import Any

from quart import jsonify, request
from quart_trio import QuartTrio

from voice_trio.config import Settings
from voice_trio.instance.center import CallCenter
from voice_trio.observability import call_id_var
from voice_trio.providers.telnyx.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookInvalid,
    WebhookRejected,
    WebhookVerifier,
    event_label,
    parse_webhook,
)
from voice_trio.store import StoreError

log = logging.getLogger("voice_trio.web")


def warn_about_signatures(settings: Settings) -> None:
    """Say at start-up, loudly, when webhooks are not verified or not accepted at all."""
    if settings.telnyx_public_key:
        return
    if settings.allow_unsigned_webhooks:
        log.warning(
            "⚠️ ALLOW_UNSIGNED_WEBHOOKS=true and no TELNYX_PUBLIC_KEY: webhooks are accepted"
            " WITHOUT a signature; anyone who can reach /webhook/telnyx can hang up or steer"
            " your calls. Set TELNYX_PUBLIC_KEY."
        )
    else:
        log.error(
            "⚠️ TELNYX_PUBLIC_KEY is not set: every webhook is refused (401), so no call can"
            " be answered. Set it (Telnyx portal: Keys & Credentials → Public Key)."
        )


def register_webhooks(app: QuartTrio, center: CallCenter) -> None:
    @app.before_serving
    async def warn_if_unverified() -> None:
        warn_about_signatures(center.settings)

    key = center.settings.telnyx_public_key
    verifier = WebhookVerifier(key) if key else None
    unsigned_ok = center.settings.allow_unsigned_webhooks
    metrics = center.metrics

    @app.post("/webhook/telnyx")
    async def telnyx_webhook() -> Any:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        if verifier is not None:
            try:
                verifier.verify(
                    body,
                    request.headers.get(SIGNATURE_HEADER),
                    request.headers.get(TIMESTAMP_HEADER),
                    time.time(),
                )
            except WebhookRejected as exc:
                metrics.webhooks.labels("unknown", "rejected").inc()
                log.warning("📨 Webhook rejected: %s", exc)
                return _json(401, error="invalid_signature", reason=str(exc))
        elif not unsigned_ok:
            metrics.webhooks.labels("unknown", "rejected").inc()
            return _json(
                401,
                error="signature_not_configured",
                reason="TELNYX_PUBLIC_KEY is not set, so no webhook can be verified "
                "(ALLOW_UNSIGNED_WEBHOOKS=true accepts them unsigned)",
            )
        if not center.accepting_work:
            # The store and clients are closing: Telnyx retries a 5xx, here or elsewhere.
            metrics.webhooks.labels("unknown", "refused").inc()
            response = _json(503, error="shutting_down", reason="the server is shutting down")
            response.headers["Retry-After"] = "1"
            return response
        try:
            event = parse_webhook(body)
        except WebhookInvalid as exc:
            metrics.webhooks.labels("unknown", "invalid").inc()
            return _json(400, error="invalid_webhook", reason=str(exc))
        token = call_id_var.set(event.call_control_id or "-")
        try:
            if not await first_time(center, event.id):
                metrics.webhooks.labels(event_label(event.event_type), "duplicate").inc()
                log.debug("📨 Duplicate webhook %s ignored", event.id)
                return _json(200, status="duplicate")
            metrics.webhooks.labels(event_label(event.event_type), "accepted").inc()
            log.info("📨 Webhook recibido: %s", event.event_type)
        finally:
            call_id_var.reset(token)
        center.spawn(center.handle_event, event)
        return _json(200, status="received")


async def first_time(center: CallCenter, event_id: str) -> bool:
    """True if no instance has seen ``event_id`` yet (see the module docstring)."""
    if not center.seen_events.first_time(event_id):
        return False
    if center.store is None:
        return True
    try:
        return await center.store.claim_event(event_id)
    except StoreError as exc:
        log.warning("📨 Webhook ids not shared (store unavailable: %s)", exc)
        return True


def _json(code: int, /, **body: Any) -> Any:
    response = jsonify(body)
    response.status_code = code
    return response
