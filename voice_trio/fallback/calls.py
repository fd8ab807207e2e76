"""How calls come to fallback mode, and the fallback calls running on this instance.

A call is in fallback mode from its start with ``USE_MEDIA_STREAMS=false`` (mode
``fallback``), or because its media stream failed (mode ``degraded``). A stream fails in
one of four ways:

- Telnyx says so: a ``streaming.failed`` webhook. Whichever instance it lands on, it is
  decided deployment-wide: the process holding the call's socket hands the call over (the
  fact reaches it over the call-event bus, ``instance.live``); if no socket claimed the
  stream anywhere, the instance that got the webhook claims it and starts fallback mode.
- It never comes: no media socket with a ``start`` frame ``STREAM_CONNECT_TIMEOUT_MS`` after
  ``streaming_start`` was sent (and no socket claimed the call's stream on another
  instance). A ``streaming_stop`` follows, and a socket that still turns up later, on any
  instance, finds the stream claimed and is refused.
- It comes in a codec the media path cannot carry (Telnyx streams the call's own codec when
  it cannot transcode to PCMU: G722, OPUS): at once, with ``streaming_stop``.
- It drops: the socket closes without a ``stop`` frame (``EndReason.STREAM_LOST``). Telnyx sends
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
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.registry import ActiveCall, RecentCalls
from voice_trio.calls.services import CallServices
from voice_trio.config import KeyAction
from voice_trio.conversation.history import Conversation
from voice_trio.fallback import state as fs
from voice_trio.fallback.call import FallbackCall
from voice_trio.fallback.records import FallbackRecords
from voice_trio.observability import call_id_var
from voice_trio.providers.telnyx.control import decode_client_state
from voice_trio.providers.telnyx.speech import caller_words
from voice_trio.providers.telnyx.webhooks import WebhookEvent
from voice_trio.store import SqliteStore

log = logging.getLogger("voice_trio.calls")

# The webhooks a fallback-mode call acts on (besides call.hangup, which ends any call).
CALL_EVENTS = frozenset(
    {"call.transcription", "call.speak.ended", "call.speak.started", "call.dtmf.received"}
)


@dataclass(slots=True)
class _StreamWait:
    """A media socket due for a call: ``over`` once it came (``connected``) or the call no
    longer needs it (hang-up, ``streaming.failed``, a codec it cannot carry)."""

    over: trio.Event = field(default_factory=trio.Event)
    connected: bool = False


class FallbackCalls:
    """The fallback-mode calls as this instance sees them: webhooks applied to their shared
    state, this instance's ``FallbackCall`` tasks, their records, and the four ways a
    media-streams call degrades into one (module docstring)."""

    def __init__(self, services: CallServices) -> None:
        self.services = services
        self.records = FallbackRecords(services)
        self.me = secrets.token_hex(6)  # this instance, as turn owner and state writer
        self._shared: fs.SharedCalls | None = None
        self._own_store_opened = trio.Lock()
        self._own_store_open = False
        self._calls: dict[str, FallbackCall] = {}
        self._stream_waits: dict[str, _StreamWait] = {}
        # call.hangup may overtake the events it follows (webhooks are not ordered): a call
        # that hung up is never started or degraded afterwards.
        self._hung_up = RecentCalls()

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def waiting_for_streams(self) -> int:
        return len(self._stream_waits)

    @property
    def shared(self) -> fs.SharedCalls:
        """The shared state, in the call store; without one (it failed to open), in a
        store of this instance's own, so a single instance still works."""
        if self._shared is None:
            store = self.services.store
            if store is None:
                log.warning("Fallback-mode state kept in memory: calls cannot move instances")
                store = SqliteStore(":memory:")
            self._shared = fs.SharedCalls(store, self.me, self.records.failed)
        return self._shared

    async def deliver(self, event: WebhookEvent) -> bool:
        """Apply a call's webhook to its fallback-mode state, wherever the call is carried;
        False if the call is not in fallback mode (or not one to handle here)."""
        kind = event.event_type
        ccid = event.call_control_id
        if kind not in CALL_EVENTS or not ccid:
            return False
        local = self._calls.get(ccid)
        if local is None and self.services.registry.get(ccid) is not None:
            return False  # a media call here
        now = time.time()
        if kind == "call.dtmf.received":
            mutate = self._key_pressed(event, now)
            if mutate is None:
                return local is not None
        elif kind == "call.speak.ended":
            mutate = lambda d: fs.speech_ended(d, now)  # noqa: E731
        elif kind == "call.speak.started":
            return local is not None
        else:
            text = caller_words(event.payload, self.services.settings.transcription_min_confidence)
            if text is None:
                return local is not None
            log.info("🎤 Caller: %s", text)
            self.services.registry.feed.publish({"k": "caller", "c": ccid, "text": text})
            mutate = lambda d: fs.add_caller_words(d, text, now, event.occurred_at)  # noqa: E731
        await self._ensure_store()
        state, changed = await self.shared.update(ccid, mutate)
        if state is None:
            return local is not None
        if changed:
            self._join(ccid, state)
        return True

    def _key_pressed(self, event: WebhookEvent, now: float) -> fs.Mutation | None:
        """A key press as a change of the call's state: the ``end_call`` shortcut, or a
        note for the conversation. Other shortcuts (``transfer``) are a media-mode act
        (docs/reliability.md); here the key is told to the conversation like any other."""
        digit = event.payload.get("digit")
        if not isinstance(digit, str) or not digit:
            return None
        settings = self.services.settings
        action = settings.dtmf_actions.get(digit)
        log.info("🎤 DTMF %s%s", digit, f" → {action}" if action else "")
        if action == KeyAction.END_CALL:
            return lambda d: fs.request_end(d, EndReason.CALLER_ENDED)
        language = settings.agent_language
        return lambda d: fs.add_caller_key(d, digit, now, event.occurred_at, language)

    def _join(self, ccid: str, state: fs.Snapshot) -> None:
        """This instance wrote the call's state: it watches the call from now on."""
        local = self._calls.get(ccid)
        if local is not None:
            local.seen(state)
            return
        if state.data.ended or self.services.going_away.is_set():
            return
        call = ActiveCall(ccid, mode=state.data.mode, state="listening")
        call.started_at = state.data.origin
        call.party = _party(state.data.caller, state.data.line)
        try:
            self.services.registry.add(call)
        except KeyError:
            return
        self.services.registry.total_calls -= 1  # a call started elsewhere, not a new one
        self._run_here(FallbackCall(self, call, state=state))

    def hung_up(self, call_control_id: str) -> None:
        """``call.hangup`` arrived. A task here ends the call through the registry; else the
        call's state (if it is in fallback mode anywhere) is ended here."""
        self.note_hung_up(call_control_id)
        if call_control_id not in self._calls:
            self.services.spawn(self._end_everywhere, call_control_id)

    def note_hung_up(self, call_control_id: str) -> None:
        """The call hung up (here or, told over the bus, elsewhere): it is never started or
        degraded here afterwards, and no longer waits for its stream."""
        self._hung_up.add(call_control_id)
        self._stream_arrived(call_control_id)

    async def request_end(self, call_control_id: str, reason: EndReason) -> bool | None:
        """Ask a fallback-mode call (held anywhere) to say goodbye and hang up: True if
        asked, False if it is ending already, None if no call has such a state.
        ``StoreError`` if the store cannot say."""
        await self._ensure_store()
        state, changed = await self.shared.update(
            call_control_id, lambda d: fs.request_end(d, reason)
        )
        if state is None:
            return None
        if changed:
            self._join(call_control_id, state)
        return changed

    async def _end_everywhere(self, ccid: str) -> None:
        await self._ensure_store()
        now = time.time()
        taken = False

        def end(data: fs.FallbackState) -> bool:
            nonlocal taken
            if not data.end(EndReason.HANGUP, now):
                return False
            taken = fs.turn_free(data, self.me, now)
            if taken:
                fs.claim(data, self.me, now)
            return True

        state, changed = await self.shared.update(ccid, end)
        if state is None or not changed:
            return
        token = call_id_var.set(ccid)
        try:
            log.info("📴 Call hung up")
            if taken:
                await self.finalize(ccid, state.data)
        finally:
            call_id_var.reset(token)

    def answered(self, event: WebhookEvent) -> None:
        """``call.answered`` with ``USE_MEDIA_STREAMS=false``."""
        if self.services.going_away.is_set():
            log.info("📵 Not starting the conversation: server is shutting down")
            return
        payload = event.payload
        self.start(
            event.call_control_id,
            decode_client_state(event.client_state),
            CallMode.FALLBACK,
            line={
                "call_session_id": str(payload.get("call_session_id") or ""),
                "from_number": str(payload.get("from") or ""),
                "to_number": str(payload.get("to") or ""),
            },
        )

    def start(
        self,
        call_control_id: str,
        context: dict[str, Any],
        mode: CallMode,
        conversation: Conversation | None = None,
        *,
        grace: float = 0.0,
        started_at: float | None = None,
        line: dict[str, str] | None = None,
    ) -> FallbackCall | None:
        """Register a fallback call and run it in the instance's background nursery; None if the call
        hung up already or is running here."""
        if call_control_id in self._hung_up:
            log.info("📴 Not starting fallback mode: the call has hung up")
            return None
        call = ActiveCall(call_control_id, mode=mode, state="listening")
        if started_at is not None:
            call.started_at = started_at
        now = time.time()
        line = line or {}
        caller = fs.Caller(
            **{k: str(context.get(k) or "") for k in ("nombre", "contexto", "saludo")}
        )
        on_line = fs.Line(
            direction="inbound" if context.get("dir") == "inbound" else "outbound",
            call_session_id=line.get("call_session_id", ""),
            from_number=line.get("from_number", ""),
            to_number=line.get("to_number", ""),
            created_at=call.started_at,
            answered_at=call.started_at if started_at is not None else now,
        )
        call.party = _party(caller, on_line)
        try:
            self.services.registry.add(call)
        except KeyError:
            log.debug("Not starting fallback mode: the call is already running here")
            return None
        initial = fs.new_state(
            mode=mode,
            caller=caller,
            line=on_line,
            origin=call.started_at,
            deadline_at=call.started_at + self.services.settings.max_call_seconds,
            writer=self.me,
            conversation=conversation,
            grace_until=now + grace if grace else None,
            merge_record=conversation is not None,
        )
        fallback = FallbackCall(self, call, initial=initial)
        log.info("🔀 Conversation over Telnyx speak and transcription (mode %s)", mode)
        self._run_here(fallback)
        return fallback

    def _run_here(self, fallback: FallbackCall) -> None:
        self._calls[fallback.call_control_id] = fallback
        self.services.spawn(self._run, fallback)

    async def _run(self, fallback: FallbackCall) -> None:
        call = fallback.call
        try:
            await self._ensure_store()
            await fallback.run()
        finally:
            if self._calls.get(call.call_control_id) is fallback:
                del self._calls[call.call_control_id]
            self.services.registry.remove(call)

    async def _ensure_store(self) -> None:
        """Open this instance's own state store, if it has to use one (see ``shared``)."""
        store = self.shared.store
        if store is self.services.store or self._own_store_open:
            return
        async with self._own_store_opened:
            if not self._own_store_open:
                await store.open()
                self._own_store_open = True

    async def record_started(self, ccid: str, data: fs.FallbackState) -> None:
        await self.records.started(ccid, data)

    async def finalize(self, ccid: str, data: fs.FallbackState, *, stored: bool = True) -> None:
        """Write the ended call's record and delete its state (by the turn holder only)."""
        record = await self.records.ended(ccid, data)
        if stored:
            await self.records.keep(self.shared.delete, ccid)
        self.services.metrics.calls.labels(record.mode, record.end_reason or "unknown").inc()
        log.info("📴 Call ended (%s)", record.end_reason or "unknown")

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
            media_call.end_reason = EndReason.HANGUP  # the socket only closed because the call did
            return False
        if self.services.going_away.is_set():
            return False
        lost = media_call.end_reason == EndReason.STREAM_LOST
        log.warning(
            "🔀 Media stream %s: the call goes on in fallback mode with its history",
            "closed without a stop frame" if lost else "failed",
        )
        grace = self.services.settings.stream_lost_grace_ms / 1000 if lost else 0.0
        fallback = self.start(
            ccid,
            decode_client_state(client_state),
            CallMode.DEGRADED,
            conversation,
            grace=grace,
            started_at=media_call.started_at,
        )
        if fallback is None:
            return False
        self.services.registry.total_calls -= 1  # the same call going on, not a new one
        return True

    def expect_stream(self, call_control_id: str) -> None:
        """``streaming_start`` is about to be sent: note that a socket is due."""
        self._stream_waits.setdefault(call_control_id, _StreamWait())

    def stream_started(self, call_control_id: str) -> None:
        """The call's media socket sent ``start``, claimed the stream, and the media call is
        registered."""
        waiting = self._stream_waits.get(call_control_id)
        if waiting is not None:
            waiting.connected = True
        self._stream_arrived(call_control_id)

    def _stream_arrived(self, call_control_id: str) -> None:
        waiting = self._stream_waits.get(call_control_id)
        if waiting is not None:
            waiting.over.set()

    async def await_stream(self, call_control_id: str, client_state: str | None) -> None:
        """Degrade the call if its media socket is not there in time (see ``expect_stream``).

        Whether it came is the deployment's to say, not this instance's: the socket may have
        landed on another one. So the wait ends in a claim on the call's stream
        (``CallServices.claim_stream``) unless the socket came here: losing it means a socket
        has the stream elsewhere; winning it shuts the door on any socket still to come, on
        every instance (after a hang-up or ``streaming.failed`` too)."""
        waiting = self._stream_waits.get(call_control_id)
        if waiting is None:
            return
        try:
            with trio.move_on_after(self.services.settings.stream_connect_timeout_ms / 1000):
                await waiting.over.wait()
        finally:
            if self._stream_waits.get(call_control_id) is waiting:
                del self._stream_waits[call_control_id]
        if waiting.connected or not await self.services.claim_stream(call_control_id):
            return
        if waiting.over.is_set() or self.services.registry.get(call_control_id) is not None:
            return  # a streaming.failed or call.hangup dealt with it
        if self.services.going_away.is_set() or call_control_id in self._hung_up:
            return
        log.warning(
            "🔌 No media stream %d ms after Streaming Start: the call goes on in fallback mode",
            self.services.settings.stream_connect_timeout_ms,
        )
        if self.start(call_control_id, decode_client_state(client_state), CallMode.DEGRADED):
            self.services.spawn(self.services.telnyx.streaming_stop, call_control_id)

    def stream_unusable(self, call_control_id: str, client_state: str | None, why: str) -> None:
        """The call's media socket came, but its audio cannot be carried (``why``, e.g. its
        codec): the call goes on in fallback mode at once, and the stream is stopped."""
        log.warning("🔀 Media stream unusable (%s): the call goes on in fallback mode", why)
        self._stream_arrived(call_control_id)
        if self.services.going_away.is_set() or call_control_id in self._hung_up:
            return
        if self.start(call_control_id, decode_client_state(client_state), CallMode.DEGRADED):
            self.services.spawn(self.services.telnyx.streaming_stop, call_control_id)

    async def stream_failed(self, event: WebhookEvent) -> bool:
        """``streaming.failed`` for a call that is not in fallback mode already (see the
        module docstring: the deployment decides, not this instance alone). False if the
        stream is held by another process, which is to be told."""
        ccid = event.call_control_id
        log.warning("🔌 Media stream failed: %s", event.payload.get("failure_reason") or "-")
        self._stream_arrived(ccid)
        if self.services.going_away.is_set() or ccid in self._hung_up:
            return True
        media_call = self.services.registry.get(ccid)
        if media_call is not None:
            if media_call.mode == CallMode.MEDIA:
                media_call.end(EndReason.STREAM_FAILED)  # its session hands over as it ends
            return True
        if await self.services.claim_stream(ccid):
            # No socket has the stream anywhere, and none can take it now: the caller has
            # heard nothing yet, so the call starts afresh, here.
            if ccid not in self._hung_up and self.services.registry.get(ccid) is None:
                self.start(ccid, decode_client_state(event.client_state), CallMode.DEGRADED)
            return True
        return False


def _party(caller: fs.Caller, line: fs.Line) -> dict[str, str]:
    """Who is on the line, as the operator console shows it (``ActiveCall.party``)."""
    number = line.from_number if line.direction == "inbound" else line.to_number
    return {"nombre": caller.nombre, "number": number, "direction": line.direction}
