"""The call-event bus: facts and commands for a live call reach the process that holds it,
wherever the webhook or the API request landed (DESIGN.md §4).

A media call lives in the process that holds its socket, but Telnyx posts the call's
webhooks, and operators send their API requests, to any instance or worker. Every process
listens on one channel; an event names its kind (``k``), its call (``c``) and its sender
(``o``), and the process that holds the call acts on it (:mod:`voice_trio.instance.live`); the
others drop it. The engine is PostgreSQL ``LISTEN``/``NOTIFY`` over ``DATABASE_URL``
(:mod:`voice_trio.store.notify`): the store every instance already shares, so there is no
other service to run. With SQLite there is one process and no bus (``state`` is ``local``):
every call is here.

Delivery is at most once. A notification sent while a listener is reconnecting is lost to
it: a lost fact leaves the call as if Telnyx had not sent it (a session treats every webhook
fact as optional, ``calls.signals``), and a lost command gets no answer (the API says 504).
Losing the connection is survived: the loop reconnects after a growing pause, counts it
(``voice_call_event_reconnects_total``), and ``/health`` says ``reconnecting`` meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from voice_trio.observability import Metrics
from voice_trio.store import CallStore, StoreError

log = logging.getLogger("voice_trio.calls")

CHANNEL = "voice_trio_call_events"
LOCAL, CONNECTED, RECONNECTING = "local", "connected", "reconnecting"
# How long a worker thread waits for notifications before its task may be cancelled.
POLL_SECONDS = 0.25
RETRY_PAUSES = (0.1, 0.5, 1.0, 2.0, 5.0)  # after the 1st, 2nd, ... failure in a row

Handler = Callable[[dict[str, Any]], None]


class EventBus:
    """``publish`` an event to the other processes; ``run`` hands theirs to a handler."""

    def __init__(self, store: CallStore | None, sender: str, metrics: Metrics) -> None:
        self.sender = sender
        self.metrics = metrics
        self._store = store
        self._listener = store.listener(CHANNEL) if store is not None else None
        self.state = LOCAL if self._listener is None else RECONNECTING
        self._thread = trio.CapacityLimiter(1)  # the listener is used by one thread at a time

    @property
    def shared(self) -> bool:
        """Whether other processes may hold calls (and hear what is published)."""
        return self._listener is not None

    async def publish(self, event: dict[str, Any]) -> bool:
        """Send ``event`` (a JSON object; ``k`` is its kind) to every other process. False if
        it could not be sent (no bus, too large, the store unreachable): logged and counted."""
        kind = str(event.get("k", "?"))
        if self._store is None or self._listener is None:
            return False
        payload = json.dumps({**event, "o": self.sender}, separators=(",", ":"))
        try:
            await self._store.notify(CHANNEL, payload)
        except (StoreError, ValueError) as exc:
            self.metrics.call_events.labels(kind, "failed").inc()
            log.warning("📡 Call event %s not sent: %s", kind, exc)
            return False
        self.metrics.call_events.labels(kind, "published").inc()
        return True

    async def run(self, handler: Handler, *, task_status: trio.TaskStatus[None]) -> None:
        """Hand every event from another process to ``handler`` (synchronously: it must not
        block) until cancelled, reconnecting whenever the connection is lost. Started once
        the first attempt to connect is over, whichever way it went."""
        listener = self._listener
        if listener is None:
            task_status.started()
            return
        started = False
        failures = 0
        try:
            while True:
                try:
                    await trio.to_thread.run_sync(
                        listener.connect, limiter=self._thread, abandon_on_cancel=True
                    )
                except StoreError as exc:
                    self._lost(exc, failures)
                else:
                    if failures:
                        self.metrics.call_event_reconnects.inc()
                        log.info("📡 Call events: listening again (after %d attempts)", failures)
                    else:
                        log.info("📡 Call events: listening on PostgreSQL %s", listener.where)
                    self.state = CONNECTED
                    failures = 0
                    if not started:
                        started = True
                        task_status.started()
                    try:
                        await self._receive(handler)
                    except StoreError as exc:
                        self._lost(exc, failures)
                if not started:
                    started = True
                    task_status.started()
                failures += 1
                await trio.sleep(RETRY_PAUSES[min(failures, len(RETRY_PAUSES)) - 1])
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(listener.shut)

    def _lost(self, exc: StoreError, failures: int) -> None:
        self.state = RECONNECTING
        if failures == 0:
            log.warning("📡 Call events: connection lost, reconnecting (%s)", exc)
        else:
            log.debug("📡 Call events: still reconnecting (%s)", exc)

    async def _receive(self, handler: Handler) -> None:
        assert self._listener is not None
        receive = self._listener.receive
        while True:
            payloads = await trio.to_thread.run_sync(receive, POLL_SECONDS, limiter=self._thread)
            for raw in payloads:
                self._dispatch(raw, handler)

    def _dispatch(self, raw: str, handler: Handler) -> None:
        try:
            event = json.loads(raw)
        except (ValueError, RecursionError):
            event = None
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("o"), str)
            or not isinstance(event.get("k"), str)
        ):
            self.metrics.call_events.labels("unknown", "dropped").inc()
            log.warning("📡 Malformed call event dropped (%d bytes)", len(raw))
            return
        if event["o"] == self.sender:
            return  # our own: acted on before it was sent
        kind = event["k"] if event["k"] in KINDS else "unknown"
        self.metrics.call_events.labels(kind, "received").inc()
        try:
            handler(event)
        except Exception:
            log.exception("📡 Call event %s could not be handled", kind)


# fact: a webhook's fact for the call's holder; do / done: an operator's order and its
# outcome; feed: what happens on a live call, for the consoles of every process.
KINDS = frozenset({"fact", "do", "done", "feed"})
