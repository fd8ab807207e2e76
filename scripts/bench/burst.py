"""Synchronized load (``loadtest.py --synchronized``): N calls placed at once whose callers end
each turn at the same planned instant, so the server meets N turn ends within one tick.

The plan comes from one call run alone (the warm-up): when its first utterance ended after the
call was placed, and how far apart the ends of its utterances were, each plus a margin for
replies that come later under load. Every caller of a burst then ends utterance k at
``start + first + sum(gaps[:k])`` (:class:`~voice_trio.sim.lean_caller.LeanCaller`,
``say_ends_at``); the ends fall within one 20 ms tick of the plan, so within 40 ms of each
other. A caller whose bot is still talking at its planned start speaks as soon as the reply
is over instead (``missed_plan``): the spread printed per turn shows whether the burst held.

What a burst reports per turn, over its N calls: the spread of the callers' turn ends, the
server overhead the server recorded for that turn (``GET /api/calls/{id}``,
``turns[].latency.overhead_ms``: exact values, not histogram buckets) and voice-to-voice as
the callers heard it, as p50/p99.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.lab import CallOutcome
from bench.stats import percentile


@dataclass(frozen=True)
class BurstPlan:
    first_end_s: float  # from placing the calls to the end of the first utterance
    gaps_s: tuple[float, ...]  # between the ends of consecutive utterances

    @classmethod
    def from_call(cls, alone: CallOutcome, margin_s: float) -> BurstPlan:
        ends = alone.utterance_ends
        if not ends:
            raise ValueError("the call the plan is measured on said nothing")
        first = ends[0] - alone.started_at + margin_s
        gaps = tuple(b - a + margin_s for a, b in itertools.pairwise(ends))
        return cls(first, gaps)

    @property
    def turns(self) -> int:
        return 1 + len(self.gaps_s)

    def ends_at(self, start: float) -> list[float]:
        """The planned end of every utterance, for calls placed at ``start``."""
        out = [start + self.first_end_s]
        for gap in self.gaps_s:
            out.append(out[-1] + gap)
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "first_end_s": round(self.first_end_s, 3),
            "gaps_s": [round(g, 3) for g in self.gaps_s],
        }


def _spread(values: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(values)}
    for q in (0.5, 0.99):
        value = percentile(values, q)
        out[f"p{round(q * 100)}"] = None if value is None else round(value, 2)
    out["max"] = round(max(values), 2) if values else None
    return out


def caller_turn_overheads(call: dict[str, Any]) -> list[float | None]:
    """The server's overhead (ms) of each caller turn of one ``GET /api/calls/{id}`` answer,
    in order: the turns with the caller's words (the greeting has none)."""
    return [
        turn["latency"]["overhead_ms"] for turn in call.get("turns", []) if turn.get("user_text")
    ]


def summarize_burst(
    n: int,
    outcomes: list[CallOutcome],
    planned_ends: list[float],
    records: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Per turn and overall: caller turn-end spread, server overhead, voice-to-voice.
    ``records``: ``GET /api/calls/{id}`` answers by call control id."""
    reasons = Counter(o.reason for o in outcomes if not o.ok)
    turns = []
    all_overhead: list[float] = []
    all_v2v: list[float] = []
    for k, planned in enumerate(planned_ends):
        ends = [o.utterance_ends[k] for o in outcomes if len(o.utterance_ends) > k]
        v2v = [o.latencies_ms[k] for o in outcomes if len(o.latencies_ms) > k]
        overhead = []
        for o in outcomes:
            found = caller_turn_overheads(records.get(o.call_control_id, {}))
            value = found[k] if len(found) > k else None
            if value is not None:
                overhead.append(float(value))
        all_overhead += overhead
        all_v2v += v2v
        turns.append(
            {
                "turn": k + 1,
                "callers": len(ends),
                "end_spread_ms": round((max(ends) - min(ends)) * 1000, 1) if ends else None,
                "end_after_plan_ms_max": (round((max(ends) - planned) * 1000, 1) if ends else None),
                "server_overhead_ms": _spread(overhead),
                "voice_to_voice_ms": _spread(v2v),
            }
        )
    return {
        "concurrency": n,
        "calls": {
            "started": len(outcomes),
            "completed": sum(o.ok for o in outcomes),
            "failed": sum(not o.ok for o in outcomes),
            "failure_reasons": dict(reasons.most_common(5)),
        },
        "missed_plan": sum(o.missed_plan for o in outcomes),
        "turns": turns,
        "server_overhead_ms": _spread(all_overhead),
        "voice_to_voice_ms": _spread(all_v2v),
    }


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def burst_table(bursts: list[dict[str, Any]]) -> str:
    head = (
        "| N | turn | calls ok / failed | caller turn ends: spread ms | missed plan "
        "| server overhead p50 / p99 ms | v2v p50 / p99 ms | server CPU ms/call-s "
        "| sim CPU ms/call-s | sim / server CPU |"
    )
    rows = [head, "|" + "---|" * 10]
    for burst in bursts:
        calls = burst["calls"]
        every = [*burst["turns"], {"turn": "all", **burst}]
        for turn in every:
            ovh, v2v = turn["server_overhead_ms"], turn["voice_to_voice_ms"]
            rows.append(
                f"| {burst['concurrency']} | {turn['turn']} "
                f"| {calls['completed']} / {calls['failed']} "
                f"| {_fmt(turn.get('end_spread_ms'), 1)} | {burst['missed_plan']} "
                f"| {_fmt(ovh['p50'], 2)} / {_fmt(ovh['p99'], 2)} "
                f"| {_fmt(v2v['p50'])} / {_fmt(v2v['p99'])} "
                f"| {_fmt(burst.get('server_cpu_ms_per_call_second'), 2)} "
                f"| {_fmt(burst.get('sim_cpu_ms_per_call_second'), 2)} "
                f"| {_fmt(burst.get('sim_to_server_cpu'), 2)} |"
            )
    return "\n".join(rows)
