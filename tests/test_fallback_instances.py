"""One fallback-mode call carried by two server instances that share a PostgreSQL store:
the simulated Telnyx sends the call's webhooks to them in turn (a load balancer), so every
step of the conversation may happen on either instance."""

from collections import Counter

import trio
from conftest import LiveServer, start_lab_server, task_names
from test_fallback import PATIENT, caller, claude_messages, commands, heard_reply_to, squash
from test_store import pg_dsn  # noqa: F401  (fixture: a fresh PostgreSQL database)

from voice_trio.sim.caller import HangUp, Say, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

TURNS = [
    "Quiero una cita para el lunes.",
    "A las tres de la tarde.",
    "Eso es todo, gracias. Adiós.",
]


async def settle(*servers: LiveServer) -> None:
    with trio.fail_after(5):
        for server in servers:
            await server.app.center.registry.wait_until_empty()


def metric(server_metrics: str, line: str) -> float:
    for row in server_metrics.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_two_instances_carry_one_fallback_call(nursery, lab, pg_dsn) -> None:  # noqa: F811
    lab.telnyx.speak_ms_per_char = 10
    lab.telnyx.transcription_silence_ms = 250
    env = {"USE_MEDIA_STREAMS": "false", "DATABASE_URL": pg_dsn}
    one = await start_lab_server(nursery, lab, **env)
    two = await start_lab_server(nursery, lab, **env)
    urls = [s.app.center.settings.webhook_url for s in (one, two)]
    lab.telnyx.webhooks.round_robin = urls
    store = one.app.center.store
    assert store is not None and store.backend == "postgres"

    # A first call opens the keep-alive connections later calls reuse; it ends with the
    # caller hanging up on whichever instance that webhook lands.
    warm_up = caller([WaitForBot(300), Say("Hola.", 100), WaitForBot(300), HangUp()])
    warm_call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, warm_up)
    await warm_up.run()
    await settle(one, two)
    with trio.fail_after(5):
        while await store.load_state(warm_call.call_control_id) is not None:  # noqa: ASYNC110
            await trio.sleep(0.05)
    await trio.sleep(0.5)
    tasks_before = task_names()
    claude_before = lab.anthropic.request_count

    # Three deliveries twice each (call.initiated, call.answered, the first speak event):
    # the copy goes to the other instance; after that, deliveries alternate.
    lab.telnyx.webhooks.faults.duplicate = 3
    script = [WaitForBot(min_ms_silence=300)]
    for words in TURNS:
        script += [Say(words, 100), WaitForBot(min_ms_silence=300)]
    party = caller([*script, Wait(1500)], hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(one, two)
    ccid = call.call_control_id

    # Nothing of the call is left running on either instance.
    for server in (one, two):
        assert len(server.app.center.registry) == 0 and len(server.app.center.fallback) == 0
    with trio.move_on_after(3):
        while Counter(task_names()) - Counter(tasks_before):  # noqa: ASYNC110
            await trio.sleep(0.05)
    left = Counter(task_names()) - Counter(tasks_before)
    assert not left, f"tasks left behind: {left}"

    # The conversation worked: the greeting once, a reply to each caller turn, in order.
    assert not results.errors and not results.timed_out
    heard = [t.text for t in results.bot_turns]
    assert "Le habla Sofía" in heard[0]
    assert sum("Le habla Sofía" in s for s in call.spoken) == 1
    for words in TURNS[:2]:
        assert heard_reply_to(results, words)
    assert squash("Gracias por llamar.") in squash(heard[-1])
    said = [m[-1]["content"] for m in claude_messages(lab)[claude_before:]]
    assert said == TURNS
    assert len(commands(lab, "transcription_start")) == 2  # one per call
    hangups = [r for r in commands(lab, "hangup") if ccid in r.path]
    assert len(hangups) == 1 and results.hangup_by == "bot"

    # Both instances took part, and each duplicate landed on the instance that had not
    # seen the event, which recognised it through the store.
    deliveries = [d for d in lab.telnyx.webhooks.log if d.call_control_id == ccid]
    assert {d.url for d in deliveries} == set(urls)
    duplicates = [d for d in deliveries if d.fault == "duplicate"]
    assert len(duplicates) == 3
    texts = [(await s.client.get("/metrics")).text for s in (one, two)]
    line = 'voice_webhooks_total{event_type="call.transcription",outcome="accepted"}'
    assert all(metric(text, line) >= 1 for text in texts)
    answered_dupes = sum(
        metric(text, 'voice_webhooks_total{event_type="call.answered",outcome="duplicate"}')
        for text in texts
    )
    assert answered_dupes == 1
    ended = sum(
        metric(text, 'voice_calls_total{end_reason="agent_ended",mode="fallback"}')
        for text in texts
    )
    assert ended == 1  # counted once, by the instance that wrote the record

    # One record with every turn; no state left behind.
    found = await store.get_call(ccid)
    assert found is not None
    record, turns = found
    assert (record.direction, record.from_number, record.to_number) == (
        "inbound",
        PATIENT,
        OUR_NUMBER,
    )
    assert record.mode == "fallback" and record.status == "ended"
    assert record.end_reason == "agent_ended" and record.ended_at >= record.answered_at
    assert record.tts_characters > 0
    assert record.llm_input_tokens > 0 and record.llm_output_tokens > 0
    assert [t.kind for t in turns] == ["greeting", "reply", "reply", "reply"]
    assert [t.user_text for t in turns[1:]] == TURNS
    assert [t.index for t in turns] == [0, 1, 2, 3]
    assert turns[1].heard_text.startswith('Entendido, usted dijo: "Quiero una cita')
    assert turns[3].tool_calls == ["end_call"]
    for turn in turns[1:]:
        assert None not in (turn.t0, turn.t1, turn.t2, turn.t3), turn
        assert turn.t0 <= turn.t1 <= turn.t2 <= turn.t3
    assert await store.load_state(ccid) is None
    calls = await store.list_calls(limit=10)
    assert [c.call_control_id for c in calls.calls].count(ccid) == 1

    one.stop.set()
    two.stop.set()
