"""The stored state of a fallback-mode call, and the versioned updates that change it.

Every server instance may receive a fallback call's webhooks, so what the call needs between
them lives in the store (``CallStore.load_state`` / ``save_state``), not in a task: a
:class:`FallbackState`, stored as a JSON object, and a version. Changes are made by
:meth:`SharedCalls.update`: load, apply a pure function, save at the version read; a
``StaleState`` (another instance wrote meanwhile) reloads and applies it again.

The *turn* is the call's lock: ``owner`` (an instance id) and ``lease_until``. Whoever holds
it is the only one that speaks, hangs up or writes the call record; it is taken and given
back by versioned saves, so two instances can never both hold it. A lease runs out after
``LEASE_S`` without renewal (each ``speak`` renews it), so a turn held by an instance that
died is taken over by the next one that looks.

Wall-clock times (epoch seconds) throughout: the state is read on other machines.
:func:`next_action` and :func:`next_deadline` decide what the call needs next from the state
alone, so every instance draws the same conclusion from the same version.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.conversation.dtmf import KEY_GAP_S, key_note
from voice_trio.conversation.history import Conversation
from voice_trio.store import CallState, CallStore, StaleState, StoreError, TurnEntry

log = logging.getLogger("voice_trio.calls")

LEASE_S = 30.0  # a held turn nobody renewed for this long belongs to an instance that died
# A speak whose ``call.speak.ended`` never arrives counts as finished after this long.
SPEAK_GUARD_S_PER_CHAR = 0.12
SPEAK_GUARD_S = 2.0
KNOWN_CALLS = 10_000  # calls whose last state is kept, to go on with if the store fails
MAX_RETRIES = 50  # StaleState retries of one update: far more than a call's real contention


@dataclass(frozen=True, slots=True)
class Caller:
    """Who the call is with, as the call's client state said (for the persona prompt)."""

    nombre: str = ""
    contexto: str = ""
    saludo: str = ""  # a greeting chosen for an outbound call


@dataclass(frozen=True, slots=True)
class Line:
    """The call record's fixed fields."""

    direction: str  # inbound | outbound
    call_session_id: str
    from_number: str
    to_number: str
    created_at: float
    answered_at: float


@dataclass(slots=True)
class CallerWords:
    """Caller words not answered yet, as Telnyx heard them (or keys pressed in a row)."""

    text: str
    t0: float  # when they were heard (epoch)
    occurred_at: str  # Telnyx's timestamp: the order they were said in
    keys: list[str] | None = None  # the keys, for a key note


@dataclass(slots=True)
class Said:
    """One message of the conversation's history."""

    role: str  # user | assistant
    text: str
    interrupted: bool = False


@dataclass(slots=True, kw_only=True)
class FallbackState:
    """What a fallback-mode call needs between webhooks, on any instance.

    Stored as JSON (:meth:`to_json`, :meth:`from_json`) in the same shape it has always had,
    so instances of two versions running side by side read each other's states."""

    mode: CallMode
    caller: Caller
    line: Line
    origin: float  # turn stamps are ms since this moment
    deadline_at: float  # maximum call length
    grace_until: float | None = None  # a dropped stream: wait this long for call.hangup first
    merge_record: bool = False  # a media session wrote the first part of the call record
    writer: str = ""  # the instance that saved this version
    opened: bool = False  # first words said and transcription started
    history: list[Said] = field(default_factory=list)
    pending: list[CallerWords] = field(default_factory=list)
    keys_until: float = 0.0  # keys pressed in a row: answered once this passes without one
    requested: EndReason | None = None  # an end a key or an operator asked for
    turns: list[TurnEntry] = field(default_factory=list)  # the fallback part of the call
    speaks_sent: int = 0
    speaks_ended: int = 0
    guard_until: float = 0.0  # speech sent is taken as played by then, ended or not
    quiet_since: float = 0.0  # the bot's last speech ended
    reprompted: bool = False
    owner: str | None = None  # the turn holder
    lease_until: float = 0.0
    ended: EndReason | None = None  # once the call is over
    ended_at: float | None = None
    tts_characters: int = 0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0

    def conversation(self) -> Conversation:
        conversation = Conversation()
        for said in self.history:
            if said.role == "user":
                conversation.add_user(said.text)
            else:
                conversation.add_assistant(said.text, interrupted=said.interrupted)
        return conversation

    def end(self, reason: EndReason, now: float) -> bool:
        """Mark the call ended (once): False if it was already."""
        if self.ended is not None:
            return False
        self.ended, self.ended_at = reason, now
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "context": {
                "nombre": self.caller.nombre,
                "contexto": self.caller.contexto,
                "saludo": self.caller.saludo,
            },
            "record": asdict(self.line),
            "origin": self.origin,
            "deadline_at": self.deadline_at,
            "grace_until": self.grace_until,
            "merge_record": self.merge_record,
            "opened": self.opened,
            "history": [[s.role, s.text, s.interrupted] for s in self.history],
            "pending": [
                [w.text, w.t0, w.occurred_at] + ([w.keys] if w.keys is not None else [])
                for w in self.pending
            ],
            "keys_until": self.keys_until,
            "requested": None if self.requested is None else str(self.requested),
            "turns": [asdict(t) for t in self.turns],
            "speaks_sent": self.speaks_sent,
            "speaks_ended": self.speaks_ended,
            "guard_until": self.guard_until,
            "quiet_since": self.quiet_since,
            "reprompted": self.reprompted,
            "owner": self.owner,
            "lease_until": self.lease_until,
            "writer": self.writer,
            "ended": None if self.ended is None else str(self.ended),
            "ended_at": self.ended_at,
            "tts_characters": self.tts_characters,
            "llm_input_tokens": self.llm_input_tokens,
            "llm_output_tokens": self.llm_output_tokens,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FallbackState:
        context, line = data["context"], data["record"]
        return cls(
            mode=CallMode(data["mode"]),
            caller=Caller(
                nombre=context.get("nombre", ""),
                contexto=context.get("contexto", ""),
                saludo=context.get("saludo", ""),
            ),
            line=Line(**line),
            origin=data["origin"],
            deadline_at=data["deadline_at"],
            grace_until=data.get("grace_until"),
            merge_record=bool(data.get("merge_record")),
            writer=data.get("writer", ""),
            opened=bool(data.get("opened")),
            history=[Said(role, text, bool(cut)) for role, text, cut in data.get("history", [])],
            pending=[
                CallerWords(p[0], p[1], p[2], list(p[3]) if len(p) > 3 else None)
                for p in data.get("pending", [])
            ],
            keys_until=data.get("keys_until", 0.0),
            requested=_reason(data.get("requested")),
            turns=[TurnEntry(**t) for t in data.get("turns", [])],
            speaks_sent=data.get("speaks_sent", 0),
            speaks_ended=data.get("speaks_ended", 0),
            guard_until=data.get("guard_until", 0.0),
            quiet_since=data.get("quiet_since", 0.0),
            reprompted=bool(data.get("reprompted")),
            owner=data.get("owner"),
            lease_until=data.get("lease_until", 0.0),
            ended=_reason(data.get("ended")),
            ended_at=data.get("ended_at"),
            tts_characters=data.get("tts_characters", 0),
            llm_input_tokens=data.get("llm_input_tokens", 0),
            llm_output_tokens=data.get("llm_output_tokens", 0),
        )


def _reason(value: str | None) -> EndReason | None:
    return None if value is None else EndReason(value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A call's state as read or saved at ``version``: this reader's own copy."""

    data: FallbackState
    version: int


Mutation = Callable[[FallbackState], bool]  # changes the state in place; False: nothing to save


def new_state(
    *,
    mode: CallMode,
    caller: Caller,
    line: Line,
    origin: float,
    deadline_at: float,
    writer: str,
    conversation: Conversation | None = None,
    grace_until: float | None = None,
    merge_record: bool = False,
) -> FallbackState:
    """The state of a call entering fallback mode. ``merge_record`` says a media session
    already wrote part of the call record."""
    now = time.time()
    history = [Said(t.role, t.text, t.interrupted) for t in (conversation or Conversation()).turns]
    return FallbackState(
        mode=mode,
        caller=caller,
        line=line,
        origin=origin,
        deadline_at=deadline_at,
        grace_until=grace_until,
        merge_record=merge_record,
        writer=writer,
        history=history,
        guard_until=now,
        quiet_since=now,
    )


def turn_free(data: FallbackState, me: str, now: float) -> bool:
    """Nobody else holds the turn (or their lease ran out)."""
    return data.owner in (None, me) or data.lease_until < now


def pending_speech(data: FallbackState) -> int:
    return max(0, data.speaks_sent - data.speaks_ended)


def listen_deadline(data: FallbackState, silence_s: float) -> float:
    """When caller silence since the bot's speech ended calls for a reprompt."""
    if pending_speech(data):
        return data.guard_until + silence_s
    return data.quiet_since + silence_s


def next_action(
    data: FallbackState, me: str, now: float, silence_s: float, drain: bool = False
) -> tuple[str, EndReason | None] | None:
    """What the call needs next, if the turn is free for ``me``: ``("finalize", None)``,
    ``("open", None)``, ``("reply", None)``, ``("reprompt", None)`` or ``("finish", reason)``."""
    if not turn_free(data, me, now):
        return None
    if data.ended:
        return ("finalize", None)
    if not data.opened:
        return ("open", None)
    if drain:
        return ("finish", EndReason.DRAIN)
    if data.requested:
        return ("finish", data.requested)
    if now >= data.deadline_at:
        return ("finish", EndReason.MAX_DURATION)
    if data.pending and now >= data.keys_until:
        return ("reply", None)
    if now >= listen_deadline(data, silence_s):
        if data.reprompted:
            return ("finish", EndReason.SILENCE_TIMEOUT)
        return ("reprompt", None)
    return None


def next_deadline(data: FallbackState, me: str, now: float, silence_s: float) -> float:
    """When :func:`next_action` may next have something to do, with no webhook meanwhile."""
    if not turn_free(data, me, now):
        return min(data.lease_until, data.deadline_at)
    if data.ended or not data.opened or data.requested:
        return now
    if data.pending:
        return max(now, data.keys_until)
    return min(data.deadline_at, listen_deadline(data, silence_s))


def claim(data: FallbackState, me: str, now: float) -> None:
    data.owner = me
    data.lease_until = now + LEASE_S


def add_caller_words(data: FallbackState, text: str, t0: float, occurred_at: str) -> bool:
    """Caller words for the turn holder to answer, kept in the order Telnyx heard them."""
    if data.ended:
        return False
    data.pending.append(CallerWords(text, t0, occurred_at))
    data.pending.sort(key=lambda p: p.occurred_at)
    return True


def add_caller_key(
    data: FallbackState, digit: str, now: float, occurred_at: str, language: str
) -> bool:
    """A key press (``call.dtmf.received``): keys pressed in a row are one caller turn,
    a bracketed note (:func:`~voice_trio.conversation.dtmf.key_note`) answered ``KEY_GAP_S``
    after the last of them, as a media call groups them."""
    if data.ended:
        return False
    last = data.pending[-1] if data.pending else None
    if last is not None and last.keys is not None:
        last.keys.append(digit)
        last.text = key_note(last.keys, language)
    else:
        data.pending.append(CallerWords(key_note([digit], language), now, occurred_at, [digit]))
    data.keys_until = now + KEY_GAP_S
    return True


def request_end(data: FallbackState, reason: EndReason) -> bool:
    """A key (or an operator) asked to end the call: the next turn says goodbye and hangs up."""
    if data.ended or data.requested:
        return False
    data.requested = reason
    return True


def speech_ended(data: FallbackState, now: float) -> bool:
    """``call.speak.ended``: one speak fewer playing. Ends beyond the speaks sent are not
    ours to count (every speak is counted before it is sent)."""
    if data.speaks_ended >= data.speaks_sent:
        return False
    data.speaks_ended += 1
    if data.speaks_ended == data.speaks_sent:
        data.quiet_since = now
    return True


def speech_sent(data: FallbackState, me: str, text: str, now: float) -> bool:
    """A speak about to be sent by the turn holder: counted, its guard time added, the
    lease renewed. False if the holder lost the turn or the call is over."""
    if data.owner != me or data.ended:
        return False
    data.speaks_sent += 1
    data.guard_until = (
        max(data.guard_until, now) + SPEAK_GUARD_S + len(text) * SPEAK_GUARD_S_PER_CHAR
    )
    data.tts_characters += len(text)
    claim(data, me, now)
    return True


class SharedCalls:
    """Versioned access to the fallback calls' state in ``store``, on behalf of instance
    ``me`` (every save records ``writer = me``).

    A store that fails (``StoreError``) must not end the calls it holds. The last state
    this instance read or wrote of each call is kept (``KNOWN_CALLS`` calls at most), and
    a call whose state cannot be read or saved goes on from it in this instance's memory:
    *pinned* here for the rest of the call, which then can no longer move to another
    instance. ``on_failure(operation)`` is told of each such failure (a metric)."""

    def __init__(
        self,
        store: CallStore,
        me: str,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.me = me
        self._on_failure = on_failure
        self._known: OrderedDict[str, CallState] = OrderedDict()
        self._pinned: dict[str, CallState] = {}

    def pinned(self, call_control_id: str) -> bool:
        return call_control_id in self._pinned

    def _remember(self, call_control_id: str, state: CallState | None) -> CallState | None:
        if state is None:
            self._known.pop(call_control_id, None)
            return None
        self._known[call_control_id] = CallState(copy.deepcopy(state.data), state.version)
        self._known.move_to_end(call_control_id)
        while len(self._known) > KNOWN_CALLS:
            self._known.popitem(last=False)
        return state

    def _pin(self, call_control_id: str, operation: str, exc: StoreError) -> bool:
        """Go on with the call's last known state in memory; False if there is none."""
        if self._on_failure is not None:
            self._on_failure(operation)
        known = self._known.pop(call_control_id, None)
        if known is None:
            return False
        log.error(
            "Fallback state not shared (store %s failed: %s): the call goes on here",
            operation,
            exc,
        )
        self._pinned[call_control_id] = known
        return True

    async def load(self, call_control_id: str) -> Snapshot | None:
        held = self._pinned.get(call_control_id)
        if held is None:
            try:
                stored = await self.store.load_state(call_control_id)
            except StaleState:
                raise
            except StoreError as exc:
                if not self._pin(call_control_id, "load_state", exc):
                    raise
                held = self._pinned[call_control_id]
            else:
                if self._remember(call_control_id, stored) is None:
                    return None
                assert stored is not None
                return Snapshot(FallbackState.from_json(stored.data), stored.version)
        return Snapshot(FallbackState.from_json(copy.deepcopy(held.data)), held.version)

    async def _save(self, call_control_id: str, data: dict[str, Any], version: int | None) -> int:
        """``save_state`` to the store, or to memory for a pinned call."""
        held = self._pinned.get(call_control_id)
        if held is None:
            try:
                new = await self.store.save_state(call_control_id, data, expected_version=version)
            except StaleState:
                raise
            except StoreError as exc:
                if version is None:
                    self._known[call_control_id] = CallState(copy.deepcopy(data), 0)
                if not self._pin(call_control_id, "save_state", exc):
                    raise
                held = self._pinned[call_control_id]
            else:
                self._remember(call_control_id, CallState(data, new))
                return new
        if held.version != (version if version is not None else 0):
            raise StaleState(call_control_id, version, held.version)
        self._pinned[call_control_id] = CallState(copy.deepcopy(data), held.version + 1)
        return held.version + 1

    async def delete(self, call_control_id: str) -> None:
        self._known.pop(call_control_id, None)
        if self._pinned.pop(call_control_id, None) is None:
            await self.store.delete_state(call_control_id)

    async def create(self, call_control_id: str, state: FallbackState) -> Snapshot | None:
        """Store a new call's state; None if one is there already (another instance
        started it: join that one instead)."""
        state.writer = self.me
        try:
            version = await self._save(call_control_id, state.to_json(), None)
        except StaleState:
            return None
        return Snapshot(state, version)

    async def update(self, call_control_id: str, mutate: Mutation) -> tuple[Snapshot | None, bool]:
        """Apply ``mutate`` to the current state and save it at the version read. Returns the
        state as it now is (None: there is none) and whether ``mutate`` changed it."""
        for _ in range(MAX_RETRIES):
            state = await self.load(call_control_id)
            if state is None:
                return None, False
            data = state.data
            if not mutate(data):
                return state, False
            data.writer = self.me
            try:
                version = await self._save(call_control_id, data.to_json(), state.version)
            except StaleState:
                continue
            return Snapshot(data, version), True
        raise RuntimeError(f"state of {call_control_id}: too much contention")
