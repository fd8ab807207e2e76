"""The scripted caller against a fake bot: turns, heard text, latency, barge-in, hang-ups."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import httpx
import trio
import trio_websocket
from test_sim_telnyx import OUR_NUMBER, PERSON, dial_body, start_sim

from voice_trio.sim.caller import (
    BargeIn,
    CallerResults,
    HangUp,
    Say,
    ScriptedCaller,
    Wait,
    WaitForBot,
)
from voice_trio.sim.speech import SpeechDecoder, encode_speech
from voice_trio.sim.telnyx import TelnyxSim

GREETING = "Hello, how can I help?"
STORY = "Once upon a time there was a very patient robot who told very long stories to everyone"


def echo_reply(heard: str) -> str:
    return STORY if "story" in heard else f"You said {heard}"


@dataclass
class FakeBot:
    """A stand-in for our server's media socket: greets, listens, answers, honours barge-in."""

    reply: Callable[[str], str] = echo_reply
    greeting: str | None = GREETING
    ms_per_char: int = 10
    end_of_turn_ms: int = 200
    heard: list[str] = field(default_factory=list)
    clears_sent: int = 0
    url: str = ""
    replied: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        decoder = SpeechDecoder()
        chars: list[str] = []
        speaking_until = 0.0

        async def say(text: str) -> None:
            nonlocal speaking_until
            audio = encode_speech(text, self.ms_per_char)
            audio += b"\xff" * (-len(audio) % 160)
            payload = base64.b64encode(audio).decode()
            await ws.send_message(json.dumps({"event": "media", "media": {"payload": payload}}))
            now = trio.current_time()
            speaking_until = max(now, speaking_until) + len(audio) / 8000

        try:
            while True:
                frame = json.loads(await ws.get_message())
                if frame["event"] == "start" and self.greeting:
                    await say(self.greeting)
                elif frame["event"] == "media":
                    voiced_before = decoder.voiced_until
                    chars.extend(
                        s.char for s in decoder.feed(base64.b64decode(frame["media"]["payload"]))
                    )
                    now = trio.current_time()
                    if decoder.voiced_until > voiced_before and now < speaking_until:
                        await ws.send_message('{"event":"clear"}')  # barge-in
                        self.clears_sent += 1
                        speaking_until = now
                    if chars and decoder.offset - decoder.voiced_until >= self.end_of_turn_ms * 8:
                        heard = "".join(chars).strip()
                        chars.clear()
                        self.heard.append(heard)
                        await say(self.reply(heard))
                        self.replied.set()
        except trio_websocket.ConnectionClosed:
            pass


async def start_bot(nursery: trio.Nursery, **kwargs) -> FakeBot:
    bot = FakeBot(**kwargs)
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, bot.handle, "127.0.0.1", 0, ssl_context=None)
    )
    bot.url = f"ws://127.0.0.1:{server.port}/stream/media"
    return bot


async def inbound_conversation(
    nursery: trio.Nursery, caller: ScriptedCaller, bot: FakeBot
) -> tuple[TelnyxSim, CallerResults]:
    sim, client = await start_sim(nursery)
    async with client:
        call = sim.place_inbound_call(PERSON, OUR_NUMBER, caller)
        answer = {"stream_url": bot.url, "stream_bidirectional_mode": "rtp"}
        r = await client.post(f"/calls/{call.call_control_id}/actions/answer", json=answer)
        assert r.status_code == 200
        results = await caller.run()
        with trio.fail_after(3):
            await call.ended.wait()
    return sim, results


async def test_conversation_text_and_latency(nursery) -> None:
    bot = await start_bot(nursery)
    script = [
        WaitForBot(min_ms_silence=250),
        Say("book a table"),
        WaitForBot(min_ms_silence=250),
        Say("for two", pause_before_ms=50),
        WaitForBot(min_ms_silence=250),
        HangUp(),
    ]
    caller = ScriptedCaller(script, ms_per_char=10, timeout_s=10)
    _, results = await inbound_conversation(nursery, caller, bot)
    assert not results.errors and not results.timed_out
    assert [t.text for t in results.bot_turns] == [
        GREETING,
        "You said book a table",
        "You said for two",
    ]
    assert bot.heard == ["book a table", "for two"]
    assert [u.text for u in results.utterances] == ["book a table", "for two"]
    assert not any(u.barge_in for u in results.utterances)
    assert results.bot_turns[0].latency_ms is None  # the greeting answers nobody
    assert len(results.latencies_ms) == 2
    for latency in results.latencies_ms:
        # The bot waits 200 ms of silence; the rest is pacing and loopback.
        assert 180 <= latency <= 600, results.latencies_ms
    assert results.hangup_by == "caller"
    assert results.bot_text.startswith(GREETING)


async def test_barge_in_talks_over_the_bot_and_gets_it_cut(nursery) -> None:
    bot = await start_bot(nursery)
    script = [
        WaitForBot(min_ms_silence=250),
        Say("tell me a story"),
        BargeIn(after_bot_ms=300, text="stop"),
        WaitForBot(min_ms_silence=250),
        HangUp(),
    ]
    caller = ScriptedCaller(script, ms_per_char=10, timeout_s=10)
    _, results = await inbound_conversation(nursery, caller, bot)
    assert not results.errors
    greeting, story, answer = results.bot_turns
    assert greeting.text == GREETING and not greeting.cut
    assert story.barged_in and story.cut
    assert STORY.startswith(story.text) and 10 < len(story.text) < len(STORY) - 20
    assert answer.text == "You said stop" and answer.latency_ms is not None
    assert [u.barge_in for u in results.utterances] == [False, True]
    assert bot.clears_sent == 1 and results.clears == 1
    assert bot.heard == ["tell me a story", "stop"]


async def test_outbound_callee_and_bot_hang_up(nursery) -> None:
    bot = await start_bot(nursery)
    sim, client = await start_sim(nursery)
    caller = ScriptedCaller(
        [WaitForBot(min_ms_silence=250), Say("who is this"), Wait(5000)],
        ms_per_char=10,
        timeout_s=10,
    )
    sim.answer_with(PERSON, caller)
    async with client, trio.open_nursery() as n:
        body = dial_body(stream_url=bot.url, stream_bidirectional_mode="rtp")
        ccid = (await client.post("/calls", json=body)).json()["data"]["call_control_id"]
        done: list[CallerResults] = []

        async def run_caller() -> None:
            done.append(await caller.run())

        n.start_soon(run_caller)
        with trio.fail_after(5):
            await bot.replied.wait()
        await trio.sleep(0.4)  # the reply (200 ms) plays to the end
        await client.post(f"/calls/{ccid}/actions/hangup")
    results = done[0]
    assert results.hangup_by == "bot" and not results.timed_out
    assert bot.heard == ["who is this"]
    assert [t.text for t in results.bot_turns] == [GREETING, "You said who is this"]
    assert sim.calls[ccid].hangup_source == "caller"  # our server placed the call


async def test_waits_time_out_and_the_whole_call_has_a_deadline(nursery) -> None:
    sim, client = await start_sim(nursery)
    patient = ScriptedCaller([WaitForBot(timeout_ms=150), HangUp()], timeout_s=5)
    stuck = ScriptedCaller([Wait(5000)], timeout_s=0.3)
    async with client:
        calls = [sim.place_inbound_call(PERSON, OUR_NUMBER, c) for c in (patient, stuck)]
        for call in calls:
            await client.post(f"/calls/{call.call_control_id}/actions/answer", json={})
        first = await patient.run()
        second = await stuck.run()
        with trio.fail_after(3):
            for call in calls:
                await call.ended.wait()
    assert first.errors == ["caller: WaitForBot timed out after 150 ms"]
    assert first.hangup_by == "caller"
    assert second.timed_out and second.hangup_by == "caller"
    assert not first.bot_turns


async def test_caller_hears_speak_without_a_stream(nursery) -> None:
    sim, client = await start_sim(nursery)
    caller = ScriptedCaller([WaitForBot(min_ms_silence=200), HangUp()], ms_per_char=10, timeout_s=5)
    async with client:
        call = sim.place_inbound_call(PERSON, OUR_NUMBER, caller)
        base = f"/calls/{call.call_control_id}/actions"
        await client.post(f"{base}/answer", json={})
        await client.post(
            f"{base}/speak",
            json={
                "payload": "<speak>Hi <b>there</b></speak>",
                "voice": "female",
                "payload_type": "ssml",
            },
        )
        results = await caller.run()
    assert [t.text for t in results.bot_turns] == ["Hi there"]
    assert isinstance(client, httpx.AsyncClient)
