"""An operator's orders for a live call (hang up, transfer, say) and what came of them.

Plain data, checked the same way where the API receives an order and where one arrives over
the call-event bus (:mod:`voice_trio.instance.live`): a process never acts on an order it has
not checked itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voice_trio.config import E164

ACTIONS = ("hangup", "transfer", "say")
MAX_SAY_CHARS = 500  # an operator's note, said as one bot turn; also bounds a bus event
OPERATOR_HANGUP = "operator_hangup"  # end reason of a call an operator hung up


class InvalidOrder(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Order:
    """``action`` with its argument: ``to`` (transfer: an E.164 number) or ``text`` (say)."""

    action: str
    to: str = ""
    text: str = ""

    @classmethod
    def from_request(cls, action: str, body: Any, transfer_number: str = "") -> Order:
        """The order an API request body asks for (None or ``{}`` for no argument); a
        transfer without ``to`` goes to ``transfer_number``. ``InvalidOrder`` says why not."""
        if action not in ACTIONS:
            raise InvalidOrder("action", "must be one of " + ", ".join(ACTIONS))
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidOrder("body", "must be a JSON object")
        allowed = {"hangup": set(), "transfer": {"to"}, "say": {"text"}}[action]
        unknown = sorted(set(body) - allowed)
        if unknown:
            accepted = ", ".join(sorted(allowed)) or "no fields"
            raise InvalidOrder(str(unknown[0])[:40], f"unknown field; {action} takes {accepted}")
        if action == "transfer":
            to = body.get("to", "")
            if not isinstance(to, str):
                raise InvalidOrder("to", "must be an E.164 phone number such as +573001234567")
            to = to.strip() or transfer_number
            if not to:
                raise InvalidOrder("to", "is required: TRANSFER_NUMBER is not set")
            return cls("transfer", to=_number(to))
        if action == "say":
            return cls("say", text=_text(body.get("text")))
        return cls("hangup")

    def wire(self) -> dict[str, str]:
        return {"a": self.action, "n": self.to, "x": self.text}

    @classmethod
    def from_wire(cls, event: dict[str, Any]) -> Order:
        """The order in a bus event (``wire``), checked like a request's."""
        action = event.get("a")
        if action == "transfer":
            to = event.get("n")
            return cls("transfer", to=_number(to if isinstance(to, str) else ""))
        if action == "say":
            return cls("say", text=_text(event.get("x")))
        if action == "hangup":
            return cls("hangup")
        raise InvalidOrder("action", "must be one of " + ", ".join(ACTIONS))


def _number(to: str) -> str:
    if not E164.match(to):
        raise InvalidOrder("to", "must be an E.164 phone number such as +573001234567")
    return to


def _text(given: Any) -> str:
    if not isinstance(given, str):
        raise InvalidOrder("text", "is required: the words for the agent to say")
    # One line of printable text: no control character reaches the voice or the log.
    text = " ".join("".join(c for c in given if c.isprintable() or c.isspace()).split())
    if not text:
        raise InvalidOrder("text", "is required: the words for the agent to say")
    if len(text) > MAX_SAY_CHARS:
        raise InvalidOrder("text", f"must be at most {MAX_SAY_CHARS} characters")
    return text


@dataclass(frozen=True, slots=True)
class Outcome:
    """What came of an order: an HTTP status and a JSON body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


def accepted(**body: Any) -> Outcome:
    return Outcome(200, body)


def refused(reason: str) -> Outcome:
    """The call cannot do it now (409)."""
    return Outcome(409, {"error": "conflict", "reason": reason})


def not_found(reason: str = "no live call with this call_control_id") -> Outcome:
    return Outcome(404, {"error": "not_found", "reason": reason})
