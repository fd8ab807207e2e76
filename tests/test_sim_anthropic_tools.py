"""The Anthropic simulator's tool use: several calls per reply, the scripted clinic intents
(played against the clinic simulator, as the server will), and the tool pairing rules."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from test_sim_anthropic import HEADERS, assert_error, parse_sse

from voice_trio.conversation.persona import load_persona, system_blocks
from voice_trio.conversation.tools import END_CALL
from voice_trio.providers.claude import ClaudeClient, LlmError, ToolCall
from voice_trio.sim import clinic
from voice_trio.sim.anthropic import (
    AnthropicSim,
    Reply,
    add_arguments,
    default_reply,
    serve,
    validate,
)
from voice_trio.sim.anthropic_replies import CONTINUATION_TEXT, ERROR_TEXT, NO_SLOTS_TEXT

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clinic-tools.toml"
SECRET = "tools-secret-for-tests"
FRIDAY = datetime(2026, 12, 4, 15, 30, tzinfo=clinic.TIMEZONE)
NOW = FRIDAY  # the system prompt's date and the clinic's clock agree
CONFIRMATION = (
    "Listo, su cita quedó para el 2026-12-07T08:00 con Dra. Rojas. ¿Le puedo ayudar en algo más?"
)


def clinic_tools() -> list[dict[str, Any]]:
    """The example tools file as the server will offer it to Claude, plus end_call."""
    declared = tomllib.loads(EXAMPLE.read_text())["tool"]
    offered = [
        {"name": t["name"], "description": t["description"], "input_schema": t["input_schema"]}
        for t in declared
    ]
    return [*offered, END_CALL.spec()]


def system(nombre: str = "Ana María", language: str = "es") -> list[dict[str, Any]]:
    persona = load_persona(language=language)
    return system_blocks(persona, nombre=nombre, contexto="", now=NOW, max_chars=300)


def request(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 300, "messages": list(messages), **extra}


def user(*content: Any) -> dict[str, Any]:
    """A user message: one string as itself, else the blocks given."""
    if len(content) == 1 and isinstance(content[0], str):
        return {"role": "user", "content": content[0]}
    return {"role": "user", "content": list(content)}


def text(words: str) -> dict[str, Any]:
    return {"type": "text", "text": words}


def tool_use(tool_id: str, name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": data or {}}


def result(tool_id: str, answer: Any, *, error: bool = False) -> dict[str, Any]:
    block = {"type": "tool_result", "tool_use_id": tool_id, "content": json.dumps(answer)}
    return block | {"is_error": True} if error else block


def assistant(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": list(content)}


SLOTS = {
    "slots": [
        {
            "slot_id": "2026-12-07T08:00/dr-rojas",
            "start": "2026-12-07T08:00",
            "doctor": "Dra. Rojas",
        },
        {
            "slot_id": "2026-12-07T08:00/dr-perez",
            "start": "2026-12-07T08:00",
            "doctor": "Dr. Pérez",
        },
    ]
}
BOOKED = {
    "booked": True,
    "appointment_id": "apt-0001",
    "start": "2026-12-07T08:00",
    "doctor": "Dra. Rojas",
    "patient_name": "Ana María",
}


@pytest.fixture
def sim() -> AnthropicSim:
    return AnthropicSim(ttft=0.0, tokens_per_second=math.inf)


@pytest.fixture
async def base_url(sim: AnthropicSim, nursery: trio.Nursery) -> str:
    return await nursery.start(serve, sim)


@pytest.fixture
async def claude(base_url: str) -> AsyncIterator[ClaudeClient]:
    async with ClaudeClient(
        api_key="sk-test", base_url=base_url, model="claude-haiku-4-5", timeout=10
    ) as client:
        yield client


# --- Reply and the pure script ------------------------------------------------------------


def test_a_reply_holds_one_or_several_tool_calls() -> None:
    one = ("end_call", {"reason": "bye"})
    assert Reply("t", one) == Reply("t", tool_calls=(one,)) == Reply("t", one, (one,))
    assert Reply("t", one).tool_calls == (one,)
    two = Reply("t", tool_calls=(("a", {}), ("b", {"x": 1})))
    assert two.tool_call == ("a", {}) and len(two.tool_calls) == 2
    assert Reply("t").tool_call is None and Reply("t").tool_calls == ()
    with pytest.raises(ValueError):
        Reply("t", ("b", {}), (("a", {}),))


def test_an_appointment_request_asks_for_free_slots_only_when_offered() -> None:
    tools = clinic_tools()
    for said in ("Quisiera pedir una CITA", "¿Me da un turno?", "Quiero agendar", "An appointment"):
        reply = default_reply(request(user(said), tools=tools))
        assert reply == Reply("Con gusto, reviso la agenda.", ("free_slots", {})), said
    assert default_reply(request(user("Quiero una cita"))).tool_calls == ()
    assert default_reply(request(user("Quiero una cita"), tools=[END_CALL.spec()])).tool_calls == ()
    # The farewell still wins, and a word containing "cita" is not a request.
    farewell = default_reply(request(user("Ya tengo la cita, adiós"), tools=tools))
    assert farewell.tool_call is not None and farewell.tool_call[0] == "end_call"
    assert default_reply(request(user("Felicitaciones"), tools=tools)).tool_calls == ()


def test_free_slots_results_book_the_first_slot_for_the_caller_named_in_the_system_prompt() -> None:
    history = [user("una cita"), assistant(text("Con gusto."), tool_use("toolu_1", "free_slots"))]
    answer = user(result("toolu_1", SLOTS))
    reply = default_reply(request(*history, answer, tools=clinic_tools(), system=system()))
    booking = {"slot_id": "2026-12-07T08:00/dr-rojas", "patient_name": "Ana María"}
    assert reply == Reply("Le reservo el primer espacio disponible.", ("book_appointment", booking))
    # The English persona's system prompt states the name the same way; no name: "paciente".
    english = default_reply(
        request(*history, answer, tools=clinic_tools(), system=system("Bob", "en"))
    )
    assert english.tool_call == ("book_appointment", booking | {"patient_name": "Bob"})
    nameless = default_reply(request(*history, answer, tools=clinic_tools(), system=system("")))
    assert nameless.tool_call == ("book_appointment", booking | {"patient_name": "paciente"})
    # No slots; or no booking tool on offer: nothing is booked.
    empty = user(result("toolu_1", {"slots": []}))
    assert default_reply(request(*history, empty, tools=clinic_tools())) == Reply(NO_SLOTS_TEXT)
    no_booking = [t for t in clinic_tools() if t["name"] != "book_appointment"]
    assert default_reply(request(*history, answer, tools=no_booking)) == Reply(CONTINUATION_TEXT)


def test_a_booking_result_is_confirmed_and_an_error_result_apologised_for() -> None:
    history = [user("una cita"), assistant(tool_use("toolu_2", "book_appointment", {"x": 1}))]
    booked = default_reply(request(*history, user(result("toolu_2", BOOKED)), tools=clinic_tools()))
    assert booked == Reply(CONFIRMATION)
    failed = user(result("toolu_2", {"error": "http 409", "body": "{}"}, error=True))
    assert default_reply(request(*history, failed, tools=clinic_tools())) == Reply(ERROR_TEXT)
    # A result the script does not know (another tool, or not JSON) is a plain continuation.
    other = [user("x"), assistant(tool_use("toolu_3", "lookup")), user(result("toolu_3", 1))]
    assert default_reply(request(*other)) == Reply(CONTINUATION_TEXT)
    cut = {
        "type": "tool_result",
        "tool_use_id": "toolu_2",
        "content": '{"booked": tr…[truncated 9 characters]',
    }
    assert default_reply(request(*history, user(cut))) == Reply(CONTINUATION_TEXT)


def test_words_said_over_the_tools_are_acknowledged_before_the_results_answer() -> None:
    history = [user("una cita"), assistant(tool_use("toolu_1", "free_slots"))]
    barge_in = user(result("toolu_1", SLOTS), text("  perdón,  ¿con quién? "))
    body = request(*history, barge_in, tools=clinic_tools(), system=system())
    assert validate(body, "2023-06-01") is None  # results first, then the words: valid
    reply = default_reply(body)
    assert reply.text == (
        'Perdone, le escuché: "perdón, ¿con quién?". Le reservo el primer espacio disponible.'
    )
    assert reply.tool_call is not None and reply.tool_call[0] == "book_appointment"


# --- several tool calls on the wire --------------------------------------------------------


async def test_several_tool_calls_stream_as_several_tool_use_blocks(
    sim: AnthropicSim, base_url: str
) -> None:
    calls = (("free_slots", {"date": "2026-12-07"}), ("free_slots", {"doctor": "Pérez"}))
    sim.reply_fn = lambda body: Reply("Reviso las dos agendas.", tool_calls=calls)
    sim.words_per_delta = 1
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post(
            "/v1/messages", headers=HEADERS, json=request(user("hola"), stream=True)
        )
        message = (await http.post("/v1/messages", headers=HEADERS, json=request(user("x")))).json()
    events = parse_sse(response.text)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"]
    ids = [b["id"] for b in starts[1:]]
    assert len(set(ids)) == 2 and all(i.startswith("toolu_") for i in ids)
    assert all(b["input"] == {} for b in starts[1:])
    for index, (_, data) in enumerate(calls, start=1):
        pieces = [
            d["delta"]["partial_json"]
            for n, d in events
            if n == "content_block_delta" and d["index"] == index
        ]
        assert all(pieces) and json.loads("".join(pieces)) == data
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert [n for n, _ in events].count("content_block_stop") == 3
    # Not streamed: the same blocks in the Message.
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["input"] for b in message["content"][1:]] == [c[1] for c in calls]
    assert message["stop_reason"] == "tool_use"


async def test_the_sdk_and_the_claude_client_read_several_tool_calls(
    sim: AnthropicSim, claude: ClaudeClient
) -> None:
    calls = (("free_slots", {}), ("end_call", {"reason": "x"}))
    sim.reply_fn = lambda body: Reply("Un momento.", tool_calls=calls)
    async with claude.stream_reply("Eres Sofía.", [user("hola")], tools=clinic_tools()) as reply:
        said = "".join([delta.text async for delta in reply])
    assert said == "Un momento." and reply.stop_reason == "tool_use"
    assert [(c.name, c.input) for c in reply.tool_calls] == list(calls)
    assert all(isinstance(c, ToolCall) for c in reply.tool_calls)
    assert len({c.id for c in reply.tool_calls}) == 2
    content = reply.assistant_content()
    assert [b["type"] for b in content] == ["text", "tool_use", "tool_use"]


async def test_tool_calls_that_do_not_fit_max_tokens_are_all_dropped(
    sim: AnthropicSim, base_url: str
) -> None:
    calls = (("a", {"q": "uno dos"}), ("b", {"q": "tres cuatro cinco"}))
    sim.reply_fn = lambda body: Reply("Hola.", tool_calls=calls)
    async with httpx.AsyncClient(base_url=base_url) as http:
        body = request(user("x")) | {"max_tokens": 3}
        message = (await http.post("/v1/messages", headers=HEADERS, json=body)).json()
    assert message["stop_reason"] == "max_tokens"
    assert [b["type"] for b in message["content"]] == ["text"]


# --- the clinic, end to end ----------------------------------------------------------------


async def run_tools(clinic_url: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Call the clinic for each tool call as docs/tools.md says the server does; the
    ``tool_result`` blocks of the answers."""
    results = []
    async with httpx.AsyncClient(base_url=clinic_url) as http:
        for call in calls:
            caller = {"nombre": "Ana María", "telefono": "+573001112233", "contexto": ""}
            body = json.dumps(
                {
                    "call_control_id": "v3:c",
                    "tool": call.name,
                    "input": call.input,
                    "caller": caller,
                }
            ).encode()
            stamp = str(int(time.time()))
            mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
            headers = {
                "content-type": "application/json",
                "X-Voice-Trio-Timestamp": stamp,
                "X-Voice-Trio-Signature": "v1=" + mac.hexdigest(),
                "X-Voice-Trio-Tool-Call": call.id,
            }
            response = await http.post(f"/tools/{call.name}", content=body, headers=headers)
            block = {"type": "tool_result", "tool_use_id": call.id, "content": response.text}
            if not response.is_success:
                block["is_error"] = True
            results.append(block)
    return results


async def converse(
    claude: ClaudeClient, clinic_url: str, said: str, *, rounds: int = 4
) -> list[tuple[str, list[ToolCall]]]:
    """One caller turn with tool rounds: each reply's text and tool calls, in order."""
    messages: list[dict[str, Any]] = [user(said)]
    replies = []
    for _ in range(rounds):
        async with claude.stream_reply(system(), messages, tools=clinic_tools()) as reply:
            words = "".join([delta.text async for delta in reply])
        replies.append((words, reply.tool_calls))
        if not reply.tool_calls:
            return replies
        messages.append({"role": "assistant", "content": reply.assistant_content()})
        messages.append({"role": "user", "content": await run_tools(clinic_url, reply.tool_calls)})
    raise AssertionError(f"still calling tools after {rounds} rounds: {replies}")


@pytest.fixture
async def clinic_sim(nursery: trio.Nursery) -> tuple[clinic.ClinicSim, str]:
    sim = clinic.ClinicSim(secret=SECRET, clock=lambda: FRIDAY)
    return sim, await nursery.start(clinic.serve, sim)


async def test_the_clinic_intents_book_an_appointment_over_two_tool_rounds(
    claude: ClaudeClient, clinic_sim: tuple[clinic.ClinicSim, str]
) -> None:
    clinic_state, clinic_url = clinic_sim
    replies = await converse(claude, clinic_url, "Hola, quisiera pedir una cita.")
    assert [(words, [(c.name, c.input) for c in calls]) for words, calls in replies] == [
        ("Con gusto, reviso la agenda.", [("free_slots", {})]),
        (
            "Le reservo el primer espacio disponible.",
            [
                (
                    "book_appointment",
                    {"slot_id": "2026-12-07T08:00/dr-rojas", "patient_name": "Ana María"},
                )
            ],
        ),
        (CONFIRMATION, []),
    ]
    [appointment] = clinic_state.booked()
    assert (appointment.patient_name, appointment.slot.start) == ("Ana María", "2026-12-07T08:00")
    assert all(r.verified and r.status == 200 for r in clinic_state.requests)


async def test_a_failing_clinic_is_apologised_for(
    claude: ClaudeClient, clinic_sim: tuple[clinic.ClinicSim, str]
) -> None:
    clinic_state, clinic_url = clinic_sim
    clinic_state.fail_status["book_appointment"] = 503
    replies = await converse(claude, clinic_url, "Necesito un turno, por favor")
    assert [words for words, _ in replies][1:] == [
        "Le reservo el primer espacio disponible.",
        ERROR_TEXT,
    ]
    assert clinic_state.booked() == []


# --- tool pairing: what the API refuses ----------------------------------------------------


async def test_a_tool_result_without_its_tool_use_just_before_is_refused(
    base_url: str, claude: ClaudeClient
) -> None:
    orphan = request(user("hola"), assistant(text("Hola.")), user(result("toolu_x", {})))
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post("/v1/messages", headers=HEADERS, json=orphan)
    message = assert_error(response, 400, "invalid_request_error")["error"]["message"]
    assert message == (
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: "
        "toolu_x. Each `tool_result` block must have a corresponding `tool_use` block in the "
        "previous message."
    )
    # Through the project's client: a request error that no retry can fix.
    with pytest.raises(LlmError) as refused:
        async with claude.stream_reply("s", orphan["messages"]):
            pass
    assert (refused.value.status, refused.value.kind) == (400, "invalid_request_error")
    assert not refused.value.retryable


def test_a_tool_use_must_be_answered_at_the_start_of_the_next_message() -> None:
    asked = assistant(text("Reviso."), tool_use("toolu_1", "free_slots"), tool_use("toolu_2", "x"))
    both = user(result("toolu_1", {}), result("toolu_2", {}), text("gracias"))
    assert validate(request(user("a"), asked, both), "2023-06-01") is None
    missing = (
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: "
        "{}. Each `tool_use` block must have a corresponding `tool_result` block in the next "
        "message."
    )
    cases = {
        "toolu_2": user(result("toolu_1", {})),  # one of two answered
        "toolu_1, toolu_2": user("gracias"),  # not answered at all
    }
    for ids, answer in cases.items():
        assert validate(request(user("a"), asked, answer), "2023-06-01") == missing.format(ids)
    # Text before the results: they do not count as "immediately after".
    text_first = user(text("aquí van"), result("toolu_1", {}), result("toolu_2", {}))
    assert validate(request(user("a"), asked, text_first), "2023-06-01") == missing.format(
        "toolu_1, toolu_2"
    )
    # A message in between, even the right results a message later, is refused too.
    late = [user("espere"), assistant(text("Bien.")), both]
    assert validate(request(user("a"), asked, *late), "2023-06-01") == missing.format(
        "toolu_1, toolu_2"
    )


async def test_an_unanswered_tool_use_in_a_last_message_is_a_knob(
    sim: AnthropicSim, base_url: str
) -> None:
    trailing = request(user("una cita"), assistant(tool_use("toolu_1", "free_slots")))
    async with httpx.AsyncClient(base_url=base_url) as http:
        refused = await http.post("/v1/messages", headers=HEADERS, json=trailing)
        assert_error(refused, 400, "invalid_request_error")
        sim.trailing_tool_use = "allow"
        assert (await http.post("/v1/messages", headers=HEADERS, json=trailing)).status_code == 200
    assert validate(trailing, "2023-06-01", trailing_tool_use="allow") is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).trailing_tool_use == "error"
    assert parser.parse_args(["--trailing-tool-use", "allow"]).trailing_tool_use == "allow"
    not_bool = request(
        user("a"), assistant(tool_use("t", "x")), user(result("t", 1) | {"is_error": "yes"})
    )
    assert validate(not_bool, "2023-06-01") == "messages.2: content.0.is_error: must be a boolean"
