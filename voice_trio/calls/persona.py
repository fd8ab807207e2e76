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

# Offered only when TRANSFER_NUMBER is set; the session says a hand-off line and transfers.
TRANSFER_TOOL: dict[str, Any] = {
    "name": "transfer_call",
    "description": (
        "Transfer the call to a person on the clinic's team. Use it when the caller asks "
        "to speak with a person, or needs something you cannot do. Say briefly that you "
        "will transfer them; the transfer happens after you finish speaking."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "why the call is transferred"}},
        "required": [],
    },
}
# How a caller's key presses appear in the conversation (see calls.dtmf.key_note).
KEYS_FACT = (
    "Un texto entre corchetes como [la persona marcó 1 en el teclado] no es voz: son teclas "
    "que la persona marcó en el teléfono."
)


def tools_for(*, can_transfer: bool) -> list[dict[str, Any]]:
    return [END_CALL_TOOL, TRANSFER_TOOL] if can_transfer else [END_CALL_TOOL]


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
    facts.append(KEYS_FACT)
    return [
        {"type": "text", "text": persona, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "\n".join(facts)},
    ]
