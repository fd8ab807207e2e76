"""The Telnyx simulator with the lean carrier: the reference REST API, call states and signed
webhooks (:mod:`voice_trio.sim.telnyx`), and media streams from :mod:`.lean_carrier`.

A call placed with a :class:`~voice_trio.sim.lean_caller.LeanCaller` streams over a
:class:`~voice_trio.sim.lean_carrier.LeanMediaStream` ticked by the simulator's one
:class:`~voice_trio.sim.lean_carrier.CarrierClock`; any other party (a dialled callee, a
reference :class:`~voice_trio.sim.caller.ScriptedCaller`) gets the reference line and stream.

    sim = LeanTelnyxSim(api_key=..., default_webhook_url=...)
    base_url = await nursery.start(partial(serve, sim))
    caller = LeanCaller(script, ms_per_char=65)
    sim.place_inbound_call("+573001234567", OUR_NUMBER, caller)
    await caller.done.wait()
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import trio

from voice_trio.sim import telnyx
from voice_trio.sim.carrier import MediaStream, StreamParams
from voice_trio.sim.lean_caller import LeanCaller
from voice_trio.sim.lean_carrier import CarrierClock, LeanMediaStream
from voice_trio.sim.telnyx_calls import SimCall


class LeanSimCall(SimCall):
    """A call leg whose lean caller is ticked by the simulator's shared clock."""

    def _ensure_clock(self) -> None:
        if not isinstance(self.line.party, LeanCaller):
            super()._ensure_clock()  # the reference line's own clock

    def _new_stream(self, params: StreamParams) -> MediaStream:
        party = self.line.party
        if not isinstance(party, LeanCaller):
            return super()._new_stream(params)
        sim = cast(LeanTelnyxSim, self.sim)
        return LeanMediaStream(
            params,
            clock=sim.clock,
            line=self.line,
            caller=party,
            on_event=self._on_stream_event,
            on_closed=self._on_stream_closed,
            record_audio_bytes=int(sim.record_audio_s * 8000),
            connect_timeout=sim.stream_connect_timeout_s,
        )


class LeanTelnyxSim(telnyx.TelnyxSim):
    """:class:`~voice_trio.sim.telnyx.TelnyxSim` whose lean callers share one clock."""

    call_class = LeanSimCall

    def __init__(self, **knobs: Any) -> None:
        knobs.setdefault("record_audio_s", 0.0)
        super().__init__(**knobs)
        self.clock = CarrierClock()


async def serve(
    sim: LeanTelnyxSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API, run the calls and the clock until cancelled; ``started`` gets the
    base URL."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.clock.run)
        base_url = await nursery.start(partial(telnyx.serve, sim, host=host, port=port))
        task_status.started(base_url)
