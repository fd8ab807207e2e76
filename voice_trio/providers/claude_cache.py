"""Whether a prompt-cache breakpoint can engage: the minimum cacheable prefix per Claude model.

A ``cache_control`` breakpoint caches the prompt up to and including its block (tools, then
system, then messages) only when that prefix has at least the model's minimum number of
tokens; a shorter one is processed in full, with no error, and reported as zero cache reads
and writes (docs/protocols/anthropic.md, "Prompt caching"). So a breakpoint is put only where
the server can tell that it engages, and the tell errs towards "no": the prefix is counted
by a lower bound of its tokens, and a minimum the sources disagree on is taken at its
highest. A breakpoint left out when it could have engaged costs some savings; one put where
it cannot engage claims a cache that is not there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# Model id prefix -> minimum cacheable prompt length in tokens. Where two sources disagree,
# the higher value (docs/protocols/anthropic.md lists both).
MIN_CACHEABLE_TOKENS: dict[str, int] = {
    "claude-opus-5": 512,
    "claude-fable-5": 512,
    "claude-mythos-5": 512,
    "claude-opus-4-8": 1024,
    "claude-sonnet-5": 1024,
    "claude-sonnet-4-5": 1024,
    "claude-opus-4-1": 1024,
    "claude-opus-4": 1024,
    "claude-sonnet-4": 1024,
    "claude-3-7-sonnet": 1024,
    "claude-3-5-sonnet": 1024,
    "claude-3-opus": 1024,
    "claude-sonnet-4-6": 2048,  # 1 024 on Anthropic's page, 2 048 in a gateway's table
    "claude-mythos-preview": 2048,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
    "claude-opus-4-7": 4096,  # 2 048 on Anthropic's page, 4 096 in a 2026 summary
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-haiku-4-5": 4096,
}
# A model no source lists (Claude Haiku 5.5 among them): the highest known minimum.
UNKNOWN_MODEL_MIN_TOKENS = max(MIN_CACHEABLE_TOKENS.values())


def min_cacheable_tokens(model: str) -> int:
    """The minimum cacheable prefix of ``model`` (an alias or a dated snapshot id)."""
    matches = [
        (len(prefix), tokens)
        for prefix, tokens in MIN_CACHEABLE_TOKENS.items()
        if model == prefix or model.startswith(prefix + "-")
    ]
    return max(matches)[1] if matches else UNKNOWN_MODEL_MIN_TOKENS


def tokens_at_least(tools: Iterable[Mapping[str, Any]], texts: Iterable[str]) -> int:
    """A lower bound of the tokens in ``tools`` (as sent, JSON) and ``texts``: their
    whitespace-separated words. Every word takes at least one token, and most Spanish words
    take more than one, so the real count is higher (about 1.3 to 2 times)."""
    words = sum(len(json.dumps(tool, ensure_ascii=False).split()) for tool in tools)
    return words + sum(len(text.split()) for text in texts)


def breakpoint_engages(
    model: str, tools: Iterable[Mapping[str, Any]], texts: Iterable[str]
) -> bool:
    """True when a breakpoint closing ``tools`` then ``texts`` surely reaches ``model``'s
    minimum, so the API will cache that prefix."""
    return tokens_at_least(tools, texts) >= min_cacheable_tokens(model)
