"""Logging (human or JSON, always with ms timestamps and the call id) and Prometheus metrics.

The call id travels in a context variable: a call's nursery sets it once, and every task
started inside inherits it, so log lines need no explicit id argument.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily

from voice_trio.host_metrics import WORKER_INFO, HostCollector, PerWorker, multiprocess_mode

if TYPE_CHECKING:
    from voice_trio.providers.claude import LlmUsage

call_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")

log = logging.getLogger("voice_trio")


class HumanFormatter(logging.Formatter):
    """``[HH:MM:SS.mmm] LEVEL [call-id] message`` (the message carries its emoji marker);
    with several workers, ``[HH:MM:SS.mmm] LEVEL w2 [call-id] message``."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = f"{worker} " if worker else ""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = (
            f"[{stamp}.{int(record.msecs):03d}] {record.levelname:<5} {self.worker}"
            f"[{getattr(record, 'call_id', '-')}] {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``worker`` names the process of a server (``w1`` …, or
    ``main`` for the supervisor of several workers)."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "call_id": getattr(record, "call_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker:
            entry["worker"] = self.worker
        for key in ("event", "stage_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# A logged value from outside (a caller's name, a call id, an event type, an error text)
# is cut to this many characters and its control characters are escaped: a newline in it
# cannot forge a log line, and a 200 KB value cannot write a 200 KB line.
MAX_LOGGED_VALUE = 300
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def loggable(value: object, limit: int = MAX_LOGGED_VALUE) -> str:
    """``value`` as one bounded line of text (see ``MAX_LOGGED_VALUE``)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}…(+{len(text) - limit} chars)"
    return text.translate(_ESCAPES)


def _loggable_arg(value: object) -> object:
    if value is None or isinstance(value, int | float):
        return value  # numbers keep their %d / %.1f formats
    return loggable(value)


class LogSummary:
    """A warning that strangers can cause at will (a refused socket, say), kept bounded:
    the first is logged, then at most one line per ``every`` seconds, which counts what
    came meanwhile by kind."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 10.0) -> None:
        self.logger = logger
        self.what = what
        self.every = every
        self._logged_at: float | None = None
        self._since: dict[str, int] = {}

    def note(self, kind: str) -> None:
        now = time.monotonic()
        self._since[kind] = self._since.get(kind, 0) + 1
        if self._logged_at is not None and now - self._logged_at < self.every:
            return
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(self._since.items()))
        total = sum(self._since.values())
        if self._logged_at is None:
            self.logger.warning(
                "%s (%s); more are summed up every %.0f s", self.what, counts, self.every
            )
        else:
            self.logger.warning("%s: %d since the last report (%s)", self.what, total, counts)
        self._logged_at, self._since = now, {}


class ContextFilter(logging.Filter):
    """Stamps the call id, makes every argument a bounded single line (``loggable``), and
    removes secret values from every record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "call_id"):
            record.call_id = loggable(call_id_var.get(), 100)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_loggable_arg(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: _loggable_arg(v) for k, v in args.items()}
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "****")
            record.msg, record.args = message, None
        return True


def setup_logging(
    level: str = "INFO",
    fmt: str = "human",
    secrets: Iterable[str] = (),
    *,
    worker: str = "",
    workers: int = 1,
) -> None:
    """Configure the ``voice_trio`` logger tree (idempotent: replaces earlier handlers).
    ``worker`` names this process in JSON lines always, in human lines only when there
    are several ``workers`` (the single-process format is what the checklist greps)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(HumanFormatter(worker if workers > 1 else ""))
    handler.addFilter(ContextFilter(secrets))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class WireCounts:
    """WebSocket messages of the media path, counted as plain integers.

    They run at ~100 messages per call-second, where a Prometheus ``Counter.inc`` (a lock
    and a float add) would be a measurable share of the work; ``/metrics`` reads them as
    ``voice_ws_messages_total{peer,direction}``. Process-wide, like the process metrics.
    """

    __slots__ = ("carrier_in", "carrier_out", "carrier_reads", "stt_in", "stt_out")

    def __init__(self) -> None:
        self.carrier_reads = 0  # reads of the media socket (``voice_media_reads_total``)
        self.carrier_in = 0
        self.carrier_out = 0
        self.stt_in = 0
        self.stt_out = 0

    def get(self, key: tuple[str, str]) -> int:
        """The count of ``(peer, direction)``, e.g. ``("carrier", "in")``."""
        value: int = getattr(self, f"{key[0]}_{key[1]}")
        return value


WIRE = WireCounts()
WIRE_KEYS = (("carrier", "in"), ("carrier", "out"), ("stt", "in"), ("stt", "out"))


class _WireCollector:
    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "voice_ws_messages",
            "WebSocket messages on the media path",
            labels=["peer", "direction"],
        )
        for key in WIRE_KEYS:
            family.add_metric(list(key), WIRE.get(key))
        yield family
        yield CounterMetricFamily(
            "voice_media_reads",
            "Reads of the carrier's media sockets (each a wake-up; several frames when gathered)",
            value=WIRE.carrier_reads,
        )


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app).

    With ``worker`` (one of several processes on a host; prometheus-client in multiprocess
    mode, ``voice_trio.host_metrics``) the metrics where the worker matters carry a
    ``worker`` label, and ``registry`` renders the whole host. Without it (one process),
    ``registry`` holds this process's metrics alone, as always.
    """

    def __init__(self, worker: str | None = None) -> None:
        self.worker = worker
        self.registry = CollectorRegistry()
        r = self.registry
        if worker is not None and not multiprocess_mode():
            raise RuntimeError("per-worker metrics need PROMETHEUS_MULTIPROC_DIR")
        by_worker = [] if worker is None else ["worker"]
        calls = Counter(
            "voice_calls", "Calls handled", [*by_worker, "mode", "end_reason"], registry=r
        )
        self.calls: Counter | PerWorker[Counter] = (
            calls if worker is None else PerWorker(calls, worker)
        )
        active = Gauge(
            "voice_active_calls",
            "Calls in progress",
            by_worker,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.active_calls = active if worker is None else active.labels(worker)
        self.webhooks = Counter(
            "voice_webhooks", "Telnyx webhooks received", ["event_type", "outcome"], registry=r
        )
        self.telnyx_commands = Counter(
            "voice_telnyx_commands",
            "Telnyx Call Control commands",
            ["action", "outcome"],
            registry=r,
        )
        self.api_requests = Counter(
            "voice_api_requests", "API requests", ["route", "status"], registry=r
        )
        self.frames_dropped = Counter(
            "voice_frames_dropped", "Socket frames dropped", ["reason"], registry=r
        )
        self.stream_rejected = Counter(
            "voice_stream_rejected", "Media streams refused", ["reason"], registry=r
        )
        self.turn_stage = Histogram(
            "voice_turn_stage_seconds",
            "Per-turn stage durations (DESIGN.md §5)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.server_overhead = Histogram(
            "voice_server_overhead_seconds",
            "(t1-t0)+(t3-t2)+(t5-t4) per bot turn",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=r,
        )
        lag = Histogram(
            "voice_event_loop_lag_seconds",
            "Trio scheduling lag of a periodic probe",
            by_worker,
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag = lag if worker is None else lag.labels(worker)
        late = Counter(
            "voice_outbound_frames_late",
            "Outbound audio written after its play time",
            by_worker,
            registry=r,
        )
        self.frames_late = late if worker is None else late.labels(worker)
        self.barge_ins = Counter("voice_barge_ins", "Bot turns cut by the caller", registry=r)
        self.speculations = Counter(
            "voice_speculations",
            "Replies started before the turn ended, by outcome (started, kept, cancelled)",
            ["outcome"],
            registry=r,
        )
        self.store_errors = Counter(
            "voice_store_errors",
            "Store writes given up (the call went on; its record was not saved)",
            ["operation"],
            registry=r,
        )
        self.stt_reconnects = Counter(
            "voice_stt_reconnects",
            "Deepgram STT reconnects (counted when the call ends)",
            registry=r,
        )
        self.llm_tokens = Counter(
            "voice_llm_tokens",
            "Claude tokens as the API reported them, by kind (input: uncached input; "
            "cache_read, cache_write: prompt-cache reads and writes; output)",
            ["kind"],
            registry=r,
        )
        self.connections_refused = Counter(
            "voice_connections_refused",
            "Connections refused at the limits (MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT)",
            ["reason"],
            registry=r,
        )
        self.call_events = Counter(
            "voice_call_events",
            "Events for live calls on the bus between processes (calls.bus), by kind (fact, "
            "do, done) and outcome (published, received, failed: not sent, dropped: malformed)",
            ["kind", "outcome"],
            registry=r,
        )
        # ``tool``: a name TOOLS_FILE declares (a closed set, read at start-up).
        self.tool_calls = Counter(
            "voice_tool_calls",
            "Requests to the operator's HTTP tools, by how they ended",
            ["tool", "status"],
            registry=r,
        )
        self.tool_latency = Histogram(
            "voice_tool_latency_seconds",
            "Time from a tool request to its answer (or its timeout)",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.call_event_reconnects = Counter(
            "voice_call_event_reconnects",
            "Times the call-event bus got its lost LISTEN connection back",
            registry=r,
        )
        tasks = Gauge(
            "voice_trio_tasks",
            "Live Trio tasks in the server",
            by_worker,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.trio_tasks = tasks if worker is None else tasks.labels(worker)
        if worker is None:
            # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
            ProcessCollector(registry=r)
            r.register(_WireCollector())
            return
        # One of several workers: the metrics above go to the shared files; render them all.
        info = Gauge(
            WORKER_INFO,
            "1 for each live worker process, by worker and pid",
            ["worker"],
            registry=None,
            multiprocess_mode="liveall",
        )
        info.labels(worker).set(1)
        wire = Counter(
            "voice_ws_messages",
            "WebSocket messages on the media path",
            ["worker", "peer", "direction"],
            registry=None,
        )
        self._wire = {key: wire.labels(worker, *key) for key in WIRE_KEYS}
        self._wire_published = dict.fromkeys(WIRE_KEYS, 0)
        reads = Counter(
            "voice_media_reads",
            "Reads of the carrier's media sockets (each a wake-up; several frames when gathered)",
            ["worker"],
            registry=None,
        )
        self._reads = reads.labels(worker)
        self._reads_published = 0
        self.registry = CollectorRegistry()
        self.registry.register(HostCollector())

    def count_llm_usage(self, usage: LlmUsage) -> None:
        """Add one usage report (an increase) of a Claude reply."""
        for kind, tokens in (
            ("input", usage.input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
            ("output", usage.output_tokens),
        ):
            if tokens > 0:
                self.llm_tokens.labels(kind).inc(tokens)

    def publish(self, active_calls: int) -> None:
        """Refresh the gauges that are computed rather than counted, and (one of several
        workers) the media-path message counts, for the next scrape on any worker. Call
        from the event loop: at each scrape, and every second with several workers."""
        self.active_calls.set(active_calls)
        self.trio_tasks.set(count_tasks())
        if self.worker is None:
            return
        for key, child in self._wire.items():
            now = WIRE.get(key)
            child.inc(now - self._wire_published[key])
            self._wire_published[key] = now
        self._reads.inc(WIRE.carrier_reads - self._reads_published)
        self._reads_published = WIRE.carrier_reads


def count_tasks() -> int:
    """Live Trio tasks in the whole task tree of the current run."""
    pending = [trio.lowlevel.current_root_task()]
    total = 0
    while pending:
        task = pending.pop()
        if task is None:
            continue
        total += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return total


async def watch_loop_lag(metrics: Metrics, interval: float = 0.05) -> None:
    """Sleep ``interval`` repeatedly and record how late each wake-up is."""
    deadline = trio.current_time() + interval
    while True:
        await trio.sleep_until(deadline)
        now = trio.current_time()
        metrics.loop_lag.observe(max(0.0, now - deadline))
        deadline = now + interval


async def publish_every(metrics: Metrics, active_calls: Callable[[], int], period: float) -> None:
    """``Metrics.publish`` every ``period`` seconds: with several workers, a scrape on one
    reads the others' computed gauges from what they last published."""
    while True:
        metrics.publish(active_calls())
        await trio.sleep(period)
