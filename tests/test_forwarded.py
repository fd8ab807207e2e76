"""``forwarded``: whose word about the client is taken, and what it says.

The header combinations are those proxies really send: nginx's bare ``proxy_pass`` (none),
nginx with ``$proxy_add_x_forwarded_for`` (appends the peer it saw to what the client
sent), Debian's ``/etc/nginx/proxy_params`` (X-Real-IP and X-Forwarded-For), Caddy's
``reverse_proxy`` (X-Forwarded-For with the client it saw), and RFC 7239 ``Forwarded``."""

from __future__ import annotations

import pytest
from werkzeug.datastructures import Headers

from voice_trio.forwarded import RequestOrigin, TrustedProxies, request_origin

LOCAL = TrustedProxies.parse("127.0.0.1")


def origin(
    peer: str | None, *headers: tuple[str, str], trusted: str = "127.0.0.1"
) -> RequestOrigin:
    return request_origin(peer, Headers(list(headers)), TrustedProxies.parse(trusted))


def test_without_forwarding_headers_the_peer_is_the_client() -> None:
    assert origin("127.0.0.1") == RequestOrigin("127.0.0.1")
    assert origin("127.0.0.1").on_this_machine  # also nginx's bare proxy_pass: no way to tell
    assert not origin("203.0.113.5").on_this_machine
    assert not origin(None).on_this_machine


def test_a_trusted_proxy_names_the_client() -> None:
    o = origin("127.0.0.1", ("X-Forwarded-For", "198.51.100.7"))
    assert o.client == "198.51.100.7" and not o.on_this_machine
    assert o.describe() == "198.51.100.7 via 127.0.0.1"
    local = origin("127.0.0.1", ("X-Forwarded-For", "127.0.0.1"))
    assert local.client == "127.0.0.1" and local.on_this_machine


def test_the_client_is_the_right_most_hop_that_is_not_a_trusted_proxy() -> None:
    # nginx with $proxy_add_x_forwarded_for appends its peer to whatever the client sent.
    forged = origin("127.0.0.1", ("X-Forwarded-For", "127.0.0.1, 198.51.100.7"))
    assert forged.client == "198.51.100.7" and not forged.on_this_machine
    chain = origin(
        "10.0.0.2",
        ("X-Forwarded-For", "192.0.2.1, 198.51.100.7, 10.0.0.9"),
        trusted="10.0.0.0/8",
    )
    assert chain.client == "198.51.100.7"
    # Several header lines are one list, in order (RFC 9110 §5.3).
    lines = origin("127.0.0.1", ("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "192.0.2.9"))
    assert lines.client == "192.0.2.9"
    # Every hop trusted: the left-most is the client.
    assert origin("127.0.0.1", ("X-Forwarded-For", "127.0.0.1, 127.0.0.1")).client == "127.0.0.1"


def test_headers_from_an_untrusted_peer_are_not_believed() -> None:
    o = origin("203.0.113.5", ("X-Forwarded-For", "127.0.0.1"))
    assert o.unbelieved and o.client == "203.0.113.5" and not o.on_this_machine
    # Even from loopback, when loopback is not a trusted proxy: a request someone forwarded
    # is not from this machine.
    o = origin("::1", ("X-Forwarded-For", "::1"))
    assert o.unbelieved and not o.on_this_machine
    assert origin("::1", ("X-Forwarded-For", "::1"), trusted="127.0.0.1,::1").on_this_machine


def test_every_forwarding_header_must_agree() -> None:
    # Debian's proxy_params: X-Real-IP and X-Forwarded-For both name the client.
    debian = origin("127.0.0.1", ("X-Real-IP", "198.51.100.7"), ("X-Forwarded-For", "198.51.100.7"))
    assert debian.client == "198.51.100.7" and not debian.on_this_machine
    # A proxy that sets X-Real-IP only passes a forged X-Forwarded-For through untouched.
    forged = origin("127.0.0.1", ("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "198.51.100.7"))
    assert not forged.on_this_machine
    assert forged.describe() == "127.0.0.1 / 198.51.100.7 via 127.0.0.1"


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ("for=198.51.100.7", "198.51.100.7"),
        ("For=198.51.100.7;proto=https;by=127.0.0.1", "198.51.100.7"),
        ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ('for="198.51.100.7:8080"', "198.51.100.7"),
        ("for=198.51.100.7, for=127.0.0.1", "198.51.100.7"),
        ("for=unknown", "unknown"),
        ("for=_hidden", "_hidden"),
        ("proto=https", "unknown"),  # an element that names no client
        ('for="[::ffff:127.0.0.1]"', "127.0.0.1"),
    ],
)
def test_rfc_7239_forwarded(forwarded: str, client: str) -> None:
    o = origin("127.0.0.1", ("Forwarded", forwarded))
    assert o.client == client
    assert o.on_this_machine is (client == "127.0.0.1")


def test_an_empty_or_odd_header_names_nobody_on_this_machine() -> None:
    assert not origin("127.0.0.1", ("X-Forwarded-For", "")).on_this_machine
    assert not origin("127.0.0.1", ("X-Forwarded-For", "localhost")).on_this_machine
    junk = origin("127.0.0.1", ("X-Real-IP", "x" * 500))
    assert not junk.on_this_machine and len(junk.describe()) < 100


def test_a_trusted_proxy_elsewhere_naming_loopback_means_its_own_machine() -> None:
    o = origin("10.0.0.2", ("X-Forwarded-For", "127.0.0.1"), trusted="10.0.0.0/8")
    assert o.client == "127.0.0.1" and not o.on_this_machine


def test_trusted_proxies_setting() -> None:
    assert str(LOCAL) == "127.0.0.1" and "127.0.0.1" in LOCAL and "127.0.0.2" not in LOCAL
    nets = TrustedProxies.parse(" 10.0.0.0/8 , ::1,192.168.1.7 ")
    assert str(nets) == "10.0.0.0/8,::1,192.168.1.7"
    assert "10.200.3.4" in nets and "::1" in nets and "192.168.1.7" in nets
    assert "::ffff:10.0.0.1" in nets and "192.168.1.8" not in nets and None not in nets
    everyone = TrustedProxies.parse("*")
    assert everyone.everyone and str(everyone) == "*" and "203.0.113.5" in everyone
    assert origin(
        "203.0.113.5", ("X-Forwarded-For", "192.0.2.1, 10.0.0.1"), trusted="*"
    ).client == ("192.0.2.1")
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        TrustedProxies.parse("127.0.0.1,10.0.0.300")
