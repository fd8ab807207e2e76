"""``SeenEvents``: duplicate webhook ids are recognised for the TTL, and memory stays bounded."""

from __future__ import annotations

import sys

from voice_trio.calls.registry import SeenEvents


def test_a_repeat_within_the_ttl_is_recognised() -> None:
    seen = SeenEvents(ttl=600)
    assert seen.first_time("a", now=0.0)
    assert not seen.first_time("a", now=1.0)
    assert not seen.first_time("a", now=599.0)
    assert seen.first_time("b", now=599.0)


def test_ids_expire_after_the_ttl_plus_at_most_one_slice() -> None:
    seen = SeenEvents(ttl=600)
    seen.first_time("a", now=0.0)
    assert not seen.first_time("a", now=650.0)  # inside ttl + one 60 s slice
    assert seen.first_time("a", now=661.0)  # its slice is gone: new again
    seen = SeenEvents(ttl=600)
    for i in range(100):
        seen.first_time(f"old-{i}", now=float(i))
    seen.first_time("new", now=1000.0)
    assert len(seen) == 1  # the old slices expired as a whole


def test_capacity_bounds_the_count() -> None:
    seen = SeenEvents(capacity=1000, ttl=600)
    for i in range(5000):
        seen.first_time(f"id-{i}", now=i * 0.1)  # all within the ttl
    assert len(seen) <= 1000
    assert not seen.first_time("id-4999", now=500.0)  # the newest are kept


def test_memory_per_id_is_small() -> None:
    seen = SeenEvents()
    ids = [f"0b6c8a6e-5d1f-4f0e-9f5a-{i:012d}" for i in range(20_000)]
    for i, event_id in enumerate(ids):
        seen.first_time(event_id, now=i * 0.01)  # 200 s: within one ttl
    held = sum(sys.getsizeof(s) for _, s in seen._slices)
    assert held / len(ids) < 12  # bytes per id (the id strings themselves are not kept)


def test_a_digest_match_across_a_boundary_is_not_a_hit() -> None:
    from voice_trio.calls.registry import _contains

    digests = bytearray(b"AAAABBBBCCCCDDDD")
    assert _contains(digests, b"CCCCDDDD")
    assert not _contains(digests, b"BBBBCCCC")
