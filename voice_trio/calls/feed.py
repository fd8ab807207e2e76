"""``CallFeed``: what happens on the live calls, as it happens, for whoever watches (the
operator console's Server-Sent Events).

The calls publish small events (a JSON object: kind ``k``, call ``c``, and the fields of the
kind) and never wait for a watcher: each watcher has a bounded channel, and a watcher too
slow to keep up loses events and is told so (``lagging``), so that it reloads instead of
showing a transcript with holes. The feed also keeps a snapshot of every live call it has
heard of (who, mode, state, transcript so far), so a console opened mid-call starts from it.

Kinds: ``start`` (party, mode, started), ``state`` (greeting, listening, thinking,
speaking), ``caller`` (a caller's turn, as transcribed), ``bot`` (a sentence as it starts
to be said), ``heard`` (a bot turn cut by a barge-in: what the caller heard of it),
``barge_in``, ``end`` (end reason). Events relayed from another process (``relay``) enter
the snapshot and reach the watchers the same way; ``on_publish`` sends this process's out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

KINDS = frozenset({"start", "state", "caller", "bot", "heard", "barge_in", "end"})
TRANSCRIPT_KINDS = frozenset({"caller", "bot", "heard", "barge_in"})
TRANSCRIPT_LINES = 200  # kept per live call for a console that opens mid-call
WATCHER_BUFFER = 256  # events a watcher may fall behind before it is told it lags
MAX_TEXT = 2000  # a bus event must stay small (PostgreSQL NOTIFY: 8000 bytes)
MAX_CALLS = 10_000  # a bound on snapshots, should ends from elsewhere be lost


@dataclass(slots=True)
class LiveCallView:
    """What a watcher knows of one live call."""

    call_control_id: str
    nombre: str = ""
    number: str = ""
    direction: str = ""
    mode: str = ""
    started_at: float = field(default_factory=time.time)
    state: str = "connecting"
    # The last TRANSCRIPT_LINES lines. A list: a deque's first block is 760 bytes, more
    # than a call of a few turns has lines.
    transcript: list[dict[str, Any]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Watcher:
    send: trio.MemorySendChannel[dict[str, Any]]
    lagging: bool = False


class CallFeed:
    def __init__(self) -> None:
        self.calls: dict[str, LiveCallView] = {}
        self._watchers: set[_Watcher] = set()
        # Set by the instance to pass this process's events to the others (calls.bus).
        self.on_publish: Callable[[dict[str, Any]], None] | None = None

    def publish(self, event: dict[str, Any]) -> None:
        """An event of a call here: into the snapshot, to every watcher, to the bus."""
        event = {**event, "at": event.get("at") or time.time()}
        text = event.get("text")
        if isinstance(text, str) and len(text) > MAX_TEXT:
            event["text"] = text[:MAX_TEXT]
        self._take(event)
        if self.on_publish is not None:
            self.on_publish(event)

    def relay(self, event: dict[str, Any]) -> None:
        """An event of a call held by another process (never sent on again)."""
        if event.get("k") in KINDS and isinstance(event.get("c"), str):
            self._take({k: v for k, v in event.items() if k != "o"})

    def _take(self, event: dict[str, Any]) -> None:
        self._note(event)
        for watcher in list(self._watchers):
            if watcher.lagging:
                continue
            try:
                watcher.send.send_nowait(event)
            except trio.WouldBlock:
                # It reloads rather than show a transcript with holes: its channel ends.
                watcher.lagging = True
                watcher.send.close()
            except trio.BrokenResourceError:
                self._watchers.discard(watcher)

    def _note(self, event: dict[str, Any]) -> None:
        kind, ccid = event.get("k"), str(event.get("c"))
        if kind == "start":
            if len(self.calls) >= MAX_CALLS:
                self.calls.pop(next(iter(self.calls)))
            self.calls[ccid] = LiveCallView(
                ccid,
                nombre=str(event.get("nombre", "")),
                number=str(event.get("number", "")),
                direction=str(event.get("direction", "")),
                mode=str(event.get("mode", "")),
                started_at=float(event.get("started_at") or event["at"]),
            )
            return
        if kind == "end":
            self.calls.pop(ccid, None)
            return
        view = self.calls.get(ccid)
        if view is None:
            return
        if kind == "state":
            view.state = str(event.get("state", ""))
        elif kind in TRANSCRIPT_KINDS:
            lines = view.transcript
            lines.append(event)
            if len(lines) > TRANSCRIPT_LINES:
                del lines[0]

    @contextmanager
    def watch(self) -> Iterator[tuple[trio.MemoryReceiveChannel[dict[str, Any]], _Watcher]]:
        """A channel of every event from now on, until the block ends. The watcher's
        ``lagging`` turns True when it fell ``WATCHER_BUFFER`` events behind: its channel
        then ends once the events already in it are read."""
        send, receive = trio.open_memory_channel[dict[str, Any]](WATCHER_BUFFER)
        watcher = _Watcher(send)
        self._watchers.add(watcher)
        try:
            yield receive, watcher
        finally:
            self._watchers.discard(watcher)
            send.close()
            receive.close()

    @property
    def watchers(self) -> int:
        return len(self._watchers)
