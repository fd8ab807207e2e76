"""The operator's HTTP tools in whole calls (docs/tools.md): scripted caller <-> simulated
Telnyx <-> server <-> simulated Anthropic, which asks for the clinic's tools <-> the clinic
simulator, which verifies every signature and holds what was booked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server
from processes import clean_env

from voice_trio.sim._serve import answer_lifespan, serve_asgi
from voice_trio.sim.caller import BargeIn, HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import CLINIC_TOOLS, OUR_NUMBER, Lab, open_lab

PATIENT = "+573001234567"
ASK = "Quisiera pedir una cita, por favor."


@pytest.fixture
async def lab(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Lab:
    """conftest's lab, with the clinic: the server gets its tools (TOOLS_FILE...)."""
    monkeypatch.setattr("voice_trio.sim._serve.KEEP_ALIVE_SECONDS", 0.5)
    return await open_lab(
        nursery, ms_per_char=FAST_SPEECH_MS, llm_ttft=0.05, tts_ttfb_ms=20, tools=True
    )


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


async def inbound(lab: Lab, party: ScriptedCaller):
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    return call, await party.run()


def heard(results) -> str:
    return " ".join(t.text.strip() for t in results.bot_turns)


def tools_file(tmp_path: Path, old: str, new: str, count: int = -1) -> str:
    """The clinic's tools, with ``old`` replaced by ``new``, as a file of the test's own."""
    text = Path(CLINIC_TOOLS).read_text(encoding="utf-8").replace(old, new, count)
    path = tmp_path / "tools.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def short_timeouts(tmp_path: Path, seconds: float) -> str:
    """The clinic's tools with another timeout (the shipped file says 3 s)."""
    return tools_file(tmp_path, "timeout = 3.0", f"timeout = {seconds}")


async def tool_calls(server, ccid: str, count: int, timeout: float = 8.0) -> list[dict]:
    """The call's tool requests as ``GET /api/calls/{id}`` shows them, once there are
    ``count`` (a request may end after the call did)."""
    with trio.fail_after(timeout):
        while True:
            response = await server.client.get(f"/api/calls/{ccid}")
            if response.status_code == 200 and len(response.json()["tool_calls"]) >= count:
                return response.json()["tool_calls"]
            await trio.sleep(0.1)


async def test_the_agent_books_an_appointment_in_one_turn(nursery, lab) -> None:
    """Claude asks for free slots, then books the first: two signed requests, their results
    read back, one spoken answer, and an appointment the clinic really holds."""
    server = await start_lab_server(nursery, lab)
    call, results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say(ASK, 200),
                WaitForBot(min_ms_silence=900),
                Say("Gracias, adiós.", 200),
                WaitForBot(min_ms_silence=300),
            ]
        ),
    )
    assert not results.errors and not results.timed_out
    said = heard(results)
    assert "Con gusto, reviso la agenda." in said
    assert "Listo, su cita quedó para el" in said
    booked = lab.clinic.booked()
    assert len(booked) == 1
    appointment = booked[0]
    assert appointment.caller["telefono"] == PATIENT
    assert appointment.call_control_id == call.call_control_id
    assert appointment.slot.start in said  # what the caller heard is what the clinic holds
    assert [r.path for r in lab.clinic.requests] == [
        "/tools/free_slots",
        "/tools/book_appointment",
    ]
    assert all(r.verified and r.status == 200 for r in lab.clinic.requests)
    # Claude got each answer as the tool_result of its request, in the same turn.
    bodies = [r.body for r in lab.anthropic.requests]
    results_sent = [
        block
        for body in bodies
        for block in body["messages"][-1]["content"]
        if isinstance(body["messages"][-1]["content"], list) and block.get("type") == "tool_result"
    ]
    assert len(results_sent) == 2 and not any(b.get("is_error") for b in results_sent)
    assert json.loads(results_sent[1]["content"])["appointment_id"] == appointment.appointment_id
    recorded = await tool_calls(server, call.call_control_id, 2)
    assert [(t["tool"], t["status"], t["http_status"]) for t in recorded] == [
        ("free_slots", "ok", 200),
        ("book_appointment", "ok", 200),
    ]
    assert recorded[1]["input"]["slot_id"] == appointment.slot.slot_id
    assert all(t["caller_on_line"] for t in recorded)
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_tool_calls_total{status="ok",tool="book_appointment"} 1.0' in metrics
    assert 'voice_tool_latency_seconds_count{tool="free_slots"} 1.0' in metrics


async def test_a_slow_tool_gets_its_waiting_phrase(nursery, lab) -> None:
    lab.clinic.delays["free_slots"] = 1.2
    await start_lab_server(nursery, lab)
    _, results = await inbound(
        lab,
        caller([WaitForBot(min_ms_silence=300), Say(ASK, 200), WaitForBot(min_ms_silence=1500)]),
    )
    said = heard(results)
    assert said.index("Con gusto, reviso la agenda.") < said.index("Un momento, reviso la agenda.")
    assert said.index("Un momento, reviso la agenda.") < said.index("Listo, su cita quedó")
    assert len(lab.clinic.booked()) == 1


async def test_a_tool_that_times_out_is_apologised_for(nursery, lab, tmp_path) -> None:
    lab.clinic.delays["book_appointment"] = 2.0
    server = await start_lab_server(nursery, lab, TOOLS_FILE=short_timeouts(tmp_path, 1.0))
    call, results = await inbound(
        lab,
        caller([WaitForBot(min_ms_silence=300), Say(ASK, 200), WaitForBot(min_ms_silence=1500)]),
    )
    said = heard(results)
    assert "Un momento, le reservo la cita." in said  # past TOOL_WAIT_MS
    assert "Lo siento, no pude completar eso en este momento." in said
    assert "Listo, su cita" not in said
    last = lab.anthropic.requests[-1].body["messages"][-1]["content"]
    assert last[0]["is_error"] is True
    assert json.loads(last[0]["content"]) == {"error": "timeout", "after_s": 1.0}
    recorded = await tool_calls(server, call.call_control_id, 2)
    assert recorded[1]["tool"] == "book_appointment" and recorded[1]["status"] == "timeout"
    assert recorded[1]["http_status"] is None


async def test_a_barge_in_during_a_request_does_not_cancel_it(nursery, lab) -> None:
    """The caller talks over the waiting phrase: the bot stops, the request finishes, and
    Claude reads its result together with what the caller said."""
    lab.clinic.delays["free_slots"] = 2.0
    server = await start_lab_server(nursery, lab)
    call, results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say(ASK, 200),
                BargeIn(after_bot_ms=1100, text="Mejor el martes."),
                WaitForBot(min_ms_silence=900),
            ]
        ),
    )
    assert results.clears >= 1
    after = [
        r.body["messages"]
        for r in lab.anthropic.requests
        if "Mejor el martes." in json.dumps(r.body["messages"][-1], ensure_ascii=False)
    ]
    assert after, "the caller's new words reached Claude"
    asked, answered = after[0][-2], after[0][-1]
    assert asked["role"] == "assistant" and asked["content"][-1]["name"] == "free_slots"
    result, words = answered["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == asked["content"][-1]["id"]
    assert "slots" in json.loads(result["content"])
    assert words == {"type": "text", "text": "Mejor el martes."}
    assert 'Perdone, le escuché: "Mejor el martes."' in heard(results)
    recorded = await tool_calls(server, call.call_control_id, 1)
    assert recorded[0]["tool"] == "free_slots" and recorded[0]["status"] == "ok"
    free_slots = [r for r in lab.clinic.requests if r.path == "/tools/free_slots"]
    assert len(free_slots) == 1 and free_slots[0].answered


async def test_a_hang_up_during_a_request_lets_it_finish_and_keeps_it(
    nursery, lab, tmp_path
) -> None:
    """The booking takes 5 s; the caller hangs up in the silence after the waiting phrase.
    The request is not cut: the clinic holds the appointment and the call's record keeps
    the request, marked as answered after the caller left."""
    lab.clinic.delays["book_appointment"] = 5.0
    server = await start_lab_server(nursery, lab, TOOLS_FILE=short_timeouts(tmp_path, 8.0))
    call, results = await inbound(
        lab,
        caller(
            [
                WaitForBot(min_ms_silence=300),
                Say(ASK, 200),
                WaitForBot(min_ms_silence=500),  # after the waiting phrase
                HangUp(),
            ]
        ),
    )
    assert results.hangup_by == "caller"
    recorded = await tool_calls(server, call.call_control_id, 2)
    booking = recorded[1]
    assert booking["tool"] == "book_appointment" and booking["status"] == "ok"
    assert booking["caller_on_line"] is False
    assert len(lab.clinic.booked()) == 1
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()


async def test_a_fallback_mode_call_books_too(nursery, lab) -> None:
    lab.telnyx.speak_ms_per_char = 10
    lab.telnyx.transcription_silence_ms = 250
    server = await start_lab_server(nursery, lab, USE_MEDIA_STREAMS="false")
    call, results = await inbound(
        lab,
        ScriptedCaller(
            [WaitForBot(min_ms_silence=300), Say(ASK, 200), WaitForBot(min_ms_silence=900)],
            ms_per_char=FAST_SPEECH_MS // 2,
            turn_gap_ms=300,
            timeout_s=30,
        ),
    )
    said = "".join(heard(results).split())
    assert "Listo,sucitaquedóparael" in said
    assert len(lab.clinic.booked()) == 1
    recorded = await tool_calls(server, call.call_control_id, 2)
    assert [t["tool"] for t in recorded] == ["free_slots", "book_appointment"]


async def huge_answer(scope, receive, send) -> None:
    """A tool endpoint that answers 1 MB of JSON."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"slots": [], "notes": "x" * 1_000_000}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_a_one_megabyte_answer_is_cut_before_it_reaches_claude(
    nursery, lab, tmp_path
) -> None:
    base = await nursery.start(serve_asgi, huge_answer)
    server = await start_lab_server(
        nursery, lab, TOOLS_FILE=tools_file(tmp_path, "${CLINIC_URL}", base)
    )
    call, results = await inbound(
        lab,
        caller([WaitForBot(min_ms_silence=300), Say(ASK, 200), WaitForBot(min_ms_silence=900)]),
    )
    assert not results.errors
    sent = [
        block
        for r in lab.anthropic.requests
        if isinstance(r.body["messages"][-1]["content"], list)
        for block in r.body["messages"][-1]["content"]
        if block.get("type") == "tool_result"
    ]
    assert len(sent) == 1 and not sent[0].get("is_error")
    content = sent[0]["content"]
    assert len(content) < 4100 and content.endswith("characters]")
    assert content.startswith('{"slots":[],"notes":"xxx')
    recorded = await tool_calls(server, call.call_control_id, 1)
    assert len(recorded[0]["result"]) == 1000  # the record keeps less still


async def test_a_bad_tools_file_stops_start_up_naming_the_problem(tmp_path) -> None:
    env = clean_env(
        TOOLS_FILE=tools_file(tmp_path, "timeout = 3.0", "timeout = 0", 1),
        TOOLS_SECRET="s" * 32,
        CLINIC_URL="http://127.0.0.1:4050",
    )
    done = await trio.run_process(
        [sys.executable, "-m", "voice_trio.cli", "--env-file", "/nonexistent", "serve"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode != 0
    message = done.stderr.decode()
    assert 'tool "free_slots" (#1): timeout: must be a number of seconds > 0' in message
    assert "TOOLS_FILE" in message and "Traceback" not in message
