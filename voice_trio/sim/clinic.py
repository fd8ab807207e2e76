"""A clinic's scheduling backend: the operator's side of docs/tools.md, ``voice-trio sim clinic``.

What it does (docs/tools.md is the contract):

- ``POST /tools/free_slots``, ``/tools/book_appointment``, ``/tools/cancel_appointment``
  take the body the server sends, ``{"call_control_id", "tool", "input", "caller"}``, with
  ``tool`` equal to the last part of the path. A body that is not JSON, or not that
  envelope, gets a 400; missing or wrong ``input`` fields a 422; every error body is JSON.
- **Signature**: with a ``secret``, every POST must carry ``X-Voice-Trio-Timestamp`` (whole
  Unix seconds) and ``X-Voice-Trio-Signature`` (``v1=`` + lowercase hex HMAC-SHA256 over
  ``timestamp + "." + raw body``), compared in constant time, with the timestamp at most
  ``replay_window`` seconds from this machine's clock (``time.time``); otherwise a 401
  with ``{"error": "unauthorized", "reason": ...}``. With ``secret=None`` anything is
  accepted, for poking at it by hand.
- **Slots** are made from ``clock()`` (default: now in America/Bogota): the next three
  weekdays after today, at 08:00, 09:00 and 10:00, with each of two doctors. ``free_slots``
  answers the free ones in time order, at most 6, filtered by ``input.date``
  (``YYYY-MM-DD``) and ``input.doctor`` (any part of the name, accents ignored). A slot id
  is ``<local start>/<doctor id>``, e.g. ``2026-12-07T09:00/dr-rojas``; ``start`` is local
  ISO time without offset.
- **Bookings**: ``book_appointment`` (``slot_id``, ``patient_name``, optional ``reason``)
  answers 200 ``{"booked": true, "appointment_id", "start", "doctor", "patient_name"}``, or
  409 when the slot is taken or unknown. ``cancel_appointment`` (``appointment_id``) answers
  200 ``{"cancelled": true, "appointment_id"}``, 404 for an unknown id, 409 if already
  cancelled; the slot is free again. A request repeating the ``X-Voice-Trio-Tool-Call`` of
  a booking or cancellation that succeeded gets the first answer again and changes nothing:
  a retry is never a double booking, nor a 409.
- ``GET /appointments``: every appointment held, cancelled ones included (unsigned: it is
  the simulator's own window, not part of the contract).

Knobs: ``delays`` (tool -> seconds) waits that long before answering, *after* the request
has taken effect, like a backend that booked but answers late: a server that gives up on
it still leaves the appointment booked. ``fail_status`` (tool -> HTTP status) answers that
status (JSON body) instead, changing nothing; the signature is still checked and recorded.
Every request is recorded in ``requests`` (:class:`ClinicRequest`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import trio

from voice_trio.sim._serve import answer_lifespan, read_body, serve_asgi

TIMEZONE = ZoneInfo("America/Bogota")
DOCTORS = {"dr-rojas": "Dra. Rojas", "dr-perez": "Dr. Pérez"}
HOURS = (8, 9, 10)
DAYS = 3
MAX_SLOTS = 6
REPLAY_WINDOW = 300.0
TOOLS = ("free_slots", "book_appointment", "cancel_appointment")
TIMESTAMP_HEADER = "x-voice-trio-timestamp"
SIGNATURE_HEADER = "x-voice-trio-signature"
TOOL_CALL_HEADER = "x-voice-trio-tool-call"

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Slot:
    slot_id: str
    start: str  # local ISO time, no offset: "2026-12-07T09:00"
    doctor: str

    @property
    def doctor_id(self) -> str:
        return self.slot_id.rpartition("/")[2]

    def as_json(self) -> dict[str, str]:
        return {"slot_id": self.slot_id, "start": self.start, "doctor": self.doctor}


@dataclass
class Appointment:
    appointment_id: str
    slot: Slot
    patient_name: str
    reason: str
    call_control_id: str
    caller: dict[str, Any]
    tool_call: str | None
    status: str = "booked"  # or "cancelled"

    def as_json(self) -> dict[str, Any]:
        return {
            "appointment_id": self.appointment_id,
            "status": self.status,
            **self.slot.as_json(),
            "patient_name": self.patient_name,
            "reason": self.reason,
            "call_control_id": self.call_control_id,
            "caller": self.caller,
            "tool_call": self.tool_call,
        }


@dataclass
class ClinicRequest:
    """One request as received; ``status`` is what it was answered (0 until decided)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # raw, exactly as received (what the signature covers)
    verified: bool  # a signature was sent and matched the secret within the window
    status: int = 0
    answer: Any = None
    answered: bool = False  # false if the client left before the answer was sent

    def json(self) -> Any:
        return json.loads(self.body)


class _Refusal(Exception):
    def __init__(self, status: int, **answer: Any) -> None:
        super().__init__(status, answer)
        self.status = status
        self.answer = answer


def slots_from(now: datetime) -> list[Slot]:
    """Every slot the clinic offers as seen at ``now``, in time order (pure)."""
    local = now.astimezone(TIMEZONE) if now.tzinfo else now
    days: list[date] = []
    day = local.date()
    while len(days) < DAYS:
        day += timedelta(days=1)
        if day.weekday() < 5:
            days.append(day)
    return [
        Slot(f"{start}/{doctor_id}", start, name)
        for day in days
        for hour in HOURS
        for start in [f"{day.isoformat()}T{hour:02d}:00"]
        for doctor_id, name in DOCTORS.items()
    ]


def verify(
    secret: str, headers: dict[str, str], body: bytes, now: float, window: float
) -> str | None:
    """Why the request's signature is refused, or None if it is good (pure; docs/tools.md)."""
    timestamp = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if timestamp is None or signature is None:
        return "missing X-Voice-Trio-Timestamp or X-Voice-Trio-Signature"
    if not timestamp.isascii() or not timestamp.isdigit():
        return "X-Voice-Trio-Timestamp must be whole Unix seconds"
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    if not hmac.compare_digest(signature.encode(), b"v1=" + mac.hexdigest().encode()):
        return "signature does not match"
    if abs(now - int(timestamp)) > window:
        return f"timestamp more than {window:g} s from the clinic's clock"
    return None


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _is_date(text: str) -> bool:
    try:
        return len(text) == 10 and date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def _text_field(data: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise _Refusal(422, error="invalid input", field=name, expected="a non-empty string")
    return value.strip()


@dataclass
class ClinicSim:
    """Knobs and state of one simulated scheduling backend; the object is the ASGI app."""

    secret: str | None = None
    replay_window: float = REPLAY_WINDOW
    delays: dict[str, float] = field(default_factory=dict)
    fail_status: dict[str, int] = field(default_factory=dict)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(TIMEZONE))
    requests: list[ClinicRequest] = field(init=False, default_factory=list)
    appointments: dict[str, Appointment] = field(init=False, default_factory=dict)
    # (tool, X-Voice-Trio-Tool-Call) -> the 200 answer it got: a repeat gets it again.
    _done: dict[tuple[str, str], dict[str, Any]] = field(init=False, default_factory=dict)

    def booked(self) -> list[Appointment]:
        """The appointments not cancelled, in booking order."""
        return [a for a in self.appointments.values() if a.status == "booked"]

    def free_slots(self) -> list[Slot]:
        taken = {a.slot.slot_id for a in self.booked()}
        return [s for s in slots_from(self.clock()) if s.slot_id not in taken]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = ClinicRequest(scope["method"], scope["path"], headers, body, False)
        self.requests.append(record)
        status, answer, delay = self._answer(record)
        record.status, record.answer = status, answer
        async with trio.open_nursery() as nursery:
            # A client that gives up (the server's timeout) cancels the wait, not the effect.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await trio.sleep(delay)
            record.answered = True  # before sending: the client may read it at once
            await _send_json(send, status, answer)
            nursery.cancel_scope.cancel()

    def _answer(self, record: ClinicRequest) -> tuple[int, Any, float]:
        """The status and JSON answer for ``record``, with its effect applied, and the delay."""
        path, method = record.path, record.method
        if path == "/appointments":
            if method != "GET":
                return 405, {"error": "method not allowed", "allowed": "GET"}, 0.0
            return 200, [a.as_json() for a in self.appointments.values()], 0.0
        tool = path.removeprefix("/tools/")
        if not path.startswith("/tools/") or tool not in TOOLS:
            return 404, {"error": "not found", "path": path}, 0.0
        delay = self.delays.get(tool, 0.0)
        if method != "POST":
            return 405, {"error": "method not allowed", "allowed": "POST"}, delay
        refused = None
        if self.secret is not None:
            refused = verify(
                self.secret, record.headers, record.body, time.time(), self.replay_window
            )
            record.verified = refused is None
        if tool in self.fail_status:
            status = self.fail_status[tool]
            return status, {"error": "simulated failure", "status": status}, delay
        if refused is not None:
            return 401, {"error": "unauthorized", "reason": refused}, delay
        try:
            return 200, self._run(tool, record), delay
        except _Refusal as refusal:
            return refusal.status, refusal.answer, delay

    def _run(self, tool: str, record: ClinicRequest) -> dict[str, Any]:
        try:
            body = json.loads(record.body)
        except ValueError:
            raise _Refusal(400, error="body is not JSON") from None
        envelope = {"call_control_id": str, "tool": str, "input": dict, "caller": dict}
        if not isinstance(body, dict):
            raise _Refusal(400, error="body must be a JSON object", fields=list(envelope))
        for name, kind in envelope.items():
            if not isinstance(body.get(name), kind):
                raise _Refusal(400, error="bad envelope", field=name, expected=kind.__name__)
        if body["tool"] != tool:
            raise _Refusal(400, error="tool does not match the path", tool=body["tool"])
        tool_call = record.headers.get(TOOL_CALL_HEADER)
        if tool_call is not None and (tool, tool_call) in self._done:
            return self._done[(tool, tool_call)]
        if tool == "free_slots":
            return self._free_slots(body["input"])
        if tool == "book_appointment":
            answer = self._book(body, tool_call)
        else:
            answer = self._cancel(body["input"])
        if tool_call is not None:
            self._done[(tool, tool_call)] = answer
        return answer

    def _free_slots(self, data: dict[str, Any]) -> dict[str, Any]:
        day = _text_field(data, "date", required=False)
        if day and not _is_date(day):
            raise _Refusal(422, error="invalid input", field="date", expected="YYYY-MM-DD")
        doctor = _fold(_text_field(data, "doctor", required=False))
        slots = [
            s
            for s in self.free_slots()
            if s.start.startswith(day) and doctor in _fold(f"{s.doctor} {s.doctor_id}")
        ]
        return {"slots": [s.as_json() for s in slots[:MAX_SLOTS]]}

    def _book(self, body: dict[str, Any], tool_call: str | None) -> dict[str, Any]:
        data = body["input"]
        missing = [n for n in ("slot_id", "patient_name") if not data.get(n)]
        if missing:
            raise _Refusal(422, error="missing input", fields=missing)
        slot_id = _text_field(data, "slot_id")
        name = _text_field(data, "patient_name")
        reason = _text_field(data, "reason", required=False)
        slot = next((s for s in slots_from(self.clock()) if s.slot_id == slot_id), None)
        if slot is None:
            raise _Refusal(409, error="unknown slot", slot_id=slot_id)
        if any(a.slot.slot_id == slot_id for a in self.booked()):
            raise _Refusal(409, error="slot taken", slot_id=slot_id)
        appointment = Appointment(
            f"apt-{len(self.appointments) + 1:04d}",
            slot,
            name,
            reason,
            body["call_control_id"],
            body["caller"],
            tool_call,
        )
        self.appointments[appointment.appointment_id] = appointment
        return {
            "booked": True,
            "appointment_id": appointment.appointment_id,
            "start": slot.start,
            "doctor": slot.doctor,
            "patient_name": name,
        }

    def _cancel(self, data: dict[str, Any]) -> dict[str, Any]:
        appointment_id = _text_field(data, "appointment_id")
        appointment = self.appointments.get(appointment_id)
        if appointment is None:
            raise _Refusal(404, error="unknown appointment", appointment_id=appointment_id)
        if appointment.status == "cancelled":
            raise _Refusal(409, error="already cancelled", appointment_id=appointment_id)
        appointment.status = "cancelled"
        return {"cancelled": True, "appointment_id": appointment_id}


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_json(send: Send, status: int, answer: Any) -> None:
    payload = json.dumps(answer, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def serve(
    sim: ClinicSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status.started`` gets the base URL."""
    await serve_asgi(sim, host=host, port=port, task_status=task_status)


def _per_tool(kind: type[float] | type[int]) -> Callable[[str], tuple[str, float]]:
    def parse(text: str) -> tuple[str, float]:
        tool, _, value = text.partition("=")
        try:
            return _known_tool(tool.strip()), kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TOOL={kind.__name__.upper()}, got {text!r}"
            ) from None

    return parse


def _known_tool(name: str) -> str:
    if name not in TOOLS:
        raise ValueError(name)
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--secret", default=None, help="TOOLS_SECRET to verify with (default: accept unsigned)"
    )
    parser.add_argument("--replay-window", type=float, default=REPLAY_WINDOW, metavar="SECONDS")
    parser.add_argument(
        "--delay",
        action="append",
        default=[],
        type=_per_tool(float),
        metavar="TOOL=SECONDS",
        help="answer this tool late (repeatable)",
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        type=_per_tool(int),
        metavar="TOOL=STATUS",
        help="answer this tool with this HTTP status (repeatable)",
    )


async def run_from_args(args: argparse.Namespace) -> None:
    sim = ClinicSim(
        secret=args.secret,
        replay_window=args.replay_window,
        delays=dict(args.delay),
        fail_status={tool: int(status) for tool, status in args.fail},
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve, sim, host=args.host, port=args.port))
        print(f"Clinic simulator listening on {base_url}", flush=True)
