"""TOOLS_FILE: the operator's HTTP tools are read once at start-up, and a bad file stops it
with a message that names the tool and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voice_trio.config import ConfigError, Settings
from voice_trio.tools_file import HttpToolSpec, ToolsFileError, load_tools_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GOOD = """
[[tool]]
name = "book_appointment"
description = "Book a free slot for the caller."
endpoint = "${CLINIC_URL}/tools/book_appointment"
timeout = 2.5
waiting_phrase = "Un momento, le reservo la cita."

[tool.input_schema]
type = "object"
required = ["slot_id"]
[tool.input_schema.properties.slot_id]
type = "string"

[[tool]]
name = "free_slots"
description = "List free slots."
endpoint = "https://clinic.example/voice/slots"
retry = true
[tool.input_schema]
type = "object"
"""


def write(tmp_path: Path, text: str, name: str = "tools.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_file_reads_into_tools(tmp_path: Path) -> None:
    tools = load_tools_file(write(tmp_path, GOOD), {"CLINIC_URL": "http://127.0.0.1:8095"})
    assert tools == (
        HttpToolSpec(
            name="book_appointment",
            description="Book a free slot for the caller.",
            input_schema={
                "type": "object",
                "required": ["slot_id"],
                "properties": {"slot_id": {"type": "string"}},
            },
            endpoint="http://127.0.0.1:8095/tools/book_appointment",
            timeout=2.5,
            retry=False,
            waiting_phrase="Un momento, le reservo la cita.",
        ),
        HttpToolSpec(
            name="free_slots",
            description="List free slots.",
            input_schema={"type": "object"},
            endpoint="https://clinic.example/voice/slots",
            timeout=3.0,
            retry=True,
        ),
    )
    as_json = {"tool": [{**t, "endpoint": "https://a.example/x"} for t in _tables(GOOD)]}
    again = load_tools_file(write(tmp_path, json.dumps(as_json), "tools.json"), {})
    assert [t.name for t in again] == ["book_appointment", "free_slots"]


def _tables(text: str) -> list[dict]:
    import tomllib

    return tomllib.loads(text)["tool"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('name = "book appointment"', "tool #1: name: expected 1-64 of a-z A-Z 0-9 _ -"),
        ('name = "end_call"', 'tool "end_call" (#1): name: end_call is a built-in tool'),
        ('description = ""', 'tool "book_appointment" (#1): description: required'),
        ("timeout = 0", 'tool "book_appointment" (#1): timeout: must be a number of seconds'),
        ('timeout = "3s"', "got '3s'"),
        ("timeout = 31", "<= 30"),
        ('retry = "yes"', "retry: expected true or false"),
        ('endpoint = "ftp://x.example/a"', "endpoint: expected an https URL"),
        ('endpoint = "http://clinic.example/a"', "http is allowed only to a loopback address"),
        ('endpoint = "${NOT_SET}/a"', "endpoint: ${NOT_SET} is not set"),
        ("colour = 1", "unknown field 'colour'"),
    ],
)
def test_a_bad_field_is_named(tmp_path: Path, change: str, message: str) -> None:
    key = change.split(" = ")[0]
    lines = GOOD.splitlines()
    head = lines.index("[[tool]]")  # the first tool's fields follow, up to its schema
    fields = lines[head + 1 : lines.index("[tool.input_schema]")]
    found = [i for i, line in enumerate(fields) if line.startswith(f"{key} =")]
    if found:
        lines[head + 1 + found[0]] = change
    else:
        lines.insert(head + 1, change)
    with pytest.raises(ToolsFileError, match=_escape(message)):
        load_tools_file(write(tmp_path, "\n".join(lines)), {"CLINIC_URL": "http://127.0.0.1:1"})


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_whole_file_problems(tmp_path: Path) -> None:
    cases = {
        "[[tool]\nname=": "not valid TOML",
        "[other]\nx = 1": "expected only [[tool]] tables",
        GOOD.replace('name = "free_slots"', 'name = "book_appointment"'): (
            'tool "book_appointment" (#2): declared twice'
        ),
        GOOD.replace('type = "object"\n"""', '"""').replace(
            '[tool.input_schema]\ntype = "object"\n', "[tool.input_schema]\n"
        ): 'input_schema: expected a JSON Schema with type "object"',
    }
    for text, message in cases.items():
        with pytest.raises(ToolsFileError, match=_escape(message)):
            load_tools_file(write(tmp_path, text), {"CLINIC_URL": "http://127.0.0.1:1"})
    with pytest.raises(ToolsFileError, match="cannot be read"):
        load_tools_file(tmp_path / "missing.toml", {})


def test_settings_read_the_file_and_need_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    env = {"TOOLS_FILE": str(path), "CLINIC_URL": "http://127.0.0.1:8095"}
    with pytest.raises(ConfigError, match="TOOLS_SECRET: TOOLS_FILE declares tools"):
        Settings.from_env(env, None)
    settings = Settings.from_env({**env, "TOOLS_SECRET": "s" * 32}, None)
    assert [t.name for t in settings.http_tools] == ["book_appointment", "free_slots"]
    assert "s" * 32 in settings.secrets()
    assert "HTTP_TOOLS" not in {name for name, _, _ in settings.describe()}
    with pytest.raises(ConfigError, match=r'TOOLS_FILE: TOOLS_FILE .*tool "book_appointment"'):
        bad = write(tmp_path, GOOD.replace("timeout = 2.5", "timeout = -1"), "bad.toml")
        Settings.from_env({**env, "TOOLS_FILE": str(bad), "TOOLS_SECRET": "s" * 32}, None)
    assert Settings.from_env({}, None).http_tools == ()


def test_check_config_lists_the_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from voice_trio.cli import check_config

    env = {
        "TOOLS_FILE": str(write(tmp_path, GOOD)),
        "TOOLS_SECRET": "s" * 32,
        "CLINIC_URL": "http://127.0.0.1:8095",
    }
    assert check_config(Settings.from_env(env, None)) == 0
    out = capsys.readouterr().out
    assert "tools: end_call (built in); 2 from TOOLS_FILE" in out
    assert (
        "  book_appointment: POST http://127.0.0.1:8095/tools/book_appointment"
        " (timeout 2.5 s, not retried)" in out
    )
    assert (
        "  free_slots: POST https://clinic.example/voice/slots (timeout 3 s, retried once)" in out
    )
    assert "s" * 32 not in out  # the secret is masked
