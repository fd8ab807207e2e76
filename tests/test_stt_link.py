"""``SttLink`` against the Deepgram simulator: drops, replay pacing, refusals, clean exit.

Timing tests run on trio's autojump clock: the simulator, the link and the caller share
it, so 20 ms frames are sent "in real time" and the simulator's per-stream rate is measured
on the same clock the link paces with, while the test itself takes a fraction of a second.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing
from conftest import count_fds, task_names

from voice_trio.providers.deepgram.link import (
    _EVENT_QUEUE_SIZE,
    SttLink,
    SttLost,
    _AudioRing,
    _EventQueue,
    _Pacer,
    _Timeline,
    open_stt_link,
)
from voice_trio.providers.deepgram.stt import (
    SpeechStarted,
    SttEvent,
    SttMetadata,
    SttOptions,
    SttRejected,
    SttUnavailable,
    Transcript,
    UtteranceEnd,
)
from voice_trio.sim.deepgram import DeepgramSim, serve
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR, encode_speech, silence

KEY = "dg-test-key"
OPTS = SttOptions()
PHRASE = "Quiero cambiar mi cita para el viernes."
GREETING = "Hola."
FRAME = 160  # 20 ms of mu-law 8 kHz
ENDPOINTING_S = OPTS.endpointing_ms / 1000  # type: ignore[operator]


def speech_s(text: str) -> float:
    return len(text) * DEFAULT_MS_PER_CHAR / 1000


@pytest.fixture
async def dg(nursery: trio.Nursery) -> AsyncIterator[tuple[DeepgramSim, str]]:
    sim = DeepgramSim()
    base = await nursery.start(partial(serve, sim))
    yield sim, base


async def speak(link: SttLink, audio: bytes) -> None:
    """Send ``audio`` in 20 ms frames on a real-time schedule (of the trio clock)."""
    deadline = trio.current_time()
    for pos in range(0, len(audio), FRAME):
        await link.send_audio(audio[pos : pos + FRAME])
        deadline += FRAME / 8000
        await trio.sleep_until(deadline)


async def collect(link: SttLink, out: list[SttEvent | BaseException]) -> None:
    try:
        async for event in link.events():
            out.append(event)
    except SttLost as exc:
        out.append(exc)


def finals(events: list[SttEvent | BaseException]) -> list[Transcript]:
    return [e for e in events if isinstance(e, Transcript) and e.is_final]


def assert_tiled(results: list[Transcript]) -> None:
    """Each final starts where the previous one ended: no gap, no overlap, one timeline."""
    for before, after in itertools.pairwise(results):
        assert after.start == pytest.approx(before.start + before.duration, abs=0.002)


async def test_drop_mid_utterance_replays_and_keeps_one_timeline(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    greeting_end = 0.4 + speech_s(GREETING)
    phrase_start = greeting_end + 0.7
    phrase_end = phrase_start + speech_s(PHRASE)
    audio = silence(400) + encode_speech(GREETING) + silence(700) + encode_speech(PHRASE)
    drop_at = phrase_start + 1.0  # mid-phrase, after the greeting's final
    sim.drop_next_stt_after_s = drop_at
    events: list[SttEvent | BaseException] = []
    catch_up_rate: float | None = None

    async with open_stt_link(base, KEY, OPTS) as link, trio.open_nursery() as nursery:
        nursery.start_soon(collect, link, events)
        await speak(link, audio + silence(600))
        # Live silence until the replay has caught up with the caller, then read the
        # new stream's rate: replay plus live, first to last byte, as the simulator sees it.
        with trio.fail_after(30):
            while link.reconnects == 0 or link.backlog_seconds > 0.05:
                await speak(link, silence(100))
        catch_up_rate = sim.stt_streams[1].rate
        await speak(link, silence(1400))
        metadata = await link.close_stream(timeout=5)

    assert link.reconnects == 1 and link.lost is None
    assert [s.close_code for s in sim.stt_streams] == [1011, 1000]
    assert sim.stt_streams[0].audio_seconds == pytest.approx(drop_at, abs=0.021)
    assert catch_up_rate is not None and 1.1 < catch_up_rate <= 1.25
    assert all(s.rate is not None and s.rate <= 1.25 for s in sim.stt_streams)
    assert isinstance(metadata, SttMetadata)
    assert metadata.request_id == link.request_id == sim.stt_streams[1].request_id

    # The phrase arrives whole, once, in one speech_final from the new connection (the
    # first one never got its end), with its times on the caller's timeline.
    spoken = finals(events)
    assert [f.text for f in spoken if f.text] == [GREETING, PHRASE]
    phrase = next(f for f in spoken if f.text == PHRASE)
    assert phrase.speech_final
    assert phrase_end > sim.stt_streams[0].audio_seconds
    assert phrase.start == pytest.approx(greeting_end + ENDPOINTING_S, abs=0.021)
    assert phrase.start + phrase.duration == pytest.approx(phrase_end + ENDPOINTING_S, abs=0.03)
    assert_tiled(spoken)
    onsets = [e.timestamp for e in events if isinstance(e, SpeechStarted)]
    assert onsets == sorted(onsets)
    assert onsets[-1] == pytest.approx(phrase_start, abs=0.021)
    starts = [e.start for e in events if isinstance(e, Transcript)]
    assert starts == sorted(starts)
    ends = [e.last_word_end for e in events if isinstance(e, UtteranceEnd)]
    assert ends and ends[-1] == pytest.approx(phrase_end, abs=0.021)

    # Usage: every byte Deepgram received (the replay too) versus what the caller said.
    assert link.audio_seconds == pytest.approx(sum(sim.stt_audio_seconds))
    replay_start = greeting_end + ENDPOINTING_S  # where the greeting's final ended
    assert sim.stt_streams[1].audio_seconds == pytest.approx(
        link.caller_audio_seconds - replay_start, abs=0.021
    )
    assert link.audio_seconds > link.caller_audio_seconds


async def test_replay_buffer_is_capped_and_the_timeline_follows(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    sim.drop_next_stt_after_s = 2.0  # no final before it: the whole 2 s is unconfirmed
    events: list[SttEvent | BaseException] = []
    async with (
        open_stt_link(base, KEY, OPTS, replay_seconds=1.0, backoff=(0.2, 1.0)) as link,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, link, events)
        await speak(link, encode_speech(PHRASE) + silence(8000))
        await link.close_stream(timeout=5)
    assert link.reconnects == 1
    # 2 s sent when it dropped, 0.2 s more while waiting to reconnect: 1.2 s fell out.
    assert link.lost_audio_seconds == pytest.approx(1.2, abs=0.03)
    assert sim.stt_streams[1].audio_seconds == pytest.approx(
        link.caller_audio_seconds - link.lost_audio_seconds, abs=0.01
    )
    spoken = finals(events)
    first_after = next(f for f in spoken if f.text)
    assert first_after.start == pytest.approx(link.lost_audio_seconds, abs=0.01)
    assert first_after.text and first_after.text in PHRASE and first_after.text != PHRASE
    assert_tiled(spoken)


async def test_reconnect_retries_a_refusal_then_recovers(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    sim.drop_next_stt_after_s = 1.0
    events: list[SttEvent | BaseException] = []
    async with open_stt_link(base, KEY, OPTS) as link, trio.open_nursery() as nursery:
        nursery.start_soon(collect, link, events)
        sim.reject_next_stt = 503  # taken by the first reconnect, not by the open above
        await speak(link, encode_speech(PHRASE) + silence(12000))
        await link.close_stream(timeout=5)
    assert link.reconnects == 2 and sim.stt_rejected == 1 and len(sim.stt_streams) == 2
    assert [f.text for f in finals(events) if f.text] == [PHRASE]


async def test_repeated_drops_end_in_stt_lost(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    sim.close_stt_after_s = 0.5  # every stream, before any final can come
    events: list[SttEvent | BaseException] = []
    async with open_stt_link(base, KEY, OPTS, max_reconnects=2) as link:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, link, events)
            with trio.fail_after(20):
                while link.lost is None:
                    await speak(link, encode_speech(PHRASE))
        await link.send_audio(b"\xff" * FRAME)  # ignored, not an error: the call goes on
    assert isinstance(events[-1], SttLost)
    assert "2 reconnect attempts" in str(events[-1])
    assert link.reconnects == 2 and len(sim.stt_streams) == 3
    assert all(s.close_code == 1011 for s in sim.stt_streams)
    assert not finals(events)


async def test_reconnect_refused_401_is_lost_at_once(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    sim.drop_next_stt_after_s = 0.5
    events: list[SttEvent | BaseException] = []
    async with open_stt_link(base, KEY, OPTS) as link, trio.open_nursery() as nursery:
        nursery.start_soon(collect, link, events)
        sim.reject_next_stt = 401
        await speak(link, encode_speech(PHRASE))
    lost = events[-1]
    assert isinstance(lost, SttLost) and "401" in lost.reason
    assert isinstance(lost.__cause__, SttRejected) and lost.__cause__.status == 401
    assert link.reconnects == 1 and sim.stt_rejected == 1


@pytest.mark.parametrize("status", [401, 403, 503])
async def test_refusal_at_start_comes_out_of_open(dg: tuple[DeepgramSim, str], status: int) -> None:
    sim, base = dg
    sim.reject_next_stt = status
    with pytest.raises(SttRejected) as caught:
        async with open_stt_link(base, KEY, OPTS):
            pytest.fail("the block must not run")
    assert caught.value.status == status
    assert not sim.stt_streams


async def test_unreachable_at_start_comes_out_of_open() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(SttUnavailable):
        async with open_stt_link(f"http://127.0.0.1:{port}", KEY, OPTS, connect_timeout=1):
            pytest.fail("the block must not run")


async def test_finalize_waits_for_queued_audio_and_close_ends_events(
    dg: tuple[DeepgramSim, str], autojump_clock: trio.testing.MockClock
) -> None:
    sim, base = dg
    events: list[SttEvent | BaseException] = []
    async with open_stt_link(base, KEY, OPTS) as link:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, link, events)
            await speak(link, silence(300) + encode_speech(GREETING))
            await link.finalize()
            await speak(link, silence(200))
            assert await link.close_stream(timeout=5) is not None
        await link.send_audio(b"\xff" * FRAME)  # after close: ignored
    flushed = [f for f in finals(events) if f.from_finalize]
    assert [f.text for f in flushed] == [GREETING]
    assert isinstance(events[-1], SttMetadata) and link.reconnects == 0
    assert sim.stt_streams[0].audio_seconds == pytest.approx(link.caller_audio_seconds)


async def test_leaving_the_block_mid_reconnect_leaves_nothing_behind(
    dg: tuple[DeepgramSim, str],
) -> None:
    sim, base = dg
    tasks_before, fds_before = Counter(task_names()), count_fds()
    sim.drop_next_stt_after_s = 0.2
    async with open_stt_link(base, KEY, OPTS, backoff=(30.0, 30.0)) as link:
        assert Counter(task_names()) - tasks_before  # the link's tasks are running
        await speak(link, silence(300))
        with trio.fail_after(2):
            while link.reconnects == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
    with trio.fail_after(2):
        # The simulator's side of the socket ends a moment after ours.
        while Counter(task_names()) - tasks_before or count_fds() > fds_before:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert link.lost is None


async def test_block_error_comes_out_bare(dg: tuple[DeepgramSim, str]) -> None:
    _, base = dg
    with pytest.raises(KeyError):
        async with open_stt_link(base, KEY, OPTS):
            raise KeyError("from the body")


def test_audio_ring_drops_oldest_and_releases_whole_frames() -> None:
    ring = _AudioRing(capacity=8, frame=2)
    ring.append(b"abcdef")
    ring.append(b"ghij")  # 10 bytes: the oldest 2 go
    assert (ring.start, ring.end) == (2, 10)
    assert ring.read(4, 3) == b"efg"
    ring.release(7)  # rounds down to a frame: keeps byte 6 onwards
    assert ring.start == 6 and ring.read(6, 10) == b"ghij"
    ring.release(3)  # already gone: nothing happens
    assert ring.start == 6


def test_timeline_maps_connection_times_through_jumps() -> None:
    timeline = _Timeline(link_start=8000, bytes_per_second=8000)  # began at link 1.0 s
    assert timeline.to_link(0.5) == 1.5
    timeline.jump(conn_pos=8000, link_pos=24000)  # after 1 s sent, 1 s of audio was skipped
    assert timeline.to_link(0.5) == 1.5
    assert timeline.to_link(1.25) == 3.25


async def test_pacer_holds_a_replay_to_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    pacer = _Pacer(rate=1.2, slack=0.25)
    start = trio.current_time()
    for _ in range(100):  # 2 s of audio in 20 ms chunks
        await pacer.ready(0.02)
    assert trio.current_time() - start == pytest.approx(2.0 / 1.2, abs=0.001)
    await trio.sleep(10)  # idle: only `slack` of allowance is kept (plus the first chunk)
    start = trio.current_time()
    for _ in range(50):
        await pacer.ready(0.02)
    assert trio.current_time() - start == pytest.approx(0.98 / 1.2 - 0.25, abs=0.001)


async def test_the_event_queue_keeps_order_back_pressure_and_both_ends() -> None:
    """What the link's queue took over from a trio memory channel: order, a sender that
    waits while it is full, the receiver's end after the sender's close, both closes."""
    queue = _EventQueue()
    got: list[object] = []

    async def consume() -> None:
        try:
            while True:
                got.append(await queue.receive())
        except trio.EndOfChannel:
            got.append("end")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(3 * _EVENT_QUEUE_SIZE):
            await queue.send(UtteranceEnd(last_word_end=float(i)))
        queue.close()
    assert got[-1] == "end" and len(got) == 3 * _EVENT_QUEUE_SIZE + 1
    ends = [e.last_word_end for e in got if isinstance(e, UtteranceEnd)]
    assert ends == [float(i) for i in range(3 * _EVENT_QUEUE_SIZE)]

    full = _EventQueue()
    for i in range(_EVENT_QUEUE_SIZE):
        await full.send(UtteranceEnd(last_word_end=float(i)))
    with trio.move_on_after(0.05) as waited:
        await full.send(UtteranceEnd(last_word_end=-1.0))
    assert waited.cancelled_caught  # full: the sender waits, nothing is dropped or added
    assert (await full.receive()) == UtteranceEnd(last_word_end=0.0)

    async with trio.open_nursery() as nursery:
        broken = trio.Event()

        async def send_into_full() -> None:
            await full.send(UtteranceEnd(last_word_end=-2.0))  # fills the freed place
            with pytest.raises(trio.BrokenResourceError):
                await full.send(UtteranceEnd(last_word_end=-3.0))
            broken.set()

        nursery.start_soon(send_into_full)
        await trio.testing.wait_all_tasks_blocked()
        full.close_receiving()
        await broken.wait()
    with pytest.raises(trio.ClosedResourceError):
        await full.receive()
