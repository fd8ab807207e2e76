"""Shared pieces of ``scripts/loadtest.py`` and ``scripts/soak.py``.

- Pure math: Prometheus text parsing, histogram bucket deltas and quantiles (at bucket
  resolution), percentiles of raw samples.
- The server under test as a child process (``python -m voice_trio.cli serve``), pointed at
  the simulators of this process, reachable on 127.0.0.1 only.
- The lab (every simulator) trimmed for long runs, and scripted inbound calls.
- A one-line progress display, a sim-side event-loop lag probe, machine facts, and the
  optional matplotlib import.

The scripts run the simulators (carrier, callers, Deepgram, Anthropic) in their own process
and the server in another, so the server's CPU, memory and loop lag are its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import trio

Buckets = list[tuple[float, float]]  # (upper bound "le", cumulative count); last le is +Inf

# ---------------------------------------------------------------------------------------------
# Pure math


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition -> ``{sample name: [(labels, value), ...]}``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def bucket_delta(before: Buckets | None, after: Buckets) -> Buckets:
    """Observations between two scrapes of one histogram (cumulative counts per bucket)."""
    if not before:
        return list(after)
    earlier = dict(before)
    return [(le, max(0.0, count - earlier.get(le, 0.0))) for le, count in after]


def bucket_total(buckets: Buckets) -> float:
    return buckets[-1][1] if buckets else 0.0


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q``-quantile estimated like Prometheus' ``histogram_quantile``: find the bucket
    holding rank ``q * total`` and interpolate linearly inside it (the first bucket starts at
    0). A rank in the ``+Inf`` bucket gives the highest finite bound. None without data."""
    total = bucket_total(buckets)
    if total <= 0:
        return None
    q = min(max(q, 0.0), 1.0)
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        if not math.isinf(le):
            lower = le
        below = count
    return lower


def bucket_upper_bound(q: float, buckets: Buckets) -> float | None:
    """The smallest bucket bound ``b`` with at least ``q`` of the observations ``<= b``: the
    exact statement "the q-quantile is at most b". ``inf`` if only ``+Inf`` qualifies."""
    total = bucket_total(buckets)
    if total <= 0:
        return None
    for le, count in buckets:
        if count >= q * total - 1e-9:
            return le
    return math.inf


def max_bound(buckets: Buckets) -> float | None:
    """The smallest bucket bound that holds every observation (the maximum is at most it)."""
    total = bucket_total(buckets)
    if total <= 0:
        return None
    return next(le for le, count in buckets if count >= total)


def per_bucket(buckets: Buckets) -> dict[str, int]:
    """Cumulative buckets -> observations in each bucket, keyed ``"<=0.02"`` (s), non-empty."""
    out: dict[str, int] = {}
    below = 0.0
    for le, count in buckets:
        if count - below > 0:
            out[f"<={le:g}"] = int(count - below)
        below = count
    return out


def share_at_most(bound: float, buckets: Buckets) -> float | None:
    """Share of the observations ``<= bound``, counted at the largest bucket bound that is
    ``<= bound`` (exact when ``bound`` is a bucket bound)."""
    total = bucket_total(buckets)
    if total <= 0:
        return None
    below = 0.0
    for le, count in buckets:
        if le > bound + 1e-12:
            break
        below = count
    return below / total


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of raw samples, interpolating between order statistics."""
    if not values:
        return None
    ordered = sorted(values)
    pos = min(max(q, 0.0), 1.0) * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def hist_summary(
    buckets: Buckets, qs: Iterable[float] = (0.5, 0.99), *, bounds: bool = True
) -> dict[str, Any]:
    """Quantiles of a histogram delta in milliseconds: the interpolated estimate ``pNN_ms``
    and the bucket bound it is certainly under, ``pNN_le_ms`` (``null`` = above every bound)."""
    out: dict[str, Any] = {"count": int(bucket_total(buckets))}
    for q in qs:
        name = f"p{round(q * 100):d}"
        estimate = histogram_quantile(q, buckets)
        bound = bucket_upper_bound(q, buckets)
        out[f"{name}_ms"] = None if estimate is None else round(estimate * 1000, 3)
        if not bounds:
            continue
        out[f"{name}_le_ms"] = (
            None if bound is None or math.isinf(bound) else round(bound * 1000, 3)
        )
        out[f"{name}_overflow"] = bound is not None and math.isinf(bound)
    return out


def raw_summary(values: Sequence[float], qs: Iterable[float] = (0.5, 0.95, 0.99)) -> dict:
    out: dict[str, Any] = {"count": len(values)}
    for q in qs:
        value = percentile(values, q)
        out[f"p{round(q * 100):d}"] = None if value is None else round(value, 1)
    out["max"] = round(max(values), 1) if values else None
    return out


# ---------------------------------------------------------------------------------------------
# /metrics


@dataclass
class Scrape:
    """One ``GET /metrics``: the samples and the (trio) time they were taken."""

    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        found = [v for lab, v in self.samples.get(name, []) if _matches(lab, labels)]
        return sum(found) if found else None

    def histogram(self, name: str, **labels: str) -> Buckets:
        rows = [
            (float(lab["le"]), v)
            for lab, v in self.samples.get(name + "_bucket", [])
            if _matches({k: x for k, x in lab.items() if k != "le"}, labels)
        ]
        merged: dict[float, float] = {}
        for le, v in rows:
            merged[le] = merged.get(le, 0.0) + v
        return sorted(merged.items())

    @property
    def rss(self) -> float | None:
        return self.value("process_resident_memory_bytes")

    @property
    def fds(self) -> float | None:
        return self.value("process_open_fds")

    @property
    def cpu(self) -> float | None:
        return self.value("process_cpu_seconds_total")

    @property
    def tasks(self) -> float | None:
        return self.value("voice_trio_tasks")

    @property
    def active_calls(self) -> float | None:
        return self.value("voice_active_calls")

    def worker_pids(self) -> dict[str, int]:
        """Live workers of a ``--workers`` server (``voice_worker_info``): name -> pid.
        Empty for a single process."""
        return {
            labels["worker"]: int(labels["pid"])
            for labels, value in self.samples.get("voice_worker_info", [])
            if value
        }

    def workers(self) -> list[str]:
        """The worker labels to break numbers down by; ``["-"]`` for a single process
        (whose samples carry no worker label)."""
        return sorted(self.worker_pids()) or ["-"]

    def of(self, name: str, worker: str, **labels: str) -> float | None:
        """``value`` for one worker (``"-"``: the single process, every sample)."""
        return (
            self.value(name, **labels)
            if worker == "-"
            else self.value(name, worker=worker, **labels)
        )

    def histogram_of(self, name: str, worker: str) -> Buckets:
        return self.histogram(name) if worker == "-" else self.histogram(name, worker=worker)


def _matches(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    response.raise_for_status()
    return Scrape(trio.current_time(), parse_metrics(response.text))


# ---------------------------------------------------------------------------------------------
# The server under test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setting_names() -> set[str]:
    from voice_trio.config import Settings

    names: set[str] = set()
    for f in dataclasses.fields(Settings):
        names.add(f.metadata["env"])
        names.update(f.metadata.get("aliases", ()))
    return names


def server_env(
    lab_env: dict[str, str],
    port: int,
    data_dir: Path,
    extra: dict[str, str] | None = None,
    *,
    workers: int = 1,
    database_url: str = "",
) -> dict:
    """The server's environment: this one without any voice-trio setting of its own (a
    developer's shell must not change the run), plus the lab's, loopback host and port, and
    the call-records file (the default SQLite store) in ``data_dir``, not in the checkout.
    ``workers`` > 1 needs ``database_url`` (PostgreSQL) and gets a random shared secret."""
    names = _setting_names()
    env = {k: v for k, v in os.environ.items() if k not in names}
    if "SQLITE_PATH" in names:
        env["SQLITE_PATH"] = str(data_dir.resolve() / "calls.sqlite3")
    env.update(lab_env)
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if "MAX_CONNECTIONS_PER_CLIENT" in names:
        # Every simulated carrier connects from 127.0.0.1: one client, hundreds of calls.
        env["MAX_CONNECTIONS_PER_CLIENT"] = "5000"
        env["MAX_CONNECTIONS"] = "5000"
    if workers > 1:
        env["WORKERS"] = str(workers)
        env["SERVER_SECRET"] = os.urandom(16).hex()
        # Each worker's metric files go here; the supervisor removes them at the end.
        env["TMPDIR"] = str(data_dir.resolve())
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


def sigterm_as_interrupt() -> None:
    """SIGTERM (``timeout``, a CI runner) ends the script like Ctrl-C: ``finally`` blocks
    run and the server child is stopped instead of orphaned."""

    def handler(signum: int, frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def lab_ports(lab: Any) -> dict[int, str]:
    """Simulator ports by name, to say where a server's socket goes."""
    ports: dict[int, str] = {}
    for name in ("telnyx", "deepgram", "anthropic", "elevenlabs"):
        url = getattr(lab, f"{name}_url", None)
        if url:
            ports[int(url.rsplit(":", 1)[1].split("/", 1)[0])] = name
    return ports


class ServerProcess:
    """``python -m voice_trio.cli serve`` as a child process; stderr goes to ``log_path``.

    Ready when ``GET /health`` answers (at ``LOG_LEVEL=WARNING`` the INFO line "Server
    listening" is not printed). :meth:`stop` sends SIGTERM (the server ends its calls
    politely), then SIGKILL after ``timeout``.
    """

    def __init__(
        self,
        env: dict[str, str],
        port: int,
        log_path: Path,
        launcher: list[str] | None = None,
        workers: int = 1,
    ) -> None:
        # ``launcher`` replaces ``python -m voice_trio.cli`` (e.g. scripts/_traced_serve.py).
        self.launcher = launcher or [sys.executable, "-m", "voice_trio.cli"]
        self.env = env
        self.port = port
        self.workers = workers
        self.worker_pids: dict[str, int] = {}  # with several workers: the last ones seen
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: trio.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float = 30.0) -> None:
        self._log = self._open_log()
        # A settings file that does not exist: the environment alone configures the run.
        missing_env_file = str(self.log_path.with_suffix(".no-env-file"))
        self.process = await trio.lowlevel.open_process(
            [*self.launcher, "--env-file", missing_env_file, "serve"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2, trust_env=False) as c:
            with trio.move_on_after(timeout):
                while self.process.poll() is None:
                    try:
                        if (await c.get("/health")).status_code == 200 and (
                            self.workers == 1 or len(await self.live_workers(c)) == self.workers
                        ):
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)
        code = self.process.poll()
        await self.stop(2.0)
        raise RuntimeError(
            f"server did not become ready (exit code {code}); last log lines:\n{self.log_tail()}"
        )

    async def live_workers(self, client: httpx.AsyncClient) -> dict[str, int]:
        """The workers ``/metrics`` lists (every one has started serving)."""
        self.worker_pids = (await scrape(client)).worker_pids()
        return self.worker_pids

    @property
    def pids(self) -> list[int]:
        """The processes that serve: the workers, or the server itself."""
        if self.workers > 1:
            return sorted(self.worker_pids.values())
        return [self.pid] if self.pid is not None else []

    def _open_log(self) -> IO[bytes]:
        return open(self.log_path, "wb")  # closed in stop()

    async def stop(self, timeout: float = 20.0) -> int | None:
        process = self.process
        if process is None:
            return None
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(timeout):
                    await process.wait()
            if process.poll() is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def kill_now(self) -> None:
        """Last resort (the harness itself is failing): no server outlives the script."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> dict[str, int]:
        """Lines at WARNING/ERROR and tracebacks in the server's log."""
        counts = {"warning": 0, "error": 0, "traceback": 0}
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return counts
        for line in text.splitlines():
            if " WARNING " in line or " WARN " in line:
                counts["warning"] += 1
            elif " ERROR " in line or " CRITICAL " in line:
                counts["error"] += 1
            if line.startswith("Traceback"):
                counts["traceback"] += 1
        return counts

    def socket_peers(
        self, names: dict[int, str] | None = None, pid: int | None = None
    ) -> dict[str, int]:
        """The server's TCP sockets by direction, peer and state, e.g. ``"out deepgram
        ESTABLISHED": 3``, ``"in CLOSE_WAIT": 1`` (``in``: accepted on the server's port):
        what a descriptor leak is made of. ``pid``: one worker's (default: every serving
        process's, summed)."""
        if pid is None:
            total: dict[str, int] = {}
            for each in self.pids:
                for key, count in self.socket_peers(names, each).items():
                    total[key] = total.get(key, 0) + count
            return total
        names = names or {}
        inodes: set[str] = set()
        try:
            for entry in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(entry)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            return {}
        peers: dict[str, int] = {}
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) < 10 or cols[9] not in inodes:
                    continue
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                state = _TCP_STATES.get(cols[3], cols[3])
                if state == "LISTEN":
                    key = "listen"
                elif local_port == self.port:
                    key = f"in {state}"
                else:
                    key = f"out {names.get(remote_port, remote_port)} {state}"
                peers[key] = peers.get(key, 0) + 1
        return peers

    def fd_kinds(self, pid: int | None = None) -> dict[str, int]:
        """What the server's descriptors are (socket, pipe, file, ...), for leak reports:
        one worker's, or every serving process's summed."""
        kinds: dict[str, int] = {}
        if pid is None:
            for each in self.pids:
                for key, count in self.fd_kinds(each).items():
                    kinds[key] = kinds.get(key, 0) + count
            return kinds
        base = Path(f"/proc/{pid}/fd")
        try:
            entries = list(base.iterdir())
        except OSError:
            return kinds
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            kind = target.split(":", 1)[0] if ":" in target else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds


# ---------------------------------------------------------------------------------------------
# The simulators and the calls

# What the callers say, one sentence per turn (no farewell: the caller hangs up at the end).
UTTERANCES = (
    "Hola, quisiera pedir una cita para el martes.",
    "¿Tienen horario disponible en la tarde?",
    "Mi nombre es Carlos Gómez, para medicina general.",
    "Prefiero con la doctora Martínez, si se puede.",
    "¿Cuánto cuesta la consulta particular?",
    "Perfecto, quedo pendiente de la confirmación.",
)


def call_script(turns: int, *, pause_ms: int = 300, silence_ms: int = 500) -> list[Any]:
    """Greeting, then ``turns`` exchanges (say a sentence, wait for the whole reply)."""
    from voice_trio.sim.caller import Say, WaitForBot

    steps: list[Any] = [WaitForBot(min_ms_silence=silence_ms)]
    for turn in range(turns):
        steps.append(Say(UTTERANCES[turn % len(UTTERANCES)], pause_ms))
        steps.append(WaitForBot(min_ms_silence=silence_ms))
    return steps


async def open_bench_lab(
    nursery: trio.Nursery,
    *,
    ms_per_char: int,
    llm_ttft: float,
    tts_ttfb_ms: float,
    webhook_url: str,
    keep_alive_s: float = 5.0,
) -> Any:
    """The lab, trimmed so that thousands of calls keep this process's memory flat."""
    import voice_trio.sim._serve as sim_serve
    from voice_trio.sim.lab import open_lab

    sim_serve.KEEP_ALIVE_SECONDS = keep_alive_s
    lab = await open_lab(
        nursery,
        ms_per_char=ms_per_char,
        llm_ttft=llm_ttft,
        tts_ttfb_ms=tts_ttfb_ms,
        webhook_url=webhook_url,
    )
    lab.telnyx.record_audio_s = 0.0
    lab.telnyx.max_ended_calls = 500
    return lab


def prune_lab(lab: Any) -> None:
    """Forget finished Deepgram streams (the simulator keeps them for tests)."""
    streams = lab.deepgram.stt_streams
    if len(streams) > 200:
        streams[:] = [s for s in streams if not s.closed]


@dataclass
class CallOutcome:
    ok: bool
    reason: str
    latencies_ms: list[float]
    turn_starts: list[tuple[float, float]]  # (trio time a timed bot turn started, latency)
    late_resyncs: int
    started_at: float
    ended_at: float


async def run_inbound_call(
    lab: Any,
    *,
    number: str,
    script: list[Any],
    turns: int,
    ms_per_char: int,
    timeout_s: float,
    turn_gap_ms: int = 500,
) -> CallOutcome:
    """One inbound call by a scripted caller; ok if every reply was heard and timed and the
    caller hung up at the end."""
    from voice_trio.sim.caller import ScriptedCaller
    from voice_trio.sim.lab import OUR_NUMBER

    started = trio.current_time()
    caller = ScriptedCaller(
        script, ms_per_char=ms_per_char, turn_gap_ms=turn_gap_ms, timeout_s=timeout_s, name=number
    )
    call = lab.telnyx.place_inbound_call(number, OUR_NUMBER, caller)
    results = await caller.run()
    timed = [(t.started_at, t.latency_ms) for t in results.bot_turns if t.latency_ms is not None]
    reason = ""
    if results.timed_out:
        reason = "timed out"
    elif results.errors:
        reason = results.errors[0].split(": ", 1)[-1]
    elif results.hangup_by not in (None, "caller"):
        reason = f"hung up by {results.hangup_by}"
    elif len(timed) < turns:
        reason = f"{len(timed)} of {turns} replies timed"
    return CallOutcome(
        ok=not reason,
        reason=reason,
        latencies_ms=[ms for _, ms in timed],
        turn_starts=timed,
        late_resyncs=call.line.late_resyncs,
        started_at=started,
        ended_at=trio.current_time(),
    )


# ---------------------------------------------------------------------------------------------
# This process: CPU, loop lag, progress


@dataclass
class LagProbe:
    """The simulators' own event-loop lag (same probe as the server's): if this process is
    late, caller audio is late and the server's numbers mean little."""

    interval: float = 0.05
    samples: list[float] = field(default_factory=list)

    async def run(self) -> None:
        deadline = trio.current_time() + self.interval
        while True:
            await trio.sleep_until(deadline)
            now = trio.current_time()
            self.samples.append(max(0.0, now - deadline))
            if len(self.samples) > 200_000:
                del self.samples[:100_000]
            deadline = now + self.interval

    def mark(self) -> int:
        return len(self.samples)

    def since(self, mark: int) -> list[float]:
        return self.samples[mark:] if mark <= len(self.samples) else list(self.samples)


class Progress:
    """One status line rewritten in place with ``\\r`` (plain lines when not a terminal)."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 10.0
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str = "") -> None:
        if self.tty:
            if text:
                self.update(text, force=True)
            self.stream.write("\n")
            self._width = 0
        elif text:
            self.stream.write(text + "\n")
        self.stream.flush()


def bar(done: float, total: float, width: int = 24) -> str:
    share = 0.0 if total <= 0 else min(1.0, done / total)
    filled = int(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def load_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, or None (it is not a project dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 2)
