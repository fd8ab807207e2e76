"""Pure arithmetic over benchmark numbers: Prometheus histogram buckets (deltas between
scrapes, quantiles at bucket resolution, shares under a bound) and percentiles of raw samples.
No I/O: ``tests/test_bench_math.py`` checks it against ``prometheus_client``'s own output."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

Buckets = list[tuple[float, float]]  # (upper bound "le", cumulative count); last le is +Inf


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
