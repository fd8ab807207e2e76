"""The load generator's provider process: Deepgram (live STT and REST TTS) as the lean
simulator on a reactor thread (``voice_trio.sim.lean_deepgram``), the reference Anthropic and
ElevenLabs simulators in Trio, each on its own loopback port, in a process of their own.

    PYTHONPATH=scripts python -m bench.providers_serve '{"ms_per_char": 65, ...}'

Started by :class:`bench.generator.LeanGenerator`. The argument is a JSON object:
``ms_per_char``, ``llm_ttft`` (s), ``tts_ttfb_ms``, ``keep_alive_s``. The one line it
writes is ``{"ready": {"deepgram_url", "anthropic_url", "elevenlabs_url"}}``; it ends when
its stdin closes. The simulators are the lab's (``voice_trio.sim.lab.open_lab``), with the
lab's keys and knobs, minus Telnyx (the carrier process has that one); Deepgram is the lean
one, whose per-message work would otherwise cost as much CPU as the server's.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from typing import Any

import trio

from bench.ipc import JsonLines


async def main(config: dict[str, Any]) -> None:
    import voice_trio.sim._serve as sim_serve
    from voice_trio.sim import anthropic, elevenlabs
    from voice_trio.sim.lab import ANTHROPIC_KEY, DEEPGRAM_KEY, ELEVENLABS_KEY
    from voice_trio.sim.lean_deepgram import LeanDeepgram
    from voice_trio.sim.reactor import Reactor

    sim_serve.KEEP_ALIVE_SECONDS = float(config.get("keep_alive_s", 5.0))
    ms_per_char = int(config["ms_per_char"])
    tts_ttfb_ms = float(config["tts_ttfb_ms"])
    dg = LeanDeepgram(
        api_key=DEEPGRAM_KEY,
        ms_per_char=ms_per_char,
        tts_ttfb_ms=tts_ttfb_ms,
        keep_alive_s=sim_serve.KEEP_ALIVE_SECONDS,
    )
    reactor = Reactor()
    deepgram_url = dg.serve(reactor)
    reactor.start("lean-deepgram")
    an = anthropic.AnthropicSim(api_key=ANTHROPIC_KEY, ttft=float(config["llm_ttft"]))
    el = elevenlabs.ElevenLabsSim(
        api_key=ELEVENLABS_KEY, ms_per_char=ms_per_char, ttfb_ms=tts_ttfb_ms
    )
    channel = JsonLines.stdio()
    try:
        async with trio.open_nursery() as nursery:
            urls = {
                "deepgram_url": deepgram_url,
                "anthropic_url": await nursery.start(partial(anthropic.serve, an)),
                "elevenlabs_url": await nursery.start(partial(elevenlabs.serve, el)),
            }
            await channel.send({"ready": urls})
            while await channel.receive() is not None:
                pass  # nothing is asked of this process: it serves until stdin closes
            nursery.cancel_scope.cancel()
    finally:
        reactor.stop()
        reactor.join(5.0)
        reactor.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hypercorn.error").disabled = True
    trio.run(main, json.loads(sys.argv[1]))
