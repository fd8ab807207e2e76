"""``/api/*``: who may call it, and ``/api/call/*`` (place calls). Input is validated here;
dialing is the call center's job.

The API places calls that cost money (DESIGN.md §6). With ``API_TOKEN`` set every ``/api/*``
route but ``/api/health`` wants ``Authorization: Bearer <API_TOKEN>`` (401 otherwise).
Without it, ``/api/*`` is closed to everyone (403), and the server says so at start-up.

Why not "loopback clients only" without a token: a reverse proxy on this machine connects
from 127.0.0.1 on behalf of the whole internet, and nginx's bare ``proxy_pass`` adds no
header that says so (no ``X-Forwarded-For``, HTTP/1.0, ``Host`` of the upstream): such a
request cannot be told from ``curl`` on this machine. So serving loopback without a token is
an operator's explicit choice, ``API_LOOPBACK_WITHOUT_TOKEN=true``, warned about at start-up.
Then the client is found with ``forwarded`` (headers believed from ``FORWARDED_ALLOW_IPS``
only), which holds behind a proxy that names its client — Caddy's ``reverse_proxy`` by
default, nginx with ``X-Forwarded-For`` — but not behind a bare ``proxy_pass``.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import trio
from quart import jsonify, request
from quart_trio import QuartTrio

from voice_trio.config import E164, Settings
from voice_trio.forwarded import HeaderLookup, request_origin
from voice_trio.instance.center import CallCenter, CallRequest
from voice_trio.providers.telnyx.control import TelnyxError

log = logging.getLogger("voice_trio.web")


MAX_BATCH = 100
BATCH_CONCURRENCY = 5
LIMITS = {"nombre": 100, "contexto": 2000, "saludo": 400}


class InvalidRequest(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


async def json_body() -> Any:
    """The request body as JSON, or ``InvalidRequest`` saying why it is not. (Quart's
    ``get_json(silent=True)`` lets a ``RecursionError`` from deeply nested input escape.)"""
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or ``InvalidRequest`` saying why it is not."""
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidRequest("body", "must be a JSON object") from None
    except RecursionError:
        raise InvalidRequest("body", "is nested too deeply") from None


def parse_call_request(item: Any) -> CallRequest:
    """A ``CallRequest`` from a JSON object, or ``InvalidRequest`` naming the bad field."""
    if not isinstance(item, dict):
        raise InvalidRequest("body", "must be a JSON object")
    telefono = item.get("telefono")
    if not isinstance(telefono, str) or not E164.match(telefono.strip()):
        raise InvalidRequest("telefono", "must be an E.164 phone number such as +573001234567")
    values: dict[str, str] = {}
    for field, limit in LIMITS.items():
        value = item.get(field, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InvalidRequest(field, "must be a string")
        if len(value) > limit:
            raise InvalidRequest(field, f"must be at most {limit} characters")
        values[field] = value.strip()
    if not values["nombre"]:
        raise InvalidRequest("nombre", "is required")
    return CallRequest(telefono=telefono.strip(), **values)


PUBLIC_API = frozenset({"/api/health"})
CLOSED = (
    "API_TOKEN is not set: /api is closed"
    " (set API_TOKEN, or API_LOOPBACK_WITHOUT_TOKEN=true for clients on this machine)"
)
NOT_HERE = "API_TOKEN is not set: only clients on this machine may call /api"


def api_refusal(
    settings: Settings, path: str, headers: HeaderLookup, peer: str | None
) -> tuple[int, str, str] | None:
    """Why a request to ``path`` from ``peer`` (the connected address) is refused, as
    (status, error, reason); None if it may go on (module docstring)."""
    if not path.startswith("/api/") or path in PUBLIC_API:
        return None
    if settings.api_token:
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        expected = settings.api_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return 401, "unauthorized", "a valid 'Authorization: Bearer' token is required"
        return None
    return loopback_refusal(settings, headers, peer)


def loopback_refusal(
    settings: Settings, headers: HeaderLookup, peer: str | None
) -> tuple[int, str, str] | None:
    """Without ``API_TOKEN``: why this client is refused (closed, or not on this machine);
    None if ``API_LOOPBACK_WITHOUT_TOKEN`` lets it in. The console follows the same rule."""
    if not settings.api_loopback_without_token:
        return 403, "forbidden", CLOSED
    if not request_origin(peer, headers, settings.forwarded_allow_ips).on_this_machine:
        return 403, "forbidden", NOT_HERE
    return None


def warn_about_access(settings: Settings) -> None:
    """Say at start-up how ``/api`` is reachable when no token guards it."""
    if settings.api_token:
        if settings.api_loopback_without_token:
            log.warning("API_LOOPBACK_WITHOUT_TOKEN is ignored: API_TOKEN is set")
        return
    if not settings.api_loopback_without_token:
        log.warning("⚠️ API_TOKEN is not set: /api/* is closed (403) until it is")
        return
    log.warning(
        "⚠️ API_TOKEN is not set and API_LOOPBACK_WITHOUT_TOKEN=true: /api/* places calls for"
        " any client on this machine without a token. A reverse proxy on this machine that"
        " does not send X-Forwarded-For (nginx's bare proxy_pass) opens it to everyone it"
        " serves. Set API_TOKEN."
    )


def dialing_refusal(center: CallCenter) -> dict[str, Any] | None:
    """Why no call can be placed now (draining, Telnyx not configured), as an error body;
    None if calls can be placed."""
    if center.going_away.is_set():
        return {"error": "draining", "reason": "the server is shutting down"}
    missing = [
        name
        for name, value in (
            ("TELNYX_API_KEY", center.settings.telnyx_api_key),
            ("TELNYX_CONNECTION_ID", center.settings.telnyx_connection_id),
            ("TELNYX_PHONE_NUMBER", center.settings.telnyx_phone_number),
        )
        if not value
    ]
    if missing:
        return {
            "error": "not_configured",
            "reason": "Telnyx is not configured: set " + ", ".join(missing),
            "missing": missing,
        }
    return None


def register_api(app: QuartTrio, center: CallCenter) -> None:
    @app.before_serving
    async def warn_if_open() -> None:
        warn_about_access(center.settings)

    def not_ready() -> Any:
        refusal = dialing_refusal(center)
        return None if refusal is None else _json(503, **refusal)

    @app.post("/api/call/initiate")
    async def initiate() -> Any:
        refusal = not_ready()
        if refusal is not None:
            return refusal
        try:
            call = parse_call_request(await json_body())
        except InvalidRequest as exc:
            return _json(422, error="validation_failed", field=exc.field, reason=exc.reason)
        try:
            result = await center.place_call(call)
        except TelnyxError as exc:
            return _json(
                502,
                error="telnyx_error",
                reason=exc.title or "Telnyx refused the call",
                telnyx_status=exc.status,
                code=exc.code,
                detail=exc.detail,
            )
        return _json(
            201,
            status="initiated",
            call_control_id=result.call_control_id,
            call_leg_id=result.call_leg_id,
            call_session_id=result.call_session_id,
            telefono=call.telefono,
        )

    @app.post("/api/call/batch")
    async def batch() -> Any:
        refusal = not_ready()
        if refusal is not None:
            return refusal
        try:
            body = await json_body()
        except InvalidRequest as exc:
            return _json(422, error="validation_failed", field=exc.field, reason=exc.reason)
        calls = body.get("calls") if isinstance(body, dict) else None
        if not isinstance(calls, list) or not calls:
            return _json(
                422,
                error="validation_failed",
                field="calls",
                reason="must be a non-empty list of calls",
            )
        if len(calls) > MAX_BATCH:
            return _json(
                422,
                error="validation_failed",
                field="calls",
                reason=f"at most {MAX_BATCH} calls per batch",
            )
        results: list[dict[str, Any]] = [{} for _ in calls]
        limiter = trio.CapacityLimiter(BATCH_CONCURRENCY)

        async def one(index: int, item: Any) -> None:
            try:
                call = parse_call_request(item)
            except InvalidRequest as exc:
                results[index] = {
                    "index": index,
                    "status": "invalid",
                    "field": exc.field,
                    "reason": exc.reason,
                }
                return
            async with limiter:
                try:
                    dialed = await center.place_call(call)
                except TelnyxError as exc:
                    results[index] = {
                        "index": index,
                        "telefono": call.telefono,
                        "status": "failed",
                        "code": exc.code,
                        "reason": exc.title or str(exc),
                    }
                    return
            results[index] = {
                "index": index,
                "telefono": call.telefono,
                "status": "initiated",
                "call_control_id": dialed.call_control_id,
            }

        async with trio.open_nursery() as nursery:
            for index, item in enumerate(calls):
                nursery.start_soon(one, index, item)
        initiated = sum(1 for r in results if r["status"] == "initiated")
        return _json(200, initiated=initiated, failed=len(results) - initiated, results=results)


def _json(code: int, /, **body: Any) -> Any:
    response = jsonify(body)
    response.status_code = code
    return response
