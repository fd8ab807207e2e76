"""Transfer to a person, end to end: Claude's ``transfer_call`` tool and the ``0`` key, each
while the bot is talking. The caller hears the hand-off line, Telnyx gets one ``transfer``
to TRANSFER_NUMBER, we never hang up, and the record says ``transferred``."""

import trio
from conftest import FAST_SPEECH_MS, start_lab_server, task_names

from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.sim.caller import Dtmf, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"
DESK = "+573009998877"
HANDOFF = "Un momento, por favor. Le comunico con una persona de nuestro equipo."


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(script, ms_per_char=FAST_SPEECH_MS, turn_gap_ms=300, timeout_s=30, **kw)


def commands(lab, action: str) -> list:
    return [r for r in lab.telnyx.requests if r.path.endswith(f"/actions/{action}")]


async def transferred_call(lab, server, script):
    """Run an inbound call; return what the caller heard and its record, once all is done."""
    party = caller(script)
    sim_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    with trio.fail_after(5):
        await sim_call.ended.wait()  # the caller hung up on the person at the end
    found = await server.app.center.store.get_call(sim_call.call_control_id)
    assert found is not None
    record, turns = found
    assert [t.bot_text for t in turns if t.kind == "handoff"] == [HANDOFF]
    return sim_call, results, record


def assert_transferred(lab, server, sim_call, results, record) -> None:
    heard = results.bot_text
    assert HANDOFF in heard
    [transfer] = commands(lab, "transfer")
    assert transfer.json["to"] == DESK and transfer.status == 200
    assert commands(lab, "hangup") == []  # the leg left us; we never hang it up
    assert record.end_reason == "transferred" and record.status == "ended"
    assert sim_call.transferred_to == DESK
    assert "transferred" in [e.kind for e in results.events]
    leg = sim_call.transfer_legs[0]
    assert leg.events == ["call.initiated", "call.answered", "call.bridged"]
    assert server.app.center.metrics is not None
    assert not [n for n in task_names() if "media.session" in n or "conversation.dtmf" in n]
    assert len(server.app.center.signals) == 0


async def test_claude_transfers_after_the_reply_that_announces_it(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, TRANSFER_NUMBER=DESK)
    sim_call, results, record = await transferred_call(
        lab,
        server,
        [
            WaitForBot(min_ms_silence=300),
            Say("Quisiera hablar con una persona, por favor.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(300),
        ],
    )
    assert lab.anthropic.requests[0].body["tools"] == tool_specs(offered_tools(can_transfer=True))
    # The tool arrived while the reply was still playing: the reply is heard to its end,
    # then the hand-off line, then the transfer.
    reply = "Con gusto, le comunico con una persona."
    heard = results.bot_text
    assert reply in heard and heard.index(reply) < heard.index(HANDOFF)
    assert_transferred(lab, server, sim_call, results, record)
    transfer_at = next(e.at for e in results.events if e.kind == "transferred")
    handoff_turn = next(t for t in results.bot_turns if HANDOFF in t.text)
    assert handoff_turn.ended_at is not None and handoff_turn.ended_at <= transfer_at
    server.stop.set()


async def test_zero_during_bot_speech_cuts_it_and_transfers(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, TRANSFER_NUMBER=DESK)
    sim_call, results, record = await transferred_call(
        lab,
        server,
        [
            WaitForBot(min_ms_silence=300),
            Say("Necesito información sobre los horarios de atención de la clínica.", 100),
            Dtmf("0", during_bot_ms=400),
            WaitForBot(min_ms_silence=300),
            Wait(300),
        ],
    )
    assert results.clears >= 1
    assert [t for t in results.bot_turns if t.cut]  # the reply stopped at the key press
    assert_transferred(lab, server, sim_call, results, record)
    # The shortcut is an action, not words for Claude.
    assert all("marcó" not in str(r.body["messages"]) for r in lab.anthropic.requests)
    server.stop.set()
