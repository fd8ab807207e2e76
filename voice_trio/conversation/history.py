"""A call's conversation, kept both as a record and in the shape Claude's Messages API wants.

The API wants messages that alternate ``user`` / ``assistant`` and start with ``user``.
A phone call does not: the bot greets first, a reprompt
follows a reply the caller did not answer, the caller speaks twice while the bot is
cut off. :class:`Conversation` keeps every turn as it happened (``turns``, for the call
record) and, alongside, API messages where consecutive same-role turns are merged.

Tool exchanges (docs/tools.md) live only in the API messages: an assistant message with the
``tool_use`` blocks, then a user message whose content starts with their ``tool_result``
blocks. Caller words that follow join that user message as a text block; the window never
begins with a result whose request it cut off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["DEFAULT_OPENING", "INTERRUPTED_MARK", "Conversation", "Turn"]

Role = Literal["user", "assistant"]

# Stands for "the caller picked up" when the bot speaks first, so the API sees a user turn
# before the greeting; the parentheses read as a stage direction, not as caller speech.
DEFAULT_OPENING = "(llamada conectada)"
# Appended to a reply the caller cut off: the model reads an unfinished sentence.
INTERRUPTED_MARK = " —"


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn as it happened; ``text`` is what was said (for the bot: what was heard)."""

    role: Role
    text: str
    interrupted: bool = False


class Conversation:
    """The history of one call.

    - ``add_user`` / ``add_assistant`` ignore blank text: a reply interrupted before any
      of it was heard left nothing in the caller's ear, so it leaves nothing here either.
    - An interrupted reply is stored as the text actually heard, with ``interrupted=True``
      in ``turns`` and :data:`INTERRUPTED_MARK` appended in the API message.
    - If the bot speaks first, a synthetic user message ``opening`` is put before it. It
      is not a turn (not in ``turns``).
    - Consecutive same-role turns become one API message, joined with a space.
    """

    __slots__ = ("_messages", "_turns", "opening")

    def __init__(self, opening: str = DEFAULT_OPENING) -> None:
        self.opening = opening
        self._turns: list[Turn] = []
        self._messages: list[dict[str, Any]] = []

    @property
    def turns(self) -> tuple[Turn, ...]:
        return tuple(self._turns)

    def add_user(self, text: str) -> None:
        text = text.strip()
        if text:
            self._turns.append(Turn("user", text))
            self._append("user", text)

    def add_assistant(self, text: str, interrupted: bool = False) -> None:
        text = text.strip()
        if not text:
            return
        self._turns.append(Turn("assistant", text, interrupted))
        if not self._messages:
            self._messages.append({"role": "user", "content": self.opening})
        self._append("assistant", text + INTERRUPTED_MARK if interrupted else text)

    def add_tool_exchange(self, asked: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        """Claude's ``tool_use`` blocks (``asked``; other blocks are left out: what was
        said is added as the bot's words) and the ``tool_result`` blocks that answer them."""
        uses = [dict(b) for b in asked if b.get("type") == "tool_use"]
        if not uses:
            return
        if not self._messages:
            self._messages.append({"role": "user", "content": self.opening})
        self._append_blocks("assistant", uses)
        self._messages.append({"role": "user", "content": [dict(b) for b in results]})

    def window(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` API messages (fresh copies), starting with a ``user`` message.

        When the cut would start on an assistant message that message is left out too, and
        so are tool results whose request was cut off; the result never exceeds ``limit``.
        """
        if limit <= 0:
            return []
        recent = [_copy(m) for m in self._messages[-limit:]]
        while recent:
            first = recent[0]
            if first["role"] == "assistant":
                recent = recent[1:]
                continue
            content = first["content"]
            if isinstance(content, list) and any(_is_result(b) for b in content):
                kept = [b for b in content if not _is_result(b)]
                if not kept:
                    recent = recent[1:]
                    continue
                first["content"] = kept
            break
        return recent

    def _append(self, role: Role, content: str) -> None:
        messages = self._messages
        if messages and messages[-1]["role"] == role:
            last = messages[-1]
            if isinstance(last["content"], list):
                last["content"].append({"type": "text", "text": content})
            else:
                last["content"] += " " + content
        else:
            messages.append({"role": role, "content": content})

    def _append_blocks(self, role: Role, blocks: list[dict[str, Any]]) -> None:
        messages = self._messages
        if messages and messages[-1]["role"] == role:
            last = messages[-1]
            if isinstance(last["content"], str):
                last["content"] = [{"type": "text", "text": last["content"]}]
            last["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})


def _is_result(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "tool_result"


def _copy(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, list):
        return {"role": message["role"], "content": [dict(b) for b in content]}
    return dict(message)
