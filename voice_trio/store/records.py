"""What the store keeps, and the interface both backends implement.

Wall-clock times (``created_at``, ``answered_at``, ``ended_at``) are Unix epoch seconds
(``time.time()``), the same clock as ``ActiveCall.started_at``. A turn's latency stamps are
milliseconds since the call's origin on the Trio clock (``trio.current_time()`` when the
session began), so one call's turns read as a single timeline and need no wall clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import trio

from voice_trio.store.errors import StoreError

if TYPE_CHECKING:
    from voice_trio.store.notify import Listener

DIRECTIONS = ("inbound", "outbound")
MODES = ("media", "fallback", "degraded")
STATUSES = ("active", "ended")
TURN_KINDS = (
    "greeting",
    "reply",
    "reprompt",
    "goodbye",
    "apology",
    "continuation",
    "handoff",
    "voicemail",
    "note",  # an operator's text (POST /api/calls/{id}/say)
    "notice",  # the recording notice, before the greeting (RECORD_CALLS)
)
STAMPS = ("t0", "t1", "t2", "t2s", "t3", "t4", "t5")

EVENT_TTL = 3600.0  # a webhook id is remembered this long; Telnyx retries within minutes
STATE_TTL = 86400.0  # fallback state untouched this long belongs to a call that is gone
HOUSEKEEPING_EVERY = 300.0  # seconds between sweeps of expired events and states
SERVER_LOST = "server_lost"  # end reason of a call whose instance died (crash, kill -9)

T = TypeVar("T")


@dataclass(slots=True)
class CallRecord:
    """One call, as an operator looks it up afterwards."""

    call_control_id: str
    direction: str
    from_number: str
    to_number: str
    call_session_id: str = ""
    nombre: str = ""
    contexto: str = ""
    created_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    mode: str = "media"
    status: str = "active"
    stt_audio_seconds: float = 0.0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    tts_characters: int = 0
    holder: str | None = None  # the instance running it; None: its state is shared

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("direction", self.direction, DIRECTIONS),
            ("mode", self.mode, MODES),
            ("status", self.status, STATUSES),
        ):
            if value not in allowed:
                raise ValueError(f"CallRecord.{name}: expected one of {allowed}, got {value!r}")
        if not self.call_control_id:
            raise ValueError("CallRecord.call_control_id is required")
        # Both backends keep microseconds; rounding here makes a saved record read back equal.
        self.created_at = round(self.created_at, 6)
        if self.answered_at is not None:
            self.answered_at = round(self.answered_at, 6)
        if self.ended_at is not None:
            self.ended_at = round(self.ended_at, 6)


TOOL_STATUSES = ("ok", "error", "timeout")


@dataclass(slots=True)
class ToolCallEntry:
    """One request to an operator's HTTP tool (docs/tools.md), as it ended."""

    call_control_id: str
    tool_use_id: str  # Claude's id for the call; the request's X-Voice-Trio-Tool-Call
    tool: str
    input: dict[str, Any]
    status: str  # ok | error | timeout
    http_status: int | None  # None: no answer (timeout, connection refused)
    result: str  # the answer (or the error) as Claude got it, cut to RESULT_CHARS
    latency_ms: float
    started_at: float = field(default_factory=time.time)
    caller_on_line: bool = True  # False: the caller hung up before the answer came

    RESULT_CHARS = 1000

    def __post_init__(self) -> None:
        if self.status not in TOOL_STATUSES:
            raise ValueError(
                f"ToolCallEntry.status: expected one of {TOOL_STATUSES}, got {self.status!r}"
            )
        if len(self.result) > self.RESULT_CHARS:
            self.result = self.result[: self.RESULT_CHARS]
        self.started_at = round(self.started_at, 6)
        self.latency_ms = round(self.latency_ms, 1)


class _TurnLike(Protocol):
    """What ``TurnEntry.from_turn`` reads (``conversation.turn_record.TurnRecord`` has it)."""

    kind: str
    user_text: str
    bot_text: str
    heard_text: str
    interrupted: bool
    t0: float | None
    t1: float | None
    t2: float | None
    t2s: float | None
    t3: float | None
    t4: float | None
    t5: float | None
    tool_calls: list[str]

    def overhead(self) -> float | None: ...


@dataclass(slots=True)
class TurnEntry:
    """One bot turn: what the caller said, what the bot said and what was heard of it
    (cut at barge-in), and its latency ledger in ms since the call's origin."""

    index: int
    kind: str = "reply"
    user_text: str = ""
    bot_text: str = ""
    heard_text: str = ""
    interrupted: bool = False
    t0: float | None = None  # turn end detected
    t1: float | None = None  # LLM request sent
    t2: float | None = None  # first LLM token
    t2s: float | None = None  # token that completed the first sentence
    t3: float | None = None  # first sentence sent to TTS
    t4: float | None = None  # first TTS audio
    t5: float | None = None  # first audio frame written to Telnyx
    overhead_ms: float | None = None  # (t1-t0) + (t3-t2s) + (t5-t4)
    tool_calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in TURN_KINDS:
            raise ValueError(f"TurnEntry.kind: expected one of {TURN_KINDS}, got {self.kind!r}")

    @classmethod
    def from_turn(cls, index: int, turn: _TurnLike, origin: float) -> TurnEntry:
        """A session's turn, with Trio-clock stamps made relative to ``origin`` (seconds)."""
        stamps = {
            name: None if getattr(turn, name) is None else ms(getattr(turn, name) - origin)
            for name in STAMPS
        }
        overhead = turn.overhead()
        return cls(
            index=index,
            kind=turn.kind,
            user_text=turn.user_text,
            bot_text=turn.bot_text,
            heard_text=turn.heard_text,
            interrupted=turn.interrupted,
            overhead_ms=None if overhead is None else ms(overhead),
            tool_calls=list(turn.tool_calls),
            **stamps,
        )

    def stages_ms(self) -> dict[str, float]:
        """Durations between consecutive stamps, as in ``TurnRecord.stages_ms``."""
        out: dict[str, float] = {}
        for a, b in (("t0", "t1"), ("t1", "t2"), ("t2", "t3"), ("t3", "t4"), ("t4", "t5")):
            start, end = getattr(self, a), getattr(self, b)
            if start is not None and end is not None:
                out[f"{a}-{b}"] = round(end - start, 1)
        if self.t0 is not None and self.t5 is not None:
            out["t0-t5"] = round(self.t5 - self.t0, 1)
        return out


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class CallPage:
    """One page of ``list_calls``, newest first; ``next_cursor`` is None on the last page."""

    calls: list[CallRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class CallState:
    """Fallback-mode state of one call: a JSON object and the version it was read at."""

    data: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class CallQuery:
    """The filters of ``list_calls``, already validated; ``queries.list_calls`` makes the SQL."""

    limit: int
    after: tuple[float, str] | None  # (created_at, call_control_id) of the last row seen
    since: float | None  # created_at >= since
    until: float | None  # created_at < until
    status: str | None
    phone: str | None  # from_number or to_number, exactly
    end_reason: str | None = None


MAX_PAGE = 100
MAX_EPOCH = 253402300800.0  # 10000-01-01T00:00:00Z: later times overflow datetime


def encode_cursor(record: CallRecord) -> str:
    raw = json.dumps([record.created_at, record.call_control_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor names, or ``ValueError`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, call_control_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError) as exc:
        raise ValueError("not a cursor returned by this API") from exc
    if (
        not isinstance(created_at, int | float)
        or not 0 <= created_at < MAX_EPOCH
        or not isinstance(call_control_id, str)
    ):
        raise ValueError("not a cursor returned by this API")
    return float(created_at), call_control_id


class CallCounts(NamedTuple):
    active: int
    total: int


class CallStore(ABC):
    """Call records, transcripts and fallback-mode shared state.

    Every method is a Trio coroutine; the blocking driver runs in a worker thread bounded
    by ``limiter``. A cancelled caller still waits for its statement to finish (threads are
    not abandoned), so a write is either done or not started, never half done. Saving at
    call end is the caller's to shield: ``with trio.move_on_after(t) as s: s.shield = True``.
    """

    backend: str  # "sqlite" or "postgres"
    where: str  # a file path or host:port/dbname, for logs; never a password

    def __init__(self, limiter: trio.CapacityLimiter, event_ttl: float = EVENT_TTL) -> None:
        self.limiter = limiter
        self.event_ttl = event_ttl
        self._swept_at = 0.0

    # Driver errors that mean "the database is unavailable" rather than "a bug": callers
    # (the session, the API) handle one ``StoreError`` instead of each driver's exceptions.
    outage_errors: tuple[type[Exception], ...] = ()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except self.outage_errors as exc:
            raise StoreError(f"{self.backend} store {self.where}: {exc}") from exc

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date (idempotent, safe to race)."""

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    async def start_call(self, record: CallRecord) -> None:
        """Insert the row of a call that just started; a row already there is kept."""

    @abstractmethod
    async def save_call(self, record: CallRecord, turns: list[TurnEntry]) -> None:
        """Write the whole call (row and turns) in one transaction; repeating it is harmless."""

    @abstractmethod
    async def get_call(self, call_control_id: str) -> tuple[CallRecord, list[TurnEntry]] | None:
        """The call and its turns in order, or None."""

    @abstractmethod
    async def delete_call(self, call_control_id: str) -> bool:
        """Delete the call's row, turns and tool calls in one transaction; False if there
        was no such call."""

    @abstractmethod
    async def save_tool_call(self, entry: ToolCallEntry) -> None:
        """Keep one tool request as it ended (kept even if the call's row is not there)."""

    @abstractmethod
    async def get_tool_calls(self, call_control_id: str) -> list[ToolCallEntry]:
        """The call's tool requests, oldest first."""

    async def list_calls(
        self,
        *,
        limit: int = 20,
        cursor: str | None = None,
        since: float | None = None,
        until: float | None = None,
        status: str | None = None,
        phone: str | None = None,
        end_reason: str | None = None,
    ) -> CallPage:
        """Calls newest first (by ``created_at``), ``limit`` at most, after ``cursor``.
        ``ValueError`` names a bad argument."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be from 1 to {MAX_PAGE}")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        query = CallQuery(
            limit=limit,
            after=None if cursor is None else decode_cursor(cursor),
            since=since,
            until=until,
            status=status,
            phone=phone,
            end_reason=end_reason,
        )
        rows = await self._list(query)
        more = len(rows) > limit
        calls = rows[:limit]
        return CallPage(calls, encode_cursor(calls[-1]) if more else None)

    @abstractmethod
    async def count_calls(self) -> CallCounts:
        """Calls on file across the deployment: active ones, and all."""

    @abstractmethod
    async def _list(self, query: CallQuery) -> list[CallRecord]:
        """Up to ``query.limit + 1`` rows, so that the caller knows whether more follow."""

    async def claim_event(self, event_id: str) -> bool:
        """True the first time any instance claims ``event_id`` (within ``event_ttl``)."""
        now = time.time()
        if now - self._swept_at >= HOUSEKEEPING_EVERY:
            self._swept_at = now
            await self._sweep()
        return await self._claim(event_id)

    async def claim_stream(self, call_control_id: str) -> bool:
        """True the first time any instance claims the media stream of ``call_control_id``:
        the first socket that proves the call, or the decision that no socket will come.
        Kept as a claimed id (``stream:<call id>``) for ``event_ttl``, which must outlast a
        stream token (``calls.stream_token``): a replayed token always finds the claim."""
        return await self.claim_event(f"stream:{call_control_id}")

    @abstractmethod
    async def _claim(self, event_id: str) -> bool: ...

    @abstractmethod
    async def _sweep(self) -> None:
        """Forget expired webhook ids and abandoned call states."""

    @abstractmethod
    async def load_state(self, call_control_id: str) -> CallState | None: ...

    @abstractmethod
    async def save_state(
        self, call_control_id: str, state: dict[str, Any], *, expected_version: int | None
    ) -> int:
        """Write ``state`` if the stored version is still ``expected_version`` (None: no
        state yet) and return the new version; otherwise raise ``StaleState``."""

    @abstractmethod
    async def delete_state(self, call_control_id: str) -> None: ...

    def listener(self, channel: str) -> Listener | None:
        """A ``LISTEN`` connection on ``channel`` (not connected yet) for the call-event bus;
        None if this store carries no events (SQLite: one process, nobody else to tell)."""
        return None

    async def notify(self, channel: str, payload: str) -> None:
        """Send ``payload`` to every listener on ``channel`` (``listener``)."""
        raise StoreError(f"the {self.backend} store carries no events")

    @abstractmethod
    async def register_instance(self, instance_id: str, name: str) -> None:
        """Record this instance as alive. Rows with the same ``name`` (earlier runs of this
        instance: same host and port) are dropped: those processes are gone."""

    @abstractmethod
    async def heartbeat(self, instance_id: str, name: str) -> None:
        """This instance is still alive (re-registers it if its row has gone)."""

    @abstractmethod
    async def forget_instance(self, instance_id: str) -> None: ...

    @abstractmethod
    async def end_orphaned_calls(self, stale_after: float, idle_after: float) -> list[str]:
        """End (``SERVER_LOST``) the active calls nobody carries any more: held by an
        instance not seen for ``stale_after`` seconds (or unknown), or shared (fallback
        state) with no state touched for ``idle_after`` seconds. Returns their ids."""
