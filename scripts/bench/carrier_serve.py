"""The load generator's carrier process: Telnyx (REST, webhooks) with the lean carrier and
its scripted callers (``voice_trio.sim.lean_telnyx``), driven over stdin/stdout.

    PYTHONPATH=scripts python -m bench.carrier_serve '{"webhook_url": "...", ...}'

Started by :class:`bench.generator.LeanGenerator`. The argument is a JSON object:
``webhook_url`` (the server's), ``keep_alive_s`` (the REST server's idle keep-alive).
Its first line out is ``{"ready": {"telnyx_url", "public_key"}}``. Then, one JSON document
per line (``bench.ipc``), requests in and answers out, matched by ``id``:

- ``{"op": "call", "id", "number", "script", "turns", "ms_per_char", "timeout_s",
  "say_ends_at"}`` places one inbound call (``script`` as ``bench.lab.script_json`` makes it;
  ``say_ends_at``: monotonic instants, or empty) and answers ``{"id", "outcome"}`` once the
  caller is done (a ``bench.lab.CallOutcome``, times in monotonic seconds);
- ``{"op": "mark", "id"}`` answers ``{"id", "mark"}``, a point in the media engine's record of
  how late its clock woke up; ``{"op": "stats", "id", "mark"}`` answers ``{"id", "stats"}``:
  that lateness since the mark (p99, max: late here is late caller audio), the clock's late
  resyncs, the streams open and the largest unsent backlog any stream had.

The process ends when its stdin closes (the load test ended or died).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from functools import partial
from typing import Any

import trio

from bench.ipc import JsonLines
from bench.lab import call_outcome, script_from_json
from bench.stats import percentile


async def place_call(sim: Any, request: dict[str, Any], channel: JsonLines) -> None:
    """One inbound call by a lean caller; answers with its outcome (monotonic times: the
    media engine's clock)."""
    from voice_trio.sim.lab import OUR_NUMBER
    from voice_trio.sim.lean_caller import LeanCaller

    started = time.monotonic()
    timeout = float(request["timeout_s"])
    caller = LeanCaller(
        script_from_json(request["script"]),
        ms_per_char=int(request["ms_per_char"]),
        timeout_s=timeout,
        say_ends_at=request.get("say_ends_at") or (),
        name=request["number"],
    )
    party = sim.lean_party(caller)
    call = sim.place_inbound_call(request["number"], OUR_NUMBER, party)
    # The caller times itself out on its ticks; this is for a call that never got a stream.
    with trio.move_on_after(timeout + 5):
        await party.done.wait()
    if not party.done.is_set():
        party.fail(f"timed out after {timeout} s")
        with trio.move_on_after(5):
            await party.done.wait()
        caller.results.timed_out = True
    outcome = call_outcome(
        caller.results, int(request["turns"]), call.line.late_resyncs, started, time.monotonic()
    )
    outcome.call_control_id = call.call_control_id
    outcome.missed_plan = caller.missed_plan
    await channel.send({"id": request["id"], "outcome": dataclasses.asdict(outcome)})


async def main(config: dict[str, Any]) -> None:
    import voice_trio.sim._serve as sim_serve
    from voice_trio.sim.lab import TELNYX_KEY
    from voice_trio.sim.lean_telnyx import LeanTelnyxSim, serve

    sim_serve.KEEP_ALIVE_SECONDS = float(config.get("keep_alive_s", 5.0))
    channel = JsonLines.stdio()
    sim = LeanTelnyxSim(api_key=TELNYX_KEY, default_webhook_url=config["webhook_url"])
    sim.max_ended_calls = 500
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, sim))
        engine = sim.engine
        await channel.send({"ready": {"telnyx_url": url, "public_key": sim.public_key_b64}})
        while True:
            request = await channel.receive()
            if request is None:
                break
            if request["op"] == "call":
                nursery.start_soon(place_call, sim, request, channel)
            elif request["op"] == "mark":
                mark = {"lateness": len(engine.lateness)}
                await channel.send({"id": request["id"], "mark": mark})
            elif request["op"] == "stats":
                mark = request["mark"]
                samples = engine.lateness[int(mark["lateness"]) :]
                stats = {
                    "lag_p99_ms": _ms(percentile(samples, 0.99)),
                    "lag_max_ms": _ms(max(samples) if samples else None),
                    "late_resyncs": engine.late_resyncs,
                    "streams_open": engine.streams,
                    "outbox_peak_bytes": engine.outbox_peak,
                }
                await channel.send({"id": request["id"], "stats": stats})
        nursery.cancel_scope.cancel()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hypercorn.error").disabled = True
    trio.run(main, json.loads(sys.argv[1]))
