"""``CallRecording``: both sides of one media call, as one stereo WAV (``RECORD_CALLS``).

Caller on the left, bot on the right; 8 kHz, 16-bit PCM decoded from the stream's G.711.
Both tracks are placed on the call's clock (``trio.current_time()``): a caller frame where
it arrived, the bot's audio where playback (``media.playback``) schedules it to be heard.
The bot's audio is scheduled up to the pacing lead ahead of the clock, and a barge-in's
``clear`` drops what was sent but not yet played (``unheard_after``): the file keeps what
the caller heard, not what was sent.

Memory stays bounded: only audio not yet on the clock's past is kept (about a second, plus
the pacing lead); the writer task (``run``) appends the rest to ``.<name>.part`` every
``FLUSH_SECONDS`` in a worker thread, and when the call ends — also when it is cancelled:
shielded, bounded — writes the last of it, fixes the WAV header and renames the file into
place. A recording that cannot be written is logged and dropped; the call goes on.
"""

from __future__ import annotations

import logging
import os
import wave
from pathlib import Path

import trio

from voice_trio.audio import (
    ALAW_SILENCE,
    MULAW_SILENCE,
    SAMPLE_RATE,
    alaw_to_linear,
    mulaw_to_linear,
)
from voice_trio.recordings import part_path, recording_path

log = logging.getLogger("voice_trio.calls")

FLUSH_SECONDS = 1.0
CLOSE_SECONDS = 5.0
# If the disk stalls, audio further than this past the written part is dropped, not kept.
MAX_BUFFER_SAMPLES = 60 * SAMPLE_RATE


def _halves(decode: list[int]) -> tuple[bytes, bytes]:
    """Tables from a G.711 byte to the low and high byte of its 16-bit sample, so that
    decoding a track is two ``bytes.translate`` calls (in C)."""
    return bytes(v & 0xFF for v in decode), bytes((v >> 8) & 0xFF for v in decode)


MULAW_HALVES = _halves([mulaw_to_linear(b) for b in range(256)])
ALAW_HALVES = _halves([alaw_to_linear(b) for b in range(256)])


class CallRecording:
    """Both sides of one call on its way to ``<RECORDINGS_DIR>/<name>.wav``."""

    def __init__(self, directory: str, call_control_id: str, encoding: str, origin: float) -> None:
        self.final = recording_path(directory, call_control_id)
        self.part = part_path(directory, call_control_id)
        self.origin = origin
        alaw = encoding == "PCMA"
        self._caller_halves = ALAW_HALVES if alaw else MULAW_HALVES
        self._caller_silence = ALAW_SILENCE if alaw else MULAW_SILENCE
        self._caller = bytearray()  # G.711 of the stream's codec, from sample ``_base``
        self._bot = bytearray()  # mu-law, from sample ``_base``
        self._base = 0
        self._caller_end = 0
        self._wav: wave.Wave_write | None = None
        self.samples_written = 0

    def _index(self, at: float) -> int:
        return max(0, round((at - self.origin) * SAMPLE_RATE))

    def caller_frame(self, payload: bytes, at: float) -> None:
        """A caller frame that arrived at ``at``: it holds the audio just before then. A
        frame that came in a burst follows the previous one instead of overwriting it."""
        pos = max(self._index(at) - len(payload), self._caller_end)
        self._put(self._caller, self._caller_silence, pos, payload)
        self._caller_end = pos + len(payload)

    def bot_audio(self, audio: bytes, at: float) -> None:
        """Bot audio (mu-law) that starts playing at ``at``."""
        self._put(self._bot, MULAW_SILENCE, self._index(at), audio)

    def unheard_after(self, at: float) -> None:
        """Playback was cleared at ``at``: bot audio scheduled after it was never heard."""
        keep = self._index(at) - self._base
        if keep < len(self._bot):
            del self._bot[max(0, keep) :]

    def _put(self, track: bytearray, silence: int, pos: int, data: bytes) -> None:
        at = pos - self._base
        if at < 0:  # already written out: keep only what is still ahead
            data, at = data[-at:], 0
        if at + len(data) > MAX_BUFFER_SAMPLES:
            return
        if len(track) < at:
            track.extend(bytes([silence]) * (at - len(track)))
        track[at : at + len(data)] = data

    def take(self, until: float) -> bytes:
        """The stereo PCM of everything before ``until``, removed from the buffers."""
        count = self._index(until) - self._base
        if count <= 0:
            return b""
        caller = self._cut(self._caller, self._caller_silence, count)
        bot = self._cut(self._bot, MULAW_SILENCE, count)
        self._base += count
        out = bytearray(4 * count)
        lo, hi = self._caller_halves
        out[0::4], out[1::4] = caller.translate(lo), caller.translate(hi)
        lo, hi = MULAW_HALVES
        out[2::4], out[3::4] = bot.translate(lo), bot.translate(hi)
        return bytes(out)

    @staticmethod
    def _cut(track: bytearray, silence: int, count: int) -> bytes:
        head = bytes(track[:count])
        del track[:count]
        return head + bytes([silence]) * (count - len(head))

    async def run(self, *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file (started: True, or False if it cannot be written), append to it
        as the call goes, and finish it when cancelled (the call's end)."""
        try:
            self._wav = await trio.to_thread.run_sync(self._open)
        except OSError as exc:
            log.error("🎙️ Recording disabled for this call: %s", exc)
            task_status.started(False)
            return
        task_status.started(True)
        try:
            while True:
                await trio.sleep(FLUSH_SECONDS)
                await self._write(self.take(trio.current_time()))
        finally:
            ended = trio.current_time()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS) as bounded:
                await self._finish(ended)
            if bounded.cancelled_caught:
                log.error("🎙️ Recording not finished in %.0f s: dropped", CLOSE_SECONDS)

    def _open(self) -> wave.Wave_write:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        wav = wave.open(str(self.part), "wb")
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        return wav

    async def _write(self, pcm: bytes) -> None:
        if pcm and self._wav is not None:
            await trio.to_thread.run_sync(self._wav.writeframesraw, pcm)
            self.samples_written += len(pcm) // 4

    async def _finish(self, ended: float) -> None:
        try:
            await self._write(self.take(ended))
            await trio.to_thread.run_sync(self._close_and_place)
            log.info("🎙️ Recording saved (%.1f s)", self.samples_written / SAMPLE_RATE)
        except OSError as exc:
            log.error("🎙️ Recording could not be saved: %s", exc)
            _discard(self.part)

    def _close_and_place(self) -> None:
        assert self._wav is not None
        self._wav.close()  # writes the header's sizes
        os.replace(self.part, self.final)


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
