"""How many Trio tasks one call costs the server while it idles (issue 17: at most 10).

Idle: the call is connected, the greeting has been said, the caller is silent and no turn
runs. Counted is every task the call adds to the server's task tree: its media
connection (Hypercorn's connection handler and the app task under it), the call's own
tasks, and the Deepgram link (its task and its pump; the STT socket, read in the link's
task, has none of its own); all of them live under the media connection's handler. The simulators run in this process too, so only the server's
subtree is looked at. Other new tasks may only be idle HTTP connections: the webhooks'
keep-alive connections, pooled by Telnyx's client and shared by every call.
"""

from collections import Counter

import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.sim.caller import ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

MAX_TASKS_PER_IDLE_CALL = 10

# What an idle call runs today: 8 tasks, one of each.
IDLE_CALL_TASKS = {
    "trio._highlevel_serve_listeners._run_handler",
    "voice_trio.compat.hypercorn._spawn_app.<locals>.run_app",
    "voice_trio.media.controls.CallControls.run",
    "voice_trio.media.session.CallSession.converse",
    "voice_trio.media.session.CallSession.listen",
    "voice_trio.media.session.CallSession.read_carrier",
    "voice_trio.providers.deepgram.link.SttLink._pump",
    "voice_trio.providers.deepgram.link.SttLink._run",
}


def subtree(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    return [task] + [
        t
        for nursery in task.child_nurseries
        for child in nursery.child_tasks
        for t in subtree(child)
    ]


def new_roots(
    tasks: list[trio.lowlevel.Task], before: set[trio.lowlevel.Task]
) -> list[trio.lowlevel.Task]:
    """The new tasks whose parent is not new: each is one thing the call added."""
    new = {t for t in tasks if t not in before}
    return [t for t in new if t.parent_nursery is None or t.parent_nursery.parent_task not in new]


def greeting_heard(party: ScriptedCaller) -> bool:
    turns = party.results.bot_turns
    return bool(turns) and turns[0].ended_at is not None


def listing(tasks: list[trio.lowlevel.Task]) -> str:
    counts = Counter(t.name for t in tasks)
    return "\n".join(f"  {n} × {name}" for name, n in sorted(counts.items()))


async def test_an_idle_call_runs_at_most_ten_tasks(nursery, lab) -> None:
    others = set(nursery.child_tasks)
    server = await start_lab_server(nursery, lab, SILENCE_TIMEOUT_MS=60_000)
    (server_task,) = set(nursery.child_tasks) - others
    await trio.sleep(0.5)  # the server's start-up work is done
    before = set(subtree(server_task))
    party = ScriptedCaller(
        [WaitForBot(min_ms_silence=300), Wait(60_000)], ms_per_char=FAST_SPEECH_MS, timeout_s=30
    )
    lab.telnyx.place_inbound_call("+573001234567", OUR_NUMBER, party)
    async with trio.open_nursery() as callers:
        callers.start_soon(party.run)
        with trio.fail_after(10):
            while not greeting_heard(party):  # noqa: ASYNC110 (the caller's notes are plain data)
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # greeting heard and played out; the caller stays silent

        # A webhook's request may still be finishing: look again until only the call's
        # connection holds tasks.
        with trio.move_on_after(3):
            while True:
                roots = new_roots(subtree(server_task), before)
                calls = [r for r in roots if len(subtree(r)) > 1]
                if len(calls) == 1:
                    break
                await trio.sleep(0.05)
        assert len(calls) == 1, "\n\n".join(listing(subtree(r)) for r in roots)
        call_tasks = subtree(calls[0])
        idle_connections = [r for r in roots if r not in calls]
        assert all(r.name.endswith("_run_handler") for r in idle_connections), listing(
            idle_connections
        )
        print(f"\nan idle call runs {len(call_tasks)} tasks:\n{listing(call_tasks)}")
        assert len(call_tasks) <= MAX_TASKS_PER_IDLE_CALL, (
            f"an idle call runs {len(call_tasks)} tasks "
            f"(at most {MAX_TASKS_PER_IDLE_CALL}):\n{listing(call_tasks)}"
        )
        assert sorted(t.name for t in call_tasks) == sorted(IDLE_CALL_TASKS), listing(call_tasks)
        assert party.line is not None
        party.line.hang_up()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    server.stop.set()
