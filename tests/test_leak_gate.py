"""The leak gate: a short soak (200 calls, 40 at a time, about a minute) against a real server
process. Leaks are counts — Trio tasks and registry exactly back at the idle baseline,
descriptors within the pooled-connection tolerance — so nothing here depends on how fast the
machine is. The RSS limit is loose on purpose: 200 calls are still inside the warm-up of the
allocator and of the server's bounded webhook-dedup cache; it catches calls that are kept
whole (hundreds of KB each), and the tight 2 MB drift check belongs to the long soak
(docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CALLS = 200


def test_a_short_soak_leaves_no_task_descriptor_or_call_behind(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "soak.py"),
        "--calls",
        str(CALLS),
        "--concurrency",
        "40",
        "--ms-per-char",
        "15",
        "--warm-up",
        "0.2",
        "--rss-drift-mb",
        "12",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["ok"] and summary["leaks"] == [], report
    assert summary["calls"]["done"] == CALLS
    assert summary["calls"]["failed"] <= CALLS * 0.05, summary["calls"]
    assert summary["tasks_delta"] == 0
    assert summary["registry_at_end"] == 0
    assert summary["baseline"]["registry"] == 0
    assert summary["fds_delta"] <= 2
    assert summary["rss_drift_mb"] is not None and summary["rss_drift_mb"] <= 12
    assert summary["server_exit_code"] == 0
    assert summary["server_log_problems"]["traceback"] == 0, report
    # The run was watched: samples over time and one row per wave.
    assert len(summary["wave_ends"]) == CALLS // 40
    assert len(summary["samples"]) >= 10
