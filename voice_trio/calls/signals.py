"""Webhook facts for the media calls running here: key presses and machine detection.

A media call hears its caller over the socket, but some facts only come as webhooks:
``call.dtmf.received`` (also sent as a ``dtmf`` frame) and answering machine detection.
The webhook handler hands them to :class:`CallSignals`, which passes each to the call's
session, synchronously and without blocking. Machine detection may finish before the media
socket is up, so facts for a call with no session yet are kept (bounded, oldest calls
forgotten first) and handed over when the session attaches.

Webhooks land on any instance (DESIGN.md §4): a fact for a call not running in the process
that got it is passed on over the call-event bus (:mod:`voice_trio.instance.live`), and every
process keeps it here for a session not attached yet, so a verdict that beats the socket
reaches the call wherever the socket lands. Sessions still treat every fact as optional (the
bus delivers at most once): a missing machine verdict means a person, a missing
``call.dtmf.received`` is covered by the frame.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from voice_trio.providers.telnyx.webhooks import AMD_DETECTION_EVENTS, AMD_GREETING_EVENTS

# ``call.speak.ended``: a sentence that went out through Telnyx speak (bot_voice) has played.
SIGNAL_EVENTS = (
    frozenset({"call.dtmf.received", "call.speak.ended"})
    | AMD_DETECTION_EVENTS
    | AMD_GREETING_EVENTS
)
EARLY_CALLS = 1000  # calls whose facts are kept while their socket is not up yet
EARLY_FACTS = 8  # facts kept per such call

Sink = Callable[[str, dict[str, Any]], None]


class CallSignals:
    def __init__(self, capacity: int = EARLY_CALLS) -> None:
        self._sinks: dict[str, Sink] = {}
        self._early: OrderedDict[str, list[tuple[str, dict[str, Any]]]] = OrderedDict()
        self._capacity = capacity

    def deliver(self, call_control_id: str, kind: str, payload: dict[str, Any]) -> bool:
        """Hand a fact to the call's session; False if it was kept for later."""
        sink = self._sinks.get(call_control_id)
        if sink is not None:
            sink(kind, payload)
            return True
        facts = self._early.setdefault(call_control_id, [])
        self._early.move_to_end(call_control_id)
        if len(facts) < EARLY_FACTS:
            facts.append((kind, payload))
        while len(self._early) > self._capacity:
            self._early.popitem(last=False)
        return False

    def attach(self, call_control_id: str, sink: Sink) -> None:
        """From now on ``sink`` gets the call's facts; facts that came early go first."""
        self._sinks[call_control_id] = sink
        for kind, payload in self._early.pop(call_control_id, []):
            sink(kind, payload)

    def detach(self, call_control_id: str, sink: Sink) -> None:
        if self._sinks.get(call_control_id) == sink:
            del self._sinks[call_control_id]
        self._early.pop(call_control_id, None)

    def __len__(self) -> int:
        return len(self._sinks)
