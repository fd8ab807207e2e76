"""Key presses (DTMF) of a media call: counted once, grouped, and told to the conversation.

Telnyx reports a key press twice when both paths are on: as a ``dtmf`` frame on the media
stream and as a ``call.dtmf.received`` webhook (protocols/telnyx.md §3.2). Neither carries an
id the other shares, so :class:`PressDeduper` pairs them: a press from one path that matches
an unpaired press of the same key from the *other* path within ``DEDUPE_WINDOW_S`` is the
same press. Two presses of one key on the same path are two presses, so "11" stays "11".

Digits typed in a row (an ID number, a menu choice) are one caller turn, not one per key:
:class:`KeyCollector` closes a group after ``KEY_GAP_S`` without another key. The turn text
is a bracketed note ("[la persona marcó 1 2 3]") that Claude reads as a key press, not speech.
"""

from __future__ import annotations

import math

STREAM = "stream"
WEBHOOK = "webhook"
# Both reports of one press arrive well within this of each other (frame: at once; webhook:
# an HTTP round trip later, retried deliveries are de-duplicated by event id before here).
DEDUPE_WINDOW_S = 2.0
KEY_GAP_S = 0.8  # a pause this long after a key ends the group of keys
KEY_QUEUE = 32  # presses waiting to be reported; a caller cannot type faster than we read

KEY_NOTES = {
    "es": "[la persona marcó {keys} en el teclado]",
    "en": "[the caller pressed {keys} on the keypad]",
}


def key_note(keys: list[str], language: str) -> str:
    """The conversation's text for keys pressed in a row."""
    template = KEY_NOTES["en" if language.lower().startswith("en") else "es"]
    return template.format(keys=" ".join(keys))


class PressDeduper:
    """Pairs the two reports of one key press (module docstring). Pure, clock passed in."""

    def __init__(self, window: float = DEDUPE_WINDOW_S) -> None:
        self._window = window
        # (key, source, at): a press waits here at most ``window`` s, so a list is enough
        # (an empty deque is a 600-byte block per call).
        self._unpaired: list[tuple[str, str, float]] = []

    def first_report(self, key: str, source: str, now: float) -> bool:
        """True if this is a new press; False if it is the other path's report of one."""
        while self._unpaired and now - self._unpaired[0][2] > self._window:
            del self._unpaired[0]
        for i, (k, s, _) in enumerate(self._unpaired):
            if k == key and s != source:
                del self._unpaired[i]
                return False
        self._unpaired.append((key, source, now))
        return True


class KeyCollector:
    """Groups presses into turns. Pure, clock passed in: ``push`` never blocks, and the
    task that drives it (the call's watch) waits until ``due``, reports each press
    (``take_presses``, to barge in) and then each finished group (``take_group``)."""

    def __init__(self, gap: float = KEY_GAP_S) -> None:
        self._gap = gap
        self._unreported: list[str] = []  # at most KEY_QUEUE
        self._group: list[str] = []
        self._closes_at = math.inf

    def push(self, key: str, now: float) -> bool:
        """Queue a press made at ``now``; False (dropped) if the queue is full."""
        if len(self._unreported) >= KEY_QUEUE:
            return False
        self._unreported.append(key)
        self._group.append(key)
        self._closes_at = now + self._gap
        return True

    @property
    def due(self) -> float:
        """When there is something to take: at once while presses wait to be reported,
        else when the open group's gap ends (``inf``: no group is open)."""
        return -math.inf if self._unreported else self._closes_at

    def take_presses(self) -> list[str]:
        """The presses not reported yet, in order."""
        presses = list(self._unreported)
        self._unreported.clear()
        return presses

    def take_group(self, now: float) -> list[str] | None:
        """The keys pressed in a row, once ``gap`` has passed without another press and
        every one of them was reported; else None."""
        if not self._group or self._unreported or now < self._closes_at:
            return None
        group, self._group = self._group, []
        self._closes_at = math.inf
        return group
