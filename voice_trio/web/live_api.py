"""``POST /api/calls/<call_control_id>/hangup|transfer|say``: act on a live call.

Any instance (or worker) may receive the request, whichever process holds the call: the
order is checked here and carried out by the call center (``instance.live``), over the
call-event bus if need be. Answers:

- 200 with what happens now (``hanging_up``, ``transferring`` to a number, ``queued``);
- 404 for an unknown or ended call;
- 409 for a call that cannot do it now (being transferred, leaving a voicemail, ending, in
  fallback mode for transfer and say, too many texts waiting);
- 422 for a bad body, naming the field; 503 while this server drains or its store or bus is
  unreachable; 504 if the process holding the call did not answer in time.

Bodies: ``hangup`` none (or ``{}``); ``transfer`` ``{"to": "+573001234567"}`` or none (to
``TRANSFER_NUMBER``); ``say`` ``{"text": "..."}`` (at most 500 characters). Authentication is
the ``/api/*`` guard's (``web.app``).
"""

from __future__ import annotations

from typing import Any

from quart import jsonify, request
from quart_trio import QuartTrio

from voice_trio.calls.orders import ACTIONS, InvalidOrder, Order, Outcome
from voice_trio.instance.center import CallCenter
from voice_trio.web.api import InvalidRequest, parse_json


async def carry_out(center: CallCenter, call_control_id: str, action: str, body: Any) -> Outcome:
    """An operator's order from a request body (parsed JSON, or None), carried out wherever
    the call runs: the API's answer, also the console's (``web.console``)."""
    if not center.accepting_work or center.going_away.is_set():
        return Outcome(503, {"error": "draining", "reason": "the server is shutting down"})
    try:
        order = Order.from_request(action, body, center.settings.transfer_number)
    except InvalidOrder as exc:
        return Outcome(
            422, {"error": "validation_failed", "field": exc.field, "reason": exc.reason}
        )
    return await center.live.order(call_control_id, order)


def register_live_api(app: QuartTrio, center: CallCenter) -> None:
    async def answer(call_control_id: str, action: str) -> Any:
        try:
            body = await _optional_json_body()
        except InvalidRequest as exc:
            return _json(422, error="validation_failed", field=exc.field, reason=exc.reason)
        outcome = await carry_out(center, call_control_id, action, body)
        return _json(outcome.status, **{**outcome.body, "call_control_id": call_control_id})

    for action in ACTIONS:
        app.add_url_rule(
            f"/api/calls/<call_control_id>/{action}",
            f"live_call_{action}",
            _route(answer, action),
            methods=["POST"],
        )


def _route(answer: Any, action: str) -> Any:
    async def route(call_control_id: str) -> Any:
        return await answer(call_control_id, action)

    return route


async def _optional_json_body() -> Any:
    """The body as JSON; None if there is none."""
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return parse_json(raw) if raw.strip() else None


def _json(code: int, /, **body: Any) -> Any:
    response = jsonify(body)
    response.status_code = code
    return response
