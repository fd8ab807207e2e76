"""Which calls run on this instance, and which webhook events were already seen."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from hashlib import blake2b

import trio

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.feed import CallFeed
from voice_trio.calls.orders import Order, Outcome


@dataclass(eq=False)
class ActiveCall:
    """A call running here. ``cancel_scope`` is the call's nursery scope; ``end`` stops it."""

    call_control_id: str
    mode: CallMode
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started_at: float = field(default_factory=time.time)
    end_reason: EndReason | None = None
    # Set when the server drains: the call should say goodbye and hang up soon.
    wind_down: trio.Event = field(default_factory=trio.Event)
    # How a media call here takes an operator's order, once it can (None until then).
    obey: Callable[[Order], Outcome] | None = None
    # Who is on the line, for the operator console: nombre, number, direction.
    party: dict[str, str] = field(default_factory=dict)
    # greeting | listening | thinking | speaking, as the call's session says (set_state).
    state: str = "connecting"
    # Where the call's events go (calls.feed); the registry sets it when the call is added.
    feed: CallFeed | None = None

    def note(self, kind: str, **fields: object) -> None:
        """Tell whoever watches (the console) what just happened on the call."""
        if self.feed is not None:
            self.feed.publish({"k": kind, "c": self.call_control_id, **fields})

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.note("state", state=state)

    def end(self, reason: EndReason) -> None:
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
        self.feed = CallFeed()  # what happens on these calls, for the operator console

    def add(self, call: ActiveCall) -> None:
        if call.call_control_id in self._calls:
            raise KeyError(f"call {call.call_control_id} is already running here")
        self._calls[call.call_control_id] = call
        self.total_calls += 1
        call.feed = self.feed
        call.note("start", mode=str(call.mode), started_at=call.started_at, **call.party)
        call.note("state", state=call.state)

    def remove(self, call: ActiveCall) -> None:
        if self._calls.get(call.call_control_id) is call:
            del self._calls[call.call_control_id]
            self._removed.set()
            self._removed = trio.Event()
            call.note("end", end_reason=str(call.end_reason or ""), mode=str(call.mode))

    async def wait_until_empty(self) -> None:
        while self._calls:
            await self._removed.wait()

    def get(self, call_control_id: str) -> ActiveCall | None:
        return self._calls.get(call_control_id)

    def end(self, call_control_id: str, reason: EndReason) -> bool:
        call = self._calls.get(call_control_id)
        if call is None:
            return False
        call.end(reason)
        return True

    def end_all(self, reason: EndReason) -> None:
        for call in list(self._calls.values()):
            call.end(reason)

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[ActiveCall]:
        return iter(list(self._calls.values()))


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


class SeenEvents:
    """Webhook event ids seen recently: a retried or duplicated delivery is recognised and
    ignored. Telnyx retries within about a minute; we remember ``ttl`` (10 minutes).

    At ~5 events a call this holds tens of thousands of ids on a busy server, so each is
    kept as an 8-byte digest in a flat ``bytearray`` per ``ttl / 10`` slice: 8 bytes an id
    (an id string in a dict cost ~175), whole slices expiring at once, so an id is
    remembered for between ``ttl`` and 1.1 ``ttl``. A lookup scans the digests in C
    (~50 us at 50 000 ids), which is nothing at a few webhooks a second. At most
    ``capacity`` ids are kept (the oldest slices go first). Two ids with the same 64-bit
    digest would be taken for one: at 50 000 ids, a chance of about 1 in 10^10.
    """

    def __init__(self, capacity: int = 50_000, ttl: float = 600.0) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._slice = ttl / 10
        self._slices: deque[tuple[float, bytearray]] = deque()  # (slice start, digests)
        self._count = 0

    def first_time(self, event_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        slices = self._slices
        while slices and now - slices[0][0] > self._ttl + self._slice:
            self._count -= len(slices.popleft()[1]) // _DIGEST
        key = blake2b(event_id.encode(), digest_size=_DIGEST).digest()
        for _, digests in slices:
            if _contains(digests, key):
                return False
        if not slices or now - slices[-1][0] >= self._slice:
            slices.append((now, bytearray()))
        slices[-1][1].extend(key)
        self._count += 1
        while self._count > self._capacity and len(slices) > 1:
            self._count -= len(slices.popleft()[1]) // _DIGEST
        return True

    def __len__(self) -> int:
        return self._count


_DIGEST = 8


def _contains(digests: bytearray, key: bytes) -> bool:
    """Whether ``key`` is one of the digests (a match must start on a digest boundary)."""
    at = digests.find(key)
    while at >= 0:
        if at % _DIGEST == 0:
            return True
        at = digests.find(key, at + 1)
    return False
