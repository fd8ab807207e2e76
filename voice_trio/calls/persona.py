"""The system prompt and the tools Claude may use on a call."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

END_CALL_TOOL: dict[str, Any] = {
    "name": "end_call",
    "description": (
        "End the phone call. Use it after saying goodbye, when the caller says goodbye "
        "or has nothing else to ask."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "why the call ends"}},
        "required": [],
    },
}


def load_persona(path: str = "") -> str:
    """The persona prompt: ``PERSONA_PROMPT_FILE`` if set, else the built-in receptionist."""
    if path:
        return Path(path).read_text(encoding="utf-8").strip()
    return (
        resources.files("voice_trio.prompts")
        .joinpath("receptionist_es.txt")
        .read_text(encoding="utf-8")
        .strip()
    )


def system_blocks(
    persona: str, *, nombre: str, contexto: str, now: datetime, max_chars: int
) -> list[dict[str, Any]]:
    """System prompt as blocks: the persona (cacheable, identical on every call) first,
    then what is particular to this call."""
    facts = [f"Fecha y hora local: {now:%Y-%m-%d %H:%M} ({now.tzname()})."]
    if nombre:
        facts.append(f"La persona en la llamada se llama {nombre}.")
    if contexto:
        facts.append(f"Contexto de la llamada: {contexto}")
    facts.append(f"Cada respuesta debe tener como máximo {max_chars} caracteres.")
    return [
        {"type": "text", "text": persona, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "\n".join(facts)},
    ]
