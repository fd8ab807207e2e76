"""Call recordings (RECORD_CALLS): the writer's placement of both sides by time, the files'
names and sweep, the settings, and whole calls against the simulators."""

import os
import time
import wave
from array import array

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.audio import linear_to_mulaw
from voice_trio.config import ConfigError, Settings
from voice_trio.media.recording import CallRecording
from voice_trio.recordings import delete_recording, file_name, find_recording, sweep
from voice_trio.sim.caller import BargeIn, HangUp, Say, ScriptedCaller, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

LOUD = bytes([linear_to_mulaw(8000)])
PATIENT = "+573001234567"


def channels(pcm: bytes) -> tuple[array, array]:
    samples = array("h", pcm)
    return samples[0::2], samples[1::2]


def loud_ms(track: array, start_s: float, end_s: float) -> float:
    """Milliseconds of non-silent audio in ``[start_s, end_s)`` of a channel."""
    lo, hi = max(0, int(start_s * 8000)), max(0, int(end_s * 8000))
    return sum(1 for v in track[lo:hi] if abs(v) > 64) / 8


def test_both_sides_are_placed_by_time_and_a_clear_drops_the_unheard_rest() -> None:
    rec = CallRecording("/nonexistent", "v3:x", "PCMU", origin=100.0)
    rec.bot_audio(LOUD * 800, at=100.1)  # heard from 100 ms to 200 ms
    rec.caller_frame(LOUD * 160, at=100.5)  # arrived at 500 ms: 480..500 ms
    rec.bot_audio(LOUD * 4000, at=100.6)  # scheduled 600 ms..1.1 s
    rec.unheard_after(100.7)  # barge-in at 700 ms: the rest never played
    caller, bot = channels(rec.take(102.0))
    assert len(caller) == len(bot) == 16000
    assert loud_ms(bot, 0.1, 0.2) == 100 and loud_ms(bot, 0.0, 0.1) == 0
    assert loud_ms(bot, 0.6, 0.7) == 100 and loud_ms(bot, 0.7, 2.0) == 0
    assert loud_ms(caller, 0.48, 0.5) == 20 and loud_ms(caller, 0, 0.48) == 0
    assert rec.take(102.0) == b""  # nothing twice


def test_a_burst_of_caller_frames_follows_on_instead_of_overwriting() -> None:
    rec = CallRecording("/nonexistent", "v3:x", "PCMU", origin=0.0)
    for _ in range(3):
        rec.caller_frame(LOUD * 160, at=0.2)
    caller, _ = channels(rec.take(1.0))
    assert loud_ms(caller, 0.18, 0.24) == 60


def test_pcma_caller_audio_is_decoded_as_a_law() -> None:
    rec = CallRecording("/nonexistent", "v3:x", "PCMA", origin=0.0)
    rec.caller_frame(bytes([0xD5]) * 160, at=0.02)  # A-law silence
    caller, bot = channels(rec.take(0.02))
    assert max(abs(v) for v in caller) <= 8 and set(bot) == {0}


async def test_the_file_is_written_as_the_call_goes_and_placed_when_it_ends(tmp_path) -> None:
    rec = CallRecording(str(tmp_path), "v3:../../etc/passwd", "PCMU", origin=trio.current_time())
    async with trio.open_nursery() as nursery:
        assert await nursery.start(rec.run)
        rec.bot_audio(LOUD * 8000, trio.current_time())
        await trio.sleep(1.3)
        assert rec.part.exists() and not rec.final.exists()
        assert rec.samples_written >= 8000  # written out, not held
        rec.bot_audio(LOUD * 8000, trio.current_time() + 0.1)  # never played: cut by the end
        nursery.cancel_scope.cancel()
    assert not rec.part.exists()
    assert [p.name for p in tmp_path.iterdir()] == [rec.final.name]
    with wave.open(str(rec.final)) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        assert 1.25 < wav.getnframes() / 8000 < 1.6


def test_file_names_are_safe_and_distinct() -> None:
    names = {file_name(ccid) for ccid in ("v3:a/b", "v3:a_b", "../../x", "v3:a:b", "")}
    assert len(names) == 5
    for name in names:
        assert "/" not in name and ".." not in name and name.endswith(".wav")


def test_the_sweep_deletes_old_recordings_only(tmp_path) -> None:
    old, new, other = tmp_path / file_name("old"), tmp_path / file_name("new"), tmp_path / "x.txt"
    for path in (old, new, other):
        path.write_bytes(b"RIFF")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    os.utime(other, (month_ago, month_ago))
    assert sweep(tmp_path, 30 * 86400) == 1
    assert not old.exists() and new.exists() and other.exists()
    assert find_recording(str(tmp_path), "new") == new
    assert delete_recording(str(tmp_path), "new") and not new.exists()
    assert not delete_recording(str(tmp_path), "new")


def test_settings(tmp_path) -> None:
    base = {"SQLITE_PATH": str(tmp_path / "calls.sqlite3")}
    assert not Settings.from_env(base, None).record_calls
    s = Settings.from_env({**base, "RECORD_CALLS": "true"}, None)
    assert s.recordings_dir == str(tmp_path / "recordings")
    assert s.recording_retention_days == 30
    with pytest.raises(ConfigError, match="RECORDINGS_DIR"):
        Settings.from_env({"RECORD_CALLS": "true", "DATABASE_URL": "postgresql://h/db"}, None)
    s = Settings.from_env(
        {"RECORD_CALLS": "true", "DATABASE_URL": "postgresql://h/db", "RECORDINGS_DIR": "rec"},
        None,
    )
    assert s.recordings_dir == "rec"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="RECORDINGS_DIR"):
        Settings.from_env({"RECORD_CALLS": "true", "RECORDINGS_DIR": str(tmp_path / "file")}, None)


async def test_a_recorded_call_keeps_both_sides_where_they_were_heard(
    nursery, lab, tmp_path
) -> None:
    rec_dir = tmp_path / "rec"
    server = await start_lab_server(nursery, lab, RECORD_CALLS="true", RECORDINGS_DIR=str(rec_dir))
    party = ScriptedCaller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Necesito información sobre los horarios de atención de la clínica.", 100),
            BargeIn(after_bot_ms=500, text="Espere, otra cosa."),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ],
        ms_per_char=FAST_SPEECH_MS,
        turn_gap_ms=300,
        timeout_s=30,
    )
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(8):  # the file is in place before the call leaves the registry
        await server.app.center.registry.wait_until_empty()
    assert not results.errors and results.clears >= 1
    [path] = list(rec_dir.glob("*.wav"))
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        caller, bot = channels(wav.readframes(wav.getnframes()))
    # The file's clock starts with the call; align it on the first audio the caller heard.
    first_bot = next(i for i, v in enumerate(bot) if abs(v) > 64) / 8000
    shift = results.bot_turns[0].started_at - first_bot
    spoken = [u for u in results.utterances if u.started_at and u.ended_at]
    duration = len(bot) / 8000
    assert spoken[-1].ended_at - shift < duration < spoken[-1].ended_at - shift + 5
    for u in spoken:
        start, end = u.started_at - shift, u.ended_at - shift
        assert loud_ms(caller, start, end) > 0.5 * (end - start) * 1000, u.text
    for turn in results.bot_turns:
        if turn.ended_at is not None:
            start, end = turn.started_at - shift, turn.ended_at - shift
            assert loud_ms(bot, start, end) > 0.5 * (end - start) * 1000, turn.text
    # The barge-in: what was sent after the clear was never heard, nor recorded.
    cut = next(t for t in results.bot_turns if t.cut)
    after = next(t.started_at for t in results.bot_turns if t.started_at > cut.started_at)
    assert cut.ended_at is not None
    assert loud_ms(bot, cut.ended_at - shift + 0.12, after - shift - 0.05) < 10
    # The notice came first, before the greeting.
    assert "grabada" in results.bot_turns[0].text


async def test_without_record_calls_nothing_is_written(nursery, lab, tmp_path) -> None:
    rec_dir = tmp_path / "rec"
    server = await start_lab_server(nursery, lab, RECORDINGS_DIR=str(rec_dir))
    party = ScriptedCaller(
        [WaitForBot(min_ms_silence=300), Say("Hola.", 100), WaitForBot(300), HangUp()],
        ms_per_char=FAST_SPEECH_MS,
        timeout_s=20,
    )
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    assert not results.errors
    assert "grabada" not in results.bot_turns[0].text
    assert not rec_dir.exists()
