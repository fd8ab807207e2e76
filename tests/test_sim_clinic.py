"""The clinic simulator against docs/tools.md, over real HTTP: signatures, slots, bookings."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dotenv import dotenv_values

from voice_trio.cli import build_parser
from voice_trio.config import Settings
from voice_trio.sim import lab
from voice_trio.sim.clinic import (
    TIMEZONE,
    TOOLS,
    ClinicSim,
    add_arguments,
    run_from_args,
    serve,
    slots_from,
)

SECRET = "clinic-test-secret"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clinic-tools.toml"
# A Friday: the next three weekdays are Monday 7, Tuesday 8 and Wednesday 9 December.
FRIDAY = datetime(2026, 12, 4, 15, 30, tzinfo=TIMEZONE)
CALLER = {"nombre": "Ana", "telefono": "+573001112233", "contexto": "control anual"}


def envelope(tool: str, data: dict[str, Any] | None = None) -> bytes:
    body = {"call_control_id": "v3:sim-call", "tool": tool, "input": data or {}, "caller": CALLER}
    return json.dumps(body).encode()


def signed(
    body: bytes,
    *,
    secret: str = SECRET,
    at: int | None = None,
    tool_call: str = "toolu_test_1",
) -> dict[str, str]:
    """Headers as docs/tools.md specifies them, computed here independently of the sim."""
    stamp = str(int(time.time()) if at is None else at)
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "X-Voice-Trio-Timestamp": stamp,
        "X-Voice-Trio-Signature": f"v1={mac}",
        "X-Voice-Trio-Tool-Call": tool_call,
    }


@pytest.fixture
def sim() -> ClinicSim:
    return ClinicSim(secret=SECRET, clock=lambda: FRIDAY)


@pytest.fixture
async def http(sim: ClinicSim, nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    url = await nursery.start(serve, sim)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


async def call(
    http: httpx.AsyncClient, tool: str, data: dict[str, Any] | None = None, **sign: Any
) -> httpx.Response:
    body = envelope(tool, data)
    return await http.post(f"/tools/{tool}", content=body, headers=signed(body, **sign))


def assert_json(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_slots_are_the_next_three_weekdays_at_eight_nine_and_ten_with_two_doctors() -> None:
    slots = slots_from(FRIDAY)
    assert len(slots) == 18
    assert {s.start[:10] for s in slots} == {"2026-12-07", "2026-12-08", "2026-12-09"}
    assert {s.start[11:] for s in slots} == {"08:00", "09:00", "10:00"}
    assert {s.doctor for s in slots} == {"Dra. Rojas", "Dr. Pérez"}
    assert slots[0].slot_id == "2026-12-07T08:00/dr-rojas"
    assert [s.start for s in slots] == sorted(s.start for s in slots)
    # The same moment in another zone gives the same slots (they are local to the clinic).
    assert slots_from(FRIDAY.astimezone(UTC)) == slots


async def test_a_signed_request_gets_the_first_six_free_slots(
    http: httpx.AsyncClient, sim: ClinicSim
) -> None:
    answer = assert_json(await call(http, "free_slots"), 200)
    assert answer == {
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
            {
                "slot_id": "2026-12-07T09:00/dr-rojas",
                "start": "2026-12-07T09:00",
                "doctor": "Dra. Rojas",
            },
            {
                "slot_id": "2026-12-07T09:00/dr-perez",
                "start": "2026-12-07T09:00",
                "doctor": "Dr. Pérez",
            },
            {
                "slot_id": "2026-12-07T10:00/dr-rojas",
                "start": "2026-12-07T10:00",
                "doctor": "Dra. Rojas",
            },
            {
                "slot_id": "2026-12-07T10:00/dr-perez",
                "start": "2026-12-07T10:00",
                "doctor": "Dr. Pérez",
            },
        ]
    }
    [record] = sim.requests
    assert record.verified and record.answered and record.status == 200
    assert record.json()["caller"] == CALLER and record.headers["x-voice-trio-tool-call"]


async def test_free_slots_filters_by_date_and_doctor(http: httpx.AsyncClient) -> None:
    answer = assert_json(
        await call(http, "free_slots", {"date": "2026-12-09", "doctor": "perez"}), 200
    )
    assert [s["slot_id"] for s in answer["slots"]] == [
        "2026-12-09T08:00/dr-perez",
        "2026-12-09T09:00/dr-perez",
        "2026-12-09T10:00/dr-perez",
    ]
    answer = assert_json(await call(http, "free_slots", {"doctor": "Dra. ROJAS"}), 200)
    assert {s["doctor"] for s in answer["slots"]} == {"Dra. Rojas"} and len(answer["slots"]) == 6
    assert assert_json(await call(http, "free_slots", {"date": "2026-12-12"}), 200) == {"slots": []}
    bad = assert_json(await call(http, "free_slots", {"date": "9 de diciembre"}), 422)
    assert bad["field"] == "date"


async def test_a_wrong_signature_is_refused_with_a_reason(
    http: httpx.AsyncClient, sim: ClinicSim
) -> None:
    refused = assert_json(await call(http, "free_slots", secret="another-secret"), 401)
    assert refused["error"] == "unauthorized" and "signature" in refused["reason"]
    # The signature covers the body exactly as sent: one changed byte is a different body.
    body = envelope("free_slots")
    headers = signed(body)
    response = await http.post("/tools/free_slots", content=body + b" ", headers=headers)
    assert_json(response, 401)
    assert [r.verified for r in sim.requests] == [False, False]


async def test_a_timestamp_outside_the_300_s_window_is_refused(http: httpx.AsyncClient) -> None:
    now = int(time.time())
    for at in (now - 301, now + 301):
        refused = assert_json(await call(http, "free_slots", at=at), 401)
        assert "300 s" in refused["reason"]
    assert_json(await call(http, "free_slots", at=now - 290), 200)
    body = envelope("free_slots")
    headers = signed(body) | {"X-Voice-Trio-Timestamp": f"{now}.5"}
    assert_json(await http.post("/tools/free_slots", content=body, headers=headers), 401)


async def test_unsigned_requests_are_refused_when_a_secret_is_set(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/tools/free_slots", content=envelope("free_slots"))
    assert "missing" in assert_json(response, 401)["reason"]


async def test_without_a_secret_unsigned_requests_are_accepted(nursery: trio.Nursery) -> None:
    sim = ClinicSim(clock=lambda: FRIDAY)
    url = await nursery.start(serve, sim)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/tools/free_slots", content=envelope("free_slots"))
    assert len(assert_json(response, 200)["slots"]) == 6
    assert sim.requests[0].verified is False


async def test_booking_a_taken_slot_is_a_409_but_a_repeated_tool_call_gets_the_first_answer(
    http: httpx.AsyncClient, sim: ClinicSim
) -> None:
    slot = "2026-12-07T09:00/dr-rojas"
    booking = {"slot_id": slot, "patient_name": "Ana", "reason": "control anual"}
    first = assert_json(await call(http, "book_appointment", booking, tool_call="toolu_a"), 200)
    assert first == {
        "booked": True,
        "appointment_id": "apt-0001",
        "start": "2026-12-07T09:00",
        "doctor": "Dra. Rojas",
        "patient_name": "Ana",
    }
    other = {"slot_id": slot, "patient_name": "Luis"}
    taken = assert_json(await call(http, "book_appointment", other, tool_call="toolu_b"), 409)
    assert taken["slot_id"] == slot
    # A retry of the first request (same tool-call id) is answered as the first time.
    again = assert_json(await call(http, "book_appointment", booking, tool_call="toolu_a"), 200)
    assert again == first and len(sim.appointments) == 1
    unknown = {"slot_id": "2026-12-05T09:00/dr-rojas", "patient_name": "Ana"}  # a Saturday
    assert_json(await call(http, "book_appointment", unknown, tool_call="toolu_c"), 409)

    held = assert_json(await http.get("/appointments"), 200)
    assert [(a["appointment_id"], a["slot_id"], a["patient_name"], a["status"]) for a in held] == [
        ("apt-0001", slot, "Ana", "booked")
    ]
    assert held[0]["reason"] == "control anual" and held[0]["tool_call"] == "toolu_a"
    assert held[0]["caller"] == CALLER and held[0]["call_control_id"] == "v3:sim-call"
    slots = assert_json(await call(http, "free_slots", {"date": "2026-12-07"}), 200)["slots"]
    assert slot not in [s["slot_id"] for s in slots]


async def test_cancelling_frees_the_slot(http: httpx.AsyncClient, sim: ClinicSim) -> None:
    booking = {"slot_id": "2026-12-08T10:00/dr-perez", "patient_name": "Ana"}
    await call(http, "book_appointment", booking, tool_call="toolu_book")
    cancel = {"appointment_id": "apt-0001"}
    done = assert_json(await call(http, "cancel_appointment", cancel, tool_call="toolu_x"), 200)
    assert done == {"cancelled": True, "appointment_id": "apt-0001"}
    assert (
        assert_json(await call(http, "cancel_appointment", cancel, tool_call="toolu_x"), 200)
        == done
    )
    assert_json(await call(http, "cancel_appointment", cancel, tool_call="toolu_y"), 409)
    missing = {"appointment_id": "apt-9999"}
    assert_json(await call(http, "cancel_appointment", missing, tool_call="toolu_z"), 404)
    assert sim.booked() == [] and sim.appointments["apt-0001"].status == "cancelled"
    rebooked = assert_json(await call(http, "book_appointment", booking, tool_call="toolu_2"), 200)
    assert rebooked["appointment_id"] == "apt-0002"


async def test_bad_requests_get_json_errors(http: httpx.AsyncClient) -> None:
    missing = assert_json(await call(http, "book_appointment", {"slot_id": "x"}), 422)
    assert missing["fields"] == ["patient_name"]
    assert_json(await call(http, "cancel_appointment", {}), 422)

    async def post(path: str, body: bytes) -> httpx.Response:
        return await http.post(path, content=body, headers=signed(body))

    assert "JSON" in assert_json(await post("/tools/free_slots", b"{not json"), 400)["error"]
    assert_json(await post("/tools/free_slots", b"[]"), 400)
    mismatch = assert_json(await post("/tools/free_slots", envelope("book_appointment")), 400)
    assert mismatch["tool"] == "book_appointment"
    no_caller = json.dumps({"call_control_id": "c", "tool": "free_slots", "input": {}}).encode()
    assert assert_json(await post("/tools/free_slots", no_caller), 400)["field"] == "caller"
    assert_json(await post("/tools/reschedule", envelope("reschedule")), 404)
    assert_json(await http.get("/tools/free_slots"), 405)


async def test_a_delay_answers_late_after_the_booking_took_effect(
    http: httpx.AsyncClient, sim: ClinicSim
) -> None:
    sim.delays["book_appointment"] = 0.5
    booking = {"slot_id": "2026-12-07T08:00/dr-perez", "patient_name": "Ana"}
    started = trio.current_time()
    assert_json(await call(http, "book_appointment", booking, tool_call="toolu_1"), 200)
    assert trio.current_time() - started >= 0.5
    # A client that gives up first (the server's timeout) leaves the booking made.
    body = envelope("book_appointment", booking | {"slot_id": "2026-12-07T08:00/dr-rojas"})
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/tools/book_appointment", content=body, headers=signed(body), timeout=0.1)
    assert len(sim.booked()) == 2
    await trio.sleep(0.6)  # past the delay: the answer was never sent to the gone client
    last = sim.requests[-1]
    assert last.status == 200 and not last.answered


async def test_fail_status_answers_that_status_and_changes_nothing(
    http: httpx.AsyncClient, sim: ClinicSim
) -> None:
    sim.fail_status["book_appointment"] = 503
    booking = {"slot_id": "2026-12-07T08:00/dr-perez", "patient_name": "Ana"}
    failed = assert_json(await call(http, "book_appointment", booking), 503)
    assert failed["status"] == 503
    assert sim.appointments == {} and sim.requests[-1].verified
    assert_json(await call(http, "free_slots"), 200)  # other tools are unaffected


def test_the_example_tools_file_declares_the_clinic_as_docs_tools_md_shows() -> None:
    tools = tomllib.loads(EXAMPLE.read_text())["tool"]
    assert [t["name"] for t in tools] == list(TOOLS)
    for tool in tools:
        assert tool["endpoint"] == "${CLINIC_URL}/tools/" + tool["name"]
        assert tool["description"] and tool["waiting_phrase"]
        assert 0 < tool["timeout"] <= 30
        assert tool["retry"] is (tool["name"] == "free_slots")  # only the read-only one
        assert tool["input_schema"]["type"] == "object"
    by_name = {t["name"]: t for t in tools}
    assert by_name["book_appointment"]["input_schema"]["required"] == ["slot_id", "patient_name"]
    assert by_name["cancel_appointment"]["input_schema"]["required"] == ["appointment_id"]
    assert set(by_name["free_slots"]["input_schema"]["properties"]) == {"date", "doctor"}


async def test_the_cli_serves_the_clinic(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [
            "sim",
            "clinic",
            "--secret",
            SECRET,
            "--delay",
            "free_slots=0.2",
            "--fail",
            "cancel_appointment=500",
        ]
    )
    assert args.delay == [("free_slots", 0.2)] and args.fail == [("cancel_appointment", 500)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--delay", "reschedule=1"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_from_args, args)
        with trio.fail_after(5):
            # Polling: captured stdout offers nothing to wait on.
            while "listening" not in (out := capsys.readouterr().out):  # noqa: ASYNC110
                await trio.sleep(0.01)
        url = re.fullmatch(r"Clinic simulator listening on (http://127\.0\.0\.1:\d+)\n", out)
        assert url is not None
        async with httpx.AsyncClient(base_url=url[1]) as http:
            assert_json(await call(http, "free_slots"), 200)
            assert_json(await call(http, "cancel_appointment", {"appointment_id": "a"}), 500)
            assert_json(await http.post("/tools/free_slots", content=envelope("free_slots")), 401)
        nursery.cancel_scope.cancel()


async def test_sim_all_serves_the_clinic_and_writes_its_tool_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / ".env"
    argv = ["sim", "all", "--write-env", str(env_file)]
    ports = ["--telnyx-port=0", "--deepgram-port=0", "--anthropic-port=0"]
    secrets_seen = []
    for _ in range(2):  # the second run keeps the secret a server may have been started with
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lab.run_from_args, build_parser().parse_args([*argv, *ports]))
            out = ""
            with trio.fail_after(10):
                # Polling: captured stdout offers nothing to wait on.
                while "(written to" not in out:
                    await trio.sleep(0.01)
                    out += capsys.readouterr().out
            url = re.search(r"^Clinic simulator listening on (http://127\.0\.0\.1:\d+)$", out, re.M)
            assert url is not None
            written = dotenv_values(env_file)
            assert written["TOOLS_FILE"] == lab.CLINIC_TOOLS and written["CLINIC_URL"] == url[1]
            secret = written["TOOLS_SECRET"]
            assert secret is not None and len(secret) >= 16
            secrets_seen.append(secret)
            # A server reads them: the clinic's tools, signed with the clinic's secret.
            settings = Settings.from_env(dict(written), None)  # type: ignore[arg-type]
            assert [t.name for t in settings.http_tools][:2] == ["free_slots", "book_appointment"]
            assert settings.http_tools[0].endpoint == f"{url[1]}/tools/free_slots"
            async with httpx.AsyncClient(base_url=url[1]) as http:
                assert_json(await call(http, "free_slots", secret=secret), 200)
            nursery.cancel_scope.cancel()
    assert secrets_seen[0] == secrets_seen[1]


def test_the_example_is_the_declaration_the_package_ships() -> None:
    """examples/clinic-tools.toml links to the file inside the package (the demo and
    `sim all` use it from an installed package too)."""
    assert Path(lab.CLINIC_TOOLS).read_bytes() == EXAMPLE.read_bytes()
