"""``voice-trio demo``: one whole call, offline, against the simulators.

The server and every simulator run in this process: the server places an outbound call
(through its own ``POST /api/call/initiate``) to a scripted Spanish-speaking patient who
asks for an appointment (which the agent books in the clinic simulator through its HTTP
tools, docs/tools.md), asks two more things, talks over the bot once, and says goodbye.
The server's log shows the conversation live; a summary with each turn's voice-to-voice
latency and the appointment the clinic now holds follows.

With ``--console`` the server keeps running after the call, until Ctrl-C, and the operator
console shows the demo's call in its history: transcript, latency waterfall and (the demo
records its call then, to a temporary folder) the recording.
"""

from __future__ import annotations

import logging
import signal
import statistics
import sys
import tempfile
import wave
from functools import partial

import httpx
import trio

from voice_trio.audio import BYTES_PER_MS, mulaw_to_linear
from voice_trio.config import Settings
from voice_trio.observability import setup_logging
from voice_trio.server import reserve_listener, serve
from voice_trio.sim.caller import CallerResults, ScriptedCaller
from voice_trio.sim.clinic import Appointment
from voice_trio.sim.lab import DEMO_SCRIPT, open_lab
from voice_trio.web.dispatch import build_app

log = logging.getLogger("voice_trio")

PATIENT_NUMBER = "+573001234567"
_LINEAR = [mulaw_to_linear(b) for b in range(256)]


class RecordingCaller(ScriptedCaller):
    """The scripted patient, also keeping both sides of the call for ``--wav``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.t0: float | None = None
        self.tracks = (bytearray(), bytearray())  # caller, bot (mu-law, 8 kHz)

    def _write(self, track: int, audio: bytes, now: float) -> None:
        if self.t0 is None:
            self.t0 = now
        pos = int((now - self.t0) * 1000 * BYTES_PER_MS)
        buf = self.tracks[track]
        if len(buf) < pos:
            buf.extend(b"\xff" * (pos - len(buf)))
        buf[pos : pos + len(audio)] = audio

    def caller_frame(self, now: float) -> bytes | None:
        frame = super().caller_frame(now)
        if frame:
            self._write(0, frame, now)
        return frame

    def bot_audio(self, audio: bytes, now: float) -> None:
        self._write(1, audio, now)
        super().bot_audio(audio, now)

    def write_wav(self, path: str) -> None:
        caller, bot = self.tracks
        size = max(len(caller), len(bot))
        caller.extend(b"\xff" * (size - len(caller)))
        bot.extend(b"\xff" * (size - len(bot)))
        frames = bytearray()
        for a, b in zip(caller, bot, strict=True):
            frames += _LINEAR[a].to_bytes(2, "little", signed=True)
            frames += _LINEAR[b].to_bytes(2, "little", signed=True)
        with wave.open(path, "wb") as out:
            out.setnchannels(2)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(bytes(frames))


async def run_demo(user_settings: Settings, wav: str | None = None, console: bool = False) -> int:
    print("voice-trio demo: the server and every simulator in this process, offline.\n")
    if not console:
        return await _run_demo(user_settings, wav, None)
    with tempfile.TemporaryDirectory(prefix="voice-trio-demo-") as folder:
        return await _run_demo(user_settings, wav, folder)


async def _run_demo(user_settings: Settings, wav: str | None, console_dir: str | None) -> int:
    """The demo; with ``console_dir`` (a folder for the call store and the recording) the
    server stays up for the console after the call, until SIGINT."""
    code: int | None = None
    async with trio.open_nursery() as nursery:
        lab = await open_lab(nursery, tools=True)
        listener = reserve_listener("127.0.0.1")
        port = listener.getsockname()[1]
        env = lab.server_env() | {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
            "LOG_FORMAT": user_settings.log_format,
            "AGENT_LANGUAGE": "es",
            # The faster-turn switches, so `SPECULATIVE_REPLIES=false voice-trio demo` compares.
            "SPECULATIVE_REPLIES": str(user_settings.speculative_replies).lower(),
            "STT_FINALIZE_SILENCE_MS": str(user_settings.stt_finalize_silence_ms),
        }
        if console_dir is not None:
            env |= {
                "SQLITE_PATH": f"{console_dir}/calls.sqlite3",
                "RECORD_CALLS": "true",
                "RECORDINGS_DIR": f"{console_dir}/recordings",
            }
        settings = Settings.from_env(env, env_file=None)
        setup_logging("INFO", settings.log_format, settings.secrets())
        stop = trio.Event()
        app = build_app(settings)
        base = await nursery.start(
            partial(serve, settings, app=app, listener=listener, shutdown_trigger=stop.wait)
        )
        patient = RecordingCaller(DEMO_SCRIPT, timeout_s=120, name="Ana")
        lab.telnyx.answer_with(PATIENT_NUMBER, patient)
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=lab.api_auth) as client:
            response = await client.post(
                "/api/call/initiate",
                json={
                    "telefono": PATIENT_NUMBER,
                    "nombre": "Ana",
                    "contexto": "Paciente que quiere pedir una cita de medicina general.",
                },
            )
        if response.status_code != 201:
            print(f"demo: placing the call failed: {response.status_code} {response.text}")
            return 1
        results = await patient.run()
        with trio.move_on_after(5):
            await app.center.registry.wait_until_empty()
        if console_dir is not None:
            assert lab.clinic is not None
            code = _finish(patient, results, lab.clinic.booked(), wav)
            await _serve_console(base, lab.api_token)
        stop.set()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    if code is not None:
        return code
    assert lab.clinic is not None
    return _finish(patient, results, lab.clinic.booked(), wav)


def _finish(
    patient: RecordingCaller, results: CallerResults, booked: list[Appointment], wav: str | None
) -> int:
    if wav:
        patient.write_wav(wav)
        print(f"\nWrote {wav} (left: caller, right: bot; 8 kHz, 16-bit).")
    return summarize(results, booked)


async def _serve_console(base: str, token: str) -> None:
    """Keep the server up for the operator console until Ctrl-C (SIGINT)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        print(
            f"\nOperator console: {base}/console/  (sign in with the demo's API token: {token})"
            "\nThe call is under Calls, with its waterfall and recording. Ctrl-C to stop.",
            flush=True,
        )
        async for _ in received:
            break
    print("\nStopping the demo server.", flush=True)


def summarize(results: CallerResults, booked: list[Appointment] | None = None) -> int:
    print("\n── Conversation, as the caller heard it ──")
    turns = sorted(
        [(u.started_at or 0.0, "caller", u.text, None, u.barge_in) for u in results.utterances]
        + [(t.started_at, "bot", t.text.strip(), t.latency_ms, t.cut) for t in results.bot_turns]
    )
    for _, who, text, latency, flag in turns:
        if who == "caller":
            print(f"  🧑 {text}" + ("   (talking over the bot)" if flag else ""))
        else:
            timing = f"  [{latency:.0f} ms voice-to-voice]" if latency is not None else ""
            print(f"  🤖 {text}" + (" …(cut off)" if flag else "") + timing)
    latencies = results.latencies_ms
    problems = list(results.errors)
    if results.timed_out:
        problems.append("the call timed out")
    if len([u for u in results.utterances if not u.barge_in]) < 3:
        problems.append("fewer than three caller turns")
    if not results.clears:
        problems.append("the barge-in did not stop the bot")
    if not latencies:
        problems.append("no bot reply was timed")
    if latencies:
        print(
            f"\nVoice-to-voice over {len(latencies)} turns: median "
            f"{statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms "
            "(includes the simulated 300 ms endpointing, 400 ms LLM first token, 150 ms TTS)."
        )
    print(f"Barge-ins: {results.clears}   call ended by: {results.hangup_by or 'nobody'}")
    if booked is not None:
        print("\n── The clinic simulator now holds ──")
        for appointment in booked:
            print(
                f"  📅 {appointment.appointment_id}: {appointment.slot.start} with "
                f"{appointment.slot.doctor}, for {appointment.patient_name} "
                f"({appointment.caller.get('telefono', '')})"
            )
        if not booked:
            problems.append("no appointment was booked")
    if problems:
        print("demo FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("demo OK")
    return 0
