"""The shared state of fallback-mode calls: what a call needs next, decided from the state
alone, and the turn that only one instance can hold at a time."""

from dataclasses import replace
from pathlib import Path

import trio

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.conversation.history import Conversation
from voice_trio.fallback import state as fs
from voice_trio.store import SqliteStore, TurnEntry

SILENCE = 8.0


LINE = fs.Line(
    direction="inbound",
    call_session_id="s-1",
    from_number="+573001112233",
    to_number="+576015550000",
    created_at=1000.0,
    answered_at=1001.0,
)


def state(**changes) -> fs.FallbackState:
    data = fs.new_state(
        mode=CallMode.FALLBACK,
        caller=fs.Caller(nombre="Ana"),
        line=LINE,
        origin=1000.0,
        deadline_at=1900.0,
        writer="a",
    )
    return replace(data, **changes)


def test_what_a_call_needs_next() -> None:
    now = 1010.0
    assert fs.next_action(state(), "a", now, SILENCE) == ("open", None)
    opened = state(opened=True, quiet_since=now)
    assert fs.next_action(opened, "a", now, SILENCE) is None
    assert fs.next_deadline(opened, "a", now, SILENCE) == now + SILENCE
    assert fs.next_action(opened, "a", now + SILENCE, SILENCE) == ("reprompt", None)
    again = replace(opened, reprompted=True)
    assert fs.next_action(again, "a", now + SILENCE, SILENCE) == ("finish", "silence_timeout")
    assert fs.next_action(opened, "a", 1900.0, SILENCE) == ("finish", "max_duration")
    assert fs.next_action(opened, "a", now, SILENCE, drain=True) == ("finish", "drain")
    words = replace(opened, pending=[fs.CallerWords("Hola", now, "t")])
    assert fs.next_action(words, "a", now, SILENCE) == ("reply", None)
    # Another instance holds the turn: nothing to do here until its lease runs out.
    held = replace(words, owner="b", lease_until=now + 5)
    assert fs.next_action(held, "a", now, SILENCE) is None
    assert fs.next_deadline(held, "a", now, SILENCE) == now + 5
    assert fs.next_action(held, "a", now + 6, SILENCE) == ("reply", None)
    assert fs.next_action(replace(held, ended=EndReason.HANGUP), "a", now + 6, SILENCE) == (
        "finalize",
        None,
    )


def test_speech_in_progress_is_counted_whatever_the_order() -> None:
    data = state(opened=True, owner="a", lease_until=2000.0)
    assert not fs.speech_ended(data, 1001.0)  # an end before any speak is not ours
    assert fs.speech_sent(data, "a", "Hola.", 1001.0)
    assert fs.speech_sent(data, "a", "¿Qué tal?", 1001.5)
    assert not fs.speech_sent(data, "b", "no", 1001.5)  # not the turn holder
    assert fs.pending_speech(data) == 2 and data.tts_characters == 14
    assert fs.listen_deadline(data, SILENCE) == data.guard_until + SILENCE
    assert fs.speech_ended(data, 1003.0) and fs.speech_ended(data, 1004.0)
    assert fs.pending_speech(data) == 0 and data.quiet_since == 1004.0
    words = state()
    fs.add_caller_words(words, "segundo", 1.0, "2026-11-25T10:00:02.000000Z")
    fs.add_caller_words(words, "primero", 2.0, "2026-11-25T10:00:01.000000Z")
    assert [w.text for w in words.pending] == ["primero", "segundo"]


def test_keys_in_a_row_are_one_caller_turn() -> None:
    data = state(opened=True)
    assert fs.add_caller_key(data, "1", 1005.0, "2026-11-25T10:00:01.000000Z", "es")
    assert fs.add_caller_key(data, "2", 1005.5, "2026-11-25T10:00:01.500000Z", "es")
    assert len(data.pending) == 1 and data.pending[0].keys == ["1", "2"]
    assert "12" in data.pending[0].text.replace(" ", "")
    assert fs.next_action(data, "a", 1005.6, SILENCE) is None  # more keys may follow
    assert fs.next_action(data, "a", data.keys_until, SILENCE) == ("reply", None)
    assert fs.request_end(data, EndReason.CALLER_ENDED)
    assert not fs.request_end(data, EndReason.OPERATOR_HANGUP)  # asked once
    assert fs.next_action(data, "a", 1006.0, SILENCE) == ("finish", EndReason.CALLER_ENDED)


def test_the_stored_json_keeps_its_shape() -> None:
    """Instances of two versions may share a call during a rolling upgrade: the state's
    JSON is the object it always was, and reads back to an equal state."""
    conversation = Conversation()
    conversation.add_user("Hola")
    conversation.add_assistant("Buenos días, ¿en qué", interrupted=True)
    data = fs.new_state(
        mode=CallMode.DEGRADED,
        caller=fs.Caller(nombre="Ana", contexto="cita", saludo="Hola Ana"),
        line=LINE,
        origin=1000.0,
        deadline_at=1900.0,
        writer="a",
        conversation=conversation,
        grace_until=1010.0,
        merge_record=True,
    )
    fs.add_caller_words(data, "quiero una cita", 1002.0, "2026-11-25T10:00:02.000000Z")
    fs.add_caller_key(data, "5", 1003.0, "2026-11-25T10:00:03.000000Z", "es")
    data.turns.append(TurnEntry(index=0, kind="greeting", bot_text="Hola", t5=12.5))
    data.end(EndReason.HANGUP, 1100.0)
    stored = data.to_json()
    assert stored["mode"] == "degraded" and stored["ended"] == "hangup"
    assert stored["context"] == {"nombre": "Ana", "contexto": "cita", "saludo": "Hola Ana"}
    assert stored["record"]["call_session_id"] == "s-1"
    assert stored["history"] == [
        ["user", "Hola", False],
        ["assistant", "Buenos días, ¿en qué", True],
    ]
    assert stored["pending"][0] == ["quiero una cita", 1002.0, "2026-11-25T10:00:02.000000Z"]
    assert stored["pending"][1][3] == ["5"]
    assert stored["turns"][0]["kind"] == "greeting" and stored["turns"][0]["t5"] == 12.5
    assert set(stored) == {
        "mode", "context", "record", "origin", "deadline_at", "grace_until", "merge_record",
        "opened", "history", "pending", "keys_until", "requested", "turns", "speaks_sent",
        "speaks_ended", "guard_until", "quiet_since", "reprompted", "owner", "lease_until",
        "writer", "ended", "ended_at", "tts_characters", "llm_input_tokens", "llm_output_tokens",
    }  # fmt: skip
    again = fs.FallbackState.from_json(stored)
    assert again == data and again.ended is EndReason.HANGUP
    assert [t.text for t in again.conversation().turns] == ["Hola", "Buenos días, ¿en qué"]


async def test_only_one_instance_takes_the_turn(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "calls.sqlite3")
    await store.open()
    try:
        one, two = fs.SharedCalls(store, "one"), fs.SharedCalls(store, "two")
        created = await one.create("v3:c", state(opened=True, quiet_since=0.0))
        assert created is not None and await two.create("v3:c", state()) is None
        winners: list[str] = []

        async def fire(shared: fs.SharedCalls) -> None:
            # A silence timer on each instance, for the same version: one acts.
            def take(data) -> bool:
                if fs.next_action(data, shared.me, 1000.0, SILENCE) != ("reprompt", None):
                    return False
                fs.claim(data, shared.me, 1000.0)
                return True

            _, taken = await shared.update("v3:c", take)
            if taken:
                winners.append(shared.me)

        async with trio.open_nursery() as nursery:
            for shared in (one, two, fs.SharedCalls(store, "three")):
                nursery.start_soon(fire, shared)
        assert len(winners) == 1
        loaded = await one.load("v3:c")
        assert loaded is not None and loaded.data.owner == winners[0]
        assert loaded.data.writer == winners[0] and loaded.version == 2
        await store.delete_state("v3:c")
        assert await two.update("v3:c", lambda d: True) == (None, False)
    finally:
        await store.aclose()
