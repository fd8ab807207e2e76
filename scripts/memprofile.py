"""What an active call holds in the server's memory: tracemalloc with N calls live.

    .venv/bin/python scripts/memprofile.py --calls 30 --out results/mem

The server runs under tracemalloc (scripts/bench/traced_serve.py). After one warm-up call and
a settle, snapshot A; then N calls are started (100 ms apart, long enough to stay up) and,
once all of them are in conversation, snapshot B. B - A divided by N is what one call
holds, grouped three ways: by the voice_trio line that (most recently) caused the
allocation, by package, and by the allocating line itself. RSS per call from /metrics is
printed next to it: the rest of RSS is the allocator's slack and non-Python memory.
"""

from __future__ import annotations

import argparse
import os
import signal
import tracemalloc
from collections import Counter
from pathlib import Path

import httpx
import trio

from bench.lab import call_script, open_bench_lab, run_inbound_call
from bench.report import mb
from bench.scrape import scrape
from bench.server import TRACED_SERVE, ServerProcess, free_port, server_env


def owner(tb: tracemalloc.Traceback) -> str:
    """The most recent voice_trio frame (not the simulators), else the allocating frame."""
    for frame in reversed(tb):  # tracemalloc orders frames oldest first
        name = frame.filename
        if "/voice_trio/" in name and "/voice_trio/sim/" not in name:
            return f"{name.split('/voice_trio/', 1)[1]}:{frame.lineno}"
    return f"(no voice_trio frame) {short(tb[-1].filename)}:{tb[-1].lineno}"


def short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def package(path: str) -> str:
    p = short(path)
    return p.split("/", 1)[0] if "/" in p else p


def report(a: tracemalloc.Snapshot, b: tracemalloc.Snapshot, n: int, top: int) -> str:
    diff = b.compare_to(a, "traceback")
    by_owner: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    blocks = 0
    total = 0
    for stat in diff:
        if stat.size_diff == 0:
            continue
        tb = stat.traceback
        total += stat.size_diff
        blocks += stat.count_diff
        by_owner[owner(tb)] += stat.size_diff
        by_pkg[package(tb[-1].filename)] += stat.size_diff
        by_line[f"{short(tb[-1].filename)}:{tb[-1].lineno}"] += stat.size_diff
    lines = [f"traced Python memory per call: {total / n / 1024:.1f} KB ({blocks / n:.0f} blocks)"]
    for title, table in (
        ("by voice_trio line (most recent voice_trio frame)", by_owner),
        ("by package of the allocating line", by_pkg),
        ("by allocating line", by_line),
    ):
        lines.append(f"\n{title}:")
        for key, size in table.most_common(top):
            lines.append(f"{size / n / 1024:8.1f} KB  {key}")
    return "\n".join(lines)


def fresh_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("snap-*"):
        old.unlink()
    return out


async def run(args: argparse.Namespace) -> None:
    out = fresh_dir(args.out)
    async with trio.open_nursery() as nursery:
        port = free_port()
        lab = await open_bench_lab(
            nursery,
            ms_per_char=65,
            llm_ttft=0.4,
            tts_ttfb_ms=150,
            webhook_url=f"http://127.0.0.1:{port}/webhook/telnyx",
        )
        env = server_env(lab.server_env(), port, out, {"TRACEMALLOC_OUT": str(out)})
        server = ServerProcess(env, port, out / "server.log", TRACED_SERVE)
        await server.start(timeout=240)  # tracemalloc slows start-up several-fold
        client = httpx.AsyncClient(base_url=server.base_url, timeout=30, trust_env=False)
        try:

            async def call(i: int, turns: int) -> None:
                await run_inbound_call(
                    lab,
                    number=f"+57310{i:07d}",
                    script=call_script(turns),
                    turns=turns,
                    ms_per_char=65,
                    timeout_s=600,
                )

            await call(0, 1)
            await trio.sleep(8)
            idle = await scrape(client)
            await snapshot(server, out, 1)
            async with trio.open_nursery() as calls:
                for i in range(args.calls):
                    calls.start_soon(call, i + 1, args.turns)
                    await trio.sleep(0.1)
                await trio.sleep(args.settle)
                live = await scrape(client)
                await snapshot(server, out, 2)
                calls.cancel_scope.cancel()
        finally:
            await client.aclose()
            await server.stop()
            nursery.cancel_scope.cancel()
    a = tracemalloc.Snapshot.load(str(out / "snap-1.pickle"))
    b = tracemalloc.Snapshot.load(str(out / "snap-2.pickle"))
    active = int(live.active_calls or 0)
    text = report(a, b, args.calls, args.top)
    rss = ((live.rss or 0) - (idle.rss or 0)) / max(active, 1) / 1024
    text = (
        f"calls live at snapshot B: {active} of {args.calls}; RSS idle {mb(idle.rss)} MB, "
        f"live {mb(live.rss)} MB: {rss:.0f} KB per call (includes tracemalloc's own)\n" + text
    )
    (out / "memprofile.txt").write_text(text + "\n")
    print(text)


async def snapshot(server: ServerProcess, out: Path, n: int) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGUSR2)
    with trio.fail_after(120):
        while not (out / f"snap-{n}.done").exists():  # noqa: ASYNC110 (a file)
            await trio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--turns", type=int, default=8, help="long calls: all stay up")
    parser.add_argument("--settle", type=float, default=20.0, help="s after the last start")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="results/mem")
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
