import pytest

from voice_trio.calls.stream_token import (
    StreamTokenError,
    issue,
    token_from_query,
    verify,
    with_token,
)

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
    with pytest.raises(StreamTokenError, match="expired"):
        verify(SECRET, token, "v3:abc", now=1_000_000 + 3601)
    with pytest.raises(StreamTokenError, match="expired"):
        verify(SECRET, token, "v3:abc", now=1_000_000 - 61)


def test_the_token_travels_in_the_stream_url_query() -> None:
    token = issue(SECRET, "v3:abc")
    url = with_token("wss://agent.example.com/stream/media", token)
    assert url == f"wss://agent.example.com/stream/media?token={token}"
    assert with_token("wss://h/s?x=1", token).endswith(f"?x=1&token={token}")
    assert token_from_query(url.split("?", 1)[1].encode()) == token
    assert token_from_query(b"x=1") is None
