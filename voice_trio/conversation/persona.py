"""The system prompt of a call, and whether its fixed part (the tools offered, from
:mod:`~voice_trio.conversation.tools`, then the persona) is worth a prompt-cache breakpoint."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.providers.claude_cache import breakpoint_engages
from voice_trio.tools_file import HttpToolSpec

# How a caller's key presses appear in the conversation (see conversation.dtmf.key_note).
KEYS_FACT = (
    "Un texto entre corchetes como [la persona marcó 1 en el teclado] no es voz: son teclas "
    "que la persona marcó en el teléfono."
)


def load_persona(path: str = "", language: str = "es") -> str:
    """The persona prompt: ``PERSONA_PROMPT_FILE`` if set, else the built-in receptionist in
    the agent's language (English for ``en``/``en-*``, else Spanish, as its phrases)."""
    if path:
        return Path(path).read_text(encoding="utf-8").strip()
    name = "receptionist_en.txt" if language.lower().startswith("en") else "receptionist_es.txt"
    return resources.files("voice_trio.prompts").joinpath(name).read_text(encoding="utf-8").strip()


def persona_is_cacheable(
    model: str, persona: str, *, can_transfer: bool, http: Iterable[HttpToolSpec] = ()
) -> bool:
    """Whether a cache breakpoint after the persona can engage on ``model``: the prefix it
    closes (the tools, then the persona) must reach the model's minimum cacheable length.

    Claude Haiku 4.5 caches only prefixes of at least 4 096 tokens; the built-in persona and
    tools are a few hundred, so with the default model there is no breakpoint (a breakpoint
    that cannot engage would only claim a cache that is not there). A long
    ``PERSONA_PROMPT_FILE`` or a model with a lower minimum turns it on. Padding the prompt up
    to the minimum would not pay: see docs/protocols/anthropic.md, "Prompt caching".
    """
    tools = tool_specs(offered_tools(can_transfer=can_transfer, http=http))
    return breakpoint_engages(model, tools, [persona])


def system_blocks(
    persona: str,
    *,
    nombre: str,
    contexto: str,
    now: datetime,
    max_chars: int,
    cache_persona: bool = False,
) -> list[dict[str, Any]]:
    """System prompt as blocks: the persona (identical on every call, so cacheable: marked
    when ``cache_persona``) first, then what is particular to this call."""
    facts = [f"Fecha y hora local: {now:%Y-%m-%d %H:%M} ({now.tzname()})."]
    if nombre:
        facts.append(f"La persona en la llamada se llama {nombre}.")
    if contexto:
        facts.append(f"Contexto de la llamada: {contexto}")
    facts.append(f"Cada respuesta debe tener como máximo {max_chars} caracteres.")
    facts.append(KEYS_FACT)
    persona_block: dict[str, Any] = {"type": "text", "text": persona}
    if cache_persona:
        persona_block["cache_control"] = {"type": "ephemeral"}
    return [persona_block, {"type": "text", "text": "\n".join(facts)}]
