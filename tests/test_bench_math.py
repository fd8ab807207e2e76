"""The arithmetic of the load and soak scripts: Prometheus parsing, histogram deltas and
bucket-resolution quantiles, raw percentiles, the knee and the leak verdict. Pure: no server."""

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

import loadtest
import soak
from bench import stats
from bench.scrape import Scrape, parse_metrics

INF = math.inf


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = [(1.0, 0.0), (2.0, 10.0), (INF, 10.0)]
    assert stats.histogram_quantile(0.5, buckets) == pytest.approx(1.5)
    assert stats.histogram_quantile(1.0, buckets) == pytest.approx(2.0)
    # The first bucket starts at zero.
    assert stats.histogram_quantile(0.5, [(0.01, 4.0), (INF, 4.0)]) == pytest.approx(0.005)


def test_quantile_in_the_overflow_bucket_is_the_highest_finite_bound() -> None:
    buckets = [(0.01, 90.0), (0.02, 95.0), (INF, 100.0)]
    assert stats.histogram_quantile(0.99, buckets) == pytest.approx(0.02)
    assert stats.bucket_upper_bound(0.99, buckets) == INF
    summary = stats.hist_summary(buckets, (0.99,))
    assert summary["p99_overflow"] is True and summary["p99_le_ms"] is None


def test_no_observations_give_no_quantile() -> None:
    empty = [(0.01, 0.0), (INF, 0.0)]
    assert stats.histogram_quantile(0.99, empty) is None
    assert stats.bucket_upper_bound(0.99, empty) is None
    assert stats.share_at_most(0.02, empty) is None
    assert stats.histogram_quantile(0.5, []) is None
    assert stats.hist_summary(empty)["p99_ms"] is None


def test_upper_bound_is_the_exact_bucket_statement() -> None:
    # 99 of 100 probes at most 20 ms: "p99 <= 20 ms" holds exactly.
    ok = [(0.01, 50.0), (0.02, 99.0), (0.05, 100.0), (INF, 100.0)]
    assert stats.bucket_upper_bound(0.99, ok) == 0.02
    assert stats.share_at_most(0.02, ok) == pytest.approx(0.99)
    # 98 of 100: the p99 is above 20 ms, at most 50 ms.
    late = [(0.01, 50.0), (0.02, 98.0), (0.05, 100.0), (INF, 100.0)]
    assert stats.bucket_upper_bound(0.99, late) == 0.05
    assert stats.share_at_most(0.02, late) == pytest.approx(0.98)
    # A bound between bucket edges is counted at the edge below it.
    assert stats.share_at_most(0.03, late) == pytest.approx(0.98)


def test_bucket_delta_is_the_window_between_two_scrapes() -> None:
    before = [(0.01, 10.0), (0.02, 12.0), (INF, 12.0)]
    after = [(0.01, 15.0), (0.02, 22.0), (INF, 23.0)]
    assert stats.bucket_delta(before, after) == [(0.01, 5.0), (0.02, 10.0), (INF, 11.0)]
    assert stats.bucket_delta(None, after) == after
    assert stats.bucket_delta([], after) == after


def test_percentile_of_raw_samples() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 0.5) == pytest.approx(50.5)
    assert stats.percentile(values, 0.99) == pytest.approx(99.01)
    assert stats.percentile(values, 1.0) == 100.0
    assert stats.percentile([7.0], 0.99) == 7.0
    assert stats.percentile([], 0.5) is None
    summary = stats.raw_summary([3.0, 1.0, 2.0])
    assert summary["count"] == 3 and summary["p50"] == 2.0 and summary["max"] == 3.0


def _exposition() -> tuple[Histogram, Histogram, Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    lag = Histogram(
        "voice_event_loop_lag_seconds",
        "lag",
        buckets=(0.001, 0.005, 0.02, 0.05),
        registry=registry,
    )
    stage = Histogram(
        "voice_turn_stage_seconds", "stages", ["stage"], buckets=(0.1, 1.0), registry=registry
    )
    late = Counter("voice_outbound_frames_late", "late", registry=registry)
    return lag, stage, late, registry


def test_real_exposition_round_trip_and_window_delta() -> None:
    lag, stage, late, registry = _exposition()
    for value in (0.0005, 0.003, 0.003):
        lag.observe(value)
    stage.labels("t0-t1").observe(0.05)
    stage.labels("t1-t2").observe(0.5)
    late.inc(2)
    before = Scrape(0.0, parse_metrics(generate_latest(registry).decode()))
    for value in [0.004] * 97 + [0.01, 0.03, 0.2]:
        lag.observe(value)
    late.inc(3)
    after = Scrape(1.0, parse_metrics(generate_latest(registry).decode()))

    window = stats.bucket_delta(
        before.histogram("voice_event_loop_lag_seconds"),
        after.histogram("voice_event_loop_lag_seconds"),
    )
    assert window == [(0.001, 0.0), (0.005, 97.0), (0.02, 98.0), (0.05, 99.0), (INF, 100.0)]
    assert stats.bucket_upper_bound(0.99, window) == 0.05
    assert stats.share_at_most(0.02, window) == pytest.approx(0.98)
    assert stats.histogram_quantile(0.5, window) == pytest.approx(0.001 + 0.004 * 50 / 97)
    assert after.value("voice_outbound_frames_late_total") == 5.0
    assert before.value("voice_outbound_frames_late_total") == 2.0
    # Labelled histograms are told apart; without a label filter they add up.
    assert after.histogram("voice_turn_stage_seconds", stage="t1-t2") == [
        (0.1, 0.0),
        (1.0, 1.0),
        (INF, 1.0),
    ]
    assert after.histogram("voice_turn_stage_seconds")[-1] == (INF, 2.0)
    assert after.value("no_such_metric") is None


def _level(n: int, lag_ok: bool, late: int) -> dict:
    return {"concurrency": n, "meets": {"loop_lag_p99_le_20ms": lag_ok, "no_late_frames": not late}}


def test_the_knee_is_the_last_passing_level_counted_from_the_bottom() -> None:
    levels = [_level(10, True, 0), _level(25, True, 0), _level(50, False, 3), _level(100, True, 0)]
    assert loadtest.find_knee(levels) == 25
    assert loadtest.find_knee([_level(10, True, 5)]) is None
    assert loadtest.find_knee([]) is None


def test_soak_verdict_counts_leaks_and_rss_drift() -> None:
    opts = soak.parse_args(["--calls", "100", "--concurrency", "20", "--rss-drift-mb", "2"])
    base = soak.Idle(tasks=15, fds=15, registry=0, rss=130e6, fd_kinds={"socket": 10})
    waves = [{"calls_done": 20 * i, "rss_mb": 140.0 + 0.1 * i, "t": float(i)} for i in range(1, 6)]
    problems, numbers = soak.judge(opts, base, base, waves, 100, 0)
    assert problems == [] and numbers["rss_drift_mb"] == pytest.approx(0.4)
    assert numbers["calls_at_warm_up"] == 20
    assert numbers["rss_slope_mb_per_1000_calls"] == pytest.approx(5.0)

    leaky = soak.Idle(tasks=18, fds=20, registry=1, rss=130e6, fd_kinds={"socket": 15})
    grown = [*waves[:-1], {"calls_done": 100, "rss_mb": 145.0, "t": 5.0}]
    problems, numbers = soak.judge(opts, base, leaky, grown, 100, 10)
    text = "\n".join(problems)
    assert "Trio tasks: 18" in text and "(+3)" in text
    assert "registry: 1" in text
    assert "descriptors: 20" in text and "'socket': 5" in text
    assert "RSS drift: +4.9 MB" in text
    assert "failed calls: 10 of 100" in text
    assert numbers["tasks_delta"] == 3 and numbers["fds_delta"] == 5

    # Descriptors within the pooled-connection tolerance are not a leak.
    pooled = soak.Idle(tasks=15, fds=17, registry=0, rss=130e6, fd_kinds={"socket": 12})
    assert soak.judge(opts, base, pooled, waves, 100, 0)[0] == []


def test_largest_bucket_and_per_bucket_counts() -> None:
    buckets = [(0.01, 5.0), (0.02, 5.0), (0.1, 7.0), (INF, 7.0)]
    assert stats.max_bound(buckets) == 0.1
    assert stats.per_bucket(buckets) == {"<=0.01": 5, "<=0.1": 2}
    assert stats.max_bound([(0.01, 0.0), (INF, 0.0)]) is None
    assert stats.max_bound([(0.01, 1.0), (INF, 2.0)]) == INF
