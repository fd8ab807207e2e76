"""The Telnyx simulator with the lean carrier: the reference REST API, call states and signed
webhooks (:mod:`voice_trio.sim.telnyx`) in Trio, and the calls' media on a reactor thread
(:mod:`voice_trio.sim.lean_carrier`).

A call placed with a :class:`LeanParty` (a :class:`~voice_trio.sim.lean_caller.LeanCaller`
seen from Trio) streams over a :class:`LeanMediaStream`, whose
:class:`~voice_trio.sim.lean_carrier.StreamSession` the simulator's one
:class:`~voice_trio.sim.lean_carrier.MediaEngine` ticks; any other party (a dialled callee, a
reference :class:`~voice_trio.sim.caller.ScriptedCaller`) gets the reference line and stream.

    sim = LeanTelnyxSim(api_key=..., default_webhook_url=...)
    base_url = await nursery.start(partial(serve, sim))
    party = sim.lean_party(LeanCaller(script, ms_per_char=65))
    sim.place_inbound_call("+573001234567", OUR_NUMBER, party)
    await party.done.wait()

Threads: the caller lives on the reactor's thread. :class:`LeanParty` forwards what the call
tells its party (``hangup``) there; the caller's end comes back to Trio through the run's
token, where the party hangs up if the caller asked for it and sets ``done``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import trio

from voice_trio.sim import telnyx
from voice_trio.sim.carrier import AudioPort, Line, MediaStream, StreamConnectError, StreamParams
from voice_trio.sim.lean_caller import LeanCaller
from voice_trio.sim.lean_carrier import MediaEngine, StreamSession
from voice_trio.sim.reactor import Reactor
from voice_trio.sim.telnyx_calls import SimCall


def _to_trio(token: trio.lowlevel.TrioToken) -> Callable[..., None]:
    """``notify(fn, *args)``: run ``fn(*args)`` in the Trio run of ``token``, from any thread."""

    def notify(fn: Callable[..., None], *args: Any) -> None:
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the run is over: nobody is left to tell

    return notify


class LeanParty(AudioPort):
    """The party :class:`SimCall` sees for a :class:`LeanCaller` on the engine's thread."""

    def __init__(self, caller: LeanCaller, engine: MediaEngine) -> None:
        self.caller = caller
        self.engine = engine
        self.line: Line | None = None
        self.done = trio.Event()  # the caller is done (and hung up if it meant to)
        notify = _to_trio(trio.lowlevel.current_trio_token())
        caller.on_done = lambda hang_up: notify(self._caller_done, hang_up)

    def attach(self, line: Line) -> None:
        self.line = line

    def on_event(self, kind: str, detail: str, now: float) -> None:
        if kind == "hangup":
            reactor = self.engine.reactor
            reactor.call_soon_threadsafe(self.caller.on_event, kind, detail, reactor.now())

    def fail(self, reason: str) -> None:
        """End the caller from Trio (e.g. its call never got a stream)."""
        self.engine.reactor.call_soon_threadsafe(self.caller.fail, reason)

    def _caller_done(self, hang_up: bool) -> None:
        line = self.line
        if hang_up and line is not None and line.answered.is_set() and not line.ended.is_set():
            line.hang_up()
        self.done.set()


class LeanMediaStream(MediaStream):
    """The Trio side of a lean stream: what :class:`SimCall` holds; see the module docstring."""

    def __init__(
        self,
        params: StreamParams,
        *,
        engine: MediaEngine,
        party: LeanParty,
        line: Line,
        on_event: Callable[[str, str], None],
        on_closed: Callable[[MediaStream], None] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            params,
            on_event=on_event,
            on_closed=on_closed,
            record_audio_bytes=0,
            connect_timeout=connect_timeout,
        )
        self.engine = engine
        self.party = party
        self.line = line
        self.session: StreamSession | None = None
        self._opened = trio.Event()
        self._open_error: str | None = None

    def _submit(self, method: Callable[..., None], *args: Any) -> None:
        self.engine.reactor.call_soon_threadsafe(method, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        session = StreamSession(
            self.engine,
            self,
            caller=self.party.caller,
            line=self.line,
            notify=_to_trio(trio.lowlevel.current_trio_token()),
            on_opened=self._session_opened,
            on_closed=self._session_closed,
        )
        self.session = session
        try:
            self._submit(session.open, self._connect_timeout)
            await self._opened.wait()
            if self._open_error is not None:
                raise StreamConnectError(self._open_error)
            self.started.set()
            task_status.started()
            await self.closed.wait()
        finally:
            if not self.closed.is_set():
                self._submit(session.abort)
                if self.started.is_set():
                    self._finish(self.close_reason or "cancelled")

    def _session_opened(self, error: str | None) -> None:
        self._open_error = error
        self._opened.set()

    def _session_closed(self, reason: str, code: int | None) -> None:
        self.close_code = code
        self._finish(self.close_reason or reason)

    async def stop(self) -> None:
        """Send ``stop`` and close with 1000, as the reference does; idempotent."""
        if self.session is None or not self.is_open:
            return
        self._stopping = True
        self.close_reason = "stopped"
        self._submit(self.session.stop)
        with trio.move_on_after(1.5):
            await self.closed.wait()

    async def drop(self, code: int = 1011) -> None:
        """Close without ``stop`` (a broken media path); idempotent."""
        if self.session is None or not self.is_open:
            return
        self._stopping = True
        self.close_reason = "dropped"
        self._submit(self.session.drop, code)
        with trio.move_on_after(1.5):
            await self.closed.wait()

    def press(self, digit: str) -> None:
        if self.session is not None:
            self._submit(self.session.press, digit)

    async def tick(self, caller: bytes | None) -> bytes:
        raise RuntimeError("a lean stream is ticked by its MediaEngine, not by a Line")


class LeanSimCall(SimCall):
    """A call leg whose lean caller is ticked by the simulator's media engine."""

    def _ensure_clock(self) -> None:
        if not isinstance(self.line.party, LeanParty):
            super()._ensure_clock()  # the reference line's own clock

    def _new_stream(self, params: StreamParams) -> MediaStream:
        party = self.line.party
        if not isinstance(party, LeanParty):
            return super()._new_stream(params)
        sim = cast(LeanTelnyxSim, self.sim)
        return LeanMediaStream(
            params,
            engine=sim.engine,
            party=party,
            line=self.line,
            on_event=self._on_stream_event,
            on_closed=self._on_stream_closed,
            connect_timeout=sim.stream_connect_timeout_s,
        )


class LeanTelnyxSim(telnyx.TelnyxSim):
    """:class:`~voice_trio.sim.telnyx.TelnyxSim` whose lean callers share one media engine
    (running while :func:`serve` runs)."""

    call_class = LeanSimCall

    def __init__(self, *, phases: int = 10, **knobs: Any) -> None:
        knobs.setdefault("record_audio_s", 0.0)
        super().__init__(**knobs)
        self.engine = MediaEngine(Reactor(), phases=phases)

    def lean_party(self, caller: LeanCaller) -> LeanParty:
        """``caller`` as a party to place a call with (in the Trio run that serves)."""
        return LeanParty(caller, self.engine)


async def serve(
    sim: LeanTelnyxSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API and run the calls (and the media engine's thread) until
    cancelled; ``started`` gets the base URL."""
    reactor = sim.engine.reactor
    reactor.start("lean-carrier")
    try:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(partial(telnyx.serve, sim, host=host, port=port))
            task_status.started(base_url)
    finally:
        reactor.stop()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(reactor.join, 5.0)
        reactor.close()
