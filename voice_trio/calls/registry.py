"""Which calls run on this instance, and which webhook events were already seen."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class ActiveCall:
    """A call running here. ``cancel_scope`` is the call's nursery scope; ``end`` stops it."""

    call_control_id: str
    mode: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started_at: float = field(default_factory=time.time)
    end_reason: str | None = None
    # Set when the server drains: the call should say goodbye and hang up soon.
    wind_down: trio.Event = field(default_factory=trio.Event)

    async def time_up_after(self, seconds: float) -> str:
        """Wait for the call's maximum length or a drain; say which came first."""
        with trio.move_on_after(seconds):
            await self.wind_down.wait()
            return "drain"
        return "max_duration"

    def end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        self.cancel_scope.cancel()


class CallRegistry:
    """Active calls by ``call_control_id``. A call adds itself when it starts and removes
    itself in ``finally`` when it ends, so the registry can never hold a finished call."""

    def __init__(self) -> None:
        self._calls: dict[str, ActiveCall] = {}
        self._removed = trio.Event()
        self.total_calls = 0

    def add(self, call: ActiveCall) -> None:
        if call.call_control_id in self._calls:
            raise KeyError(f"call {call.call_control_id} is already running here")
        self._calls[call.call_control_id] = call
        self.total_calls += 1

    def remove(self, call: ActiveCall) -> None:
        if self._calls.get(call.call_control_id) is call:
            del self._calls[call.call_control_id]
            self._removed.set()
            self._removed = trio.Event()

    async def wait_until_empty(self) -> None:
        while self._calls:
            await self._removed.wait()

    def get(self, call_control_id: str) -> ActiveCall | None:
        return self._calls.get(call_control_id)

    def end(self, call_control_id: str, reason: str) -> bool:
        call = self._calls.get(call_control_id)
        if call is None:
            return False
        call.end(reason)
        return True

    def end_all(self, reason: str) -> None:
        for call in list(self._calls.values()):
            call.end(reason)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._calls.values()))


class SeenEvents:
    """Webhook event ids seen recently (bounded LRU): a retried or duplicated delivery is
    recognised and ignored. Telnyx retries within about a minute; we remember 10 minutes."""

    def __init__(self, capacity: int = 50_000, ttl: float = 600.0) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity
        self._ttl = ttl

    def first_time(self, event_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self._ttl and len(self._seen) < self._capacity:
                break
            del self._seen[oldest]
        if event_id in self._seen:
            return False
        self._seen[event_id] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)
