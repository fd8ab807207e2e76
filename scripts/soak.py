"""Soak: waves of calls through one server process, then proof that nothing was left behind.

    .venv/bin/python scripts/soak.py --calls 2000 --concurrency 40
    .venv/bin/python scripts/soak.py --duration 3600 --concurrency 20 --ms-per-char 65

The server (``python -m voice_trio.cli serve``) runs as a child process on 127.0.0.1; the
simulators and the scripted callers run in this process. After one warm-up call the idle
baseline is taken: live Trio tasks, open descriptors and registry size (``voice_trio_tasks``,
``process_open_fds``, ``voice_active_calls`` on ``/metrics``). Then waves of
``--concurrency`` inbound calls (``--stagger-ms`` apart; each wave waits for all its calls)
run until ``--calls`` calls or ``--duration`` seconds. Meanwhile RSS, descriptors, tasks and
registry size are sampled every ``--sample-every`` seconds.

At the end, and after the same single call that preceded the baseline, the script waits up
to ``--settle`` seconds for the state below. The lone call matters because keep-alive pools
close idle connections lazily, when they are next used: the server's pools to the simulators
(which close their side after 1 s idle) and the Telnyx simulator's webhook pool (whose idle
connections the server itself keeps for up to 30 s). So both states are "idle after one lone
call":

- tasks <= baseline and registry == 0 (exact: leaks are counts);
- descriptors <= baseline + ``--fd-tolerance`` (default 2): a keep-alive pool may hold one
  idle connection more or less to a simulator than at the baseline, depending on timing;
- RSS drift <= ``--rss-drift-mb`` (default 2): RSS at the last wave's end minus RSS at the end
  of the wave that completed the warm-up (the first ``--warm-up`` share of the calls, at least
  one wave). Both are taken with the registry empty. Bounded caches that are still filling
  (the server's webhook-dedup memory keeps ids for 10 minutes) count as drift: for the 2 MB
  check, warm up for longer than that (e.g. ``--warm-up 0.3`` on a 10 000-call soak).

With ``--workers N`` (and ``--database-url``: the workers share PostgreSQL) the counts are
the host's, summed over the workers' ``/metrics``, and each worker is also held to its own
baseline (tasks, descriptors within the tolerance, an empty registry): a worker that leaks
cannot hide behind one that gave back more than it took.

A leak is printed with what leaked: task and descriptor counts, descriptors by kind and the
server's TCP sockets by direction, peer (which simulator) and state.

Writes ``soak.json`` (summary and samples), ``soak.png`` (RSS and tasks over time, if
matplotlib is importable) and ``server.log`` to ``--out``. Exit code 0: no leak; 1: a leak
or too many failed calls (printed); 2: the harness could not run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from bench.lab import (
    CallOutcome,
    call_script,
    lab_ports,
    open_bench_lab,
    prune_lab,
    run_inbound_call,
)
from bench.machine import machine_info
from bench.report import Progress, bar, load_matplotlib, mb, write_json
from bench.scrape import Scrape, scrape
from bench.server import (
    TRACED_SERVE,
    ServerProcess,
    free_port,
    server_env,
    sigterm_as_interrupt,
)

# Unchanged this long (longer than Hypercorn's 5 s keep-alive) counts as settled.
STABLE_S = 6.0


@dataclass
class Options:
    calls: int | None
    duration: float | None
    concurrency: int
    turns: int
    stagger_ms: float
    ms_per_char: int
    llm_ttft: float
    tts_ttfb: float
    warm_up: float
    rss_drift_mb: float
    fd_tolerance: int
    settle: float
    max_failed_share: float
    sample_every: float
    out: Path
    quiet: bool
    slow_server: bool = False
    workers: int = 1
    database_url: str = ""


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=None, help="calls to make (default 1000)")
    parser.add_argument(
        "--duration", type=float, default=None, help="or: keep starting waves for this many s"
    )
    parser.add_argument("--concurrency", type=int, default=20, help="calls per wave (default 20)")
    parser.add_argument("--turns", type=int, default=1, help="exchanges per call (default 1)")
    parser.add_argument("--stagger-ms", type=float, default=20.0, help="between call starts")
    parser.add_argument(
        "--ms-per-char", type=int, default=25, help="speech rate, ms per character (default 25)"
    )
    parser.add_argument("--llm-ttft", type=float, default=0.05, help="LLM first token, s")
    parser.add_argument("--tts-ttfb", type=float, default=20.0, help="TTS first byte, ms")
    parser.add_argument(
        "--warm-up", type=float, default=0.1, help="share of the calls before RSS is compared"
    )
    parser.add_argument("--rss-drift-mb", type=float, default=2.0, help="allowed RSS drift")
    parser.add_argument(
        "--fd-tolerance", type=int, default=2, help="descriptors allowed above the baseline"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=40.0,
        help="max wait for idle, s (the server reaps idle HTTP connections after 30 s)",
    )
    parser.add_argument(
        "--max-failed-share", type=float, default=0.05, help="failed calls allowed (share)"
    )
    parser.add_argument("--sample-every", type=float, default=1.0, help="sampling period, s")
    parser.add_argument("--out", default="results/soak", help="results directory")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument(
        "--slow-server",
        action="store_true",
        help="run the server under tracemalloc (several times slower): the overload case",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes (default 1); more than 1 needs --database-url, and\n"
        "each worker is judged against its own baseline",
    )
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL for the store (default: SQLite)"
    )
    args = parser.parse_args(argv)
    if args.workers > 1 and not args.database_url:
        parser.error("--workers above 1 needs --database-url (the workers share PostgreSQL)")
    if args.calls is None and args.duration is None:
        args.calls = 1000
    if args.concurrency < 1 or args.turns < 1:
        parser.error("--concurrency and --turns must be at least 1")
    return Options(
        calls=args.calls,
        duration=args.duration,
        concurrency=args.concurrency,
        turns=args.turns,
        stagger_ms=args.stagger_ms,
        ms_per_char=args.ms_per_char,
        llm_ttft=args.llm_ttft,
        tts_ttfb=args.tts_ttfb,
        warm_up=args.warm_up,
        rss_drift_mb=args.rss_drift_mb,
        fd_tolerance=args.fd_tolerance,
        settle=args.settle,
        max_failed_share=args.max_failed_share,
        sample_every=args.sample_every,
        out=Path(args.out),
        quiet=args.quiet,
        slow_server=args.slow_server,
        workers=max(1, args.workers),
        database_url=args.database_url,
    )


def call_timeout(opts: Options) -> float:
    per_turn = 140 * opts.ms_per_char / 1000 + 2.0 + opts.llm_ttft
    return 3 * (8 + opts.turns * per_turn) + 20


@dataclass
class Idle:
    """The server at rest: what must come back after the soak."""

    tasks: int
    fds: int
    registry: int
    rss: float
    fd_kinds: dict[str, int]
    sockets: dict[str, int] = field(default_factory=dict)
    # With several workers: each one's (tasks, descriptors, registry, inbound connections).
    workers: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trio_tasks": self.tasks,
            "open_fds": self.fds,
            "registry": self.registry,
            "rss_mb": mb(self.rss),
            "fd_kinds": self.fd_kinds,
            "sockets": self.sockets,
            "workers": {
                w: {"trio_tasks": t, "open_fds": f, "registry": r, "inbound_connections": i}
                for w, (t, f, r, i) in self.workers.items()
            },
        }


def excused(now: tuple[int, int, int, int], base: tuple[int, int, int, int]) -> int:
    """Tasks and descriptors a worker may have above its baseline: one each per inbound
    connection more than then. An idle keep-alive connection the simulators keep open
    (one task, one descriptor) lands on either worker, and may sit on another one at the
    end than at the baseline; the host's totals, judged exactly, still catch a worker
    that keeps connections its peers let go."""
    return max(0, now[3] - base[3])


def back_at(current: dict[str, tuple[int, int, int, int]], target: Idle) -> bool:
    """Every worker at or below its own baseline of tasks and descriptors."""
    return all(
        w in current
        and current[w][0] <= base[0] + excused(current[w], base)
        and current[w][1] <= base[1] + excused(current[w], base)
        for w, base in target.workers.items()
    )


class Soak:
    def __init__(self, opts: Options, lab: Any, server: ServerProcess) -> None:
        self.opts = opts
        self.lab = lab
        self.server = server
        # With several workers a kept-alive scrape connection would sit on one worker and
        # count among its tasks and descriptors, on another one the next time: close it.
        headers = {"Connection": "close"} if opts.workers > 1 else {}
        self.client = httpx.AsyncClient(
            base_url=server.base_url, timeout=10, trust_env=False, headers=headers
        )
        self.ports = lab_ports(lab)
        if opts.database_url:
            self.ports[urlsplit(opts.database_url).port or 5432] = "store"
        self.progress = Progress()
        self.number = 0
        self.done = 0
        self.failed: Counter[str] = Counter()
        self.in_call = 0
        self.samples: list[dict[str, Any]] = []
        self.boundaries: list[dict[str, Any]] = []  # the registry empty after each wave
        self.t0 = trio.current_time()
        self.wave = 0
        self.warm_up_calls = 0  # the lone calls before the baseline

    async def call(self) -> CallOutcome:
        self.number += 1
        return await run_inbound_call(
            self.lab,
            number=f"+57310{self.number:07d}",
            script=call_script(self.opts.turns, pause_ms=200, silence_ms=300),
            turns=self.opts.turns,
            ms_per_char=self.opts.ms_per_char,
            timeout_s=call_timeout(self.opts),
            turn_gap_ms=300,
        )

    async def lone_call(self) -> None:
        """One call alone; with several workers, one at a time until each worker has
        carried one (each worker's keep-alive pools then hold what one call leaves)."""
        before = await scrape(self.client)
        for _ in range(8 * self.opts.workers):
            outcome = await self.call()
            if not outcome.ok:
                raise RuntimeError(f"a single call failed: {outcome.reason}")
            await self.until_empty()
            await trio.sleep(1.2)  # the workers publish their gauges every second
            now = await scrape(self.client)
            carried = [
                w
                for w in now.workers()
                if (now.of("voice_calls_total", w) or 0) > (before.of("voice_calls_total", w) or 0)
            ]
            if len(carried) >= self.opts.workers:
                return
        raise RuntimeError("the calls did not reach every worker")

    def by_worker(self, sample: Scrape) -> dict[str, tuple[int, int, int, int]]:
        """Each worker's live tasks, descriptors (but its store connections, a bounded
        pool that grows under load and shrinks after minutes), registry size and inbound
        connections; empty for a single process."""
        out = {}
        for w, pid in sample.worker_pids().items():
            sockets = self.server.socket_peers(self.ports, pid)
            store = sum(n for key, n in sockets.items() if key.startswith("out store "))
            out[w] = (
                int(sample.of("voice_trio_tasks", w) or 0),
                int(sample.of("process_open_fds", w) or 0) - store,
                int(sample.of("voice_active_calls", w) or 0),
                sockets.get("in ESTABLISHED", 0),
            )
        return out

    async def until_empty(self, timeout: float = 60.0) -> Scrape:
        with trio.move_on_after(timeout):
            while True:
                current = await scrape(self.client)
                if not current.active_calls:
                    return current
                await trio.sleep(0.2)
        return await scrape(self.client)

    async def idle(self, target: Idle | None = None) -> Idle:
        """Wait (at most ``--settle`` s) until the registry is empty and tasks and descriptors
        have not changed for ``STABLE_S``, or, given ``target``, are back at it (or below)."""
        deadline = trio.current_time() + self.opts.settle
        previous: tuple[int, int] | None = None
        stable_since = trio.current_time()
        while True:
            current = await scrape(self.client)
            self.server.worker_pids = current.worker_pids()
            sockets = self.server.socket_peers(self.ports)
            store = sum(n for key, n in sockets.items() if key.startswith("out store "))
            # Descriptors but the store's pool (see by_worker).
            state = (int(current.tasks or 0), int(current.fds or 0) - store)
            now = trio.current_time()
            if state != previous or current.active_calls:
                previous, stable_since = state, now
            if not current.active_calls:
                back = state[0] <= target.tasks and state[1] <= target.fds if target else False
                if target is not None and back and back_at(self.by_worker(current), target):
                    break
                if now - stable_since >= STABLE_S:
                    break
            if now >= deadline:
                break
            await trio.sleep(0.5)
        return Idle(
            tasks=state[0],
            fds=state[1],
            registry=int(current.active_calls or 0),
            rss=current.rss or 0.0,
            fd_kinds=self.server.fd_kinds(),
            sockets=sockets,
            workers=self.by_worker(current),
        )

    def record(self, current: Scrape) -> dict[str, Any]:
        row = {
            "t": round(current.at - self.t0, 2),
            "calls_done": self.done,
            "rss_mb": mb(current.rss),
            "open_fds": int(current.fds or 0),
            "trio_tasks": int(current.tasks or 0),
            "registry": int(current.active_calls or 0),
        }
        self.samples.append(row)
        return row

    def target_reached(self, started_at: float) -> bool:
        opts = self.opts
        if opts.calls is not None and self.number - self.warm_up_calls >= opts.calls:
            return True
        return opts.duration is not None and trio.current_time() - started_at >= opts.duration

    async def waves(self) -> None:
        opts = self.opts
        started_at = trio.current_time()
        stagger = opts.stagger_ms / 1000
        while not self.target_reached(started_at):
            self.wave += 1
            size = opts.concurrency
            if opts.calls is not None:
                size = min(size, opts.calls - (self.number - self.warm_up_calls))

            async def one(i: int) -> None:
                await trio.sleep(i * stagger)
                self.in_call += 1
                try:
                    outcome = await self.call()
                finally:
                    self.in_call -= 1
                self.done += 1
                if not outcome.ok:
                    self.failed[outcome.reason] += 1

            async with trio.open_nursery() as nursery:
                for i in range(size):
                    nursery.start_soon(one, i)
            row = self.record(await self.until_empty())
            row["sockets"] = self.server.socket_peers(self.ports)
            self.boundaries.append(row)
            prune_lab(self.lab)

    async def sample(self) -> None:
        while True:
            row = self.record(await scrape(self.client))
            if not self.opts.quiet:
                total = self.opts.calls
                goal = f"/{total}" if total else ""
                share = self.done / total if total else 0.0
                self.progress.update(
                    f"soak {self.done}{goal} calls {bar(share, 1.0) if total else ''} "
                    f"wave {self.wave}  in call {self.in_call:>3}  RSS {row['rss_mb']} MB  "
                    f"tasks {row['trio_tasks']}  fds {row['open_fds']}  "
                    f"failed {sum(self.failed.values())}"
                )
            await trio.sleep(self.opts.sample_every)


def warm_boundary(boundaries: list[dict[str, Any]], calls: int, share: float) -> dict | None:
    """The first wave end at which at least ``share`` of the calls had been made."""
    need = max(1, math.ceil(share * calls))
    for row in boundaries:
        if row["calls_done"] >= need:
            return row
    return None


def slope_per_1000(rows: list[dict[str, Any]]) -> float | None:
    """Least-squares RSS growth in MB per 1000 calls over the given wave ends."""
    if len(rows) < 3:
        return None
    xs = [r["calls_done"] for r in rows]
    ys = [r["rss_mb"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 1000, 3)


def judge(
    opts: Options,
    baseline: Idle,
    final: Idle,
    boundaries: list[dict[str, Any]],
    done: int,
    failed: int,
) -> tuple[list[str], dict[str, Any]]:
    """The leak verdict: problems found (empty: none) and the numbers behind it."""
    problems: list[str] = []
    if final.tasks > baseline.tasks:
        problems.append(
            f"Trio tasks: {final.tasks} after the soak vs {baseline.tasks} at the baseline "
            f"({final.tasks - baseline.tasks:+d})"
        )
    if final.registry != 0:
        problems.append(f"registry: {final.registry} calls still registered")
    if final.fds > baseline.fds + opts.fd_tolerance:
        kinds = {
            k: final.fd_kinds.get(k, 0) - baseline.fd_kinds.get(k, 0)
            for k in set(final.fd_kinds) | set(baseline.fd_kinds)
            if final.fd_kinds.get(k, 0) != baseline.fd_kinds.get(k, 0)
        }
        sockets = {
            k: final.sockets.get(k, 0) - baseline.sockets.get(k, 0)
            for k in set(final.sockets) | set(baseline.sockets)
            if final.sockets.get(k, 0) != baseline.sockets.get(k, 0)
        }
        problems.append(
            f"descriptors: {final.fds} after the soak vs {baseline.fds} at the baseline "
            f"(+{final.fds - baseline.fds}, tolerance {opts.fd_tolerance}; by kind: {kinds}; "
            f"TCP sockets by peer and state: {sockets})"
        )
    for w, now in final.workers.items():
        base = baseline.workers.get(w, (0, 0, 0, 0))
        extra = excused(now, base)
        tasks, fds, registry, inbound = now
        if tasks > base[0] + extra:
            problems.append(
                f"worker {w}: Trio tasks {tasks} vs {base[0]} at the baseline "
                f"(inbound connections {inbound} vs {base[3]})"
            )
        if registry != 0:
            problems.append(f"worker {w}: {registry} calls still registered")
        if fds > base[1] + extra + opts.fd_tolerance:
            problems.append(
                f"worker {w}: descriptors {fds} vs {base[1]} at the baseline "
                f"(tolerance {opts.fd_tolerance}; inbound connections {inbound} vs {base[3]})"
            )
    warm = warm_boundary(boundaries, done, opts.warm_up)
    drift = None
    if warm is not None and boundaries:
        drift = round(boundaries[-1]["rss_mb"] - warm["rss_mb"], 3)
        if drift > opts.rss_drift_mb:
            problems.append(
                f"RSS drift: +{drift} MB from {warm['rss_mb']} MB (after {warm['calls_done']} "
                f"calls) to {boundaries[-1]['rss_mb']} MB (after {boundaries[-1]['calls_done']}), "
                f"limit {opts.rss_drift_mb} MB"
            )
    if done and failed / done > opts.max_failed_share:
        problems.append(f"failed calls: {failed} of {done} (allowed share {opts.max_failed_share})")
    after_warm = [
        b for b in boundaries if warm is not None and b["calls_done"] >= warm["calls_done"]
    ]
    numbers = {
        "rss_mb_at_warm_up": warm["rss_mb"] if warm else None,
        "calls_at_warm_up": warm["calls_done"] if warm else None,
        "rss_mb_at_end": boundaries[-1]["rss_mb"] if boundaries else None,
        "rss_drift_mb": drift,
        "rss_slope_mb_per_1000_calls": slope_per_1000(after_warm),
        "tasks_delta": final.tasks - baseline.tasks,
        "fds_delta": final.fds - baseline.fds,
        "registry_at_end": final.registry,
        "workers": {
            w: {
                "tasks_delta": now[0] - baseline.workers.get(w, (0, 0, 0, 0))[0],
                "fds_delta": now[1] - baseline.workers.get(w, (0, 0, 0, 0))[1],
                "registry_at_end": now[2],
                "inbound_connections_delta": now[3] - baseline.workers.get(w, (0, 0, 0, 0))[3],
            }
            for w, now in final.workers.items()
        },
    }
    return problems, numbers


def plot(samples: list[dict[str, Any]], path: Path) -> str:
    plt = load_matplotlib()
    if plt is None:
        return "matplotlib is not installed: no PNG written (the samples are in soak.json)"
    ts = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(ts, [s["rss_mb"] for s in samples], "-", color="tab:blue")
    top.set_ylabel("server RSS, MB")
    top.grid(True, alpha=0.3)
    bottom.plot(ts, [s["trio_tasks"] for s in samples], "-", label="Trio tasks")
    bottom.plot(ts, [s["open_fds"] for s in samples], "-", label="open fds")
    bottom.plot(ts, [s["registry"] for s in samples], "-", label="calls in registry")
    bottom.set_xlabel("seconds")
    bottom.legend()
    bottom.grid(True, alpha=0.3)
    fig.suptitle("voice-trio soak: server RSS, tasks, descriptors over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


async def run(opts: Options) -> int:
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict[str, Any] = {
        "machine": machine_info(),
        "options": {
            "calls": opts.calls,
            "duration_s": opts.duration,
            "concurrency": opts.concurrency,
            "turns": opts.turns,
            "ms_per_char": opts.ms_per_char,
            "llm_ttft_s": opts.llm_ttft,
            "tts_ttfb_ms": opts.tts_ttfb,
            "warm_up_share": opts.warm_up,
            "rss_drift_mb": opts.rss_drift_mb,
            "fd_tolerance": opts.fd_tolerance,
            "slow_server": opts.slow_server,
            "workers": opts.workers,
            "store": "postgres" if opts.database_url else "sqlite",
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    server: ServerProcess | None = None
    soak: Soak | None = None
    limit = (
        (opts.duration or 0)
        + ((opts.calls or 0) / opts.concurrency + 2) * (call_timeout(opts) + 5)
        + 4 * opts.settle
        + 120
    )
    try:
        with trio.fail_after(limit):
            async with trio.open_nursery() as nursery:
                port = free_port()
                lab = await open_bench_lab(
                    nursery,
                    ms_per_char=opts.ms_per_char,
                    llm_ttft=opts.llm_ttft,
                    tts_ttfb_ms=opts.tts_ttfb,
                    webhook_url=f"http://127.0.0.1:{port}/webhook/telnyx",
                    keep_alive_s=1.0,
                )
                server = ServerProcess(
                    server_env(
                        lab.server_env(),
                        port,
                        opts.out,
                        workers=opts.workers,
                        database_url=opts.database_url,
                    ),
                    port,
                    opts.out / "server.log",
                    TRACED_SERVE if opts.slow_server else None,
                    workers=opts.workers,
                )
                await server.start(timeout=90 if opts.slow_server else 30)
                soak = Soak(opts, lab, server)
                await soak.lone_call()
                soak.warm_up_calls = soak.number
                baseline = await soak.idle()
                soak.record(await scrape(soak.client))
                async with trio.open_nursery() as inner:
                    inner.start_soon(soak.sample)
                    await soak.waves()
                    inner.cancel_scope.cancel()
                if not opts.quiet:
                    soak.progress.done(f"soak: {soak.done} calls in {soak.wave} waves")
                # The simulators close idle keep-alive connections after 1 s; the lone call
                # then makes the server's pools notice (and drop) the closed ones.
                await trio.sleep(2.0)
                await soak.lone_call()
                final = await soak.idle(target=baseline)
                soak.record(await scrape(soak.client))
                await soak.client.aclose()
                summary["server_exit_code"] = await server.stop()
                nursery.cancel_scope.cancel()
    except Exception as exc:  # the harness itself failed (server gone, timeout, ...)
        print(f"soak: could not run: {exc!r}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.kill_now()
    failed = sum(soak.failed.values())
    problems, numbers = judge(opts, baseline, final, soak.boundaries, soak.done, failed)
    summary.update(
        {
            "calls": {
                "done": soak.done,
                "failed": failed,
                "failure_reasons": dict(soak.failed.most_common(5)),
                "waves": soak.wave,
            },
            "baseline": baseline.as_dict(),
            "final": final.as_dict(),
            **numbers,
            "leaks": problems,
            "ok": not problems,
            "server_log_problems": server.log_problems(),
            "wall_seconds": round(time.time() - started, 1),
            "wave_ends": soak.boundaries,
            "samples": soak.samples,
        }
    )
    write_json(opts.out / "soak.json", summary)
    print(
        f"soak: {soak.done} calls ({failed} failed) in {summary['wall_seconds']} s; "
        f"tasks {baseline.tasks} -> {final.tasks}, fds {baseline.fds} -> {final.fds}, "
        f"registry {final.registry}; RSS {numbers['rss_mb_at_warm_up']} MB after warm-up -> "
        f"{numbers['rss_mb_at_end']} MB (drift {numbers['rss_drift_mb']} MB, "
        f"slope {numbers['rss_slope_mb_per_1000_calls']} MB/1000 calls)"
    )
    for w, delta in numbers["workers"].items():
        print(
            f"  worker {w}: tasks {delta['tasks_delta']:+d}, fds {delta['fds_delta']:+d}, "
            f"registry {delta['registry_at_end']}, inbound connections "
            f"{delta['inbound_connections_delta']:+d}"
        )
    print(plot(soak.samples, opts.out / "soak.png"))
    print(f"summary: {opts.out / 'soak.json'}; server log: {opts.out / 'server.log'}")
    if problems:
        print("LEAK: " + "\nLEAK: ".join(problems), file=sys.stderr)
        return 1
    print("no leak")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("hypercorn.error").disabled = True  # the simulators' "Running on" lines
    sigterm_as_interrupt()
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
