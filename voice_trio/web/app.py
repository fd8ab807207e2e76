"""The Quart-Trio app: HTTP routes. ``create_app`` builds a fresh app per server (Quart
registers ``while_serving`` generators once per app object, so apps are never reused)."""

from __future__ import annotations

import logging
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from voice_trio import __version__
from voice_trio.forwarded import request_origin
from voice_trio.instance.center import CallCenter
from voice_trio.observability import publish_every, watch_loop_lag
from voice_trio.store import StoreError
from voice_trio.web.api import api_refusal, register_api
from voice_trio.web.calls_api import register_calls_api
from voice_trio.web.console import register_console
from voice_trio.web.live_api import register_live_api
from voice_trio.web.webhooks import register_webhooks

log = logging.getLogger("voice_trio.web")

MAX_BODY_BYTES = 256 * 1024
# With several workers, how often each publishes its computed gauges (active calls, live
# tasks, media-path message counts) for scrapes that land on a sibling.
PUBLISH_SECONDS = 1.0
# The stats route waits this long for the store's counts, then answers from this process.
STATS_STORE_SECONDS = 2.0
ENDPOINTS = [
    "GET /health",
    "GET /api/health",
    "GET /api/sessions/stats",
    "GET /metrics",
    "POST /api/call/initiate",
    "POST /api/call/batch",
    "GET /api/calls",
    "GET /api/calls/<call_control_id>",
    "DELETE /api/calls/<call_control_id>",
    "GET /api/calls/<call_control_id>/recording",
    "POST /api/calls/<call_control_id>/hangup",
    "POST /api/calls/<call_control_id>/transfer",
    "POST /api/calls/<call_control_id>/say",
    "POST /webhook/telnyx",
    "WS /stream/media",
    "GET /console",
]


def create_app(center: CallCenter) -> QuartTrio:
    app = QuartTrio("voice_trio")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 2
    # A body that trickles in (a byte every few seconds) may not hold its connection:
    # reading it is bounded as a whole, then 408 (compat.hypercorn, connection_limits).
    app.config["BODY_TIMEOUT"] = center.settings.request_timeout_s
    settings = center.settings

    @app.before_serving
    async def startup() -> None:
        await center.start(app.nursery)
        app.nursery.start_soon(watch_loop_lag, center.metrics)
        if center.metrics.worker is not None:
            # A scrape on a sibling worker reads this one's gauges from what it published.
            active = center.registry.__len__
            app.nursery.start_soon(publish_every, center.metrics, active, PUBLISH_SECONDS)

    @app.after_serving
    async def shutdown() -> None:
        await center.stop()

    @app.before_request
    async def guard_api() -> Any:
        client = request.scope.get("client")
        peer = client[0] if client else None
        refusal = api_refusal(settings, request.path, request.headers, peer)
        if refusal is None:
            return None
        status, error, reason = refusal
        origin = request_origin(peer, request.headers, settings.forwarded_allow_ips)
        log.warning(
            "🚫 %s %s refused (%d %s): client %s",
            request.method,
            request.path,
            status,
            error,
            origin.describe(),
        )
        response = _error(status, error, reason)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.get("/")
    async def index() -> Any:
        return {
            "service": "voice-trio",
            "version": __version__,
            "mode": settings.mode,
            "endpoints": ENDPOINTS,
        }

    @app.get("/health")
    @app.get("/api/health")
    async def health() -> Any:
        # This process only: a load balancer's probe asks about the process it reached.
        # Draining: still serving its calls, but a load balancer should send no new ones.
        draining = center.going_away.is_set()
        body = {
            "status": "draining" if draining else "ok",
            "version": __version__,
            "uptime_seconds": round(center.uptime, 3),
            "active_calls": len(center.registry),
            "mode": settings.mode,
            "worker": center.worker,
            "workers": settings.workers,
            "instance_id": center.instance_id,
            # Facts and orders for calls held by other processes: connected | reconnecting
            # (PostgreSQL's LISTEN connection lost) | local (SQLite: one process).
            "events": center.bus.state,
        }
        return (body, 503) if draining else body

    @app.get("/api/sessions/stats")
    async def stats() -> Any:
        return await deployment_stats(center)

    @app.get("/metrics")
    async def metrics() -> Response:
        # One of several workers leaves this to its publisher: every worker's gauges are
        # then as each last published them (at most PUBLISH_SECONDS old), so the answer
        # is the same whichever worker gives it.
        if center.metrics.worker is None:
            center.metrics.publish(len(center.registry))
        return Response(
            generate_latest(center.metrics.registry), content_type=CONTENT_TYPE_PLAIN_0_0_4
        )

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        reason = {
            413: "request body too large",
            408: "the request body did not arrive in time",
            404: "no such route",
            405: "method not allowed",
        }.get(exc.code or 500, exc.description or "error")
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, name, reason)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "the server failed to handle this request")

    register_api(app, center)
    register_calls_api(app, center)
    register_live_api(app, center)
    register_webhooks(app, center)
    register_console(app, center)
    return app


async def deployment_stats(center: CallCenter) -> dict[str, Any]:
    """Calls of the whole deployment, from the shared store (every worker and instance
    writes its calls there); this process's own numbers when the store cannot answer,
    and ``source`` says which."""
    counts = None
    if center.store is not None:
        with trio.move_on_after(STATS_STORE_SECONDS):
            try:
                counts = await center.store.count_calls()
            except StoreError as exc:
                log.warning("Stats from this process only (store unavailable: %s)", exc)
    here = {"active_sessions": len(center.registry), "total_calls": center.registry.total_calls}
    if counts is None:
        return {**here, "source": "process", "uptime_seconds": round(center.uptime, 3)}
    return {
        "active_sessions": counts.active,
        "total_calls": counts.total,
        "source": "store",
        "this_process": here,
        "uptime_seconds": round(center.uptime, 3),
    }


def _error(status: int, error: str, reason: str, **extra: Any) -> Any:
    response = jsonify({"error": error, "reason": reason, **extra})
    response.status_code = status
    return response
