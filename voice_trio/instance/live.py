"""Acting on a live call from any process: webhook facts for media calls, and operators'
orders (``POST /api/calls/{id}/hangup|transfer|say``).

A media call lives in the process that holds its socket; webhooks and API requests land
anywhere. The process that holds the call acts on it; any other passes the fact or the
order on over the call-event bus (:mod:`voice_trio.calls.bus`):

- A fact (``call.hangup``, ``streaming.failed``, a key press, a machine-detection verdict)
  is broadcast and forgotten. The holder acts on it; a process whose socket for the call
  has not come yet keeps it for the session (``calls.signals``); the others drop it.
- An order wants an answer (200, or 409 if the call cannot do it now), so it is a request:
  whoever holds the call replies, and the asker waits ``REPLY_SECONDS`` at most (then 504).
  Whether there is a live call to ask about is read from the store first, so an unknown or
  ended call is 404 at once. A call in fallback mode keeps its state in the store, so any
  process carries out an order for it there.

With SQLite there is no bus: one process, and every call is in its registry.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import trio

from voice_trio.calls.bus import EventBus
from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.orders import (
    InvalidOrder,
    Order,
    Outcome,
    accepted,
    not_found,
    refused,
)
from voice_trio.calls.services import CallServices
from voice_trio.calls.signals import SIGNAL_EVENTS
from voice_trio.fallback.calls import FallbackCalls
from voice_trio.observability import call_id_var
from voice_trio.store import StoreError

log = logging.getLogger("voice_trio.calls")

REPLY_SECONDS = 2.0  # how long an order waits for the process holding its call
FACT_EVENTS = SIGNAL_EVENTS | {"call.hangup", "streaming.failed"}
# The payload fields a holder reads, and a bound on each (a bus event must stay small).
FACT_FIELDS = ("digit", "result", "hangup_cause", "failure_reason")
MAX_FIELD_CHARS = 100
MAX_CALL_ID_CHARS = 256


@dataclass(slots=True)
class _Answer:
    ready: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None


FEED_QUEUE = 1000  # feed events waiting for the bus; beyond, they are dropped and counted


class LiveCalls:
    """The way to reach a live call held anywhere: a media call here takes orders through
    its ``ActiveCall.obey``."""

    def __init__(self, services: CallServices, fallback: FallbackCalls, bus: EventBus) -> None:
        self.services = services
        self.fallback = fallback
        self.bus = bus
        self._asking: dict[str, _Answer] = {}
        self._feed_send, self._feed_recv = trio.open_memory_channel[dict[str, Any]](FEED_QUEUE)

    async def pass_on(self, call_control_id: str, kind: str, payload: dict[str, Any]) -> None:
        """A webhook fact for a media call that is not here: to whoever holds it."""
        fields = {
            name: str(payload[name])[:MAX_FIELD_CHARS]
            for name in FACT_FIELDS
            if payload.get(name) is not None
        }
        await self.bus.publish({"k": "fact", "c": call_control_id, "t": kind, "p": fields})

    def take_fact(self, call_control_id: str, kind: str, payload: dict[str, Any]) -> None:
        """A fact another process received: acted on if the call is here (or, for a session
        not attached yet, kept for it)."""
        services = self.services
        if kind == "call.hangup":
            self.fallback.note_hung_up(call_control_id)
            if services.registry.end(call_control_id, EndReason.HANGUP):
                log.info("📴 Call hung up (%s)", payload.get("hangup_cause") or "-")
        elif kind == "streaming.failed":
            call = services.registry.get(call_control_id)
            if call is not None and call.mode == CallMode.MEDIA:
                log.warning("🔌 Media stream failed: %s", payload.get("failure_reason") or "-")
                call.end(EndReason.STREAM_FAILED)  # its session hands the call over as it ends
        elif kind in SIGNAL_EVENTS:
            services.signals.deliver(call_control_id, kind, payload)

    async def order(self, call_control_id: str, order: Order) -> Outcome:
        """Carry out an operator's order on the call, wherever it runs (module docstring)."""
        if len(call_control_id) > MAX_CALL_ID_CHARS:
            return not_found()
        here = await self.act_here(call_control_id, order)
        if here is not None:
            return here
        where = await self._recorded(call_control_id)
        if where == "gone":
            return not_found()
        if where == "fallback":
            return await self._fallback_order(call_control_id, order)
        if not self.bus.shared:
            return not_found()  # one process, and the call is not in it
        answer = await self._ask(call_control_id, order)
        if answer is not None:
            return answer
        if await self._recorded(call_control_id) == "gone":
            return not_found()  # it ended while we asked
        return Outcome(
            504,
            {
                "error": "no_answer",
                "reason": f"no process holding the call answered within {REPLY_SECONDS:g} s",
            },
        )

    async def act_here(self, call_control_id: str, order: Order) -> Outcome | None:
        """The outcome if the call runs in this process; None if it does not."""
        call = self.services.registry.get(call_control_id)
        if call is None:
            return None
        token = call_id_var.set(call_control_id)
        try:
            if call.mode != CallMode.MEDIA:
                return await self._fallback_order(call_control_id, order)
            if call.obey is None:
                return refused("the call is still connecting; try again in a moment")
            return call.obey(order)
        finally:
            call_id_var.reset(token)

    async def _fallback_order(self, call_control_id: str, order: Order) -> Outcome:
        """An order for a call in fallback mode, through its state in the store."""
        if order.action != "hangup":
            return refused(
                "the call is in fallback mode (Telnyx speak and transcription): "
                "it can only be hung up"
            )
        try:
            ended = await self.fallback.request_end(call_control_id, EndReason.OPERATOR_HANGUP)
        except StoreError as exc:
            log.warning("Order not carried out (store unavailable: %s)", exc)
            return Outcome(
                503, {"error": "store_unavailable", "reason": "the store is not reachable"}
            )
        if ended is None:
            return not_found()
        if not ended:
            return refused("the call is ending already")
        return accepted(status="hanging_up")

    async def _recorded(self, call_control_id: str) -> str:
        """What the store says of the call: ``gone`` (no record, or ended), ``media``,
        ``fallback`` (its state is shared), or ``unknown`` (no store to ask)."""
        store = self.services.store
        if store is None:
            return "unknown"
        try:
            found = await store.get_call(call_control_id)
        except StoreError as exc:
            self.services.metrics.store_errors.labels("get_call").inc()
            log.warning("Call lookup failed (store unavailable: %s)", exc)
            return "unknown"
        if found is None or found[0].status == "ended":
            return "gone"
        return "media" if found[0].mode == "media" else "fallback"

    async def _ask(self, call_control_id: str, order: Order) -> Outcome | None:
        request = secrets.token_hex(8)
        answer = _Answer()
        self._asking[request] = answer
        try:
            event = {"k": "do", "c": call_control_id, "r": request, **order.wire()}
            if not await self.bus.publish(event):
                return Outcome(
                    503,
                    {"error": "bus_unavailable", "reason": "the order could not be passed on"},
                )
            with trio.move_on_after(REPLY_SECONDS):
                await answer.ready.wait()
            return answer.outcome
        finally:
            del self._asking[request]

    def share_feed(self, event: dict[str, Any]) -> None:
        """A call here published ``event`` (``CallFeed.on_publish``): queued for the other
        processes' consoles, in order; dropped and counted if the bus falls behind, never
        waited for."""
        try:
            self._feed_send.send_nowait(event)
        except trio.WouldBlock:
            self.services.metrics.call_events.labels("feed", "dropped").inc()

    async def relay_feed(self) -> None:
        """Send the queued feed events over the bus, one at a time (their order is the
        transcript's), until cancelled."""
        async for event in self._feed_recv:
            await self.bus.publish({"k": "feed", "c": event["c"], "e": event})

    def on_event(self, event: dict[str, Any]) -> None:
        """An event from another process (``EventBus.run``'s handler): never blocks."""
        kind = event["k"]
        if kind == "done":
            self._answered(event)
            return
        if kind == "feed":
            if isinstance(event.get("e"), dict):
                self.services.registry.feed.relay(event["e"])
            else:
                self._malformed(kind, "no feed event")
            return
        ccid = event.get("c")
        if not isinstance(ccid, str) or not ccid or len(ccid) > MAX_CALL_ID_CHARS:
            self._malformed(kind, "no call id")
            return
        if kind == "fact":
            fact, payload = event.get("t"), event.get("p")
            if fact not in FACT_EVENTS or not isinstance(payload, dict):
                self._malformed(kind, "not a fact")
                return
            token = call_id_var.set(ccid)
            try:
                self.take_fact(ccid, fact, payload)
            finally:
                call_id_var.reset(token)
        elif kind == "do":
            if self.services.registry.get(ccid) is None:
                return  # not ours to answer
            request = event.get("r")
            try:
                order = Order.from_wire(event)
            except InvalidOrder as exc:
                self._malformed(kind, str(exc))
                return
            if not isinstance(request, str):
                self._malformed(kind, "no request id")
                return
            self.services.spawn(self._answer, event["o"], request, ccid, order)

    async def _answer(self, asker: str, request: str, ccid: str, order: Order) -> None:
        outcome = await self.act_here(ccid, order)
        if outcome is None:
            return  # the call left meanwhile: the asker hears from nobody
        reply = {"k": "done", "r": request, "for": asker, "s": outcome.status, "b": outcome.body}
        await self.bus.publish(reply)

    def _answered(self, event: dict[str, Any]) -> None:
        if event.get("for") != self.bus.sender:
            return
        answer = self._asking.get(str(event.get("r")))
        status, body = event.get("s"), event.get("b")
        if answer is None or answer.ready.is_set():
            return
        if status not in (200, 404, 409, 503) or not isinstance(body, dict):
            self._malformed("done", "not an outcome")
            return
        answer.outcome = Outcome(status, body)
        answer.ready.set()

    def _malformed(self, kind: str, why: str) -> None:
        self.services.metrics.call_events.labels(kind, "dropped").inc()
        log.warning("📡 Call event %s dropped: %s", kind, why)
