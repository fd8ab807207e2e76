"""What the simulated Claude says: :class:`Reply` and the scripted :func:`default_reply`.

The script reads only the request (messages, tools, system prompt), so a conversation
always gets the same answers. The rules, first match wins:

**The last user message holds ``tool_result`` blocks** (each is matched to its
``tool_use`` in the assistant message before it, to know which tool answered):

1. any result with ``is_error: true`` -> "Lo siento, no pude completar eso en este momento.
   ¿Desea que le comunique con una persona?"
2. a ``book_appointment`` result with ``"booked": true`` -> "Listo, su cita quedó para el
   {start} con {doctor}. ¿Le puedo ayudar en algo más?"
3. a ``free_slots`` result with slots, ``book_appointment`` on offer -> "Le reservo el primer
   espacio disponible." and ``book_appointment`` ``{"slot_id": <first slot>,
   "patient_name": <name>}``; the name comes from the system prompt's sentence "La persona
   en la llamada se llama {nombre}." (voice_trio.conversation.persona), else "paciente".
4. a ``free_slots`` result with no slots -> "No encontré espacios libres en la agenda.
   ¿Desea que le comunique con una persona?"
5. anything else -> "Listo, ya quedó hecho. ¿En qué más le puedo ayudar?"

If the same message also holds caller text (a barge-in: the caller spoke while the tools
ran, and the server put the words after the results), the answer above is said after
'Perdone, le escuché: "{text}".' and its tool calls are kept.

**Otherwise, the last user text** (accents and case folded):

6. a farewell (adiós, chao, hasta luego, eso es todo, goodbye), ``end_call`` on offer ->
   "Gracias por llamar. ¡Que tenga un buen día!" and ``end_call``;
7. a request for a person (transferir, hablar con una persona), ``transfer_call`` on offer
   -> "Con gusto, le comunico con una persona." and ``transfer_call``;
8. an appointment request (cita, turno, agendar, appointment), ``free_slots`` on offer ->
   "Con gusto, reviso la agenda." and ``free_slots`` ``{}``;
9. anything said -> 'Entendido, usted dijo: "{text}". ¿En qué más le puedo ayudar?';
10. nothing -> "Disculpe, no le escuché bien. ¿Me lo puede repetir?"
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# One tool call as the simulated model makes it: (tool name, input object).
ToolUse = tuple[str, dict[str, Any]]

_FAREWELL = re.compile(r"\b(adios|chao|hasta luego|eso es todo|goodbye)\b")
_TRANSFER = re.compile(r"\btransferir|\bhablar con una persona\b")
_APPOINTMENT = re.compile(r"\b(citas?|turnos?|agendar\w*|appointments?)\b")
_CALLER_NAME = re.compile(r"^La persona en la llamada se llama (.+)\.$", re.M)
DEFAULT_PATIENT = "paciente"

ERROR_TEXT = (
    "Lo siento, no pude completar eso en este momento. ¿Desea que le comunique con una persona?"
)
CONTINUATION_TEXT = "Listo, ya quedó hecho. ¿En qué más le puedo ayudar?"
NO_SLOTS_TEXT = "No encontré espacios libres en la agenda. ¿Desea que le comunique con una persona?"


@dataclass(frozen=True)
class Reply:
    """Text, then the tool calls, in order. ``tool_call`` is the first call (``None`` if
    there is none) and ``tool_calls`` all of them: give either or both (they must agree),
    ``Reply(text, ("end_call", {}))`` being the short form of a one-call reply."""

    text: str
    tool_call: ToolUse | None = None
    tool_calls: tuple[ToolUse, ...] = ()

    def __post_init__(self) -> None:
        if self.tool_calls and self.tool_call is None:
            object.__setattr__(self, "tool_call", self.tool_calls[0])
        elif self.tool_call is not None and not self.tool_calls:
            object.__setattr__(self, "tool_calls", (self.tool_call,))
        elif self.tool_call is not None and self.tool_call != self.tool_calls[0]:
            raise ValueError("tool_call must be the first of tool_calls")


def default_reply(request: Mapping[str, Any]) -> Reply:
    """Answer the conversation deterministically, in Spanish (the module docstring's rules)."""
    messages = request.get("messages") or []
    tools = {t.get("name") for t in request.get("tools") or [] if isinstance(t, dict)}
    at, text, results = _last_user_turn(messages)
    if results:
        asked = _tool_names(messages[at - 1] if at > 0 else {})
        answer = _answer_results(results, asked, tools, request.get("system"))
        if text:
            heard = f'Perdone, le escuché: "{text}". {answer.text}'
            return Reply(heard, tool_calls=answer.tool_calls)
        return answer
    plain = _fold(text)
    if _FAREWELL.search(plain) and "end_call" in tools:
        return Reply(
            "Gracias por llamar. ¡Que tenga un buen día!",
            ("end_call", {"reason": "caller_said_goodbye"}),
        )
    if _TRANSFER.search(plain) and "transfer_call" in tools:
        return Reply(
            "Con gusto, le comunico con una persona.",
            ("transfer_call", {"reason": "caller_asked_for_a_person"}),
        )
    if _APPOINTMENT.search(plain) and "free_slots" in tools:
        return Reply("Con gusto, reviso la agenda.", ("free_slots", {}))
    if text:
        return Reply(f'Entendido, usted dijo: "{text}". ¿En qué más le puedo ayudar?')
    return Reply("Disculpe, no le escuché bien. ¿Me lo puede repetir?")


def _last_user_turn(messages: list[Any]) -> tuple[int, str, list[dict[str, Any]]]:
    """The last user message's index, its text (whitespace collapsed) and its
    ``tool_result`` blocks."""
    for at in range(len(messages) - 1, -1, -1):
        message = messages[at]
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return at, " ".join(content.split()), []
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        results = [b for b in content if b.get("type") == "tool_result"]
        return at, " ".join(" ".join(texts).split()), results
    return -1, "", []


def _answer_results(
    results: list[dict[str, Any]], asked: dict[Any, Any], tools: set[Any], system: Any
) -> Reply:
    if any(r.get("is_error") is True for r in results):
        return Reply(ERROR_TEXT)
    answered = [(asked.get(r.get("tool_use_id")), _result_json(r)) for r in results]
    for name, value in answered:
        if name == "book_appointment" and isinstance(value, dict) and value.get("booked") is True:
            return Reply(
                f"Listo, su cita quedó para el {value.get('start')} con {value.get('doctor')}. "
                "¿Le puedo ayudar en algo más?"
            )
    for name, value in answered:
        if name != "free_slots" or not isinstance(value, dict):
            continue
        slots = [s for s in value.get("slots") or [] if isinstance(s, dict) and "slot_id" in s]
        if not slots:
            return Reply(NO_SLOTS_TEXT)
        if "book_appointment" in tools:
            booking = {"slot_id": slots[0]["slot_id"], "patient_name": caller_name(system)}
            return Reply("Le reservo el primer espacio disponible.", ("book_appointment", booking))
    return Reply(CONTINUATION_TEXT)


def _tool_names(message: Mapping[str, Any]) -> dict[Any, Any]:
    """``tool_use`` id -> tool name, in the assistant message the results answer."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, list):
        return {}
    return {b.get("id"): b.get("name") for b in content if b.get("type") == "tool_use"}


def _result_json(result: Mapping[str, Any]) -> Any:
    """The JSON a ``tool_result`` carries (string content, or its text blocks), or None."""
    content = result.get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    if not isinstance(content, str):
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None  # not JSON, e.g. cut and marked "…[truncated N characters]"


def caller_name(system: Any) -> str:
    """The caller's name as the server's system prompt states it, else "paciente"."""
    if isinstance(system, list):
        system = "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    found = _CALLER_NAME.search(system) if isinstance(system, str) else None
    return found[1].strip() if found else DEFAULT_PATIENT


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))
