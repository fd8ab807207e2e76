"""``SttLink`` batches live caller audio and keeps the socket alive: what Deepgram
receives, and when.

A fake ``open_stream`` records every send with its time on trio's autojump clock, so the
timing is exact and no socket is involved. The replay pacer (at most 1.2x real time from
a connection's first byte) also holds the first batches of a connection a little, so the
timing tests start after a second of audio.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from voice_trio.providers.deepgram.link import open_stt_link
from voice_trio.providers.deepgram.stt import SpeechStarted, SttEvent, SttOptions, Transcript

FRAME = 160  # 20 ms of mu-law 8 kHz
BATCH = 800  # 100 ms


class FakeStream:
    def __init__(self) -> None:
        self.request_id = "fake"
        self.sent: list[tuple[float, str, int]] = []  # (time, kind, bytes)
        self._send, self._recv = trio.open_memory_channel[SttEvent](16)

    async def send_audio(self, chunk: bytes) -> None:
        self.sent.append((trio.current_time(), "audio", len(chunk)))
        await trio.lowlevel.checkpoint()

    async def finalize(self) -> None:
        self.sent.append((trio.current_time(), "finalize", 0))
        await trio.lowlevel.checkpoint()

    async def keep_alive(self) -> None:
        self.sent.append((trio.current_time(), "keepalive", 0))
        await trio.lowlevel.checkpoint()

    async def close_stream(self, timeout: float = 5.0) -> None:
        self.sent.append((trio.current_time(), "close", 0))
        self._send.close()
        await trio.lowlevel.checkpoint()

    async def events(self) -> AsyncIterator[SttEvent]:
        async for event in self._recv:
            yield event

    def audio(self) -> list[tuple[float, int]]:
        return [(t, n) for t, kind, n in self.sent if kind == "audio"]


@pytest.fixture
def fake() -> FakeStream:
    return FakeStream()


def opener(fake: FakeStream) -> Any:
    @asynccontextmanager
    async def open_stream(*args: Any, **kwargs: Any) -> AsyncIterator[FakeStream]:
        yield fake

    return open_stream


async def frames(link: Any, count: int, gap: float = 0.02) -> None:
    """``count`` 20 ms frames on a real-time schedule, the first one now."""
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i * gap)
        await link.send_audio(b"\xff" * FRAME)


async def warm(link: Any, fake: FakeStream) -> float:
    """A second of live audio, so the pacer no longer holds anything; returns the time."""
    await frames(link, 50)
    await trio.sleep(0.2)
    fake.sent.clear()
    return trio.current_time()


def rates(sent: list[tuple[float, int]], bps: int = 8000) -> list[float]:
    """The stream's rate (audio s per s, first to last byte) after each send."""
    out, total = [], 0
    for t, n in sent:
        total += n
        if t > sent[0][0]:
            out.append(total / bps / (t - sent[0][0]))
    return out


def transcript(text: str, *, is_final: bool = False, speech_final: bool = False) -> Transcript:
    return Transcript(text, 0.9, is_final, speech_final, False, 0.0, 0.5, tuple(text.split()))


async def test_live_audio_goes_out_in_100_ms_batches(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await frames(link, 100)  # two seconds of audio
        await trio.sleep(0.2)
        first_two_seconds = fake.audio()
        t0 = await warm(link, fake)
        await frames(link, 50)
        await trio.sleep(0.2)
    assert sum(n for _, n in first_two_seconds) == 100 * FRAME
    assert len(first_two_seconds) <= 30  # not 100 messages
    assert max(rates(first_two_seconds)) <= 1.2 + 1e-9  # the pacer is unchanged
    # Once the connection is past its start, each batch leaves as its fifth frame
    # arrives: 100 ms per message, the oldest byte waited 80 ms.
    assert [(round(t - t0, 3), n) for t, n in fake.audio()] == [
        (round(0.08 + 0.1 * i, 3), BATCH) for i in range(10)
    ]


async def test_a_partial_batch_leaves_after_at_most_100_ms(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        t0 = await warm(link, fake)
        await frames(link, 2)  # the carrier stalls after 40 ms of audio
        await trio.sleep(0.5)
    assert [(round(t - t0, 3), n) for t, n in fake.audio()] == [(0.1, 2 * FRAME)]


async def test_two_frame_batches_while_the_caller_speaks(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await warm(link, fake)
        await fake._send.send(SpeechStarted(timestamp=0.0))
        await trio.sleep(0.01)
        t0 = trio.current_time()
        await frames(link, 10)
        await trio.sleep(0.001)
        # Each pair leaves as its second frame arrives: the first waited 20 ms.
        assert [(round(t - t0, 3), n) for t, n in fake.audio()] == [
            (round(0.02 + 0.04 * i, 3), 2 * FRAME) for i in range(5)
        ]
        fake.sent.clear()
        await frames(link, 1)  # a lone frame waits 40 ms at most
        await trio.sleep(0.1)
        assert [n for _, n in fake.audio()] == [FRAME]
        await fake._send.send(transcript("hola", is_final=True, speech_final=True))
        await trio.sleep(0.01)
        fake.sent.clear()
        await frames(link, 10)
        await trio.sleep(0.2)
    assert [n for _, n in fake.audio()] == [BATCH, BATCH]  # 100 ms batches after the turn


async def test_speech_batch_seconds_zero_sends_speech_frame_by_frame(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link(
        "ws://x", "k", SttOptions(), open_stream=opener(fake), speech_batch_seconds=0
    ) as link:
        await warm(link, fake)
        await fake._send.send(SpeechStarted(timestamp=0.0))
        await trio.sleep(0.01)
        await frames(link, 10)
        await trio.sleep(0.001)
    assert [n for _, n in fake.audio()] == [FRAME] * 10  # on arrival


async def test_words_in_an_interim_start_the_speaking_state_and_flush_the_batch(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await warm(link, fake)
        await frames(link, 2)
        t = trio.current_time()
        await fake._send.send(transcript("quiero"))
        await trio.sleep(0.001)
        assert [(round(at - t, 3), n) for at, n in fake.audio()] == [(0.0, 2 * FRAME)]


async def test_finalize_flushes_the_partial_batch_first(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await warm(link, fake)
        await frames(link, 3)
        t = trio.current_time()
        await link.finalize()
        await trio.sleep(0.001)
        sent = [(round(at - t, 3), kind, n) for at, kind, n in fake.sent]
    assert sent[:2] == [(0.0, "audio", 3 * FRAME), (0.0, "finalize", 0)]


async def test_close_stream_sends_the_partial_batch_before_closing(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await warm(link, fake)
        await frames(link, 3)
        await link.close_stream(timeout=1)
    assert [(kind, n) for _, kind, n in fake.sent] == [("audio", 3 * FRAME), ("close", 0)]


async def test_batch_seconds_zero_sends_every_frame(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link(
        "ws://x", "k", SttOptions(), open_stream=opener(fake), batch_seconds=0
    ) as link:
        await warm(link, fake)
        await frames(link, 5)
        await trio.sleep(0.1)
    assert [n for _, n in fake.audio()] == [FRAME] * 5


async def test_the_pump_keeps_an_idle_socket_alive_and_only_an_idle_one(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        await frames(link, 50)
        await trio.sleep(9)  # the carrier stalls: nothing to send
        audio_end = max(t for t, kind, _ in fake.sent if kind == "audio")
        idle = [round(t - audio_end, 3) for t, kind, _ in fake.sent if kind == "keepalive"]
        assert idle == [4.0, 8.0]  # KEEPALIVE_SECONDS after the last frame, then again
        fake.sent.clear()
        await frames(link, 500)  # ten seconds of audio: no KeepAlive among it
        assert {kind for _, kind, _ in fake.sent} == {"audio"}
        await link.close_stream(timeout=1)
        await trio.sleep(10)  # none after CloseStream either
    assert [kind for _, kind, _ in fake.sent if kind != "audio"] == ["close"]


async def test_keepalive_interval_none_sends_none(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_stt_link(
        "ws://x", "k", SttOptions(), open_stream=opener(fake), keepalive_interval=None
    ) as link:
        await frames(link, 5)
        await trio.sleep(30)
    assert {kind for _, kind, _ in fake.sent} == {"audio"}


async def test_speech_batch_seconds_is_bounded_by_the_batch(fake: FakeStream) -> None:
    with pytest.raises(ValueError, match="speech_batch_seconds"):
        async with open_stt_link(
            "ws://x",
            "k",
            SttOptions(),
            open_stream=opener(fake),
            batch_seconds=0.05,
            speech_batch_seconds=0.06,
        ):
            pass


async def test_batch_seconds_is_bounded(fake: FakeStream) -> None:
    with pytest.raises(ValueError):
        async with open_stt_link(
            "ws://x", "k", SttOptions(), open_stream=opener(fake), batch_seconds=0.5
        ):
            pass


def test_the_replay_ring_gives_memory_back_once_released() -> None:
    from voice_trio.providers.deepgram.link import _AudioRing

    ring = _AudioRing(80_000, 1)
    for _ in range(400):  # 8 s of audio
        ring.append(b"\xff" * FRAME)
    assert ring._data.__sizeof__() > 60_000
    ring.release(ring.end - 2 * FRAME)  # a final covered all but the last 40 ms
    assert ring.start == 398 * FRAME and ring.end == 400 * FRAME
    assert ring.read(ring.start, 10_000) == b"\xff" * 2 * FRAME
    assert ring._data.__sizeof__() < 4_096


async def test_a_gathered_read_counts_its_batch_wait_from_when_the_audio_arrived(
    fake: FakeStream, autojump_clock: trio.testing.MockClock
) -> None:
    """The carrier socket read 80 ms of audio at once, 80 ms after it began to arrive: the
    batch does not wait another 100 ms for its fifth frame, it leaves when the oldest
    byte has waited 100 ms in all."""
    async with open_stt_link("ws://x", "k", SttOptions(), open_stream=opener(fake)) as link:
        t0 = await warm(link, fake)
        await trio.sleep(0.08)
        for _ in range(4):
            await link.send_audio(b"\xff" * FRAME, arrived=t0)
        await trio.sleep(0.5)
        # An arrival "later" than now is read as now: it never delays a batch.
        t1 = trio.current_time()
        await link.send_audio(b"\xff" * FRAME, arrived=t1 + 5)
        await trio.sleep(0.5)
    assert [(round(t - t0, 3), n) for t, n in fake.audio()] == [
        (0.1, 4 * FRAME),
        (round(t1 - t0 + 0.1, 3), FRAME),
    ]
