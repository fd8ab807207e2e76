"""The lean carrier against the reference one: the same call, played by a
:class:`~voice_trio.sim.caller.ScriptedCaller` on the reference carrier and by a
:class:`~voice_trio.sim.lean_caller.LeanCaller` on the lean one, against the same recording
media server, must put the same frames on the wire (fields and values, the caller's audio
byte for byte), at the same pace, and answer the server's media, marks and clear alike."""

from __future__ import annotations

import base64
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from test_sim_carrier import MediaServer, start_media_server
from test_sim_telnyx import API_KEY, answered_inbound, start_receiver, start_sim

from voice_trio.audio import FRAME_BYTES
from voice_trio.sim.caller import CallerResults, Say, ScriptedCaller, Step, WaitForBot
from voice_trio.sim.carrier import MAX_LAG_S, StreamParams
from voice_trio.sim.lean_caller import LeanCaller, speech_payloads
from voice_trio.sim.lean_carrier import MediaEngine, StreamFrames
from voice_trio.sim.lean_telnyx import LeanTelnyxSim
from voice_trio.sim.lean_telnyx import serve as serve_lean
from voice_trio.sim.reactor import Reactor
from voice_trio.sim.speech import encode_speech
from voice_trio.sim.telnyx_calls import SimCall

MS_PER_CHAR = 25
GREETING = encode_speech("Hola", MS_PER_CHAR)
REPLY = encode_speech("Claro que sí", MS_PER_CHAR)
SCRIPT: list[Step] = [WaitForBot(300), Say("Buenos días.", 0), WaitForBot(300)]
STREAM = {
    "stream_bidirectional_mode": "rtp",
    "stream_auth_token": "tok-1",
    "custom_parameters": [{"name": "customer_id", "value": "c-1"}],
    "client_state": "eyJ4IjoyfQ==",
}


@dataclass
class Played:
    """One carrier's side of the scenario, as the media server recorded it."""

    server: MediaServer
    call: SimCall
    results: CallerResults
    played_at: dict[str, float]  # mark name -> when the audio before it was sent


def voiced(frame: dict[str, Any]) -> bool:
    audio = base64.b64decode(frame["media"]["payload"])
    return bool(audio.rstrip(b"\xff"))


async def media_server_script(server: MediaServer, played_at: dict[str, float]) -> None:
    """The bot: a greeting (mark g1); after the caller's words and 100 ms of silence, a
    reply (mark r1); then a burst it clears at once (mark x1 pending, echoed by the clear)."""
    await server.wait_for("start")
    await server.play(GREETING)
    played_at["g1"] = trio.current_time()
    await server.send({"event": "mark", "mark": {"name": "g1"}})
    with trio.fail_after(10):
        while True:
            media = server.of("media")
            spoke = [i for i, f in enumerate(media) if voiced(f)]
            if spoke and len(media) - 1 - spoke[-1] >= 5:
                break
            await server.changed.wait()
    await server.play(REPLY)
    played_at["r1"] = trio.current_time()
    await server.send({"event": "mark", "mark": {"name": "r1"}})
    await server.wait_for("mark", 2, timeout=5)
    await server.play(REPLY)
    await server.send({"event": "mark", "mark": {"name": "x1"}})
    await trio.sleep(0.1)
    played_at["x1"] = trio.current_time()
    await server.send({"event": "clear"})


async def play_call(nursery: trio.Nursery, *, lean: bool) -> Played:
    receiver = await start_receiver(nursery)
    party: Any
    if lean:
        sim: Any = LeanTelnyxSim(
            api_key=API_KEY, default_webhook_url=receiver.url, ring_ms=30, webhook_backoff_ms=20
        )
        base = await nursery.start(serve_lean, sim)
        client = httpx.AsyncClient(
            base_url=base + "/v2", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
        )
        caller: Any = LeanCaller(SCRIPT, ms_per_char=MS_PER_CHAR, turn_gap_ms=300, timeout_s=20)
        party = sim.lean_party(caller)
    else:
        sim, client = await start_sim(nursery, receiver)
        caller = party = ScriptedCaller(
            SCRIPT, ms_per_char=MS_PER_CHAR, turn_gap_ms=300, timeout_s=20
        )
        nursery.start_soon(caller.run)
    server = await start_media_server(nursery)
    played_at: dict[str, float] = {}
    nursery.start_soon(media_server_script, server, played_at)
    call = await answered_inbound(sim, client, receiver, party)
    response = await client.post(
        f"/calls/{call.call_control_id}/actions/streaming_start",
        json={"stream_url": server.url, **STREAM},
    )
    assert response.status_code == 200, response.text
    with trio.fail_after(20):
        await call.ended.wait()
        await server.closed.wait()
    return Played(server, call, caller.results, played_at)


def normalised(frame: dict[str, Any], call: SimCall) -> dict[str, Any]:
    """A frame with what differs between two calls (ids) replaced by names."""
    ids = {
        call.streams[0].params.stream_id: "<stream>",
        call.call_control_id: "<call>",
        call.call_session_id: "<session>",
        call.streams[0].params.user_id: "<user>",
    }

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return ids.get(value, value) if isinstance(value, str) else value

    return walk(frame)  # type: ignore[no-any-return]


@pytest.fixture
async def both(nursery: trio.Nursery) -> tuple[Played, Played]:
    async with trio.open_nursery() as calls:
        out: dict[str, Played] = {}

        async def run(lean: bool) -> None:
            out["lean" if lean else "reference"] = await play_call(nursery, lean=lean)

        calls.start_soon(run, False)
        calls.start_soon(run, True)
    return out["reference"], out["lean"]


async def test_same_frames_fields_and_audio_as_the_reference(both) -> None:
    reference, lean = both
    ref = [normalised(f, reference.call) for _, f in reference.server.frames]
    new = [normalised(f, lean.call) for _, f in lean.server.frames]
    # connected and start: the same documents.
    assert (
        new[0]
        == ref[0]
        == {
            "event": "connected",
            "version": "1.0.0",
            "x-telnyx-streaming-auth-token": "tok-1",
        }
    )
    assert new[1] == ref[1]
    assert new[1]["start"]["custom_parameters"] == {"customer_id": "c-1"}
    # Every media frame: same fields; counters as the reference numbers them.
    for frames in (ref, new):
        media = [f for f in frames if f["event"] == "media"]
        assert all(set(f) == {"event", "sequence_number", "stream_id", "media"} for f in media)
        assert [f["media"]["chunk"] for f in media] == [str(i + 1) for i in range(len(media))]
        assert all(f["media"]["timestamp"] == str(20 * i) for i, f in enumerate(media))
        assert all(f["media"]["track"] == "inbound" for f in media)
        assert all(len(base64.b64decode(f["media"]["payload"])) == FRAME_BYTES for f in media)
        seq = [int(f["sequence_number"]) for f in frames[1:]]
        assert seq == list(range(1, len(seq) + 1))  # one counter for every frame after start
    # The caller's words, byte for byte.
    said = encode_speech("Buenos días.", MS_PER_CHAR)
    for frames in (ref, new):
        audio = b"".join(
            base64.b64decode(f["media"]["payload"]) for f in frames if f["event"] == "media"
        )
        assert audio.strip(b"\xff") == said.strip(b"\xff")
    # The end: a stop with the same body, then a 1000 close.
    assert [f["event"] for f in new[-1:]] == [f["event"] for f in ref[-1:]] == ["stop"]
    stop_ref, stop_new = dict(ref[-1]), dict(new[-1])
    stop_ref.pop("sequence_number"), stop_new.pop("sequence_number")
    assert stop_new == stop_ref
    assert lean.server.close_code == reference.server.close_code == 1000
    assert lean.call.events == reference.call.events


async def test_same_marks_clear_and_timing_as_the_reference(both) -> None:
    reference, lean = both
    for played in (reference, lean):
        marks = played.server.of("mark")
        assert [m["mark"]["name"] for m in marks] == ["g1", "r1", "x1"]
        stream = played.call.streams[0]
        assert stream.marks_echoed == ["g1", "r1", "x1"] and stream.clears == 1
        echoed = {m["mark"]["name"]: t for t, m in played.server.frames if m["event"] == "mark"}
        # A mark comes back once the audio before it has played (20 ms ticks of slack).
        for name, audio in (("g1", GREETING), ("r1", REPLY)):
            duration = (len(audio) + -len(audio) % FRAME_BYTES) / 8000
            assert echoed[name] - played.played_at[name] >= duration - 0.04, name
        # A clear returns the pending mark at once, long before its audio could have played.
        assert echoed["x1"] - played.played_at["x1"] < 0.2
    # The callers heard the same bot turns and timed the reply alike.
    ref_turns, new_turns = reference.results.bot_turns, lean.results.bot_turns
    assert len(new_turns) == len(ref_turns) >= 2
    assert [t.latency_ms is None for t in new_turns] == [t.latency_ms is None for t in ref_turns]
    ref_ms, new_ms = reference.results.latencies_ms[0], lean.results.latencies_ms[0]
    assert abs(ref_ms - new_ms) <= 60, (ref_ms, new_ms)
    assert [u.text for u in lean.results.utterances] == ["Buenos días."]


async def test_paced_every_20_ms_like_the_reference(both) -> None:
    for played in both:
        times = [t for t, f in played.server.frames if f["event"] == "media"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 0.018 <= statistics.median(gaps) <= 0.022
        expected = (times[-1] - times[0]) / 0.02 + 1
        assert abs(len(times) - expected) <= max(3, 0.03 * expected)


def test_media_frames_are_the_reference_text_byte_for_byte() -> None:
    """The pure builder against :class:`MediaStream`'s own format, frame by frame."""
    from voice_trio.sim.carrier import MediaStream

    params = StreamParams(
        url="ws://127.0.0.1:1/stream/media",
        stream_id="5c0ffee0-0000-4000-8000-000000000001",
        call_control_id="v3:abc",
        call_session_id="s-1",
        from_="+13125550199",
        to="+13125550100",
        user_id="u-1",
        client_state="eyJ4IjoyfQ==",
        custom_parameters={"a": "b"},
        auth_token="tok",
    )
    sent: list[str] = []

    class Capture:
        async def send_message(self, text: str) -> None:
            sent.append(text)

    reference = MediaStream(params)
    reference._ws = Capture()  # type: ignore[assignment]
    reference.started.set()
    frames = StreamFrames(params)
    assert frames.start().decode() == reference._start_frame()
    payloads = speech_payloads("Hola", MS_PER_CHAR)

    async def drive() -> list[str]:
        for payload in payloads:
            await reference.tick(base64.b64decode(payload))
        await reference.tick(None)
        await reference._echo_mark("m-1")
        await reference._error("100003", "malformed_frame", 'not "JSON"')
        return sent

    ref = trio.run(drive)
    new = [frames.media(p).decode() for p in payloads]
    new.append(frames.media(base64.b64encode(b"\xff" * FRAME_BYTES)).decode())
    new.append(frames.mark("m-1").decode())
    new.append(frames.error("100003", "malformed_frame", 'not "JSON"').decode())
    assert new == ref


def test_the_clock_ticks_every_20_ms_and_restarts_after_200_ms_of_lag() -> None:
    """The reference line's rule (carrier.Line.run), on the lean engine's one clock."""
    reactor = Reactor()
    engine = MediaEngine(reactor)

    class Session:
        def __init__(self, line: Any) -> None:
            self.line = line
            self.deadlines: list[float] = []

        def step(self, deadline: float) -> None:
            self.deadlines.append(deadline)

    class FakeLine:
        late_resyncs = 0

    sessions = [Session(FakeLine()), Session(FakeLine())]
    reactor.start()
    try:
        reactor.call_soon_threadsafe(engine.add, sessions[0])
        time.sleep(0.011)
        reactor.call_soon_threadsafe(engine.add, sessions[1])
        time.sleep(0.3)
        reactor.call_soon_threadsafe(time.sleep, MAX_LAG_S + 0.05)  # the thread stalls
        time.sleep(MAX_LAG_S + 0.35)
    finally:
        reactor.stop()
        reactor.join(5)
        reactor.close()
    for session in sessions:
        d = session.deadlines
        gaps = [round(b - a, 6) for a, b in itertools.pairwise(d)]
        jump = max(range(len(gaps)), key=gaps.__getitem__)
        # Exactly 20 ms apart on a fixed schedule, but for the one restart after the stall.
        assert all(g == pytest.approx(0.02, abs=1e-6) for i, g in enumerate(gaps) if i != jump)
        assert gaps[jump] > MAX_LAG_S
        assert session.line.late_resyncs == 1
        assert len(d) - 1 - jump >= 10  # ticking on after the restart, not bursting
    assert engine.late_resyncs == 1
    # The two streams started 11 ms apart: on different phases of the clock.
    offset = (sessions[1].deadlines[0] - sessions[0].deadlines[0]) % 0.02
    assert offset == pytest.approx(round(offset / engine.step_s) * engine.step_s, abs=1e-6)
    assert 0.005 < offset < 0.02
