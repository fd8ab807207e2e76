"""``/api/*``: who may call it, and ``/api/call/*`` (place calls). Input is validated here;
dialing is the call center's job.

The API places calls that cost money (DESIGN.md §6). With ``API_TOKEN`` set every ``/api/*``
route but ``/api/health`` wants ``Authorization: Bearer <API_TOKEN>`` (401 otherwise).
Without it, only a client on this machine is served (403 otherwise), and the server says so
at start-up. A request that a proxy forwarded (``Forwarded``, ``X-Forwarded-For``,
``X-Real-IP``) is not a loopback client even when the proxy is: a tunnel such as ngrok in
front of Telnyx's webhooks connects from 127.0.0.1 on behalf of the whole internet. Those
headers are only ever used to refuse, never to grant.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any, Protocol

import trio
from quart import jsonify, request
from quart_trio import QuartTrio

from voice_trio.calls.center import CallCenter, CallRequest
from voice_trio.config import E164, Settings
from voice_trio.providers.telnyx_control import TelnyxError

log = logging.getLogger("voice_trio.web")


MAX_BATCH = 100
BATCH_CONCURRENCY = 5
LIMITS = {"nombre": 100, "contexto": 2000, "saludo": 400}


class InvalidRequest(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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


class HeaderLookup(Protocol):
    """Request headers, looked up case-insensitively (Werkzeug's ``Headers``)."""

    def get(self, key: str, default: str, /) -> str: ...
    def __contains__(self, key: str, /) -> bool: ...


PUBLIC_API = frozenset({"/api/health"})
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def api_refusal(
    settings: Settings, path: str, headers: HeaderLookup, client: str | None
) -> tuple[int, str, str] | None:
    """Why a request to ``path`` from ``client`` (an address) is refused, as (status,
    error, reason); None if it may go on (module docstring)."""
    if not path.startswith("/api/") or path in PUBLIC_API:
        return None
    if settings.api_token:
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        expected = settings.api_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return 401, "unauthorized", "a valid 'Authorization: Bearer' token is required"
        return None
    if not is_loopback(client) or any(h in headers for h in PROXY_HEADERS):
        return 403, "forbidden", "API_TOKEN is not set: only loopback clients may call /api"
    return None


def is_loopback(address: str | None) -> bool:
    """``address`` is this machine (127.0.0.0/8, ::1, or ::ffff:127.x.y.z)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def register_api(app: QuartTrio, center: CallCenter) -> None:
    @app.before_serving
    async def warn_if_open() -> None:
        if not center.settings.api_token:
            log.warning("⚠️ API_TOKEN is not set: /api/* accepts loopback clients only")

    def not_ready() -> Any:
        if center.going_away.is_set():
            return _json(503, error="draining", reason="the server is shutting down")
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
            return _json(
                503,
                error="not_configured",
                reason="Telnyx is not configured: set " + ", ".join(missing),
                missing=missing,
            )
        return None

    @app.post("/api/call/initiate")
    async def initiate() -> Any:
        refusal = not_ready()
        if refusal is not None:
            return refusal
        body = await request.get_json(force=True, silent=True)
        try:
            call = parse_call_request(body)
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
        body = await request.get_json(force=True, silent=True)
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
