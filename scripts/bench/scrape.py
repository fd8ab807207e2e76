"""The server's ``GET /metrics``, parsed: one :class:`Scrape` per request, with the sums,
histograms and per-worker breakdowns the scripts read from it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import trio

from bench.stats import Buckets


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition -> ``{sample name: [(labels, value), ...]}``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


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
