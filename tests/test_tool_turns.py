"""One turn with the operator's HTTP tools (conversation/thinking.py), against the Anthropic
simulator and a runner whose requests take the time a test gives them: what Claude is sent
back, in what order, and what a speculative or a cut turn does with its requests."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from voice_trio.conversation.history import Conversation
from voice_trio.conversation.thinking import (
    SENTENCE_QUEUE,
    TOOL_ROUNDS,
    Mind,
    ToolTurn,
    think_reply,
)
from voice_trio.conversation.tool_use import PendingTool, ToolCaller, ToolLedger
from voice_trio.conversation.tools import CallAct
from voice_trio.conversation.turn_record import TurnRecord
from voice_trio.providers.claude import ClaudeClient
from voice_trio.providers.tool_http import ToolOutcome
from voice_trio.sim.anthropic import AnthropicSim, Reply, serve
from voice_trio.tools_file import HttpToolSpec

API_KEY = "sk-ant-test"


def spec(name: str, phrase: str = "") -> HttpToolSpec:
    return HttpToolSpec(
        name=name,
        description=f"{name} for tests",
        input_schema={"type": "object"},
        endpoint="https://backend.example/" + name,
        waiting_phrase=phrase,
    )


class Runner:
    """Answers each request after ``delays[name]`` seconds with ``{"tool": name, ...}``."""

    def __init__(self, nursery: trio.Nursery, delays: dict[str, float]) -> None:
        self.nursery = nursery
        self.delays = delays
        self.started: list[tuple[str, str, dict[str, Any], float]] = []

    def start(
        self, caller: ToolCaller, tool: HttpToolSpec, tool_use_id: str, tool_input: dict[str, Any]
    ) -> PendingTool:
        pending = PendingTool(tool_use_id, tool.name, tool_input)
        self.started.append((caller.call_control_id, tool.name, tool_input, trio.current_time()))

        async def answer() -> None:
            await trio.sleep(self.delays.get(tool.name, 0.0))
            content = json.dumps({"tool": tool.name, "input": tool_input})
            pending.finish(ToolOutcome("ok", content, 200, 1.0))

        self.nursery.start_soon(answer)  # outside the turn, as the ToolDesk does
        return pending


def script(*replies: Reply):
    """A reply_fn that answers request n with ``replies[n]`` (the last one thereafter)."""
    answers = list(replies)

    def reply(request: dict[str, Any]) -> Reply:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return reply


async def run_turn(
    nursery: trio.Nursery,
    sim: AnthropicSim,
    runner: Runner,
    tools: ToolTurn | None,
    *,
    specs: tuple[HttpToolSpec, ...],
    conversation: Conversation | None = None,
    cancel_after: float | None = None,
) -> tuple[TurnRecord, list[str], Conversation]:
    base = await nursery.start(serve, sim)
    conversation = conversation or Conversation()
    if not conversation.turns:
        conversation.add_user("Quiero una cita.")
    record = TurnRecord(user_text="Quiero una cita.")
    said: list[str] = []
    async with ClaudeClient(api_key=API_KEY, base_url=base, model="claude-haiku-4-5") as claude:
        mind = Mind(
            claude=claude,
            persona="Eres Sofía.",
            cache_persona={False: False, True: False},
            apology="Disculpe.",
            timezone="America/Bogota",
            max_response_length=600,
            history_limit=20,
            http_tools=specs,
            tool_runner=runner,
            tool_wait_s=0.3,
            waiting_phrase="Un momento, por favor.",
        )
        send, recv = trio.open_memory_channel[str](SENTENCE_QUEUE)
        with trio.fail_after(10):
            async with trio.open_nursery() as turn:
                if cancel_after is not None:
                    turn.cancel_scope.deadline = trio.current_time() + cancel_after
                turn.start_soon(
                    lambda: think_reply(
                        mind, conversation, send, record, nombre="", contexto="", tools=tools
                    )
                )
                async with recv:
                    async for sentence in recv:
                        said.append(sentence)
    return record, said, conversation


async def test_tools_asked_together_run_side_by_side_and_answer_in_order(
    nursery: trio.Nursery,
) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    sim.reply_fn = script(
        Reply(
            "Reviso las dos cosas.",
            tool_calls=(("slots", {"day": "lunes"}), ("doctor", {}), ("end_call", {})),
        ),
        Reply("Hay espacio el lunes con la doctora Rojas."),
    )
    runner = Runner(nursery, {"slots": 0.5, "doctor": 0.5})
    tools = ToolTurn(caller=ToolCaller("v3:c"), ledger=ToolLedger())
    started = trio.current_time()
    record, said, conversation = await run_turn(
        nursery, sim, runner, tools, specs=(spec("slots"), spec("doctor"))
    )
    assert trio.current_time() - started < 0.95  # 0.5 s each, side by side
    assert [(name, args) for _, name, args, _ in runner.started] == [
        ("slots", {"day": "lunes"}),
        ("doctor", {}),
    ]
    first, second = (r.body for r in sim.requests)
    assert [t["name"] for t in first["tools"]] == ["end_call", "slots", "doctor"]
    asked, answered = second["messages"][-2:]
    ids = [b["id"] for b in asked["content"] if b["type"] == "tool_use"]
    assert [b["tool_use_id"] for b in answered["content"]] == ids  # one result each, in order
    assert json.loads(answered["content"][0]["content"])["input"] == {"day": "lunes"}
    assert not any(b.get("is_error") for b in answered["content"])
    assert "done once your reply" in answered["content"][2]["content"]  # end_call's result
    assert said == [
        "Reviso las dos cosas.",
        "Un momento, por favor.",  # 0.5 s > tool_wait_s: the default phrase
        "Hay espacio el lunes con la doctora Rojas.",
    ]
    assert record.acts == {CallAct.END}
    assert record.tool_calls == ["slots", "doctor", "end_call"]
    # The exchange stays in the history for later turns; the ledger is empty.
    assert any(
        isinstance(m["content"], list) and m["content"][0].get("type") == "tool_result"
        for m in conversation.window(20)
    )
    assert tools.ledger.open == []


async def test_a_speculative_reply_sends_no_request_before_it_is_adopted(
    nursery: trio.Nursery,
) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    sim.reply_fn = script(Reply("Reviso.", tool_calls=(("slots", {}),)), Reply("Listo."))
    runner = Runner(nursery, {})
    go_ahead = trio.Event()
    tools = ToolTurn(caller=ToolCaller("v3:c"), ledger=ToolLedger(), go_ahead=go_ahead)

    async def adopt_later() -> None:
        await trio.sleep(0.4)
        assert runner.started == []  # the words streamed; the request waits
        go_ahead.set()

    nursery.start_soon(adopt_later)
    adopted_at = trio.current_time() + 0.4
    _, said, _ = await run_turn(nursery, sim, runner, tools, specs=(spec("slots"),))
    assert said[0] == "Reviso." and said[-1] == "Listo."
    assert len(runner.started) == 1 and runner.started[0][3] >= adopted_at - 0.01


async def test_a_cut_turn_leaves_its_request_for_the_next_turn(nursery: trio.Nursery) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    sim.reply_fn = script(Reply("Reviso.", tool_calls=(("slots", {}),)), Reply("Listo."))
    runner = Runner(nursery, {"slots": 1.0})
    tools = ToolTurn(caller=ToolCaller("v3:c"), ledger=ToolLedger())
    _, said, conversation = await run_turn(
        nursery, sim, runner, tools, specs=(spec("slots", "Ya casi."),), cancel_after=0.6
    )
    assert said == ["Reviso.", "Ya casi."]  # the tool's own waiting phrase, then the cut
    assert len(tools.ledger.open) == 1 and len(sim.requests) == 1
    exchanges = await tools.ledger.settle()  # the request was not cut: it answers
    [exchange] = exchanges
    assert json.loads(exchange.results()[0]["content"])["tool"] == "slots"
    conversation.add_tool_exchange(exchange.asked, exchange.results())
    conversation.add_user("¿Y entonces?")
    last = conversation.window(20)[-1]["content"]
    assert last[0]["type"] == "tool_result" and last[1]["text"] == "¿Y entonces?"


async def test_a_reply_that_keeps_asking_for_tools_stops_after_the_last_round(
    nursery: trio.Nursery,
) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    sim.reply_fn = script(Reply("Otra vez.", tool_calls=(("slots", {}),)))
    runner = Runner(nursery, {})
    tools = ToolTurn(caller=ToolCaller("v3:c"), ledger=ToolLedger())
    _, said, _ = await run_turn(nursery, sim, runner, tools, specs=(spec("slots"),))
    assert len(runner.started) == TOOL_ROUNDS
    assert len(sim.requests) == TOOL_ROUNDS + 1
    assert said == ["Otra vez."] * (TOOL_ROUNDS + 1)


@pytest.mark.parametrize("with_tools", [False, True])
async def test_without_a_tool_turn_only_the_built_in_tools_are_offered(
    nursery: trio.Nursery, with_tools: bool
) -> None:
    sim = AnthropicSim(api_key=API_KEY, ttft=0.0, tokens_per_second=10_000)
    sim.reply_fn = script(Reply("Hola."))
    runner = Runner(nursery, {})
    tools = ToolTurn(caller=ToolCaller("v3:c"), ledger=ToolLedger()) if with_tools else None
    await run_turn(nursery, sim, runner, tools, specs=(spec("slots"),))
    names = [t["name"] for t in sim.requests[0].body["tools"]]
    assert names == (["end_call", "slots"] if with_tools else ["end_call"])
