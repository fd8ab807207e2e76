"""``/metrics`` for a whole host when several worker processes share the port.

Each worker is its own process, so its counters live in its own memory: a scrape that lands
on worker 1 would see worker 1 alone. prometheus-client's multiprocess mode is the
ecosystem's answer for pre-forked servers (Gunicorn, Hypercorn ``-w``): with
``PROMETHEUS_MULTIPROC_DIR`` set before the library is imported, every metric value is kept
in a per-process memory-mapped file in that directory, and ``MultiProcessCollector`` merges
the files of every process at scrape time. ``voice_trio.workers`` sets the variable for its
workers, cleans the directory at start, and removes a dead worker's live gauges
(``mark_process_dead``).

Three things the files cannot carry are added here:

- **which worker is which**: metrics where the worker matters carry a ``worker`` label
  (``PerWorker`` fills it in); the gauge ``voice_worker_info{worker,pid}`` (mode
  ``liveall``: dead workers drop out) maps each live worker to its process;
- **process metrics** (CPU, memory, descriptors): the standard ``ProcessCollector`` reads
  ``/proc/self``; ``HostCollector`` runs one per live worker's pid and labels its samples;
- gauges that are computed, not counted (active calls, live tasks) are written by each worker
  periodically (``Metrics.publish``), so a scrape elsewhere is at most that period old.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

from prometheus_client import ProcessCollector, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

WORKER_INFO = "voice_worker_info"

M = TypeVar("M")


def multiprocess_mode() -> bool:
    """Whether this process keeps its metric values in the shared directory (decided by
    prometheus-client when it was first imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class PerWorker(Generic[M]):
    """A labelled metric whose first label, ``worker``, is this process's: callers give the
    other labels only, as they would to the metric itself."""

    def __init__(self, metric: Any, worker: str) -> None:
        self._metric = metric
        self._worker = worker

    def labels(self, *values: str) -> M:
        child: M = self._metric.labels(self._worker, *values)
        return child


class HostCollector:
    """Every worker's metrics from the shared directory, plus each live worker's process
    metrics with its ``worker`` label."""

    def __init__(self) -> None:
        self._files = MultiProcessCollector(None)  # PROMETHEUS_MULTIPROC_DIR

    def collect(self) -> Iterator[Metric]:
        workers: list[tuple[str, str]] = []
        for family in self._files.collect():
            if family.name == WORKER_INFO:
                workers = sorted(
                    {(s.labels["worker"], s.labels["pid"]) for s in family.samples if s.value}
                )
            yield family
        yield from _process_families(workers)


def _process_families(workers: Iterable[tuple[str, str]]) -> Iterator[Metric]:
    merged: dict[str, Metric] = {}
    for worker, pid in workers:
        collector = ProcessCollector(pid=partial(str, pid), registry=None)
        for family in collector.collect():  # nothing when the process has just gone
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for sample in family.samples:
                labels = {"worker": worker, **sample.labels}
                target.samples.append(Sample(sample.name, labels, sample.value))
    yield from merged.values()
