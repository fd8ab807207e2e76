"""The tools Claude may call on a call, each declared once (:class:`Tool`).

A tool is data: its name, description and input schema go to Claude as they are
(:meth:`Tool.spec`); its :class:`CallAct` is what the call does once the reply that called
it has been said. :func:`~voice_trio.conversation.thinking.think_reply` notes the acts a
reply asked for on its turn (``TurnRecord.acts``) and each call mode carries them out
(``media.replies``, ``fallback.acts``): only Claude and this module deal in tool names.

Adding a built-in tool is declaring it in ``BUILT_IN``; a new act is also a member of
``CallAct``, which mypy then asks each mode to handle (their ``match`` ends in
``assert_never``). An operator's HTTP tool (``TOOLS_FILE``, docs/tools.md) has no act: it
has an ``http`` declaration instead, and Claude reads its answer back in the same turn
(:func:`~voice_trio.conversation.thinking.think_reply`); its name may not be one of
``BUILT_IN``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from voice_trio.tools_file import HttpToolSpec


class CallAct(StrEnum):
    """What the call does once the reply that called a tool has been said."""

    END = "end"  # hang up (EndReason.AGENT_ENDED)
    TRANSFER = "transfer"  # say the hand-off line and transfer to TRANSFER_NUMBER


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """One tool Claude may call: what Claude is told, and what the call then does."""

    name: str
    description: str  # for Claude: when to call it
    input_schema: Mapping[str, Any]  # JSON schema of the tool's input
    act: CallAct | None = None  # None: an HTTP tool, whose answer goes back to Claude
    http: HttpToolSpec | None = None  # where and how an operator's tool is called
    # Offered only when the call can transfer (TRANSFER_NUMBER set, media mode).
    needs_transfer: bool = False

    @classmethod
    def from_http(cls, spec: HttpToolSpec) -> Tool:
        return cls(
            name=spec.name,
            description=spec.description,
            input_schema=spec.input_schema,
            http=spec,
        )

    def offered(self, *, can_transfer: bool) -> bool:
        return can_transfer or not self.needs_transfer

    def spec(self) -> dict[str, Any]:
        """The tool as the Messages API takes it in ``tools``; a copy, the declaration
        stays as declared whatever the caller does with it."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": copy.deepcopy(dict(self.input_schema)),
        }


def _reason_only(why: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": why}},
        "required": [],
    }


END_CALL = Tool(
    name="end_call",
    description=(
        "End the phone call. Use it after saying goodbye, when the caller says goodbye "
        "or has nothing else to ask."
    ),
    input_schema=_reason_only("why the call ends"),
    act=CallAct.END,
)

TRANSFER_CALL = Tool(
    name="transfer_call",
    description=(
        "Transfer the call to a person on the clinic's team. Use it when the caller asks "
        "to speak with a person, or needs something you cannot do. Say briefly that you "
        "will transfer them; the transfer happens after you finish speaking."
    ),
    input_schema=_reason_only("why the call is transferred"),
    act=CallAct.TRANSFER,
    needs_transfer=True,
)

# In the order Claude sees them: the tools open the prompt-cache prefix.
BUILT_IN: tuple[Tool, ...] = (END_CALL, TRANSFER_CALL)


def offered_tools(*, can_transfer: bool, http: Iterable[HttpToolSpec] = ()) -> tuple[Tool, ...]:
    """The tools offered on a call (fallback mode never transfers: ``can_transfer=False``):
    the built-in ones, then the operator's ``http`` tools in the order declared."""
    built_in = tuple(tool for tool in BUILT_IN if tool.offered(can_transfer=can_transfer))
    return built_in + tuple(Tool.from_http(spec) for spec in http)


def tool_specs(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    """``tools`` as sent to Claude, in order."""
    return [tool.spec() for tool in tools]
