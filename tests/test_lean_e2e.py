"""The lean load generator against a real server: lean callers on the lean carrier, the lean
Deepgram, the reference Anthropic. Calls must complete with every turn heard and timed, and
the server must have heard what the callers said."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import API_TOKEN, FAST_SPEECH_MS, start_server

from bench.lab import call_outcome, call_script
from voice_trio.sim.lab import DEEPGRAM_KEY, OUR_NUMBER, TELNYX_KEY
from voice_trio.sim.lean_caller import LeanCaller
from voice_trio.sim.lean_deepgram import LeanDeepgram
from voice_trio.sim.lean_telnyx import LeanTelnyxSim
from voice_trio.sim.lean_telnyx import serve as serve_lean
from voice_trio.sim.reactor import Reactor
from voice_trio.web import lean_socket

ROOT = Path(__file__).resolve().parents[1]
TURNS = 2


def sample(metrics: str, name: str) -> float:
    """The value of one sample of a /metrics text (its whole name with labels)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def gaps(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Each media socket's read gaps, in the order the call set them (changes only)."""
    traced: list[list[float]] = []

    class TracedLean(lean_socket.LeanWebSocket):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.gaps: list[float] = []
            traced.append(self.gaps)
            super().__init__(*args, **kwargs)

        @property  # type: ignore[override]
        def read_gap(self) -> float:
            return self.gaps[-1] if self.gaps else 0.0

        @read_gap.setter
        def read_gap(self, value: float) -> None:
            if not self.gaps or self.gaps[-1] != value:
                self.gaps.append(value)

    monkeypatch.setattr(lean_socket, "LeanWebSocket", TracedLean)
    return traced


async def test_lean_calls_complete_with_the_expected_turns(nursery, lab, gaps) -> None:
    telnyx = LeanTelnyxSim(api_key=TELNYX_KEY)
    telnyx_url = await nursery.start(serve_lean, telnyx)
    dg = LeanDeepgram(api_key=DEEPGRAM_KEY, ms_per_char=FAST_SPEECH_MS, tts_ttfb_ms=20)
    reactor = Reactor()
    dg_url = dg.serve(reactor)
    reactor.start()
    try:
        env = {
            **lab.server_env(),
            "TELNYX_API_BASE": telnyx_url + "/v2",
            "TELNYX_PUBLIC_KEY": telnyx.public_key_b64,
            "DEEPGRAM_API_BASE": dg_url,
            "API_TOKEN": API_TOKEN,
        }
        server = await start_server(nursery, env)
        metrics = (await server.client.get("/metrics")).text
        reads_before = sample(metrics, "voice_media_reads_total")
        frames_before = sample(metrics, 'voice_ws_messages_total{direction="in",peer="carrier"}')
        telnyx.default_webhook_url = server.app.center.settings.webhook_url
        callers = [
            LeanCaller(call_script(TURNS), ms_per_char=FAST_SPEECH_MS, timeout_s=40)
            for _ in range(3)
        ]
        parties = [telnyx.lean_party(c) for c in callers]
        calls = [
            telnyx.place_inbound_call(f"+5730000000{i}", OUR_NUMBER, p)
            for i, p in enumerate(parties)
        ]
        with trio.fail_after(60):
            for party in parties:
                await party.done.wait()
            await server.app.center.registry.wait_until_empty()
        for caller, call in zip(callers, calls, strict=True):
            outcome = call_outcome(caller.results, TURNS, call.line.late_resyncs, 0.0, 0.0)
            assert outcome.ok, outcome.reason
            assert len(outcome.latencies_ms) == TURNS
            assert all(300 < ms < 3000 for ms in outcome.latencies_ms), outcome.latencies_ms
            said = [u.text for u in caller.results.utterances]
            record = (await server.client.get(f"/api/calls/{call.call_control_id}")).json()
            heard = [t["user_text"] for t in record["turns"] if t["user_text"]]
            assert heard == said
            assert all(
                t["latency"]["overhead_ms"] is not None for t in record["turns"] if t["user_text"]
            )
            assert call.streams[0].close_reason == "stopped"
            assert call.events[-2:] == ["streaming.stopped", "call.hangup"]
        assert dg.stt_streams == 3 and dg.tts_requests > 0
        # Reads were gathered while the caller was quiet and not while they spoke: each
        # turn took the gap away and gave it back (the turns above were still on time).
        assert len(gaps) == 3
        for gap in gaps:
            assert gap[:2] == [0.0, 0.1], gap
            assert gap.count(0.0) >= TURNS + 1 and gap.count(0.1) >= TURNS, gap
        # /metrics counts the reads: fewer wake-ups than frames (the process-wide counts,
        # read as a difference from before these calls).
        metrics = (await server.client.get("/metrics")).text
        reads = sample(metrics, "voice_media_reads_total") - reads_before
        frames = sample(metrics, 'voice_ws_messages_total{direction="in",peer="carrier"}')
        frames -= frames_before
        assert 0 < reads < 0.8 * frames, (reads, frames)
        assert telnyx.engine.late_resyncs == 0
    finally:
        reactor.stop()
        await trio.to_thread.run_sync(reactor.join, 5)
        reactor.close()


@pytest.mark.e2e
def test_a_synchronized_load_test_runs_end_to_end(tmp_path: Path) -> None:
    """``scripts/loadtest.py --synchronized``: its processes, the plan, the server's records."""
    command = [
        sys.executable,
        str(ROOT / "scripts" / "loadtest.py"),
        "--synchronized",
        "--levels",
        "3",
        "--turns",
        "2",
        "--ms-per-char",
        "25",
        "--sync-margin",
        "1.0",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    results = json.loads((tmp_path / "results.json").read_text())
    burst = results["bursts"][0]
    assert burst["calls"]["completed"] == 3 and burst["missed_plan"] == 0, report
    for turn in burst["turns"]:
        assert turn["end_spread_ms"] <= 100
        assert turn["server_overhead_ms"]["count"] == 3
        assert turn["voice_to_voice_ms"]["count"] == 3
    assert burst["sim"]["cpu_percent_by_process"].keys() >= {"carrier", "providers"}
    assert burst["sim_to_server_cpu"] > 0
    assert (tmp_path / "generator-carrier.log").exists()
