"""Load test: one server process, many concurrent scripted calls, the numbers per level.

    .venv/bin/python scripts/loadtest.py --levels 10,25,50,100 --turns 3 --duration 30
    .venv/bin/python scripts/loadtest.py --synchronized --levels 20,40 --turns 3

The server (``python -m voice_trio.cli serve``, Hypercorn's trio worker) runs as a child
process on 127.0.0.1 (with ``--workers N``: N worker processes under their supervisor, on
PostgreSQL, ``--database-url``). The load generator (``bench.generator``) is, by default,
two more processes: the *carrier* (Telnyx REST and webhooks, the lean carrier and its
scripted callers) and the *providers* (the lean Deepgram, the reference Anthropic and
ElevenLabs); ``--generator reference`` runs the reference simulators and callers in this
process instead, as every run before the lean generator did. For each concurrency level N,
N call slots start ``--stagger-ms`` apart; each slot places an inbound call (greeting, then
``--turns`` exchanges in real-time audio both ways, then the caller hangs up) and dials
again when it ends, until ``--duration`` seconds of steady state have passed. The
steady-state window starts once every slot is in a call and ends when slots stop dialling;
all the per-level numbers but the call counts come from that window:

- voice-to-voice p50/p95/p99 (ms): measured by the callers (their last speech frame sent ->
  first bot audio frame played), bot turns that started in the window;
- server overhead per turn p50/p99 and event-loop lag p50/p99: from the server's
  ``/metrics`` histograms, the bucket counts of a scrape after the window minus those of a
  scrape before it. These are bucket-resolution numbers: ``pNN_ms`` interpolates inside the
  bucket like Prometheus' ``histogram_quantile``; ``pNN_le_ms`` is the bucket bound the
  quantile is certainly under (null: above the last finite bound);
- outbound late frames (counter delta), server CPU (% of one core: CPU-seconds delta / wall
  time), peak RSS, and RSS per active call = (peak RSS - idle RSS after warm-up) / N;
- the load generator's CPU: each of its processes (this one included) and their total, in %
  of a core and in ms per call-second, next to the server's (``sim_to_server_cpu``), with
  each child's threads (reactor: the per-frame work; main: Trio) in a table of their own;
  and how late the callers' clock woke up (p99). Any generator process above ~85 % of a
  core makes callers' audio late and the server's numbers untrustworthy: the level is
  flagged ``sim_saturated``.

Every number above is the whole server's (with several workers: the host's, summed from
the ``/metrics`` of any worker); ``workers`` in ``results.json`` and the last table break
them down per worker: the calls it carried over the level (its share), its CPU, its CPU per
call-second (over the calls it held on average in the window), its loop lag and late
frames, and its tasks and descriptors after the level against its own idle baseline.

``--synchronized`` (``bench.burst``): instead of staggered levels, for each level N one
burst of N calls placed together whose callers end every one of their ``--turns``
utterances at the same planned instant (the plan: one call measured alone during the
warm-up, plus ``--sync-margin`` per turn). Per turn: the spread of the callers' turn ends,
the server overhead the server recorded for each call's turn (``GET /api/calls/{id}``), and
voice-to-voice, as p50/p99; and the CPU of server and generator over the burst.

Writes ``results.json``, ``loadtest.png`` (if matplotlib is importable), ``server.log`` and
the generator's ``generator-*.log`` to ``--out``. The knee is the highest level where the
server's loop lag p99 is at most 20 ms (at bucket resolution: 99 % of the probes in buckets
<= 20 ms) and no outbound frame was late.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.burst import BurstPlan, burst_table, summarize_burst
from bench.generator import (
    Generator,
    GeneratorOptions,
    cpu_percent,
    start_generator,
    threads_ms_per_call_second,
)
from bench.lab import CallOutcome, call_script
from bench.machine import machine_cpu, machine_info
from bench.report import Progress, bar, load_matplotlib, mb, write_json
from bench.scrape import Scrape, scrape
from bench.server import (
    VARIANT_SERVE,
    ServerProcess,
    free_port,
    server_env,
    sigterm_as_interrupt,
)
from bench.stats import (
    Buckets,
    bucket_delta,
    hist_summary,
    max_bound,
    per_bucket,
    raw_summary,
    share_at_most,
)

LAG_TARGET_S = 0.02
SIM_CPU_WARN = 85.0
# CPU used by the rest of the machine (other jobs, the kernel's loopback work) above which a
# level's numbers are not the server's alone: on a 2-core machine this is the usual culprit.
OTHERS_CPU_WARN = 30.0


@dataclass
class Options:
    levels: list[int]
    turns: int
    duration: float
    stagger_ms: float
    ms_per_char: int
    llm_ttft: float
    tts_ttfb: float
    max_calls: int | None
    out: Path
    time_limit: float
    sample_every: float
    variant: str = ""
    workers: int = 1
    database_url: str = ""
    generator: str = "lean"
    synchronized: bool = False
    sync_margin: float = 1.5


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--levels",
        "--concurrency",
        default="10,25,50",
        help="concurrency levels, comma-separated (default: 10,25,50)",
    )
    parser.add_argument("--turns", type=int, default=3, help="exchanges per call (default 3)")
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="steady-state seconds per level; slots stop dialling after it (default 30)",
    )
    parser.add_argument(
        "--stagger-ms", type=float, default=100.0, help="between call starts (default 100)"
    )
    parser.add_argument(
        "--ms-per-char",
        type=int,
        default=65,
        help="speech rate of callers and TTS, ms per character (default 65, natural)",
    )
    parser.add_argument(
        "--llm-ttft", type=float, default=0.4, help="LLM time to first token, s (default 0.4)"
    )
    parser.add_argument(
        "--tts-ttfb", type=float, default=150.0, help="TTS time to first byte, ms (default 150)"
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=None,
        help="at most this many calls per level (default: as many as the duration takes)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=900.0,
        help="abort the whole run after this many seconds (default 900)",
    )
    parser.add_argument(
        "--sample-every", type=float, default=1.0, help="/metrics sampling period, s"
    )
    parser.add_argument("--out", default="results/loadtest", help="results directory")
    parser.add_argument(
        "--variant",
        default="",
        help="switch optimisations off in the server, to compare; comma-separated "
        "(scripts/bench/variant_serve.py: no-stt-batching, hypercorn-reads,"
        " asgi-media-socket, no-gathered-reads, no-speech-batching, trio-stream-io)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes (voice-trio serve --workers; default 1); more than 1\n"
        "needs --database-url; the numbers are also broken down per worker",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="PostgreSQL for the server's store (default: a SQLite file in --out)",
    )
    parser.add_argument(
        "--generator",
        choices=("lean", "reference"),
        default="lean",
        help="lean (default): the lean carrier and callers in one process, the provider\n"
        "simulators in another; reference: the reference simulators and callers in this one",
    )
    parser.add_argument(
        "--synchronized",
        action="store_true",
        help="turn-end bursts instead of staggered calls: for each level N, N calls start\n"
        "together and every caller ends each of its --turns utterances at the same\n"
        "planned instant (needs the lean generator)",
    )
    parser.add_argument(
        "--sync-margin",
        type=float,
        default=1.5,
        help="synchronized: seconds added to each turn of the plan, measured on one call\n"
        "alone, for replies that come later under load (default 1.5)",
    )
    args = parser.parse_args(argv)
    if args.synchronized and args.generator != "lean":
        parser.error("--synchronized needs the lean generator")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not args.database_url:
        parser.error("--workers above 1 needs --database-url (the workers share PostgreSQL)")
    levels = sorted({int(x) for x in str(args.levels).split(",") if x.strip()})
    if not levels or min(levels) < 1:
        parser.error("--levels needs positive integers")
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    return Options(
        levels=levels,
        turns=args.turns,
        duration=args.duration,
        stagger_ms=args.stagger_ms,
        ms_per_char=args.ms_per_char,
        llm_ttft=args.llm_ttft,
        tts_ttfb=args.tts_ttfb,
        max_calls=args.calls,
        out=Path(args.out),
        time_limit=args.time_limit,
        sample_every=args.sample_every,
        variant=args.variant,
        workers=args.workers,
        database_url=args.database_url,
        generator=args.generator,
        synchronized=args.synchronized,
        sync_margin=args.sync_margin,
    )


def call_timeout(opts: Options) -> float:
    """Generous: greeting + turns of speech and replies at this speech rate, times three."""
    per_turn = 140 * opts.ms_per_char / 1000 + 2.0 + opts.llm_ttft
    return 3 * (8 + opts.turns * per_turn) + 20


class Runner:
    def __init__(self, opts: Options, generator: Generator, server: ServerProcess) -> None:
        self.opts = opts
        self.generator = generator
        self.server = server
        # Several workers: no kept-alive scrape connection counted on one worker or another.
        headers = {"Connection": "close"} if opts.workers > 1 else {}
        self.client = httpx.AsyncClient(
            base_url=server.base_url, timeout=10, trust_env=False, headers=headers
        )
        self.progress = Progress()
        self.number = 0
        self.idle: Scrape | None = None

    def next_number(self) -> str:
        self.number += 1
        return f"+57300{self.number:07d}"

    async def call(self, turns: int, say_ends_at: list[float] | None = None) -> CallOutcome:
        return await self.generator.call(
            number=self.next_number(),
            script=call_script(turns),
            turns=turns,
            ms_per_char=self.opts.ms_per_char,
            timeout_s=call_timeout(self.opts),
            say_ends_at=say_ends_at,
        )

    async def wait_idle(self, timeout: float = 60.0, settle: float = 12.0) -> Scrape:
        """Until the server's registry is empty, then until its tasks and descriptors are
        back at the idle baseline (or, before there is one, have been stable for longer than
        the 5 s keep-alive timeout); at most ``settle`` seconds for that part."""
        with trio.move_on_after(timeout):
            while True:
                current = await scrape(self.client)
                if not current.active_calls:
                    break
                await trio.sleep(0.5)
        deadline = trio.current_time() + settle
        previous, since = None, trio.current_time()
        while trio.current_time() < deadline:
            await trio.sleep(0.5)
            current = await scrape(self.client)
            state = (current.tasks, current.fds)
            if state != previous:
                previous, since = state, trio.current_time()
            idle = self.idle
            if idle is not None:
                if (current.tasks or 0) <= (idle.tasks or 0) and (current.fds or 0) <= (
                    idle.fds or 0
                ) + 2:
                    break
            elif trio.current_time() - since >= 6.0:
                break
        return current

    async def warm_up(self) -> CallOutcome:
        self.progress.update("warm-up call ...", force=True)
        # Synchronized bursts plan their turns on a whole call, measured alone.
        outcome = await self.call(self.opts.turns if self.opts.synchronized else 1)
        if not outcome.ok:
            raise RuntimeError(f"the warm-up call failed: {outcome.reason}")
        self.idle = await self.wait_idle()
        self.progress.done(
            f"warm-up call ok; idle: RSS {mb(self.idle.rss)} MB, "
            f"{int(self.idle.tasks or 0)} tasks, {int(self.idle.fds or 0)} fds"
        )
        return outcome

    async def level(self, n: int) -> dict[str, Any]:
        opts = self.opts
        stagger = opts.stagger_ms / 1000
        start = trio.current_time()
        ramp_end = start + (n - 1) * stagger
        window_start = ramp_end + 1.0
        stop_dialling = window_start + opts.duration
        outcomes: list[CallOutcome] = []
        state = {"started": 0, "active": 0}
        max_calls = opts.max_calls if opts.max_calls is not None else math.inf
        level_start = await scrape(self.client)

        async def slot(i: int) -> None:
            await trio.sleep_until(start + i * stagger)
            while state["started"] < max_calls:
                state["started"] += 1
                state["active"] += 1
                try:
                    outcomes.append(await self.call(opts.turns))
                finally:
                    state["active"] -= 1
                if trio.current_time() >= stop_dialling:
                    return

        window: dict[str, Any] = {}

        async def measure() -> None:
            await trio.sleep_until(window_start)
            before = await scrape(self.client)
            cpu0, wall0 = self.generator.cpu_seconds(), trio.current_time()
            threads0 = self.generator.threads_cpu_seconds()
            lag_mark = await self.generator.lag_mark()
            machine0 = machine_cpu()
            samples: list[Scrape] = [before]
            while trio.current_time() < stop_dialling - opts.sample_every / 2:
                await trio.sleep(min(opts.sample_every, stop_dialling - trio.current_time()))
                samples.append(await scrape(self.client))
            after = await scrape(self.client)
            samples.append(after)
            wall = trio.current_time() - wall0
            machine1 = machine_cpu()
            window.update(
                machine_busy=(machine1[0] - machine0[0]) / wall * 100 if wall > 0 else None,
                before=before,
                after=after,
                samples=samples,
                wall=wall,
                t0=before.at,
                t1=after.at,
                sim_cpu=cpu_percent(cpu0, self.generator.cpu_seconds(), wall),
                sim_threads=threads_ms_per_call_second(
                    threads0, self.generator.threads_cpu_seconds(), n * wall
                ),
                sim_stats=await self.generator.stats(lag_mark),
            )

        async def show() -> None:
            while True:
                now = trio.current_time()
                if now < window_start:
                    phase = f"ramp {bar(now - start, window_start - start)}"
                elif now < stop_dialling:
                    phase = f"steady {bar(now - window_start, opts.duration)}"
                else:
                    phase = f"draining {now - stop_dialling:4.0f}s"
                failed = sum(1 for o in outcomes if not o.ok)
                self.progress.update(
                    f"N={n:<4} {phase}  in call {state['active']:>4}"
                    f"  done {len(outcomes) - failed}  failed {failed}"
                )
                await trio.sleep(0.5)

        with trio.fail_after(stop_dialling - start + call_timeout(opts) + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show)
                async with trio.open_nursery() as calls:
                    for i in range(n):
                        calls.start_soon(slot, i)
                    calls.start_soon(measure)
                nursery.cancel_scope.cancel()
        self.progress.done(
            f"N={n:<4} done: {sum(o.ok for o in outcomes)} ok, "
            f"{sum(not o.ok for o in outcomes)} failed"
        )
        after = await self.wait_idle()
        result = summarize_level(n, outcomes, window, self.idle, opts)
        idle = self.idle
        self.server.worker_pids = after.worker_pids()
        result["after_level"] = {
            "trio_tasks": int(after.tasks or 0),
            "open_fds": int(after.fds or 0),
            "tasks_above_idle": int((after.tasks or 0) - ((idle.tasks or 0) if idle else 0)),
            "fds_above_idle": int((after.fds or 0) - ((idle.fds or 0) if idle else 0)),
            "sockets": self.server.socket_peers(self.generator.ports()),
        }
        result["workers"] = per_worker(window, level_start, after, idle, n)
        return result

    async def burst(self, n: int, plan: BurstPlan) -> dict[str, Any]:
        """N calls placed together, every caller ending turn k at the same planned instant;
        then the calls' records from the server's API (see ``bench.burst``)."""
        start = trio.current_time()
        planned = plan.ends_at(start)
        outcomes: list[CallOutcome] = []
        before = await scrape(self.client)
        cpu0, machine0 = self.generator.cpu_seconds(), machine_cpu()
        threads0 = self.generator.threads_cpu_seconds()
        lag_mark = await self.generator.lag_mark()

        async def one() -> None:
            outcomes.append(await self.call(plan.turns, planned))

        async def show() -> None:
            while True:
                elapsed = trio.current_time() - start
                self.progress.update(
                    f"N={n:<4} burst {bar(elapsed, planned[-1] - start + 2)}  done {len(outcomes)}"
                )
                await trio.sleep(0.5)

        with trio.fail_after(planned[-1] - start + call_timeout(self.opts) + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show)
                async with trio.open_nursery() as calls:
                    for _ in range(n):
                        calls.start_soon(one)
                nursery.cancel_scope.cancel()
        after = await scrape(self.client)
        wall = after.at - before.at
        machine1 = machine_cpu()
        sim_cpu = cpu_percent(cpu0, self.generator.cpu_seconds(), wall)
        threads1 = self.generator.threads_cpu_seconds()
        sim_stats = await self.generator.stats(lag_mark)
        self.progress.done(
            f"N={n:<4} burst done: {sum(o.ok for o in outcomes)} ok, "
            f"{sum(not o.ok for o in outcomes)} failed"
        )
        await self.wait_idle()
        records: dict[str, dict[str, Any]] = {}
        auth = {"Authorization": f"Bearer {self.generator.api_token}"}
        for o in outcomes:
            if o.call_control_id:
                answer = await self.client.get(f"/api/calls/{o.call_control_id}", headers=auth)
                if answer.status_code == 200:
                    records[o.call_control_id] = answer.json()
        result = summarize_burst(n, outcomes, planned, records)
        cpu = None
        if after.cpu is not None and before.cpu is not None and wall > 0:
            cpu = (after.cpu - before.cpu) / wall * 100
        held = sum(min(o.ended_at, after.at) - max(o.started_at, before.at) for o in outcomes)
        total = sim_cpu.get("total")
        lag = bucket_delta(
            before.histogram("voice_event_loop_lag_seconds"),
            after.histogram("voice_event_loop_lag_seconds"),
        )
        late = (after.value("voice_outbound_frames_late_total") or 0.0) - (
            before.value("voice_outbound_frames_late_total") or 0.0
        )
        result.update(
            window_s=round(wall, 1),
            call_seconds=round(held, 1),
            plan=[round(t - start, 3) for t in planned],
            server_overhead_metrics=hist_summary(
                bucket_delta(
                    before.histogram("voice_server_overhead_seconds"),
                    after.histogram("voice_server_overhead_seconds"),
                ),
                (0.5, 0.99),
            ),
            event_loop_lag=hist_summary(lag, (0.5, 0.99)),
            outbound_frames_late=int(late),
            server_cpu_percent=None if cpu is None else round(cpu, 1),
            sim={
                "generator": self.opts.generator,
                "cpu_percent": None if total is None else round(total, 1),
                "cpu_percent_by_process": {k: round(v, 1) for k, v in sim_cpu.items()},
                "carrier": sim_stats,
                "threads_ms_per_call_second": threads_ms_per_call_second(threads0, threads1, held),
            },
        )
        if wall > 0:
            busy = (machine1[0] - machine0[0]) / wall * 100
            others = busy - (cpu or 0.0) - (total or 0.0)
            result["machine"] = {
                "busy_percent_of_one_core": round(busy, 1),
                "others_percent": round(others, 1),
            }
            result["contended"] = others > OTHERS_CPU_WARN
        if held > 0:
            # CPU per call-second over the call-seconds actually held in the window.
            if cpu is not None:
                result["server_cpu_ms_per_call_second"] = round(cpu * 10 * wall / held, 2)
            if total is not None:
                result["sim_cpu_ms_per_call_second"] = round(total * 10 * wall / held, 2)
        if cpu and total is not None:
            result["sim_to_server_cpu"] = round(total / cpu, 3)
        return result


def summarize_level(
    n: int,
    outcomes: list[CallOutcome],
    window: dict[str, Any],
    idle: Scrape | None,
    opts: Options,
) -> dict[str, Any]:
    before: Scrape = window["before"]
    after: Scrape = window["after"]
    samples: list[Scrape] = window["samples"]
    t0, t1 = window["t0"], window["t1"]

    def delta_hist(name: str, **labels: str) -> Buckets:
        return bucket_delta(before.histogram(name, **labels), after.histogram(name, **labels))

    in_window = [ms for o in outcomes for at, ms in o.turn_starts if t0 <= at <= t1]
    every = [ms for o in outcomes for ms in o.latencies_ms]
    lag = delta_hist("voice_event_loop_lag_seconds")
    overhead = delta_hist("voice_server_overhead_seconds")
    stages = {}
    for stage in ("t0-t1", "t1-t2", "t2-t3", "t3-t4", "t4-t5", "t0-t5"):
        stages[stage] = hist_summary(
            delta_hist("voice_turn_stage_seconds", stage=stage), bounds=False
        )
    late = (after.value("voice_outbound_frames_late_total") or 0.0) - (
        before.value("voice_outbound_frames_late_total") or 0.0
    )
    cpu = None
    if after.cpu is not None and before.cpu is not None and t1 > t0:
        cpu = (after.cpu - before.cpu) / (t1 - t0) * 100
    rss_peak = max((s.rss or 0.0) for s in samples)
    idle_rss = idle.rss if idle is not None else None
    share_ok = share_at_most(LAG_TARGET_S, lag)
    lag_ok = share_ok is not None and share_ok >= 0.99
    sim_stats = window["sim_stats"]
    sim_by_process: dict[str, float] = window["sim_cpu"]
    sim_cpu = sim_by_process.get("total")
    reasons = Counter(o.reason for o in outcomes if not o.ok)
    result = {
        "concurrency": n,
        "calls": {
            "started": len(outcomes),
            "completed": sum(o.ok for o in outcomes),
            "failed": sum(not o.ok for o in outcomes),
            "failure_reasons": dict(reasons.most_common(5)),
        },
        "window_s": round(t1 - t0, 1),
        "voice_to_voice_ms": raw_summary(in_window),
        "voice_to_voice_ms_all_turns": raw_summary(every),
        "server_overhead": hist_summary(overhead, (0.5, 0.99)),
        "event_loop_lag": hist_summary(lag, (0.5, 0.99)),
        "event_loop_lag_share_le_20ms": None if share_ok is None else round(share_ok, 5),
        "event_loop_lag_max_le_ms": _ms(max_bound(lag)),
        "event_loop_lag_buckets": per_bucket(lag),
        "turn_stages": stages,
        "outbound_frames_late": int(late),
        "server_cpu_percent": None if cpu is None else round(cpu, 1),
        "server_rss_mb_idle": mb(idle_rss),
        "server_rss_mb_peak": mb(rss_peak),
        "rss_per_call_kb": None if idle_rss is None else round((rss_peak - idle_rss) / n / 1024, 1),
        "max_active_calls": int(max((s.active_calls or 0.0) for s in samples)),
        "max_trio_tasks": int(max((s.tasks or 0.0) for s in samples)),
        "max_open_fds": int(max((s.fds or 0.0) for s in samples)),
        "sim": {
            "generator": opts.generator,
            "cpu_percent": None if sim_cpu is None else round(sim_cpu, 1),
            "cpu_percent_by_process": {k: round(v, 1) for k, v in sim_by_process.items()},
            # The callers' process: late there means late caller audio.
            "loop_lag_p99_ms": sim_stats.get("lag_p99_ms"),
            "line_late_resyncs": sum(o.late_resyncs for o in outcomes),
            "carrier": sim_stats,
            "threads_ms_per_call_second": window["sim_threads"],
        },
        "meets": {
            "loop_lag_p99_le_20ms": lag_ok,
            "no_late_frames": late == 0,
            "no_failed_calls": not reasons,
        },
    }
    busy = window["machine_busy"]
    if busy is not None:
        # Everything else on the machine in the window (other users, the kernel's own work).
        result["machine"] = {
            "busy_percent_of_one_core": round(busy, 1),
            "cores": os.cpu_count(),
            "others_percent": round(busy - (cpu or 0.0) - (sim_cpu or 0.0), 1),
        }
    # One generator process is one core's worth: any of them near it makes late audio.
    result["sim_saturated"] = any(
        v > SIM_CPU_WARN for k, v in sim_by_process.items() if k != "total"
    )
    others = result.get("machine", {}).get("others_percent")
    result["contended"] = others is not None and others > OTHERS_CPU_WARN
    if cpu is not None:
        result["server_cpu_ms_per_call_second"] = round(cpu * 10 / n, 2)
    if sim_cpu is not None:
        # The load generator's own cost (simulators + callers), to tell which side limits.
        result["sim_cpu_ms_per_call_second"] = round(sim_cpu * 10 / n, 2)
        result["sim_cpu_ms_per_call_second_by_process"] = {
            k: round(v * 10 / n, 2) for k, v in sim_by_process.items() if k != "total"
        }
        if cpu:
            result["sim_to_server_cpu"] = round(sim_cpu / cpu, 3)
    if t1 > t0:
        messages: dict[str, float] = {}
        for peer in ("carrier", "stt"):
            for direction in ("in", "out"):
                name = "voice_ws_messages_total"
                a = after.value(name, peer=peer, direction=direction)
                b = before.value(name, peer=peer, direction=direction)
                if a is not None and b is not None:
                    messages[f"{peer}_{direction}"] = round((a - b) / (t1 - t0) / n, 1)
        if messages:
            messages["total"] = round(sum(messages.values()), 1)
            result["messages_per_call_second"] = messages
        a, b = after.value("voice_media_reads_total"), before.value("voice_media_reads_total")
        if a is not None and b is not None:
            # Wake-ups of the media socket's reader (the lean socket; frames per read > 1
            # when reads are gathered).
            result["media_reads_per_call_second"] = round((a - b) / (t1 - t0) / n, 1)
    return result


def per_worker(
    window: dict[str, Any],
    level_start: Scrape,
    after: Scrape,
    idle: Scrape | None,
    n: int,
) -> dict[str, dict[str, Any]]:
    """The level's numbers by worker (one entry, ``"-"``, for a single process): the calls
    it carried over the whole level, and in the window its CPU, its CPU per call-second
    (over the calls it held on average), its loop lag and late frames; its tasks and
    descriptors after the level, against its own idle baseline."""
    before: Scrape = window["before"]
    end: Scrape = window["after"]
    samples: list[Scrape] = window["samples"]
    wall = end.at - before.at
    names = sorted(set(level_start.workers()) | set(after.workers()))
    carried = {
        w: (after.of("voice_calls_total", w) or 0.0)
        - (level_start.of("voice_calls_total", w) or 0.0)
        for w in names
    }
    total = sum(carried.values())
    out: dict[str, dict[str, Any]] = {}
    for w in names:
        cpu_s = None
        cpu_a, cpu_b = (
            end.of("process_cpu_seconds_total", w),
            before.of("process_cpu_seconds_total", w),
        )
        if cpu_a is not None and cpu_b is not None and wall > 0:
            cpu_s = cpu_a - cpu_b
        held = [s.of("voice_active_calls", w) or 0.0 for s in samples]
        mean_held = sum(held) / len(held) if held else 0.0
        lag = bucket_delta(
            before.histogram_of("voice_event_loop_lag_seconds", w),
            end.histogram_of("voice_event_loop_lag_seconds", w),
        )
        late = (end.of("voice_outbound_frames_late_total", w) or 0.0) - (
            before.of("voice_outbound_frames_late_total", w) or 0.0
        )
        share_ok = share_at_most(LAG_TARGET_S, lag)
        row: dict[str, Any] = {
            "calls": int(carried[w]),
            "calls_share": round(carried[w] / total, 3) if total else None,
            "mean_active_calls": round(mean_held, 1),
            "cpu_percent": None if cpu_s is None else round(cpu_s / wall * 100, 1),
            "cpu_ms_per_call_second": (
                round(cpu_s * 1000 / (mean_held * wall), 2)
                if cpu_s is not None and mean_held > 0
                else None
            ),
            "event_loop_lag": hist_summary(lag, (0.5, 0.99)),
            "event_loop_lag_share_le_20ms": None if share_ok is None else round(share_ok, 5),
            "outbound_frames_late": int(late),
        }
        if idle is not None:
            row["tasks_above_idle"] = int(
                (after.of("voice_trio_tasks", w) or 0) - (idle.of("voice_trio_tasks", w) or 0)
            )
            row["fds_above_idle"] = int(
                (after.of("process_open_fds", w) or 0) - (idle.of("process_open_fds", w) or 0)
            )
            row["registry_after"] = int(after.of("voice_active_calls", w) or 0)
        out[w] = row
    return out


def generator_table(levels: list[dict[str, Any]]) -> str:
    """The load generator's CPU per call-second, by process (and thread: reactor / Trio),
    against the server's."""
    head = (
        "| N | generator | load test | carrier (reactor / Trio) | providers (reactor / Trio) "
        "| generator total | server | generator / server |"
    )
    rows = [head, "|" + "---|" * 8]
    for lv in levels:
        by = lv.get("sim_cpu_ms_per_call_second_by_process", {})
        threads = lv["sim"].get("threads_ms_per_call_second", {})
        cell = partial(_process_cell, by, threads)
        rows.append(
            f"| {lv['concurrency']} | {lv['sim'].get('generator', '-')} "
            f"| {_fmt(by.get('load test'), 2)} | {cell('carrier')} | {cell('providers')} "
            f"| {_fmt(lv.get('sim_cpu_ms_per_call_second'), 2)} "
            f"| {_fmt(lv.get('server_cpu_ms_per_call_second'), 2)} "
            f"| {_fmt(lv.get('sim_to_server_cpu'), 2)} |"
        )
    return "\n".join(rows)


def _process_cell(by: dict[str, float], threads: dict[str, dict[str, float]], process: str) -> str:
    split = threads.get(process)
    text = _fmt(by.get(process), 2)
    if split:
        text += f" ({_fmt(split.get('reactor'), 2)} / {_fmt(split.get('main'), 2)})"
    return text


def worker_table(levels: list[dict[str, Any]]) -> str:
    head = (
        "| N | worker | calls (share) | mean calls held | CPU % | CPU ms/call-s "
        "| loop lag p50 / p99 ms (≤ bucket) | late frames | tasks / fds above idle |"
    )
    rows = [head, "|" + "---|" * 9]
    for lv in levels:
        for name, w in lv.get("workers", {}).items():
            lag = w["event_loop_lag"]
            share = "-" if w["calls_share"] is None else f"{w['calls_share'] * 100:.0f} %"
            rows.append(
                f"| {lv['concurrency']} | {name} | {w['calls']} ({share}) "
                f"| {_fmt(w['mean_active_calls'], 1)} | {_fmt(w['cpu_percent'])} "
                f"| {_fmt(w['cpu_ms_per_call_second'], 2)} "
                f"| {_fmt(lag['p50_ms'], 1)} / {_fmt(lag['p99_ms'], 1)} (≤ {_fmt(lag['p99_le_ms'])}) "
                f"| {w['outbound_frames_late']} "
                f"| {_fmt(w.get('tasks_above_idle'))} / {_fmt(w.get('fds_above_idle'))} |"
            )
    return "\n".join(rows)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else round(seconds * 1000, 3)


def find_knee(levels: list[dict[str, Any]]) -> int | None:
    """The highest level passing the target, counted up from the lowest level while they pass."""
    knee = None
    for level in sorted(levels, key=lambda x: x["concurrency"]):
        meets = level["meets"]
        if meets["loop_lag_p99_le_20ms"] and meets["no_late_frames"]:
            knee = level["concurrency"]
        else:
            break
    return knee


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(levels: list[dict[str, Any]]) -> str:
    head = (
        "| N | calls ok / failed | v2v p50 / p95 / p99 ms | overhead p50 / p99 ms "
        "| loop lag p99 ms (≤ bucket) | late frames | server CPU % | CPU ms/call-s "
        "| msgs/call-s | RSS peak MB | RSS/call KB | sim CPU % | sim CPU ms/call-s "
        "| sim / server CPU | sim lag p99 ms | others CPU % | left tasks / fds |"
    )
    rows = [head, "|" + "---|" * 17]
    for lv in levels:
        v2v, ovh, lag = lv["voice_to_voice_ms"], lv["server_overhead"], lv["event_loop_lag"]
        lag_text = f"{_fmt(lag['p99_ms'], 1)} (≤ {_fmt(lag['p99_le_ms'])})"
        if lag["p99_overflow"]:
            lag_text = f"> {_fmt(lag['p99_ms'])}"
        sim = lv["sim"]
        flag = " ⚠" if lv["sim_saturated"] else ""
        busy = " ⚠" if lv.get("contended") else ""
        left = lv.get("after_level", {})
        rows.append(
            f"| {lv['concurrency']} | {lv['calls']['completed']} / {lv['calls']['failed']} "
            f"| {_fmt(v2v['p50'])} / {_fmt(v2v['p95'])} / {_fmt(v2v['p99'])} "
            f"| {_fmt(ovh['p50_ms'], 2)} / {_fmt(ovh['p99_ms'], 2)} "
            f"| {lag_text} | {lv['outbound_frames_late']} | {_fmt(lv['server_cpu_percent'])} "
            f"| {_fmt(lv.get('server_cpu_ms_per_call_second'), 2)} "
            f"| {_fmt(lv.get('messages_per_call_second', {}).get('total'), 1)} "
            f"| {_fmt(lv['server_rss_mb_peak'], 1)} | {_fmt(lv['rss_per_call_kb'])} "
            f"| {_fmt(sim['cpu_percent'])}{flag} "
            f"| {_fmt(lv.get('sim_cpu_ms_per_call_second'), 2)} "
            f"| {_fmt(lv.get('sim_to_server_cpu'), 2)} "
            f"| {_fmt(sim['loop_lag_p99_ms'], 1)} "
            f"| {_fmt(lv.get('machine', {}).get('others_percent'))}{busy} "
            f"| {_fmt(left.get('tasks_above_idle'))} / {_fmt(left.get('fds_above_idle'))} |"
        )
    return "\n".join(rows)


def plot(levels: list[dict[str, Any]], path: Path) -> str:
    plt = load_matplotlib()
    if plt is None:
        return (
            "matplotlib is not installed: no PNG written (pip install matplotlib to get "
            f"{path.name}; the numbers are all in results.json)"
        )
    xs = [lv["concurrency"] for lv in levels]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        top.plot(xs, [lv["voice_to_voice_ms"][key] for lv in levels], style, label=f"v2v {key}")
    top.set_ylabel("voice-to-voice, ms")
    top.legend()
    top.grid(True, alpha=0.3)
    series = (
        ("server overhead p50", [lv["server_overhead"]["p50_ms"] for lv in levels], "o-"),
        ("server overhead p99", [lv["server_overhead"]["p99_ms"] for lv in levels], "s-"),
        ("event-loop lag p99", [lv["event_loop_lag"]["p99_ms"] for lv in levels], "^-"),
    )
    for label, ys, style in series:
        bottom.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=label)
    bottom.axhline(20, color="red", linestyle="--", linewidth=1, label="lag target 20 ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (bucket resolution)")
    bottom.set_xlabel("concurrent calls")
    bottom.legend()
    bottom.grid(True, alpha=0.3, which="both")
    fig.suptitle("voice-trio loadtest: percentiles against concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


async def run(opts: Options) -> int:
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    meta: dict[str, Any] = {
        "machine": machine_info(),
        "options": {
            "levels": opts.levels,
            "turns": opts.turns,
            "duration_s": opts.duration,
            "stagger_ms": opts.stagger_ms,
            "ms_per_char": opts.ms_per_char,
            "llm_ttft_s": opts.llm_ttft,
            "tts_ttfb_ms": opts.tts_ttfb,
            "max_calls_per_level": opts.max_calls,
            "workers": opts.workers,
            "store": "postgres" if opts.database_url else "sqlite",
            "generator": opts.generator,
            "synchronized": opts.synchronized,
            "sync_margin_s": opts.sync_margin if opts.synchronized else None,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "variant": opts.variant or None,
    }
    levels: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    server: ServerProcess | None = None
    generator: Generator | None = None
    try:
        with trio.fail_after(opts.time_limit):
            async with trio.open_nursery() as nursery:
                port = free_port()
                generator = await start_generator(
                    opts.generator,
                    nursery,
                    GeneratorOptions(
                        ms_per_char=opts.ms_per_char,
                        llm_ttft=opts.llm_ttft,
                        tts_ttfb_ms=opts.tts_ttfb,
                        webhook_url=f"http://127.0.0.1:{port}/webhook/telnyx",
                        log_dir=opts.out,
                    ),
                )
                meta["generator_pids"] = generator.pids()
                env = server_env(
                    generator.server_env(),
                    port,
                    opts.out,
                    workers=opts.workers,
                    database_url=opts.database_url,
                )
                launcher = None
                if opts.variant:
                    env["VARIANT"] = opts.variant
                    launcher = VARIANT_SERVE
                server = ServerProcess(
                    env, port, opts.out / "server.log", launcher, workers=opts.workers
                )
                await server.start()
                runner = Runner(opts, generator, server)
                alone = await runner.warm_up()
                if opts.synchronized:
                    plan = BurstPlan.from_call(alone, opts.sync_margin)
                    meta["burst_plan"] = plan.as_json()
                    for n in opts.levels:
                        bursts.append(await runner.burst(n, plan))
                        write_json(opts.out / "results.json", {**meta, "bursts": bursts})
                for n in [] if opts.synchronized else opts.levels:
                    result = await runner.level(n)
                    levels.append(result)
                    write_json(opts.out / "results.json", {**meta, "levels": levels})
                    left = result["after_level"]
                    if left["tasks_above_idle"] > 0:
                        print(
                            f"warning: N={n}: after the level the server still has "
                            f"{left['tasks_above_idle']} tasks and {left['fds_above_idle']} "
                            "descriptors more than at idle (a leak? see scripts/soak.py; "
                            "pooled keep-alive connections hold descriptors, not tasks)",
                            file=sys.stderr,
                        )
                    if result["contended"]:
                        print(
                            f"warning: N={n}: the rest of the machine used "
                            f"{result['machine']['others_percent']} % of a core during the "
                            "window; the level's numbers are disturbed (run it again)",
                            file=sys.stderr,
                        )
                    if result["sim_saturated"]:
                        print(
                            f"warning: N={n}: a load generator process used more than "
                            f"{SIM_CPU_WARN:.0f} % of a core "
                            f"({result['sim']['cpu_percent_by_process']}); the level's "
                            "numbers are limited by the generator, not only by the server",
                            file=sys.stderr,
                        )
                await runner.client.aclose()
                code = await server.stop()
                meta["server_exit_code"] = code
                nursery.cancel_scope.cancel()
    finally:
        if server is not None:
            server.kill_now()
        if generator is not None:
            await generator.aclose()
    meta["server_log_problems"] = server.log_problems() if server else {}
    meta["wall_seconds"] = round(time.time() - started, 1)
    if opts.synchronized:
        write_json(opts.out / "results.json", {**meta, "bursts": bursts})
        print()
        print(burst_table(bursts))
        print(f"results: {opts.out / 'results.json'}; server log: {opts.out / 'server.log'}")
        return 0
    knee = find_knee(levels)
    write_json(opts.out / "results.json", {**meta, "levels": levels, "knee": knee})
    print()
    print(table(levels))
    print()
    print(generator_table(levels))
    print()
    print(worker_table(levels))
    print()
    print(
        f"knee (loop lag p99 <= 20 ms and no late frame): "
        f"{knee if knee is not None else 'none of the levels'}"
    )
    failing = next((lv for lv in levels if lv["concurrency"] > (knee or 0)), None)
    if failing is not None and (failing["contended"] or failing["sim_saturated"]):
        print(
            f"note: N={failing['concurrency']} failed while "
            + ("the machine was busy with other work" if failing["contended"] else "")
            + (" and " if failing["contended"] and failing["sim_saturated"] else "")
            + ("the simulators saturated their core" if failing["sim_saturated"] else "")
            + ": the knee may be higher on a quieter or bigger machine"
        )
    print(plot(levels, opts.out / "loadtest.png"))
    print(f"results: {opts.out / 'results.json'}; server log: {opts.out / 'server.log'}")
    problems = meta["server_log_problems"]
    if problems.get("error") or problems.get("traceback"):
        print(f"note: the server logged errors: {problems}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("hypercorn.error").disabled = True  # the simulators' "Running on" lines
    sigterm_as_interrupt()
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
