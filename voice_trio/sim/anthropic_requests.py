"""What the simulated Messages API accepts: the request body checks and the messages of the
``invalid_request_error`` each refusal gets (pure functions; docs/protocols/anthropic.md)."""

from __future__ import annotations

from typing import Any

API_VERSIONS = frozenset({"2023-06-01", "2026-10-21"})
_BLOCK_TYPES = frozenset(
    {"text", "tool_use", "tool_result", "thinking", "redacted_thinking", "image", "document"}
)


def validate(body: Any, version: str, *, trailing_tool_use: str = "error") -> str | None:
    """The ``invalid_request_error`` message for a bad request body, or None if it is fine.

    ``trailing_tool_use`` is what to do with ``tool_use`` blocks in a last (prefill)
    assistant message, which have no next message to be answered in: ``"error"`` or
    ``"allow"`` (the API's documentation does not say; docs/protocols/anthropic.md)."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required (a non-empty string)"
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        return "max_tokens: field required (an integer >= 1)"
    if version == "2026-10-21":
        for name in ("temperature", "top_p", "top_k"):
            if name in body:
                return f"{name}: is not supported in API version 2026-10-21"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: must be a boolean"
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list) or not all(_is_text_block(b) for b in system):
            return "system: must be a string or a list of text blocks"
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) and "name" in t for t in tools)
    ):
        return "tools: must be a list of objects with a name"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required (a non-empty list)"
    for i, message in enumerate(messages):
        problem = _message_problem(message)
        if problem:
            return f"messages.{i}: {problem}"
    return _pairing_problem(messages, trailing_tool_use == "allow")


def _pairing_problem(messages: list[dict[str, Any]], allow_trailing: bool) -> str | None:
    """Every ``tool_use`` answered by a ``tool_result`` at the start of the next message,
    every ``tool_result`` answering a ``tool_use`` of the message before (the API's wording)."""
    for i, message in enumerate(messages):
        if message["role"] == "user":
            asked = _tool_use_ids(messages[i - 1]) if i > 0 else []
            for j, block in enumerate(_blocks(message)):
                if block["type"] == "tool_result" and block["tool_use_id"] not in asked:
                    return (
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {block['tool_use_id']}. Each `tool_result` "
                        "block must have a corresponding `tool_use` block in the previous message."
                    )
            continue
        ids = _tool_use_ids(message)
        if not ids or (allow_trailing and i == len(messages) - 1):
            continue
        answered = set()
        if i + 1 < len(messages) and messages[i + 1]["role"] == "user":
            for block in _blocks(messages[i + 1]):
                if block["type"] != "tool_result":
                    break  # results must come first: any after a text block do not count
                answered.add(block["tool_use_id"])
        if missing := [tool_id for tool_id in ids if tool_id not in answered]:
            return (
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )
    return None


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return content if isinstance(content, list) else []


def _tool_use_ids(message: dict[str, Any]) -> list[str]:
    if message["role"] != "assistant":
        return []
    return [block["id"] for block in _blocks(message) if block["type"] == "tool_use"]


def _is_text_block(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and _is_str(block.get("text"))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return "role: must be 'user' or 'assistant'"
    content = message.get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return "content: must be a string or a list of content blocks"
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCK_TYPES:
            return f"content.{j}: unknown content block type {kind!r}"
        if kind == "text" and not _is_text_block(block):
            return f"content.{j}.text: field required"
        if kind == "tool_use" and not (
            _is_str(block.get("id"))
            and _is_str(block.get("name"))
            and isinstance(block.get("input"), dict)
        ):
            return f"content.{j}: tool_use needs id, name and an input object"
        if kind == "tool_result" and not _is_str(block.get("tool_use_id")):
            return f"content.{j}.tool_use_id: field required"
        if kind == "tool_result" and not isinstance(block.get("is_error", False), bool):
            return f"content.{j}.is_error: must be a boolean"
    return None
