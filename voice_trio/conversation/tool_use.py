"""A turn's requests to the operator's HTTP tools, as the conversation sees them.

Claude asks for a tool; the turn hands the request to a :class:`ToolRunner` (the instance's
``calls.tool_desk.ToolDesk``), which runs it *outside* the turn and the call: a request that
reached the operator's backend may already have changed its data, so a barge-in or a hang-up
must not cut it. The turn gets a :class:`PendingTool` and waits for it; a turn that is cut
leaves it in the call's :class:`ToolLedger`, and the next turn gives its result to Claude
with the caller's new words (docs/tools.md, "Barge-in and hang-up during a request").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from voice_trio.providers.tool_http import ToolOutcome
from voice_trio.tools_file import HttpToolSpec


@dataclass(frozen=True, slots=True)
class ToolCaller:
    """Whom a request is made for: the call, and the caller facts the backend is sent."""

    call_control_id: str
    nombre: str = ""
    telefono: str = ""
    contexto: str = ""
    on_line: Callable[[], bool] = lambda: True  # the call is still up

    def body(self, tool: str, tool_input: dict[str, Any]) -> dict[str, Any]:
        """The request body docs/tools.md gives."""
        return {
            "call_control_id": self.call_control_id,
            "tool": tool,
            "input": tool_input,
            "caller": {"nombre": self.nombre, "telefono": self.telefono, "contexto": self.contexto},
        }


class PendingTool:
    """One request under way: ``outcome`` once ``done`` is set."""

    def __init__(self, tool_use_id: str, name: str, tool_input: dict[str, Any]) -> None:
        self.tool_use_id = tool_use_id
        self.name = name
        self.input = tool_input
        self.outcome: ToolOutcome | None = None
        self.done = trio.Event()

    def finish(self, outcome: ToolOutcome) -> None:
        self.outcome = outcome
        self.done.set()

    async def wait(self) -> ToolOutcome:
        await self.done.wait()
        assert self.outcome is not None
        return self.outcome

    def result_block(self) -> dict[str, Any]:
        """The ``tool_result`` block that answers this request (only once it is done)."""
        assert self.outcome is not None
        block: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": self.tool_use_id,
            "content": self.outcome.content,
        }
        if self.outcome.is_error:
            block["is_error"] = True
        return block


class ToolRunner(Protocol):
    def start(
        self, caller: ToolCaller, tool: HttpToolSpec, tool_use_id: str, tool_input: dict[str, Any]
    ) -> PendingTool:
        """Send the request in the background; it ends by itself within the tool's timeout."""
        ...


@dataclass(slots=True)
class ToolExchange:
    """Tool requests a turn made, and the assistant content that asked for them."""

    asked: list[dict[str, Any]]  # the assistant message's blocks (text heard, tool_use)
    pending: list[PendingTool]

    def results(self) -> list[dict[str, Any]]:
        return [p.result_block() for p in self.pending]


@dataclass(slots=True)
class ToolLedger:
    """One call's tool exchanges that a cut turn left unanswered."""

    open: list[ToolExchange] = field(default_factory=list)

    async def settle(self) -> list[ToolExchange]:
        """Wait for every open request (each bounded by its timeout) and hand them over."""
        exchanges, self.open = self.open, []
        for exchange in exchanges:
            for pending in exchange.pending:
                await pending.done.wait()
        return exchanges
