"""Key presses: counted once whichever way Telnyx reports them, grouped into one caller turn
that Claude reads as keys, and shortcuts that act at once."""

import math

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.calls.signals import CallSignals
from voice_trio.conversation.dtmf import (
    KEY_QUEUE,
    STREAM,
    WEBHOOK,
    KeyCollector,
    PressDeduper,
    key_note,
)
from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.sim.caller import Dtmf, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


def test_the_two_reports_of_one_press_count_once() -> None:
    presses = PressDeduper(window=2.0)
    assert presses.first_report("1", STREAM, 0.0)
    assert not presses.first_report("1", WEBHOOK, 0.3)  # the webhook of the same press
    # The same key twice on one path is two presses, each paired with its webhook.
    assert presses.first_report("1", STREAM, 1.0)
    assert presses.first_report("1", STREAM, 1.2)
    assert not presses.first_report("1", WEBHOOK, 1.4)
    assert not presses.first_report("1", WEBHOOK, 1.5)
    # A webhook first (the frame is late) pairs just the same; a stale one does not.
    assert presses.first_report("2", WEBHOOK, 5.0)
    assert not presses.first_report("2", STREAM, 5.1)
    assert presses.first_report("3", WEBHOOK, 10.0)
    assert presses.first_report("3", STREAM, 12.5)


def test_key_notes_say_they_are_keys_in_the_call_language() -> None:
    assert key_note(["1"], "es") == "[la persona marcó 1 en el teclado]"
    assert key_note(["1", "2", "#"], "es-CO") == "[la persona marcó 1 2 # en el teclado]"
    assert key_note(["0"], "en-US") == "[the caller pressed 0 on the keypad]"


def test_keys_in_a_row_are_one_group() -> None:
    collector = KeyCollector(gap=0.2)
    assert collector.due == math.inf and collector.take_group(0.0) is None
    assert collector.push("1", 0.0) and collector.push("2", 0.05)
    assert collector.due == -math.inf  # presses to report: at once
    assert collector.take_group(1.0) is None  # not before its presses were reported
    assert collector.take_presses() == ["1", "2"]
    assert collector.due == pytest.approx(0.25)  # the gap runs from the last press
    assert collector.take_group(0.24) is None
    assert collector.take_group(0.25) == ["1", "2"]
    assert collector.due == math.inf and collector.take_presses() == []
    collector.push("#", 0.7)
    assert collector.take_presses() == ["#"] and collector.take_group(0.9) == ["#"]


def test_a_full_key_queue_drops_presses() -> None:
    collector = KeyCollector()
    assert all(collector.push("1", 0.0) for _ in range(KEY_QUEUE))
    assert not collector.push("2", 0.0)
    assert collector.take_presses() == ["1"] * KEY_QUEUE
    assert collector.push("3", 0.1)


def test_signals_wait_for_their_call_and_then_go_straight_through() -> None:
    signals = CallSignals(capacity=2)
    got: list[tuple[str, dict]] = []

    def sink(kind, payload) -> None:
        got.append((kind, payload))

    assert not signals.deliver("v3:a", "call.machine.detection.ended", {"result": "machine"})
    signals.deliver("v3:b", "call.dtmf.received", {"digit": "1"})
    signals.deliver("v3:c", "call.dtmf.received", {"digit": "2"})  # v3:a is forgotten
    signals.attach("v3:b", sink)
    assert got == [("call.dtmf.received", {"digit": "1"})]
    assert signals.deliver("v3:b", "call.dtmf.received", {"digit": "3"})
    signals.detach("v3:b", sink)
    assert len(signals) == 0 and not signals.deliver("v3:b", "x", {})
    signals.attach("v3:a", sink)
    assert len(got) == 2  # nothing was kept for v3:a


async def test_keys_during_bot_speech_reach_claude_once(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab)
    party = caller(
        [
            Dtmf("1", during_bot_ms=300),
            Dtmf("2"),
            Wait(1200),  # the keys are one turn once 0.8 s pass without another
            WaitForBot(min_ms_silence=300),
        ]
    )
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    # Telnyx reported each key both ways; the server counted each once.
    assert sim_call.events.count("call.dtmf.received") == 2
    assert sim_call.streams[0].params.track == "inbound_track"
    assert results.bot_turns[0].cut  # the greeting stopped at the first key
    [request] = lab.anthropic.requests
    last = request.body["messages"][-1]
    assert last == {"role": "user", "content": "[la persona marcó 1 2 en el teclado]"}
    system = " ".join(block["text"] for block in request.body["system"])
    assert "teclas que la persona marcó" in system
    assert "[la persona marcó 1 2 en el teclado]" in results.bot_text  # the sim quotes it
    # No TRANSFER_NUMBER: no transfer tool, and 0 would be just a key.
    assert request.body["tools"] == tool_specs(offered_tools(can_transfer=False))
    assert not server.app.center.settings.dtmf_actions
    server.stop.set()


async def test_a_shortcut_key_ends_the_call_politely(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, DTMF_SHORTCUTS="9=end_call")
    party = caller([Dtmf("9", during_bot_ms=300), Wait(4000)], hang_up_when_done=False)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert results.hangup_by == "bot"
    assert len([r for r in lab.telnyx.requests if r.path.endswith("/hangup")]) == 1
    assert lab.anthropic.request_count == 0
    record, _ = await server.app.center.store.get_call(sim_call.call_control_id)
    assert record.end_reason == "caller_ended"
    server.stop.set()
