"""The console's pages and forms. Access (sign-in, CSRF, Origin) is ``console.access``'s;
each form's work is the API's own code: ``parse_call_request`` and ``CallCenter.place_call``
to place a call, ``live_api.carry_out`` for hang-up, transfer and say (the console does not
call the HTTP API: it runs the same order, so the API's bearer token never reaches a page)."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from quart import Blueprint, Response, g, redirect, render_template, request, url_for
from quart_trio import QuartTrio

from voice_trio.calls.orders import ACTIONS
from voice_trio.forwarded import request_origin
from voice_trio.instance.center import CallCenter
from voice_trio.providers.telnyx.control import TelnyxError
from voice_trio.recordings import find_recording
from voice_trio.store import StoreError
from voice_trio.web.api import InvalidRequest, dialing_refusal, loopback_refusal, parse_call_request
from voice_trio.web.calls_api import (
    END_REASONS,
    InvalidQuery,
    erase_call,
    latency_summary,
    parse_list_query,
    recording_response,
)
from voice_trio.web.console.access import COOKIE, SESSION_SECONDS, ConsoleKeys, origin_refusal
from voice_trio.web.console.events import event_stream
from voice_trio.web.console.waterfall import STAGES, waterfall_svg
from voice_trio.web.live_api import carry_out

log = logging.getLogger("voice_trio.web")

HISTORY_PAGE = 50
CALL_FIELDS = ("telefono", "nombre", "contexto", "saludo")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none';"
        " frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
OPEN = frozenset({"console.static", "console.sign_in_form", "console.sign_in"})


def register_console(app: QuartTrio, center: CallCenter) -> None:
    settings = center.settings
    console = Blueprint(
        "console",
        __name__,
        url_prefix="/console",
        template_folder="templates",
        static_folder="static",
    )
    secret = settings.api_token.encode() if settings.api_token else center.stream_secret
    keys = ConsoleKeys(secret)
    zone = ZoneInfo(settings.timezone)

    def local(epoch: float | None) -> str:
        if epoch is None:
            return "—"
        return datetime.fromtimestamp(epoch, zone).strftime("%Y-%m-%d %H:%M:%S")

    async def page(template: str, status: int = 200, **context: Any) -> Response:
        html = await render_template(
            f"console/{template}",
            csrf=keys.csrf(g.console_session),
            signed_in=bool(settings.api_token),
            local=local,
            **context,
        )
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    async def refuse(status: int, reason: str) -> Response:
        html = await render_template("console/refused.html", status=status, reason=reason)
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    @console.before_request
    async def guard() -> Any:
        if request.endpoint == "console.static":
            return None
        client = request.scope.get("client")
        peer = client[0] if client else None
        session = keys.read(request.cookies.get(COOKIE))
        g.console_cookie = None
        if settings.api_token:
            if session is None:
                session, g.console_cookie = keys.new_session(signed_in=False)
            g.console_session = session
            if not session.signed_in and request.endpoint not in OPEN:
                if request.method == "GET" and request.endpoint != "console.events":
                    return redirect(
                        url_for("console.sign_in_form", next=request.full_path.rstrip("?"))
                    )
                return await refuse(401, "sign in first")
        else:
            refusal = loopback_refusal(settings, request.headers, peer)
            if refusal is not None:
                origin = request_origin(peer, request.headers, settings.forwarded_allow_ips)
                log.warning("🚫 console refused: client %s", origin.describe())
                return await refuse(refusal[0], refusal[2].replace("/api", "/console"))
            if session is None:
                session, g.console_cookie = keys.new_session(signed_in=True)
            g.console_session = session
        if request.method == "POST":
            why = origin_refusal(request.headers.get("Origin"), request.host)
            if why is None:
                form = await request.form
                given = form.get("csrf") or request.headers.get("X-CSRF-Token")
                if not keys.csrf_ok(session, given):
                    why = "the form's CSRF token is missing or wrong; reload the page"
            if why is not None:
                return await refuse(403, why)
        return None

    @console.after_request
    async def harden(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        cookie = getattr(g, "console_cookie", None)
        if cookie is not None:
            secure = request.scheme == "https" or (
                request.headers.get("X-Forwarded-Proto", "").lower() == "https"
            )
            response.set_cookie(
                COOKIE,
                cookie,
                max_age=SESSION_SECONDS,
                path="/console",
                secure=secure,
                httponly=True,
                samesite="Strict",
            )
        return response

    @console.get("/login")
    async def sign_in_form() -> Any:
        if not settings.api_token or g.console_session.signed_in:
            return redirect(url_for("console.live"))
        return await page("login.html", next=_next(request.args.get("next")))

    @console.post("/login")
    async def sign_in() -> Any:
        form = await request.form
        target = _next(form.get("next"))
        if not settings.api_token:
            return redirect(target)
        if not keys.token_ok(settings.api_token, form.get("token", "")):
            log.warning("🚫 console sign-in refused: wrong token")
            return await page("login.html", status=401, next=target, error="wrong token")
        g.console_session, g.console_cookie = keys.new_session(signed_in=True)
        return redirect(target)

    @console.post("/logout")
    async def sign_out() -> Any:
        g.console_session, g.console_cookie = keys.new_session(signed_in=False)
        return redirect(url_for("console.sign_in_form"))

    @console.get("/")
    async def live() -> Any:
        return await live_page()

    async def live_page(status: int = 200, **context: Any) -> Response:
        calls = sorted(center.registry.feed.calls.values(), key=lambda v: v.started_at)
        return await page(
            "live.html",
            status=status,
            calls=calls,
            now=time.time(),
            notice=request.args.get("notice", "")[:300],
            shared=center.bus.shared,
            **context,
        )

    @console.get("/events")
    async def events() -> Any:
        response = Response(
            event_stream(center.registry.feed, center.going_away),
            content_type="text/event-stream",
        )
        response.timeout = None  # the stream lasts as long as the console is open
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    @console.post("/calls/<call_control_id>/<action>")
    async def order(call_control_id: str, action: str) -> Any:
        if action not in ACTIONS:
            return await refuse(404, "no such action")
        form = await request.form
        body: dict[str, str] | None = None
        if action == "transfer" and form.get("to", "").strip():
            body = {"to": form["to"].strip()}
        elif action == "say":
            body = {"text": form.get("text", "")}
        outcome = await carry_out(center, call_control_id, action, body)
        if outcome.status == 200:
            notice = f"{action}: {outcome.body.get('status', 'ok')}"
        else:
            notice = f"{action} refused ({outcome.status}): {outcome.body.get('reason', '')}"
        return redirect(url_for("console.live") + "?" + urlencode({"notice": notice}))

    @console.post("/call")
    async def place_call() -> Any:
        form = await request.form
        values = {name: form.get(name, "") for name in CALL_FIELDS}
        refusal = dialing_refusal(center)
        if refusal is not None:
            return await live_page(503, form=values, error=refusal["reason"])
        try:
            call = parse_call_request(values)
        except InvalidRequest as exc:
            return await live_page(422, form=values, error=f"{exc.field}: {exc.reason}")
        try:
            result = await center.place_call(call)
        except TelnyxError as exc:
            reason = exc.title or "Telnyx refused the call"
            return await live_page(502, form=values, error=reason)
        notice = f"Calling {call.telefono} ({result.call_control_id})"
        return redirect(url_for("console.live") + "?" + urlencode({"notice": notice}))

    @console.get("/calls")
    async def history() -> Any:
        store = center.store
        args = {k: v for k, v in request.args.items() if v.strip()}
        try:
            query = parse_list_query(args, settings.timezone)
        except InvalidQuery as exc:
            return await page(
                "history.html",
                422,
                calls=[],
                args=args,
                error=f"{exc.field}: {exc.reason}",
                end_reasons=END_REASONS,
            )
        query["limit"] = HISTORY_PAGE
        if store is None:
            return await refuse(503, "the call store is not open")
        try:
            found = await store.list_calls(**query)
        except StoreError as exc:
            log.warning("Call store unavailable: %s", exc)
            return await refuse(503, "the call store is not reachable")
        more = None
        if found.next_cursor:
            more = (
                url_for("console.history")
                + "?"
                + urlencode(
                    {
                        **{k: v for k, v in args.items() if k != "cursor"},
                        "cursor": found.next_cursor,
                    }
                )
            )
        return await page(
            "history.html", calls=found.calls, args=args, more=more, end_reasons=END_REASONS
        )

    @console.get("/calls/<call_control_id>")
    async def call_page(call_control_id: str) -> Any:
        store = center.store
        if store is None:
            return await refuse(503, "the call store is not open")
        try:
            found = await store.get_call(call_control_id)
            tools = await store.get_tool_calls(call_control_id) if found else []
        except StoreError as exc:
            log.warning("Call store unavailable: %s", exc)
            return await refuse(503, "the call store is not reachable")
        if found is None:
            return await refuse(404, "no call with this call_control_id")
        record, turns = found
        return await page(
            "call.html",
            record=record,
            turns=turns,
            tools=tools,
            waterfall=waterfall_svg(turns),
            stages=STAGES,
            summary=latency_summary(turns),
            live=record.call_control_id in center.registry.feed.calls,
            recording=find_recording(settings.recordings_dir, call_control_id) is not None,
            recording_on=settings.record_calls,
            notice=request.args.get("notice", "")[:300],
        )

    @console.get("/calls/<call_control_id>/recording.wav")
    async def recording(call_control_id: str) -> Any:
        path = find_recording(settings.recordings_dir, call_control_id)
        if path is None:
            return await refuse(404, "no recording of this call")
        return await recording_response(str(path))

    @console.post("/calls/<call_control_id>/delete")
    async def delete_call(call_control_id: str) -> Any:
        store = center.store
        if store is None:
            return await refuse(503, "the call store is not open")
        try:
            outcome = await erase_call(center, store, call_control_id)
        except StoreError as exc:
            log.warning("Call store unavailable: %s", exc)
            return await refuse(503, "the call store is not reachable")
        if outcome == "not_found":
            return await refuse(404, "no call with this call_control_id")
        if outcome == "active":
            target = url_for("console.call_page", call_control_id=call_control_id)
            notice = "delete refused: the call is still going on"
            return redirect(target + "?" + urlencode({"notice": notice}))
        log.info("🗑️ Call %s deleted from the console", call_control_id)
        return redirect(url_for("console.history"))

    app.register_blueprint(console)


def _next(target: str | None) -> str:
    """Where to go after signing in: a console page only (never another site)."""
    if target and target.startswith("/console") and not target.startswith("//"):
        return target
    return "/console/"
