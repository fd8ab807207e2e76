import pytest

from voice_trio.calls import stream_token
from voice_trio.calls.stream_token import (
    StreamTokenError,
    issue,
    presented,
    token_from_query,
    verify,
)
from voice_trio.store.records import EVENT_TTL

SECRET = b"0123456789abcdef0123456789abcdef"


def test_a_token_verifies_for_its_call_only() -> None:
    token = issue(SECRET, "v3:abc", now=1_000_000)
    verify(SECRET, token, "v3:abc", now=1_000_010)
    with pytest.raises(StreamTokenError, match="not for this call"):
        verify(SECRET, token, "v3:other", now=1_000_010)
    with pytest.raises(StreamTokenError, match="not for this call"):
        verify(b"another secret", token, "v3:abc", now=1_000_010)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no stream token"),
        ("", "no stream token"),
        ("v1.abc.def", "malformed"),
        ("v2.1000000.x", "malformed"),
        ("garbage", "malformed"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token, reason) -> None:
    with pytest.raises(StreamTokenError, match=reason):
        verify(SECRET, token, "v3:abc", now=1_000_000)


def test_tokens_expire() -> None:
    token = issue(SECRET, "v3:abc", now=1_000_000)
    verify(SECRET, token, "v3:abc", now=1_000_000 + 600)
    with pytest.raises(StreamTokenError, match="expired"):
        verify(SECRET, token, "v3:abc", now=1_000_000 + 601)
    with pytest.raises(StreamTokenError, match="expired"):
        verify(SECRET, token, "v3:abc", now=1_000_000 - 61)


def test_a_claim_on_a_stream_outlives_its_token() -> None:
    """A replayed token must always find its stream claimed (the store keeps a claim for
    EVENT_TTL from the moment it was made, at the earliest MAX_SKEW_SECONDS before the
    token's issue time)."""
    assert stream_token.MAX_AGE_SECONDS + 2 * stream_token.MAX_SKEW_SECONDS < EVENT_TTL


@pytest.mark.parametrize(
    ("header", "connected", "query", "expected"),
    [
        ("h", "c", b"token=q", ("h", "header")),
        (None, "c", b"token=q", ("c", "connected")),
        ("", "c", b"", ("c", "connected")),
        (None, None, b"x=1&token=q", ("q", "query")),
        (None, None, b"x=1", (None, "none")),
        (None, None, b"", (None, "none")),
    ],
)
def test_the_token_is_taken_from_the_documented_channels_first(
    header, connected, query, expected
) -> None:
    assert presented(header, connected, query) == expected


def test_the_query_string_is_only_a_fallback_channel() -> None:
    token = issue(SECRET, "v3:abc")
    assert token_from_query(f"token={token}".encode()) == token
    assert token_from_query(f"x=1&token={token}".encode()) == token
    assert token_from_query(b"x=1") is None
