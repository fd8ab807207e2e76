"""How calls come to fallback mode, and the fallback calls running on this instance.

A call is in fallback mode from its start with ``USE_MEDIA_STREAMS=false`` (mode
``fallback``), or because its media stream failed (mode ``degraded``). A stream fails in
one of three ways:

- Telnyx says so: a ``streaming.failed`` webhook.
- It never comes: no media socket with a ``start`` frame ``STREAM_CONNECT_TIMEOUT_MS`` after
  ``streaming_start`` was sent. A ``streaming_stop`` follows, and a socket that still turns
  up later finds the call registered and is refused.
- It drops: the socket closes without a ``stop`` frame (:data:`STREAM_LOST`). Telnyx sends
  ``stop`` on hang-up, but it may be lost too, so the degraded call first waits
  ``STREAM_LOST_GRACE_MS`` for a ``call.hangup`` before it says anything.

A stream that failed before the caller heard anything starts afresh with the greeting. A
running media session hands over its ``Conversation``: the fallback call goes on with that
history, answering caller words the media session had not answered yet, or else with a
short "¿me decía?" prompt. The hand-over is synchronous (the media call leaves the registry
and the degraded call enters it in one step), so ``/health`` sees one call throughout and
no second socket or webhook can slip in between.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from voice_trio.calls.fallback import FallbackCall
from voice_trio.calls.history import Conversation
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.session import STREAM_LOST, STT_LOST, STT_UNAVAILABLE
from voice_trio.providers.telnyx_control import decode_client_state
from voice_trio.providers.telnyx_webhooks import WebhookEvent

if TYPE_CHECKING:
    from voice_trio.calls.center import CallCenter

log = logging.getLogger("voice_trio.calls")

# End reason of a media call whose stream Telnyx reported failed (``streaming.failed``).
STREAM_FAILED = "stream_failed"
DEGRADE_REASONS = frozenset({STREAM_LOST, STREAM_FAILED, STT_LOST, STT_UNAVAILABLE})


class RecentCalls:
    """Call ids seen recently (bounded, oldest forgotten first)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, call_control_id: str) -> None:
        self._ids[call_control_id] = None
        self._ids.move_to_end(call_control_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, call_control_id: object) -> bool:
        return call_control_id in self._ids


class FallbackCalls:
    """The fallback-mode calls of one ``CallCenter``: each call's inbox for its webhooks, and
    the three ways a media-streams call degrades into one (module docstring)."""

    def __init__(self, center: CallCenter) -> None:
        self.center = center
        self._calls: dict[str, FallbackCall] = {}
        self._stream_waits: dict[str, trio.Event] = {}
        # call.hangup may overtake the events it follows (webhooks are not ordered): a call
        # that hung up is never started or degraded afterwards.
        self._hung_up = RecentCalls()

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def waiting_for_streams(self) -> int:
        return len(self._stream_waits)

    def deliver(self, event: WebhookEvent) -> bool:
        """Queue ``event`` for its fallback call; False if its call is not one here."""
        call = self._calls.get(event.call_control_id)
        if call is None:
            return False
        call.deliver(event)
        return True

    def hung_up(self, call_control_id: str) -> None:
        """``call.hangup`` arrived (the call itself is ended through the registry)."""
        self._hung_up.add(call_control_id)
        self._stream_arrived(call_control_id)

    def answered(self, event: WebhookEvent) -> None:
        """``call.answered`` with ``USE_MEDIA_STREAMS=false``."""
        if self.center.going_away.is_set():
            log.info("📵 Not starting the conversation: server is shutting down")
            return
        self.start(event.call_control_id, decode_client_state(event.client_state), "fallback")

    def start(
        self,
        call_control_id: str,
        context: dict[str, Any],
        mode: str,
        conversation: Conversation | None = None,
        *,
        grace: float = 0.0,
        started_at: float | None = None,
    ) -> FallbackCall | None:
        """Register a fallback call and run it in the center's nursery; None if the call
        hung up already or is running here."""
        if call_control_id in self._hung_up:
            log.info("📴 Not starting fallback mode: the call has hung up")
            return None
        call = ActiveCall(call_control_id, mode=mode)
        if started_at is not None:
            call.started_at = started_at
        try:
            self.center.registry.add(call)
        except KeyError:
            log.debug("Not starting fallback mode: the call is already running here")
            return None
        fallback = FallbackCall(self.center, call, context, conversation, grace=grace)
        self._calls[call_control_id] = fallback
        log.info("🔀 Conversation over Telnyx speak and transcription (mode %s)", mode)
        self.center.spawn(self._run, fallback)
        return fallback

    async def _run(self, fallback: FallbackCall) -> None:
        call = fallback.call
        try:
            await fallback.run()
        finally:
            fallback.close_inbox()
            if self._calls.get(call.call_control_id) is fallback:
                del self._calls[call.call_control_id]
            self.center.registry.remove(call)
            self.center.metrics.calls.labels(call.mode, call.end_reason or "unknown").inc()
            log.info("📴 Call ended (%s)", call.end_reason or "unknown")

    def take_over(
        self,
        media_call: ActiveCall,
        client_state: str | None,
        conversation: Conversation,
    ) -> bool:
        """Carry on a media call whose stream failed (its end reason says how); called as
        the media call leaves the registry. False if the call is not to go on."""
        ccid = media_call.call_control_id
        if ccid in self._hung_up:
            media_call.end_reason = "hangup"  # the socket only closed because the call did
            return False
        if self.center.going_away.is_set():
            return False
        lost = media_call.end_reason == STREAM_LOST
        log.warning(
            "🔀 Media stream %s: the call goes on in fallback mode with its history",
            "closed without a stop frame" if lost else "failed",
        )
        grace = self.center.settings.stream_lost_grace_ms / 1000 if lost else 0.0
        fallback = self.start(
            ccid,
            decode_client_state(client_state),
            "degraded",
            conversation,
            grace=grace,
            started_at=media_call.started_at,
        )
        if fallback is None:
            return False
        self.center.registry.total_calls -= 1  # the same call going on, not a new one
        return True

    def expect_stream(self, call_control_id: str) -> None:
        """``streaming_start`` is about to be sent: note that a socket is due."""
        self._stream_waits.setdefault(call_control_id, trio.Event())

    def stream_started(self, call_control_id: str) -> None:
        """The call's media socket sent ``start`` and the media call is registered."""
        self._stream_arrived(call_control_id)

    def _stream_arrived(self, call_control_id: str) -> None:
        waiting = self._stream_waits.get(call_control_id)
        if waiting is not None:
            waiting.set()

    async def await_stream(self, call_control_id: str, client_state: str | None) -> None:
        """Degrade the call if its media socket is not there in time (see ``expect_stream``)."""
        arrived = self._stream_waits.get(call_control_id)
        if arrived is None:
            return
        try:
            with trio.move_on_after(self.center.settings.stream_connect_timeout_ms / 1000):
                await arrived.wait()
        finally:
            if self._stream_waits.get(call_control_id) is arrived:
                del self._stream_waits[call_control_id]
        if arrived.is_set() or self.center.registry.get(call_control_id) is not None:
            return  # connected, or a streaming.failed or call.hangup dealt with it
        if self.center.going_away.is_set() or call_control_id in self._hung_up:
            return
        log.warning(
            "🔌 No media stream %d ms after Streaming Start: the call goes on in fallback mode",
            self.center.settings.stream_connect_timeout_ms,
        )
        if self.start(call_control_id, decode_client_state(client_state), "degraded"):
            self.center.spawn(self.center.telnyx.streaming_stop, call_control_id)

    def stream_failed(self, event: WebhookEvent) -> None:
        """``streaming.failed`` for a call that is not in fallback mode already."""
        ccid = event.call_control_id
        log.warning("🔌 Media stream failed: %s", event.payload.get("failure_reason") or "-")
        self._stream_arrived(ccid)
        if self.center.going_away.is_set() or ccid in self._hung_up:
            return
        media_call = self.center.registry.get(ccid)
        if media_call is None:
            # Never connected: the caller has heard nothing yet, so this starts afresh.
            self.start(ccid, decode_client_state(event.client_state), "degraded")
        elif media_call.mode == "media":
            media_call.end(STREAM_FAILED)  # its session hands over as it ends
