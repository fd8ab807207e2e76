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

from collections import deque
from collections.abc import Awaitable, Callable

import trio

STREAM = "stream"
WEBHOOK = "webhook"
# Both reports of one press arrive well within this of each other (frame: at once; webhook:
# an HTTP round trip later, retried deliveries are de-duplicated by event id before here).
DEDUPE_WINDOW_S = 2.0
KEY_GAP_S = 0.8  # a pause this long after a key ends the group of keys
KEY_QUEUE = 32  # presses waiting to be grouped; a caller cannot type faster than we read

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
        self._unpaired: deque[tuple[str, str, float]] = deque()  # (key, source, at)

    def first_report(self, key: str, source: str, now: float) -> bool:
        """True if this is a new press; False if it is the other path's report of one."""
        while self._unpaired and now - self._unpaired[0][2] > self._window:
            self._unpaired.popleft()
        for i, (k, s, _) in enumerate(self._unpaired):
            if k == key and s != source:
                del self._unpaired[i]
                return False
        self._unpaired.append((key, source, now))
        return True


class KeyCollector:
    """Groups presses into turns: ``push`` never blocks; ``run`` hands each group on."""

    def __init__(self, gap: float = KEY_GAP_S) -> None:
        self._gap = gap
        self._send, self._recv = trio.open_memory_channel[str](KEY_QUEUE)

    def push(self, key: str) -> bool:
        """Queue a press; False (dropped) if the queue is full or closed."""
        try:
            self._send.send_nowait(key)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    async def run(
        self,
        on_press: Callable[[str], Awaitable[None]],
        on_group: Callable[[list[str]], None],
    ) -> None:
        """Await ``on_press(key)`` for every press as it comes (to barge in), and call
        ``on_group(keys)`` once ``gap`` passes without another press."""
        async with self._recv:
            async for key in self._recv:
                keys = [key]
                await on_press(key)
                while True:
                    with trio.move_on_after(self._gap):
                        key = await self._recv.receive()
                        keys.append(key)
                        await on_press(key)
                        continue
                    break
                on_group(keys)
