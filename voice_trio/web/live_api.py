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

from voice_trio.calls.orders import ACTIONS, InvalidOrder, Order
from voice_trio.instance.center import CallCenter
from voice_trio.web.api import InvalidRequest, parse_json


def register_live_api(app: QuartTrio, center: CallCenter) -> None:
    async def carry_out(call_control_id: str, action: str) -> Any:
        if not center.accepting_work or center.going_away.is_set():
            return _json(503, error="draining", reason="the server is shutting down")
        try:
            body = await _optional_json_body()
            order = Order.from_request(action, body, center.settings.transfer_number)
        except (InvalidRequest, InvalidOrder) as exc:
            return _json(422, error="validation_failed", field=exc.field, reason=exc.reason)
        outcome = await center.live.order(call_control_id, order)
        return _json(outcome.status, **{**outcome.body, "call_control_id": call_control_id})

    for action in ACTIONS:
        app.add_url_rule(
            f"/api/calls/<call_control_id>/{action}",
            f"live_call_{action}",
            _route(carry_out, action),
            methods=["POST"],
        )


def _route(carry_out: Any, action: str) -> Any:
    async def route(call_control_id: str) -> Any:
        return await carry_out(call_control_id, action)

    return route


async def _optional_json_body() -> Any:
    """The body as JSON; None if there is none."""
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return parse_json(raw) if raw.strip() else None


def _json(code: int, /, **body: Any) -> Any:
    response = jsonify(body)
    response.status_code = code
    return response
