"""Finalize: the Deepgram simulator flushes on request, and SttLink delivers it, also
across a reconnect (the Finalize waits for the replayed audio)."""

from __future__ import annotations

import trio
from conftest import FAST_SPEECH_MS

from voice_trio.providers.deepgram.link import open_stt_link
from voice_trio.providers.deepgram.stt import SttOptions, Transcript
from voice_trio.sim.lab import DEEPGRAM_KEY
from voice_trio.sim.speech import encode_speech, silence

TEXT = "Quiero una cita para el lunes."


async def _flushed_final(lab, drop_after_s: float | None) -> tuple[Transcript, float]:
    lab.deepgram.drop_next_stt_after_s = drop_after_s
    opts = SttOptions(endpointing_ms=300, utterance_end_ms=None, interim_results=False)
    audio = encode_speech(TEXT, FAST_SPEECH_MS) + silence(160)
    async with open_stt_link(
        lab.deepgram_url, DEEPGRAM_KEY, opts, backoff=(0.01, 0.05), batch_seconds=0
    ) as link:
        for i in range(0, len(audio), 160):
            await link.send_audio(audio[i : i + 160])
        asked = trio.current_time()
        await link.finalize()
        with trio.fail_after(5):
            async for event in link.events():
                if isinstance(event, Transcript) and event.is_final and event.text:
                    return event, trio.current_time() - asked
    raise AssertionError("no final")


async def test_finalize_flushes_at_once_without_waiting_for_endpointing(lab) -> None:
    final, waited = await _flushed_final(lab, drop_after_s=None)
    assert final.from_finalize and not final.speech_final
    assert final.text == TEXT
    # Only 160 ms of silence were sent: endpointing (300 ms) could not have fired.
    assert final.start + final.duration >= len(TEXT) * FAST_SPEECH_MS / 1000
    assert waited < 1.0


async def test_finalize_survives_a_reconnect_and_covers_the_replayed_audio(lab) -> None:
    final, _ = await _flushed_final(lab, drop_after_s=0.3)
    assert lab.deepgram.stt_connections_opened == 2
    assert final.from_finalize and final.text == TEXT
