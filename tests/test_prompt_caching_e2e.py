"""Prompt caching on real calls: a cache breakpoint is sent only where the model can cache
the prefix it closes, and ``/metrics`` counts exactly the cache reads and writes the API
reported (the simulator honours each model's minimum cacheable length)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.sim.caller import HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

SCRIPT = [
    WaitForBot(300),
    Say("Quiero una cita para el lunes.", 100),
    WaitForBot(300),
    Say("A las tres de la tarde.", 100),
    WaitForBot(300),
    HangUp(),
]
# Speculative replies cancelled before their usage arrives would make the sums below
# depend on timing; every reply here is asked once.
SETTINGS = {"SPECULATIVE_REPLIES": "false"}


def metric(text: str, kind: str) -> float:
    found = re.search(rf'^voice_llm_tokens_total{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(has_cache_control(v) for v in value)
    return False


async def run_call(nursery, lab, **settings: str) -> str:
    """One call of two caller turns; the server's /metrics once it has ended."""
    server = await start_lab_server(nursery, lab, **SETTINGS, **settings)
    lab.anthropic.requests.clear()
    party = ScriptedCaller(SCRIPT, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30)
    lab.telnyx.place_inbound_call("+573001234567", OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    assert not results.errors and len(results.latencies_ms) == 2, results
    metrics = (await server.client.get("/metrics")).text
    server.stop.set()
    return metrics


def reported(lab, field: str) -> int:
    return sum(r.usage[field] for r in lab.anthropic.requests if r.usage)


async def test_the_default_persona_claims_no_cache_and_metrics_show_no_reads(nursery, lab) -> None:
    """Claude Haiku 4.5 (the default) caches only prefixes of 4 096 tokens or more; tools and
    persona are a few hundred. No breakpoint is sent, none is counted."""
    metrics = await run_call(nursery, lab)
    requests = lab.anthropic.requests
    assert len(requests) == 2
    assert requests[0].body["model"] == "claude-haiku-4-5"
    assert not any(has_cache_control(r.body) for r in requests)
    assert reported(lab, "cache_read_input_tokens") == 0
    assert metric(metrics, "cache_read") == 0 == metric(metrics, "cache_write")
    assert metric(metrics, "input") == reported(lab, "input_tokens") > 0
    assert metric(metrics, "output") > 0


async def test_a_persona_long_enough_is_cached_and_metrics_count_the_reads(
    nursery, lab, tmp_path: Path
) -> None:
    """A persona that takes the prefix past the model's minimum gets the breakpoint; the
    second reply reads what the first wrote, and /metrics shows what the API reported."""
    persona = tmp_path / "persona.txt"
    rule = "Responde con cortesía, en frases cortas, y confirma siempre la fecha de la cita.\n"
    persona.write_text("Eres Sofía, la recepcionista de la clínica.\n" + rule * 300)
    metrics = await run_call(nursery, lab, PERSONA_PROMPT_FILE=str(persona))
    requests = lab.anthropic.requests
    assert len(requests) == 2
    for request in requests:
        assert request.body["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert "cache_control" not in request.body["system"][1]  # this call's facts
    first, second = (r.usage for r in requests)
    assert first is not None and second is not None
    assert first["cache_creation_input_tokens"] > 4096 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert metric(metrics, "cache_write") == first["cache_creation_input_tokens"]
    assert metric(metrics, "cache_read") == second["cache_read_input_tokens"]
    assert metric(metrics, "input") == reported(lab, "input_tokens")


async def test_the_same_persona_is_not_marked_on_a_model_with_a_higher_minimum(
    nursery, lab, tmp_path: Path
) -> None:
    """About 1 100 tokens: enough for Claude Sonnet 4.5 (1 024), not for Haiku 4.5."""
    persona = tmp_path / "persona.txt"
    persona.write_text("Eres Sofía, la recepcionista de la clínica. " * 150)
    for model, marked in (("claude-haiku-4-5", False), ("claude-sonnet-4-5", True)):
        metrics = await run_call(nursery, lab, PERSONA_PROMPT_FILE=str(persona), CLAUDE_MODEL=model)
        assert all(has_cache_control(r.body) == marked for r in lab.anthropic.requests), model
        assert (metric(metrics, "cache_read") > 0) == marked, model
