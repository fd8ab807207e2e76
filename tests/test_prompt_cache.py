"""Where the server puts a prompt-cache breakpoint: only where the model can cache the prefix
it closes (docs/protocols/anthropic.md, "Prompt caching")."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from voice_trio.conversation.persona import load_persona, persona_is_cacheable, system_blocks
from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.observability import Metrics
from voice_trio.providers.claude import LlmUsage
from voice_trio.providers.claude_cache import (
    MIN_CACHEABLE_TOKENS,
    min_cacheable_tokens,
    tokens_at_least,
)


@pytest.mark.parametrize(
    ("model", "minimum"),
    [
        ("claude-haiku-4-5", 4096),
        ("claude-haiku-4-5-20251001", 4096),
        ("claude-opus-4-5-20251101", 4096),  # not Opus 4's 1 024: the longest prefix wins
        ("claude-opus-4-20250514", 1024),
        ("claude-sonnet-4-5", 1024),
        ("claude-sonnet-4-6", 2048),  # disputed (1 024 or 2 048): the higher
        ("claude-opus-4-7", 4096),  # disputed (2 048 or 4 096): the higher
        ("claude-opus-5", 512),
        ("claude-3-5-haiku-20241022", 2048),
        ("claude-haiku-5-5", 4096),  # no source: assumed the highest
        ("claude-haiku-4-50", 4096),  # not a listed id: unknown, so the highest too
    ],
)
def test_minimum_cacheable_prefix_per_model(model: str, minimum: int) -> None:
    assert min_cacheable_tokens(model) == minimum


def test_the_token_count_is_a_lower_bound_in_words() -> None:
    tool = {"name": "end_call", "description": "Termina la llamada."}
    # {"name": "end_call", "description": "Termina la llamada."} -> 6 words
    assert tokens_at_least([tool], ["Hola, ¿en qué le puedo ayudar?"]) == 6 + 6
    assert max(MIN_CACHEABLE_TOKENS.values()) == 4096


def blocks(persona: str, cache: bool) -> list[dict[str, object]]:
    now = datetime(2026, 12, 4, 10, 0, tzinfo=ZoneInfo("America/Bogota"))
    return system_blocks(
        persona, nombre="Ana", contexto="", now=now, max_chars=300, cache_persona=cache
    )


@pytest.mark.parametrize("language", ["es", "en"])
@pytest.mark.parametrize("can_transfer", [False, True])
def test_the_built_in_persona_is_not_marked_on_haiku_4_5(language: str, can_transfer: bool) -> None:
    persona = load_persona("", language)
    assert not persona_is_cacheable("claude-haiku-4-5", persona, can_transfer=can_transfer)
    tools = tool_specs(offered_tools(can_transfer=can_transfer))
    assert tokens_at_least(tools, [persona]) < 300
    assert all("cache_control" not in block for block in blocks(persona, False))


def test_a_persona_past_the_minimum_is_marked_and_the_call_facts_never_are() -> None:
    long_persona = "Eres Sofía, recepcionista. " * 1400  # 4 200 words
    assert persona_is_cacheable("claude-haiku-4-5", long_persona, can_transfer=False)
    persona_block, facts = blocks(long_persona, True)
    assert persona_block["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in facts
    medium = "Eres Sofía, recepcionista. " * 350  # 1 050 words
    assert persona_is_cacheable("claude-sonnet-4-5", medium, can_transfer=False)
    assert not persona_is_cacheable("claude-haiku-4-5", medium, can_transfer=False)


def test_the_built_in_persona_speaks_the_agents_language() -> None:
    assert "Responde en español" in load_persona("", "es-419")
    assert "Answer in English" in load_persona("", "en-US")


def test_metrics_count_each_kind_as_reported() -> None:
    metrics = Metrics()
    metrics.count_llm_usage(LlmUsage(input_tokens=11, output_tokens=1, cache_read_input_tokens=0))
    metrics.count_llm_usage(LlmUsage(output_tokens=5, cache_creation_input_tokens=4200))

    def value(kind: str) -> float | None:
        return metrics.registry.get_sample_value("voice_llm_tokens_total", {"kind": kind})

    assert (value("input"), value("output"), value("cache_write")) == (11, 6, 4200)
    assert value("cache_read") is None  # never reported: never shown
