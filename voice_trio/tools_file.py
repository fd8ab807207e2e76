"""``TOOLS_FILE``: the operator's HTTP tools, read and checked once at start-up.

TOML (``tomllib``, in the standard library) or, for a name ending in ``.json``, JSON of the
same shape: one ``[[tool]]`` table per tool (docs/tools.md). Every problem is reported with
the file, the tool (name and position) and the field, so a bad file stops start-up with a
message that says what to fix. ``${VAR}`` in an endpoint is filled from the environment the
settings were read from (one file for staging and production).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what the Messages API accepts as a tool name
RESERVED = frozenset({"end_call", "transfer_call"})  # the built-in tools
DEFAULT_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 30.0
MAX_TOOLS = 32
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FIELDS = frozenset(
    {"name", "description", "endpoint", "timeout", "retry", "waiting_phrase", "input_schema"}
)


class ToolsFileError(ValueError):
    """The tools file cannot be used; the message names the tool and the field."""


@dataclass(frozen=True, slots=True)
class HttpToolSpec:
    """One declared tool: what Claude is told, and where and how it is called."""

    name: str
    description: str
    input_schema: dict[str, Any]
    endpoint: str
    timeout: float = DEFAULT_TIMEOUT_S
    retry: bool = False  # may be sent again once after a connection error or a 5xx
    waiting_phrase: str = ""  # said if the answer is slow; empty: the language's default


def load_tools_file(path: str | Path, environ: Mapping[str, str]) -> tuple[HttpToolSpec, ...]:
    where = f"TOOLS_FILE {path}"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ToolsFileError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        if str(path).endswith(".json"):
            document = json.loads(raw)
        else:
            document = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ToolsFileError(f"{where}: not valid {_format(path)} ({exc})") from None
    if not isinstance(document, dict) or set(document) - {"tool"}:
        raise ToolsFileError(f"{where}: expected only [[tool]] tables at the top")
    tables = document.get("tool", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ToolsFileError(f"{where}: tool: expected a list of tables ([[tool]])")
    if len(tables) > MAX_TOOLS:
        raise ToolsFileError(f"{where}: {len(tables)} tools; at most {MAX_TOOLS}")
    tools: list[HttpToolSpec] = []
    for position, table in enumerate(tables, start=1):
        tool = _tool(table, where, position, environ)
        if any(t.name == tool.name for t in tools):
            raise ToolsFileError(f'{where}: tool "{tool.name}" (#{position}): declared twice')
        tools.append(tool)
    return tuple(tools)


def _format(path: str | Path) -> str:
    return "JSON" if str(path).endswith(".json") else "TOML"


def _tool(
    table: dict[str, Any], file: str, position: int, environ: Mapping[str, str]
) -> HttpToolSpec:
    name = table.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolsFileError(
            f"{file}: tool #{position}: name: expected 1-64 of a-z A-Z 0-9 _ -, got {name!r}"
        )
    where = f'{file}: tool "{name}" (#{position})'
    if name in RESERVED:
        raise ToolsFileError(f"{where}: name: {name} is a built-in tool")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise ToolsFileError(f"{where}: unknown field {unknown[0]!r}")
    description = table.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ToolsFileError(f"{where}: description: required (what the tool does, for Claude)")
    schema = table.get("input_schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ToolsFileError(f'{where}: input_schema: expected a JSON Schema with type "object"')
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise ToolsFileError(f"{where}: input_schema.properties: expected a table")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(r in properties for r in required):
        raise ToolsFileError(
            f"{where}: input_schema.required: expected a list of names in properties"
        )
    timeout = table.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        timeout = None
    if timeout is None or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ToolsFileError(
            f"{where}: timeout: must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g},"
            f" got {table.get('timeout')!r}"
        )
    retry = table.get("retry", False)
    if not isinstance(retry, bool):
        raise ToolsFileError(f"{where}: retry: expected true or false, got {retry!r}")
    phrase = table.get("waiting_phrase", "")
    if not isinstance(phrase, str):
        raise ToolsFileError(f"{where}: waiting_phrase: expected text, got {phrase!r}")
    return HttpToolSpec(
        name=name,
        description=description.strip(),
        input_schema=schema,
        endpoint=_endpoint(table.get("endpoint"), where, environ),
        timeout=float(timeout),
        retry=retry,
        waiting_phrase=phrase.strip(),
    )


def _endpoint(value: Any, where: str, environ: Mapping[str, str]) -> str:
    if not isinstance(value, str) or not value:
        raise ToolsFileError(f"{where}: endpoint: required (an https URL)")

    def fill(match: re.Match[str]) -> str:
        found = environ.get(match.group(1))
        if not found:
            raise ToolsFileError(f"{where}: endpoint: ${{{match.group(1)}}} is not set")
        return found

    url = _VAR.sub(fill, value)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ToolsFileError(f"{where}: endpoint: expected an https URL, got {url!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ToolsFileError(
            f"{where}: endpoint: http is allowed only to a loopback address; use https"
            f" (got {url!r})"
        )
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
