"""The stored state of a fallback-mode call, and the versioned updates that change it.

Every server instance may receive a fallback call's webhooks, so what the call needs between
them lives in the store (``CallStore.load_state`` / ``save_state``), not in a task: a plain
JSON object (:func:`new_state` lists its fields) and a version. Changes are made by
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
from typing import Any

from voice_trio.conversation.dtmf import KEY_GAP_S, key_note
from voice_trio.conversation.history import Conversation
from voice_trio.store import CallState, CallStore, StaleState, StoreError

log = logging.getLogger("voice_trio.calls")

LEASE_S = 30.0  # a held turn nobody renewed for this long belongs to an instance that died
# A speak whose ``call.speak.ended`` never arrives counts as finished after this long.
SPEAK_GUARD_S_PER_CHAR = 0.12
SPEAK_GUARD_S = 2.0
KNOWN_CALLS = 10_000  # calls whose last state is kept, to go on with if the store fails
MAX_RETRIES = 50  # StaleState retries of one update: far more than a call's real contention

Mutation = Callable[[dict[str, Any]], bool]  # changes the data in place; False: nothing to save


def new_state(
    *,
    mode: str,
    context: dict[str, Any],
    record: dict[str, Any],
    origin: float,
    deadline_at: float,
    writer: str,
    conversation: Conversation | None = None,
    grace_until: float | None = None,
    merge_record: bool = False,
) -> dict[str, Any]:
    """The state of a call entering fallback mode. ``record`` holds the call record's fixed
    fields; ``merge_record`` says a media session already wrote part of that record."""
    now = time.time()
    return {
        "mode": mode,
        "context": {k: str(context.get(k) or "") for k in ("nombre", "contexto", "saludo")},
        "record": record,
        "origin": origin,  # turn stamps are ms since this moment
        "deadline_at": deadline_at,  # maximum call length
        "grace_until": grace_until,  # a dropped stream: wait this long for call.hangup first
        "merge_record": merge_record,
        "opened": False,  # first words said and transcription started
        "history": dump_history(conversation or Conversation()),
        "pending": [],  # caller words not answered yet: [text, t0, occurred_at(, keys)]
        "keys_until": 0.0,  # keys pressed in a row: answered once this passes without one
        "requested": None,  # an end reason a key asked for (DTMF_SHORTCUTS end_call)
        "turns": [],  # TurnEntry dicts of the fallback part of the call
        "speaks_sent": 0,
        "speaks_ended": 0,
        "guard_until": now,
        "quiet_since": now,
        "reprompted": False,
        "owner": None,
        "lease_until": 0.0,
        "writer": writer,
        "ended": None,  # end reason once the call is over
        "ended_at": None,
        "tts_characters": 0,
        "llm_input_tokens": 0,
        "llm_output_tokens": 0,
    }


def dump_history(conversation: Conversation) -> list[list[Any]]:
    return [[t.role, t.text, t.interrupted] for t in conversation.turns]


def load_history(rows: list[list[Any]]) -> Conversation:
    conversation = Conversation()
    for role, text, interrupted in rows:
        if role == "user":
            conversation.add_user(text)
        else:
            conversation.add_assistant(text, interrupted=bool(interrupted))
    return conversation


def turn_free(data: dict[str, Any], me: str, now: float) -> bool:
    """Nobody else holds the turn (or their lease ran out)."""
    return data["owner"] in (None, me) or data["lease_until"] < now


def pending_speech(data: dict[str, Any]) -> int:
    return max(0, int(data["speaks_sent"]) - int(data["speaks_ended"]))


def listen_deadline(data: dict[str, Any], silence_s: float) -> float:
    """When caller silence since the bot's speech ended calls for a reprompt."""
    if pending_speech(data):
        return float(data["guard_until"]) + silence_s
    return float(data["quiet_since"]) + silence_s


def next_action(
    data: dict[str, Any], me: str, now: float, silence_s: float, drain: bool = False
) -> tuple[str, str | None] | None:
    """What the call needs next, if the turn is free for ``me``: ``("finalize", None)``,
    ``("open", None)``, ``("reply", None)``, ``("reprompt", None)`` or ``("finish", reason)``."""
    if not turn_free(data, me, now):
        return None
    if data["ended"]:
        return ("finalize", None)
    if not data["opened"]:
        return ("open", None)
    if drain:
        return ("finish", "drain")
    if data.get("requested"):
        return ("finish", data["requested"])
    if now >= data["deadline_at"]:
        return ("finish", "max_duration")
    if data["pending"] and now >= data.get("keys_until", 0.0):
        return ("reply", None)
    if now >= listen_deadline(data, silence_s):
        return ("finish", "silence_timeout") if data["reprompted"] else ("reprompt", None)
    return None


def next_deadline(data: dict[str, Any], me: str, now: float, silence_s: float) -> float:
    """When :func:`next_action` may next have something to do, with no webhook meanwhile."""
    if not turn_free(data, me, now):
        return float(min(data["lease_until"], data["deadline_at"]))
    if data["ended"] or not data["opened"] or data.get("requested"):
        return now
    if data["pending"]:
        return max(now, float(data.get("keys_until", 0.0)))
    return min(float(data["deadline_at"]), listen_deadline(data, silence_s))


def claim(data: dict[str, Any], me: str, now: float) -> None:
    data["owner"] = me
    data["lease_until"] = now + LEASE_S


def add_caller_words(data: dict[str, Any], text: str, t0: float, occurred_at: str) -> bool:
    """Caller words for the turn holder to answer, kept in the order Telnyx heard them."""
    if data["ended"]:
        return False
    data["pending"].append([text, t0, occurred_at])
    data["pending"].sort(key=lambda p: p[2])
    return True


def add_caller_key(
    data: dict[str, Any], digit: str, now: float, occurred_at: str, language: str
) -> bool:
    """A key press (``call.dtmf.received``): keys pressed in a row are one caller turn,
    a bracketed note (:func:`~voice_trio.conversation.dtmf.key_note`) answered ``KEY_GAP_S``
    after the last of them, as a media call groups them."""
    if data["ended"]:
        return False
    last = data["pending"][-1] if data["pending"] else None
    if last is not None and len(last) == 4:
        last[3].append(digit)
        last[0] = key_note(last[3], language)
    else:
        data["pending"].append([key_note([digit], language), now, occurred_at, [digit]])
    data["keys_until"] = now + KEY_GAP_S
    return True


def request_end(data: dict[str, Any], reason: str) -> bool:
    """A key asked to end the call: the next turn says goodbye and hangs up."""
    if data["ended"] or data.get("requested"):
        return False
    data["requested"] = reason
    return True


def speech_ended(data: dict[str, Any], now: float) -> bool:
    """``call.speak.ended``: one speak fewer playing. Ends beyond the speaks sent are not
    ours to count (every speak is counted before it is sent)."""
    if data["speaks_ended"] >= data["speaks_sent"]:
        return False
    data["speaks_ended"] += 1
    if data["speaks_ended"] == data["speaks_sent"]:
        data["quiet_since"] = now
    return True


def speech_sent(data: dict[str, Any], me: str, text: str, now: float) -> bool:
    """A speak about to be sent by the turn holder: counted, its guard time added, the
    lease renewed. False if the holder lost the turn or the call is over."""
    if data["owner"] != me or data["ended"]:
        return False
    data["speaks_sent"] += 1
    data["guard_until"] = (
        max(data["guard_until"], now) + SPEAK_GUARD_S + len(text) * SPEAK_GUARD_S_PER_CHAR
    )
    data["tts_characters"] += len(text)
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

    async def load(self, call_control_id: str) -> CallState | None:
        held = self._pinned.get(call_control_id)
        if held is None:
            try:
                return self._remember(call_control_id, await self.store.load_state(call_control_id))
            except StaleState:
                raise
            except StoreError as exc:
                if not self._pin(call_control_id, "load_state", exc):
                    raise
                held = self._pinned[call_control_id]
        return CallState(copy.deepcopy(held.data), held.version)

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

    async def create(self, call_control_id: str, data: dict[str, Any]) -> CallState | None:
        """Store a new call's state; None if one is there already (another instance
        started it: join that one instead)."""
        data["writer"] = self.me
        try:
            version = await self._save(call_control_id, data, None)
        except StaleState:
            return None
        return CallState(data, version)

    async def update(self, call_control_id: str, mutate: Mutation) -> tuple[CallState | None, bool]:
        """Apply ``mutate`` to the current state and save it at the version read. Returns the
        state as it now is (None: there is none) and whether ``mutate`` changed it."""
        for _ in range(MAX_RETRIES):
            state = await self.load(call_control_id)
            if state is None:
                return None, False
            data = state.data
            if not mutate(data):
                return state, False
            data["writer"] = self.me
            try:
                version = await self._save(call_control_id, data, state.version)
            except StaleState:
                continue
            return CallState(data, version), True
        raise RuntimeError(f"state of {call_control_id}: too much contention")
