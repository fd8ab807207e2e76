"""The tools Claude may call, declared once (voice_trio/conversation/tools.py): what goes on
the wire to Claude on each kind of call, the acts a reply's tool calls become on its turn
(a name Claude invents asks nothing), and what each call mode does with those acts."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from voice_trio.conversation.history import Conversation
from voice_trio.conversation.thinking import SENTENCE_QUEUE, Mind, think_reply
from voice_trio.conversation.tool_use import ToolCaller
from voice_trio.conversation.tools import (
    BUILT_IN,
    END_CALL,
    CallAct,
    offered_tools,
    tool_specs,
)
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.fallback.acts import ends_the_call
from voice_trio.media.replies import Replies
from voice_trio.providers.claude import ClaudeClient
from voice_trio.sim.anthropic import AnthropicSim, Reply, serve

API_KEY = "sk-ant-test"

END_CALL_SPEC = {
    "name": "end_call",
    "description": (
        "End the phone call. Use it after saying goodbye, when the caller says goodbye "
        "or has nothing else to ask."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "why the call ends"}},
        "required": [],
    },
}
TRANSFER_CALL_SPEC = {
    "name": "transfer_call",
    "description": (
        "Transfer the call to a person on the clinic's team. Use it when the caller asks "
        "to speak with a person, or needs something you cannot do. Say briefly that you "
        "will transfer them; the transfer happens after you finish speaking."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "why the call is transferred"}},
        "required": [],
    },
}


@pytest.mark.parametrize(
    ("can_transfer", "specs"),
    [(False, [END_CALL_SPEC]), (True, [END_CALL_SPEC, TRANSFER_CALL_SPEC])],
)
def test_the_tools_offered_are_end_call_and_transfer_call_only_when_the_call_can_transfer(
    can_transfer: bool, specs: list[dict[str, Any]]
) -> None:
    tools = offered_tools(can_transfer=can_transfer)
    assert tool_specs(tools) == specs
    # Key order too: the tools open the prompt-cache prefix, byte for byte each request.
    assert [list(spec) for spec in tool_specs(tools)] == [
        ["name", "description", "input_schema"]
    ] * len(specs)
    assert [tool.act for tool in tools] == [CallAct.END, CallAct.TRANSFER][: len(specs)]


def test_a_spec_is_a_copy_the_declaration_stays_as_declared() -> None:
    spec = END_CALL.spec()
    spec["input_schema"]["properties"]["reason"]["description"] = "changed"
    spec["cache_control"] = {"type": "ephemeral"}
    assert END_CALL.spec() == END_CALL_SPEC


def test_each_built_in_tool_has_its_own_name_and_act() -> None:
    assert len({tool.name for tool in BUILT_IN}) == len(BUILT_IN)
    assert {tool.act for tool in BUILT_IN} == set(CallAct)


async def think(
    nursery: trio.Nursery, sim: AnthropicSim, text: str, *, can_transfer: bool
) -> tuple[TurnRecord, list[str]]:
    """One reply of ``think_reply`` to the caller's ``text``, asked of the simulator."""
    base = await nursery.start(serve, sim)
    conversation = Conversation()
    conversation.add_user(text)
    record = TurnRecord(user_text=text)
    said: list[str] = []
    async with ClaudeClient(api_key=API_KEY, base_url=base, model="claude-haiku-4-5") as claude:
        mind = Mind(
            claude=claude,
            persona="Eres Sofía, recepcionista.",
            cache_persona={False: False, True: False},
            apology="Disculpe.",
            timezone="America/Bogota",
            max_response_length=300,
            history_limit=10,
        )
        sentence_send, sentence_recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    lambda: think_reply(
                        mind,
                        conversation,
                        sentence_send,
                        record,
                        nombre="Ana",
                        contexto="",
                        can_transfer=can_transfer,
                    )
                )
                async with sentence_recv:
                    said.extend([sentence async for sentence in sentence_recv])
    return record, said


@pytest.mark.parametrize("can_transfer", [False, True])
async def test_a_goodbye_goes_out_with_the_offered_tools_and_asks_to_end(
    nursery: trio.Nursery, can_transfer: bool
) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    record, said = await think(nursery, sim, "Eso es todo, adiós.", can_transfer=can_transfer)
    [request] = sim.requests
    expected = [END_CALL_SPEC, TRANSFER_CALL_SPEC] if can_transfer else [END_CALL_SPEC]
    assert request.body["tools"] == expected
    assert " ".join(said).startswith("Gracias por llamar.")
    assert record.tool_calls == ["end_call"]
    assert record.acts == {CallAct.END}


async def test_a_request_for_a_person_asks_to_transfer(nursery: trio.Nursery) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    record, _ = await think(nursery, sim, "Quiero hablar con una persona.", can_transfer=True)
    assert record.tool_calls == ["transfer_call"]
    assert record.acts == {CallAct.TRANSFER}


@pytest.mark.parametrize(
    ("name", "can_transfer"),
    [("book_appointment", True), ("transfer_call", False)],  # invented; not offered here
)
async def test_a_tool_not_offered_is_recorded_and_ignored(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, name: str, can_transfer: bool
) -> None:
    def invents(request: Any) -> Reply:
        return Reply("Con gusto.", (name, {"day": "martes"}))

    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000, reply_fn=invents)
    with caplog.at_level(logging.WARNING, logger="voice_trio.calls"):
        record, said = await think(nursery, sim, "El martes.", can_transfer=can_transfer)
    assert said == ["Con gusto."]
    assert record.tool_calls == [name]  # what Claude did, as it did it
    assert record.acts == set()
    assert f"Claude called {name!r}" in caplog.text


def replies() -> Replies:
    """A media call's replies with stand-ins: ``note_acts`` touches only the controls."""
    services = SimpleNamespace(settings=SimpleNamespace())
    controls = SimpleNamespace(pending=None)
    voice = speculator = SimpleNamespace()
    return Replies(services, Conversation(), voice, controls, speculator, caller=ToolCaller("v3:t"))


@pytest.mark.parametrize(
    ("acts", "ends", "pending"),
    [
        (set(), False, None),
        ({CallAct.END}, True, None),
        ({CallAct.TRANSFER}, False, "transfer"),
        ({CallAct.END, CallAct.TRANSFER}, True, "transfer"),
    ],
)
def test_a_media_call_ends_or_transfers_after_the_reply_as_its_acts_ask(
    acts: set[CallAct], ends: bool, pending: str | None
) -> None:
    media = replies()
    record = TurnRecord(user_text="", acts=set(acts))
    media.note_acts(record)
    assert media.end_requested is ends
    assert media.controls.pending == pending


def test_a_media_transfer_never_replaces_an_action_already_pending() -> None:
    media = replies()
    media.controls.pending = "voicemail"
    media.note_acts(TurnRecord(user_text="", acts={CallAct.TRANSFER}))
    assert media.controls.pending == "voicemail"


@pytest.mark.parametrize(
    ("acts", "ends"),
    [(set(), False), ({CallAct.END}, True), ({CallAct.TRANSFER}, False)],
)
def test_a_fallback_call_ends_only_when_a_reply_asks_to(acts: set[CallAct], ends: bool) -> None:
    assert ends_the_call(acts) is ends
