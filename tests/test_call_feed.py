"""The call feed: what the console's live view is built from (calls.feed)."""

import trio

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.feed import WATCHER_BUFFER, CallFeed
from voice_trio.calls.registry import ActiveCall, CallRegistry


async def test_a_call_s_life_reaches_watchers_and_the_snapshot() -> None:
    registry = CallRegistry()
    feed = registry.feed
    with feed.watch() as (events, _):
        call = ActiveCall(
            "c1",
            mode=CallMode.MEDIA,
            party={"nombre": "Ana", "number": "+573001234567", "direction": "inbound"},
        )
        registry.add(call)
        call.set_state("greeting")
        call.note("bot", text="Hola.")
        call.note("caller", text="<script>alert(1)</script>")
        view = feed.calls["c1"]
        assert (view.nombre, view.state, view.mode) == ("Ana", "greeting", "media")
        assert [e["k"] for e in view.transcript] == ["bot", "caller"]
        call.end(EndReason.CALLER_HANGUP)
        registry.remove(call)
        kinds = []
        while True:
            try:
                kinds.append(events.receive_nowait()["k"])
            except trio.WouldBlock:
                break
    assert kinds == ["start", "state", "state", "bot", "caller", "end"]
    assert "c1" not in feed.calls and feed.watchers == 0


async def test_a_slow_watcher_is_cut_off_not_waited_for() -> None:
    feed = CallFeed()
    with feed.watch() as (events, watcher):
        for i in range(WATCHER_BUFFER + 5):
            feed.publish({"k": "bot", "c": "c1", "text": str(i)})
        assert watcher.lagging
        received = [e async for e in events]
    assert len(received) == WATCHER_BUFFER


async def test_relayed_events_enter_the_snapshot_but_are_not_sent_on() -> None:
    feed = CallFeed()
    sent = []
    feed.on_publish = sent.append
    feed.relay({"k": "start", "c": "c2", "o": "other", "nombre": "Luis", "at": 1.0})
    feed.relay({"k": "nonsense", "c": "c2"})
    assert feed.calls["c2"].nombre == "Luis" and sent == []
