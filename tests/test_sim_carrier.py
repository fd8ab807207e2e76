"""The carrier: media-stream frames, pacing, codecs, playback, marks, clear, stop and close."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from test_sim_telnyx import (
    WebhookReceiver,
    answered_inbound,
    start_receiver,
    start_sim,
)

from voice_trio.audio import alaw_to_mulaw, mulaw_to_alaw
from voice_trio.sim.caller import Say, ScriptedCaller, Wait
from voice_trio.sim.carrier import MediaStream, Playback
from voice_trio.sim.speech import decode_speech, encode_speech
from voice_trio.sim.telnyx import TelnyxSim
from voice_trio.sim.telnyx_calls import SimCall


@dataclass
class MediaServer:
    """Our server's ``/stream/media`` as played by the test: it records every frame."""

    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    url: str = ""
    ws: trio_websocket.WebSocketConnection | None = None
    close_code: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.path = request.path
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.ws = await request.accept()
        try:
            while True:
                message = await self.ws.get_message()
                self.frames.append((trio.current_time(), json.loads(message)))
                self.changed.set()
                self.changed = trio.Event()
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
        finally:
            self.closed.set()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [frame for _, frame in self.frames if frame["event"] == event]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 3.0) -> list[dict]:
        with trio.fail_after(timeout):
            while len(self.of(event)) < count:
                await self.changed.wait()
        return self.of(event)

    async def send(self, frame: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def play(self, audio: bytes) -> None:
        padded = audio + b"\xff" * (-len(audio) % 160)
        await self.send({"event": "media", "media": {"payload": base64.b64encode(padded).decode()}})


async def start_media_server(nursery: trio.Nursery) -> MediaServer:
    server = MediaServer()
    ws_server = await nursery.start(
        partial(trio_websocket.serve_websocket, server.handle, "127.0.0.1", 0, ssl_context=None)
    )
    server.url = f"ws://127.0.0.1:{ws_server.port}/stream/media"
    return server


@dataclass
class StreamedCall:
    sim: TelnyxSim
    client: httpx.AsyncClient
    receiver: WebhookReceiver
    server: MediaServer
    call: SimCall

    @property
    def stream(self) -> MediaStream:
        return self.call.streams[0]

    async def command(self, action: str, **body: Any) -> httpx.Response:
        return await self.client.post(
            f"/calls/{self.call.call_control_id}/actions/{action}", json=body
        )


async def streamed_call(
    nursery: trio.Nursery, caller=None, knobs: dict | None = None, **stream: Any
) -> StreamedCall:
    receiver = await start_receiver(nursery)
    sim, client = await start_sim(nursery, receiver, **(knobs or {}))
    server = await start_media_server(nursery)
    call = await answered_inbound(sim, client, receiver, caller)
    fields = {"stream_url": server.url, "stream_bidirectional_mode": "rtp", **stream}
    fields["stream_url"] = fields["stream_url"].format(url=server.url)
    r = await client.post(f"/calls/{call.call_control_id}/actions/streaming_start", json=fields)
    assert r.status_code == 200, r.text
    await receiver.wait_for("streaming.started")
    return StreamedCall(sim, client, receiver, server, call)


async def test_connected_start_and_media_paced_at_50_per_second(nursery) -> None:
    c = await streamed_call(
        nursery,
        stream_auth_token="tok-1",
        custom_parameters=[{"name": "customer_id", "value": "c-1"}],
        client_state="eyJ4IjoyfQ==",
    )
    await trio.sleep(0.6)
    server = c.server
    assert server.headers["x-telnyx-streaming-auth-token"] == "tok-1"
    assert server.frames[0][1] == {
        "event": "connected",
        "version": "1.0.0",
        "x-telnyx-streaming-auth-token": "tok-1",
    }
    start = server.frames[1][1]
    assert start["event"] == "start" and start["sequence_number"] == "1"
    assert start["stream_id"] == c.stream.params.stream_id
    body = start["start"]
    assert body["call_control_id"] == c.call.call_control_id
    assert body["call_session_id"] == c.call.call_session_id
    assert body["from"] == "+13125550199" and body["to"] == "+13125550100"
    assert body["client_state"] == "eyJ4IjoyfQ=="
    assert body["custom_parameters"] == {"customer_id": "c-1"}
    assert body["media_format"] == {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}
    assert body["user_id"] and body["tags"] == []

    media = [(t, f) for t, f in server.frames if f["event"] == "media"]
    first = media[0][1]
    assert first["stream_id"] == start["stream_id"]
    assert first["media"]["chunk"] == "1" and first["media"]["timestamp"] == "0"
    assert first["media"]["track"] == "inbound"
    assert base64.b64decode(first["media"]["payload"]) == b"\xff" * 160
    chunks = [int(f["media"]["chunk"]) for _, f in media]
    assert chunks == list(range(1, len(chunks) + 1))
    seqs = [int(f["sequence_number"]) for _, f in media]
    assert seqs == sorted(seqs) and all(isinstance(f["sequence_number"], str) for _, f in media)
    assert [f["media"]["timestamp"] for _, f in media[:3]] == ["0", "20", "40"]
    (t0, _), (t1, _) = media[2], media[-1]
    rate = (len(media) - 3) / (t1 - t0)
    assert 45 <= rate <= 55, rate


async def test_the_stream_token_channels_can_be_turned_off_and_the_query_dropped(
    nursery,
) -> None:
    c = await streamed_call(
        nursery,
        knobs={
            "strip_stream_query": True,
            "stream_auth_header": False,
            "stream_auth_in_connected": False,
        },
        stream_auth_token="tok-1",
        stream_url="{url}?token=tok-1",
    )
    await c.server.wait_for("start")
    assert c.server.path == "/stream/media"  # the query string did not survive
    assert "x-telnyx-streaming-auth-token" not in c.server.headers
    assert c.server.frames[0][1] == {"event": "connected", "version": "1.0.0"}


async def test_without_a_token_the_connected_frame_is_the_documented_example(nursery) -> None:
    c = await streamed_call(nursery, stream_url="{url}?token=tok-1")
    await c.server.wait_for("start")
    assert c.server.path == "/stream/media?token=tok-1"  # kept unless the knob says not
    assert "x-telnyx-streaming-auth-token" not in c.server.headers
    assert c.server.frames[0][1] == {"event": "connected", "version": "1.0.0"}


async def test_pcma_stream_carries_the_callers_words(nursery) -> None:
    caller = ScriptedCaller([Wait(150), Say("hola mundo"), Wait(150)], ms_per_char=10, timeout_s=5)
    c = await streamed_call(nursery, caller, stream_codec="PCMA", stream_bidirectional_codec="PCMA")
    await c.server.play(mulaw_to_alaw(encode_speech("buenas", ms_per_char=10)))
    await caller.run()
    await c.server.closed.wait()
    assert [t.text for t in caller.results.bot_turns] == ["buenas"]
    assert c.server.of("start")[0]["start"]["media_format"]["encoding"] == "PCMA"
    payloads = [base64.b64decode(f["media"]["payload"]) for f in c.server.of("media")]
    assert all(len(p) == 160 for p in payloads)
    assert payloads[0] == b"\xd5" * 160  # A-law silence
    assert decode_speech(alaw_to_mulaw(b"".join(payloads))) == "hola mundo"


@pytest.mark.parametrize(
    ("call_codec", "asked", "forced", "streamed", "rate"),
    [
        ("PCMU", "PCMU", None, "PCMU", 8000),
        ("PCMA", "PCMU", None, "PCMU", 8000),  # transcoded: PCMU <-> PCMA is supported
        ("PCMU", "PCMA", None, "PCMA", 8000),
        ("PCMA", "default", None, "PCMA", 8000),
        ("G722", "PCMU", None, "G722", 16000),  # not transcodable: the call's codec
        ("OPUS", "PCMU", None, "OPUS", 48000),  # a WebRTC leg
        ("PCMU", "PCMU", "PCMA", "PCMA", 8000),  # the knob: whatever was asked
    ],
)
async def test_the_stream_codec_is_telnyxs_documented_choice(
    nursery, call_codec, asked, forced, streamed, rate
) -> None:
    """The asked codec if the call has it or it transcodes (PCMU <-> PCMA), else the call's
    own; the knob forces one. Every one streams (streamed_call waits for streaming.started),
    those the sim cannot encode with placeholder payloads."""
    c = await streamed_call(
        nursery, knobs={"call_codec": call_codec, "stream_codec": forced}, stream_codec=asked
    )
    await c.server.wait_for("media", 3)
    media_format = c.server.of("start")[0]["start"]["media_format"]
    assert media_format == {"encoding": streamed, "sample_rate": rate, "channels": 1}
    payloads = [base64.b64decode(f["media"]["payload"]) for f in c.server.of("media")]
    assert all(len(p) == 160 for p in payloads)
    assert c.stream.params.codec == streamed


async def test_out_of_order_knob_swaps_adjacent_frames(nursery) -> None:
    c = await streamed_call(nursery, knobs={"out_of_order_share": 0.3, "seed": 7})
    await trio.sleep(0.5)
    chunks = [int(f["media"]["chunk"]) for f in c.server.of("media")]
    assert chunks != sorted(chunks)
    assert set(range(1, max(chunks) - 1)) <= set(chunks)  # nothing lost, only swapped
    assert all(abs(chunk - i - 1) <= 1 for i, chunk in enumerate(chunks))


async def test_played_audio_and_mark_echo_after_playback(nursery) -> None:
    caller = ScriptedCaller([Wait(700)], ms_per_char=10, timeout_s=5)
    c = await streamed_call(nursery, caller)
    async with trio.open_nursery() as n:
        n.start_soon(caller.run)
        await c.server.send({"event": "mark", "mark": {"name": "empty"}})
        sent = trio.current_time()
        echo = (await c.server.wait_for("mark"))[0]
        assert trio.current_time() - sent < 0.1
        assert echo["mark"] == {"name": "empty"} and echo["stream_id"] == c.stream.params.stream_id
        assert isinstance(echo["sequence_number"], str)

        await c.server.play(encode_speech("good morning", ms_per_char=25))  # 300 ms
        await c.server.send({"event": "mark", "mark": {"name": "greeting"}})
        sent = trio.current_time()
        await c.server.wait_for("mark", count=2)
        elapsed = trio.current_time() - sent
        assert 0.28 <= elapsed <= 0.45, elapsed
    assert decode_speech(bytes(c.stream.played_audio)) == "good morning"
    assert [t.text for t in caller.results.bot_turns] == ["good morning"]
    assert c.stream.marks_echoed == ["empty", "greeting"]


async def test_clear_drops_queued_audio_and_returns_pending_marks(nursery) -> None:
    caller = ScriptedCaller([Wait(900)], ms_per_char=10, timeout_s=5, turn_gap_ms=200)
    c = await streamed_call(nursery, caller)
    text = "this is a long answer that the caller will not hear in full"
    async with trio.open_nursery() as n:
        n.start_soon(caller.run)
        await c.server.play(encode_speech(text, ms_per_char=20))  # 1.2 s
        await c.server.send({"event": "mark", "mark": {"name": "end-of-answer"}})
        await trio.sleep(0.3)
        await c.server.send({"event": "clear"})
        cleared = trio.current_time()
        echo = (await c.server.wait_for("mark"))[0]
        assert trio.current_time() - cleared < 0.1
        assert echo["mark"]["name"] == "end-of-answer"
        await trio.sleep(0.3)
        assert c.stream.playback.empty
    heard = caller.results.bot_turns[0]
    assert heard.cut and text.startswith(heard.text) and 5 <= len(heard.text) < len(text) // 2
    assert c.stream.clears == 1 and caller.results.clears == 1
    assert c.stream.played_bytes < 0.5 * 8000


async def test_bad_frames_get_error_frames_and_the_stream_goes_on(nursery) -> None:
    c = await streamed_call(nursery)
    await c.server.send("not json")
    await c.server.send(
        {"event": "media", "media": {"payload": base64.b64encode(b"\xff" * 100).decode()}}
    )
    await c.server.send({"event": "media", "media": {"payload": "!!!"}})
    await c.server.send({"event": "dance"})
    await c.server.send({"event": "mark", "mark": "not an object"})
    await c.server.send("[1, 2]")
    errors = await c.server.wait_for("error", count=6)
    codes = [e["error"]["code"] for e in errors]
    assert codes == ["100003", "100004", "100004", "100003", "100003", "100003"]
    assert errors[0]["error"]["title"] == "malformed_frame"
    assert errors[1]["error"]["title"] == "invalid_media" and errors[1]["stream_id"]
    before = len(c.server.of("media"))
    await trio.sleep(0.1)
    assert len(c.server.of("media")) > before


async def test_mp3_mode_does_not_play_raw_audio(nursery) -> None:
    c = await streamed_call(nursery, stream_bidirectional_mode="mp3")
    await c.server.play(encode_speech("lost", ms_per_char=10))
    await trio.sleep(0.1)
    assert c.stream.media_ignored == 1 and c.stream.played_bytes == 0


async def test_hangup_sends_stop_then_close_1000(nursery) -> None:
    c = await streamed_call(nursery)
    await trio.sleep(0.05)
    assert (await c.command("hangup")).status_code == 200
    await c.server.closed.wait()
    assert c.server.close_code == 1000
    last = c.server.frames[-1][1]
    assert last["event"] == "stop" and last["stream_id"] == c.stream.params.stream_id
    assert last["stop"]["call_control_id"] == c.call.call_control_id and last["stop"]["user_id"]
    await c.receiver.wait_for("call.hangup")
    types = c.receiver.types(c.call.call_control_id)
    assert types[-2:] == ["streaming.stopped", "call.hangup"]


async def test_streaming_stop_and_server_close_end_only_the_stream(nursery) -> None:
    c = await streamed_call(nursery)
    assert (await c.command("streaming_stop")).status_code == 200
    await c.server.closed.wait()
    assert c.server.of("stop") and c.server.close_code == 1000
    await c.receiver.wait_for("streaming.stopped")
    assert c.call.state == "answered" and c.call.line.stream is None

    second = await start_media_server(nursery)
    assert (await c.command("streaming_start", stream_url=second.url)).status_code == 200
    await c.receiver.wait_for("streaming.started", count=2)
    await second.wait_for("media")
    assert second.ws is not None
    await second.ws.aclose(1011, "server going away")
    await c.receiver.wait_for("streaming.stopped", count=2)
    assert c.call.streams[1].close_reason == "server_closed"
    assert c.call.state == "answered"


def test_playback_queue_marks_and_clear() -> None:
    playback = Playback()
    playback.push(b"a" * 200)
    playback.push_mark("m1")
    playback.push(b"b" * 100)
    assert playback.take(160) == b"a" * 160
    assert playback.reached_marks() == []
    assert playback.take(160) == b"a" * 40  # stops at the mark
    assert playback.reached_marks() == ["m1"]
    playback.push_mark("m2")
    assert playback.clear() == ["m2"]
    assert playback.empty and playback.queued_bytes == 0
