"""``/api/calls``: look calls up afterwards — records, transcripts and latency ledgers.

``GET /api/calls`` lists calls newest first, a page at a time; its query parameters:

- ``limit``: 1 to 100, default 20;
- ``cursor``: the ``next_cursor`` of the previous page;
- ``since`` / ``until``: ISO 8601 (``2026-11-25T10:00:00Z``; without an offset it is read in
  ``TIMEZONE``) or Unix seconds; ``since`` is inclusive, ``until`` exclusive;
- ``status``: ``active`` or ``ended``;
- ``phone``: E.164, matched against either party (a ``+`` sent unescaped arrives as a space,
  and is restored);
- ``end_reason``: one of the end reasons (``caller_hangup``, ``operator_hangup``, ...).

``GET /api/calls/<call_control_id>`` gives one call with its turns. Authentication is the
``/api/*`` guard's (``web.app``). The store is ``center.store``, set when the center starts.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from quart import Response, jsonify, request, send_file
from quart_trio import QuartTrio

from voice_trio.calls.ends import EndReason
from voice_trio.config import E164
from voice_trio.instance.center import CallCenter
from voice_trio.recordings import delete_recording, find_recording
from voice_trio.store import MAX_PAGE, CallRecord, CallStore, StoreError, ToolCallEntry, TurnEntry
from voice_trio.store.records import MAX_EPOCH, STATUSES, decode_cursor

log = logging.getLogger("voice_trio.web")

DEFAULT_PAGE = 20
LIST_PARAMS = ("limit", "cursor", "since", "until", "status", "phone", "end_reason")
END_REASONS = tuple(sorted(r.value for r in EndReason if r != EndReason.ENDED_ELSEWHERE))


class InvalidQuery(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_list_query(args: Mapping[str, str], timezone: str) -> dict[str, Any]:
    """Keyword arguments for ``CallStore.list_calls``, or ``InvalidQuery`` naming the
    parameter that is wrong."""
    unknown = sorted(set(args) - set(LIST_PARAMS))
    if unknown:
        raise InvalidQuery(unknown[0], "unknown parameter; use " + ", ".join(LIST_PARAMS))
    query: dict[str, Any] = {"limit": DEFAULT_PAGE}
    raw = args.get("limit", "").strip()
    if raw:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
            raise InvalidQuery("limit", f"must be an integer from 1 to {MAX_PAGE}")
        query["limit"] = int(raw)
    cursor = args.get("cursor", "").strip()
    if cursor:
        try:
            decode_cursor(cursor)
        except ValueError as exc:
            raise InvalidQuery("cursor", str(exc)) from None
        query["cursor"] = cursor
    for name in ("since", "until"):
        raw = args.get(name, "").strip()
        if raw:
            query[name] = parse_time(name, raw, timezone)
    if "since" in query and "until" in query and query["since"] >= query["until"]:
        raise InvalidQuery("until", "must be later than since")
    status = args.get("status", "").strip().lower()
    if status:
        if status not in STATUSES:
            raise InvalidQuery("status", "must be one of " + ", ".join(STATUSES))
        query["status"] = status
    phone = args.get("phone", "").strip()
    if phone:
        phone = phone if phone.startswith("+") else "+" + phone
        if not E164.match(phone):
            raise InvalidQuery("phone", "must be an E.164 phone number such as +573001234567")
        query["phone"] = phone
    end_reason = args.get("end_reason", "").strip().lower()
    if end_reason:
        if end_reason not in END_REASONS:
            raise InvalidQuery("end_reason", "must be one of " + ", ".join(END_REASONS))
        query["end_reason"] = end_reason
    return query


def parse_time(field: str, raw: str, timezone: str) -> float:
    """Unix seconds from ISO 8601 or from a number of seconds."""
    try:
        epoch = float(raw)
    except ValueError:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidQuery(
                field, "must be ISO 8601 (2026-11-25T10:00:00Z) or Unix seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(timezone))
        epoch = moment.timestamp()
    if not 0 <= epoch < MAX_EPOCH:  # also refuses nan and inf
        raise InvalidQuery(field, "must be a time between 1970 and 9999")
    return epoch


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def call_json(record: CallRecord) -> dict[str, Any]:
    started = record.answered_at if record.answered_at is not None else record.created_at
    duration = None if record.ended_at is None else round(record.ended_at - started, 3)
    return {
        "call_control_id": record.call_control_id,
        "call_session_id": record.call_session_id,
        "direction": record.direction,
        "from": record.from_number,
        "to": record.to_number,
        "nombre": record.nombre,
        "contexto": record.contexto,
        "status": record.status,
        "mode": record.mode,
        "created_at": iso(record.created_at),
        "answered_at": iso(record.answered_at),
        "ended_at": iso(record.ended_at),
        "duration_seconds": duration,
        "end_reason": record.end_reason,
        "usage": {
            "stt_audio_seconds": record.stt_audio_seconds,
            "llm_input_tokens": record.llm_input_tokens,
            "llm_output_tokens": record.llm_output_tokens,
            "tts_characters": record.tts_characters,
        },
    }


def turn_json(turn: TurnEntry) -> dict[str, Any]:
    return {
        "index": turn.index,
        "kind": turn.kind,
        "user_text": turn.user_text,
        "bot_text": turn.bot_text,
        "heard_text": turn.heard_text,
        "interrupted": turn.interrupted,
        "tool_calls": turn.tool_calls,
        "latency": {
            "t0": turn.t0,
            "t1": turn.t1,
            "t2": turn.t2,
            "t2s": turn.t2s,
            "t3": turn.t3,
            "t4": turn.t4,
            "t5": turn.t5,
            "overhead_ms": turn.overhead_ms,
            "stages_ms": turn.stages_ms(),
        },
    }


def tool_call_json(entry: ToolCallEntry) -> dict[str, Any]:
    return {
        "tool": entry.tool,
        "tool_use_id": entry.tool_use_id,
        "input": entry.input,
        "status": entry.status,
        "http_status": entry.http_status,
        "result": entry.result,
        "latency_ms": entry.latency_ms,
        "started_at": iso(entry.started_at),
        "caller_on_line": entry.caller_on_line,
    }


def latency_summary(turns: list[TurnEntry]) -> dict[str, Any]:
    """Median and worst voice path (t0→t5) and server overhead over the call's turns."""
    voice = [t.t5 - t.t0 for t in turns if t.t0 is not None and t.t5 is not None]
    overhead = [t.overhead_ms for t in turns if t.overhead_ms is not None]

    def spread(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}

    return {
        "unit": "ms",
        "stamps_relative_to": "call start",
        "turns_measured": len(voice),
        "t0_t5_ms": spread(voice),
        "overhead_ms": spread(overhead),
    }


def register_calls_api(app: QuartTrio, center: CallCenter) -> None:
    def store() -> CallStore | None:
        return getattr(center, "store", None)

    @app.get("/api/calls")
    async def list_calls() -> Any:
        calls = store()
        if calls is None:
            return _no_store()
        try:
            query = parse_list_query(request.args, center.settings.timezone)
        except InvalidQuery as exc:
            return _json(422, error="validation_failed", field=exc.field, reason=exc.reason)
        try:
            page = await calls.list_calls(**query)
        except StoreError as exc:
            return _store_failed(exc)
        return _json(200, calls=[call_json(r) for r in page.calls], next_cursor=page.next_cursor)

    @app.get("/api/calls/<call_control_id>")
    async def get_call(call_control_id: str) -> Any:
        calls = store()
        if calls is None:
            return _no_store()
        try:
            found = await calls.get_call(call_control_id)
            tools = await calls.get_tool_calls(call_control_id) if found is not None else []
        except StoreError as exc:
            return _store_failed(exc)
        if found is None:
            return _json(404, error="not_found", reason="no call with this call_control_id")
        record, turns = found
        return _json(
            200,
            call=call_json(record),
            turns=[turn_json(t) for t in turns],
            tool_calls=[tool_call_json(t) for t in tools],
            latency=latency_summary(turns),
        )

    @app.get("/api/calls/<call_control_id>/recording")
    async def get_recording(call_control_id: str) -> Any:
        path = find_recording(center.settings.recordings_dir, call_control_id)
        if path is None:
            return _json(404, error="not_found", reason="no recording of this call")
        return await recording_response(str(path))

    @app.delete("/api/calls/<call_control_id>")
    async def delete_call(call_control_id: str) -> Any:
        calls = store()
        if calls is None:
            return _no_store()
        try:
            outcome = await erase_call(center, calls, call_control_id)
        except StoreError as exc:
            return _store_failed(exc)
        if outcome == "not_found":
            return _json(404, error="not_found", reason="no call with this call_control_id")
        if outcome == "active":
            return _json(409, error="call_active", reason="the call is still going on")
        return _json(200, status="deleted", call_control_id=call_control_id)


async def erase_call(center: CallCenter, calls: CallStore, call_control_id: str) -> str:
    """Delete a call's record, turns, tool calls and recording: ``deleted``, or why not
    (``not_found``, ``active``: a call still going on would write its record again).
    ``StoreError`` is the caller's to answer."""
    found = await calls.get_call(call_control_id)
    if found is None:
        return "not_found"
    if found[0].status == "active" or call_control_id in center.registry.feed.calls:
        return "active"
    await calls.delete_call(call_control_id)
    delete_recording(center.settings.recordings_dir, call_control_id)
    return "deleted"


async def recording_response(path: str) -> Response:
    """A recording as ``audio/wav``, with Range requests (browsers seek with them)."""
    response = await send_file(path, mimetype="audio/wav", conditional=True)
    response.headers["Cache-Control"] = "private, no-store"
    return response


def _no_store() -> Any:
    return _json(503, error="store_unavailable", reason="the call store is not open")


def _store_failed(exc: StoreError) -> Any:
    log.warning("Call store unavailable: %s", exc)
    return _json(503, error="store_unavailable", reason="the call store is not reachable")


def _json(code: int, /, **body: Any) -> Any:
    response = jsonify(body)
    response.status_code = code
    return response
