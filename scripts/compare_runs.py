"""Per-run and median rows from several ``loadtest.py`` results, grouped by variant and N.

    .venv/bin/python scripts/compare_runs.py results/ab-*/results.json

Disturbed levels (the rest of the machine above 30 % of a core) are listed but left out of
the medians, as in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = (
    ("cpu %", lambda lv: lv.get("server_cpu_percent")),
    ("ms/call-s", lambda lv: lv.get("server_cpu_ms_per_call_second")),
    ("sim ms/call-s", lambda lv: lv.get("sim_cpu_ms_per_call_second")),
    ("msgs/call-s", lambda lv: (lv.get("messages_per_call_second") or {}).get("total")),
    ("stt out/s", lambda lv: (lv.get("messages_per_call_second") or {}).get("stt_out")),
    ("v2v p50", lambda lv: lv["voice_to_voice_ms"].get("p50")),
    ("v2v p95", lambda lv: lv["voice_to_voice_ms"].get("p95")),
    ("ovh p99", lambda lv: lv["server_overhead"].get("p99_ms")),
    ("lag p99", lambda lv: lv["event_loop_lag"].get("p99_ms")),
    ("late", lambda lv: lv.get("outbound_frames_late")),
    ("RSS/call KB", lambda lv: lv.get("rss_per_call_kb")),
    ("others %", lambda lv: (lv.get("machine") or {}).get("others_percent")),
)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main(paths: list[str]) -> None:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    print("| run | variant | N | " + " | ".join(c for c, _ in COLUMNS) + " | disturbed |")
    print("|" + "---|" * (len(COLUMNS) + 4))
    for path in paths:
        doc = json.loads(Path(path).read_text())
        variant = doc.get("variant") or "all on"
        for lv in doc["levels"]:
            n = lv["concurrency"]
            row = [fmt(get(lv)) for _, get in COLUMNS]
            disturbed = bool(lv.get("contended"))
            print(
                f"| {Path(path).parent.name} | {variant} | {n} | "
                + " | ".join(row)
                + f" | {'yes' if disturbed else ''} |"
            )
            if not disturbed:
                groups[(variant, n)].append(lv)
    print("\nmedians of the undisturbed runs:\n")
    print("| variant | N | runs | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for (variant, n), levels in sorted(groups.items()):
        cells = []
        for _, get in COLUMNS:
            values = [v for v in (get(lv) for lv in levels) if v is not None]
            cells.append(fmt(statistics.median(values)) if values else "-")
        print(f"| {variant} | {n} | {len(levels)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
