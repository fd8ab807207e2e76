"""The shared state of fallback-mode calls: what a call needs next, decided from the state
alone, and the turn that only one instance can hold at a time."""

from pathlib import Path

import trio

from voice_trio.fallback import state as fs
from voice_trio.store import SqliteStore

SILENCE = 8.0


def state(**changes):
    data = fs.new_state(
        mode="fallback",
        context={"nombre": "Ana"},
        record={},
        origin=1000.0,
        deadline_at=1900.0,
        writer="a",
    )
    data.update(changes)
    return data


def test_what_a_call_needs_next() -> None:
    now = 1010.0
    assert fs.next_action(state(), "a", now, SILENCE) == ("open", None)
    opened = state(opened=True, quiet_since=now)
    assert fs.next_action(opened, "a", now, SILENCE) is None
    assert fs.next_deadline(opened, "a", now, SILENCE) == now + SILENCE
    assert fs.next_action(opened, "a", now + SILENCE, SILENCE) == ("reprompt", None)
    again = {**opened, "reprompted": True}
    assert fs.next_action(again, "a", now + SILENCE, SILENCE) == ("finish", "silence_timeout")
    assert fs.next_action(opened, "a", 1900.0, SILENCE) == ("finish", "max_duration")
    assert fs.next_action(opened, "a", now, SILENCE, drain=True) == ("finish", "drain")
    words = {**opened, "pending": [["Hola", now, "t"]]}
    assert fs.next_action(words, "a", now, SILENCE) == ("reply", None)
    # Another instance holds the turn: nothing to do here until its lease runs out.
    held = {**words, "owner": "b", "lease_until": now + 5}
    assert fs.next_action(held, "a", now, SILENCE) is None
    assert fs.next_deadline(held, "a", now, SILENCE) == now + 5
    assert fs.next_action(held, "a", now + 6, SILENCE) == ("reply", None)
    assert fs.next_action({**held, "ended": "hangup"}, "a", now + 6, SILENCE) == (
        "finalize",
        None,
    )


def test_speech_in_progress_is_counted_whatever_the_order() -> None:
    data = state(opened=True, owner="a", lease_until=2000.0)
    assert not fs.speech_ended(data, 1001.0)  # an end before any speak is not ours
    assert fs.speech_sent(data, "a", "Hola.", 1001.0)
    assert fs.speech_sent(data, "a", "¿Qué tal?", 1001.5)
    assert not fs.speech_sent(data, "b", "no", 1001.5)  # not the turn holder
    assert fs.pending_speech(data) == 2 and data["tts_characters"] == 14
    assert fs.listen_deadline(data, SILENCE) == data["guard_until"] + SILENCE
    assert fs.speech_ended(data, 1003.0) and fs.speech_ended(data, 1004.0)
    assert fs.pending_speech(data) == 0 and data["quiet_since"] == 1004.0
    words = state()
    fs.add_caller_words(words, "segundo", 1.0, "2026-11-25T10:00:02.000000Z")
    fs.add_caller_words(words, "primero", 2.0, "2026-11-25T10:00:01.000000Z")
    assert [w[0] for w in words["pending"]] == ["primero", "segundo"]


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
        assert loaded is not None and loaded.data["owner"] == winners[0]
        assert loaded.data["writer"] == winners[0] and loaded.version == 2
        await store.delete_state("v3:c")
        assert await two.update("v3:c", lambda d: True) == (None, False)
    finally:
        await store.aclose()
