"""Who a request is for, when a reverse proxy in front of the server says so.

A proxy names the client it serves in ``Forwarded`` (RFC 7239 ``for=``), ``X-Forwarded-For``
or ``X-Real-IP``. Anyone can send those headers, so they are believed only from a peer
listed in ``FORWARDED_ALLOW_IPS`` — the convention of Uvicorn's and Gunicorn's
``forwarded_allow_ips``: addresses or networks, ``*`` for every peer, by default 127.0.0.1
(a proxy on this machine). In a chain (``X-Forwarded-For: client, proxy1, proxy2``) each
trusted proxy appended the peer it saw, so the client is the right-most entry that is not
itself a trusted proxy; anything left of it could have been written by anybody.

A request may carry several of these headers, and a proxy that sets one passes the others
through from the client untouched (nginx forwards every header it does not set). So every
header present is read, and a request is "from this machine" only when all of them agree.

What this cannot do: a proxy that sends none of these headers (nginx's bare ``proxy_pass``)
looks exactly like a client on this machine. That is why ``/api`` trusts nobody without
``API_TOKEN`` unless told to (``web.api``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Protocol

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
_SHOWN_CHARS = 64  # an unparseable client token in a log line is cut to this


class HeaderLookup(Protocol):
    """Request headers, looked up case-insensitively (Werkzeug's ``Headers``)."""

    def get(self, key: str, default: str, /) -> str: ...
    def getlist(self, key: str, /) -> list[str]: ...


def ip_address(text: str | None) -> Address | None:
    """``text`` as an address (an IPv4-mapped IPv6 address as IPv4; a zone id dropped), or
    None when it is not one (a name, ``unknown``, an RFC 7239 obfuscated ``_hidden``)."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(address: str | None) -> bool:
    """``address`` is this machine (127.0.0.0/8, ::1, or ::ffff:127.x.y.z)."""
    ip = ip_address(address)
    return ip is not None and ip.is_loopback


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Peers whose forwarding headers are believed (``FORWARDED_ALLOW_IPS``)."""

    networks: tuple[Network, ...] = ()
    everyone: bool = False

    @classmethod
    def parse(cls, spec: str) -> TrustedProxies:
        """``127.0.0.1,10.0.0.0/8,::1`` or ``*``; ValueError naming a bad item."""
        items = [item.strip() for item in spec.split(",") if item.strip()]
        if "*" in items:
            return cls(everyone=True)
        networks = []
        for item in items:
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(item) from None
            networks.append(network)
        return cls(tuple(networks))

    def __contains__(self, address: object) -> bool:
        if self.everyone:
            return True
        ip = ip_address(address) if isinstance(address, str) else None
        return ip is not None and any(ip in network for network in self.networks)

    def __str__(self) -> str:
        if self.everyone:
            return "*"
        return ",".join(
            str(n.network_address if n.num_addresses == 1 else n) for n in self.networks
        )


@dataclass(frozen=True, slots=True)
class RequestOrigin:
    """Where a request comes from: the peer that connected, and the client each forwarding
    header names (believed from a trusted peer only)."""

    peer: str | None
    clients: tuple[str, ...] = ()
    unbelieved: bool = False  # forwarding headers came from a peer we do not trust

    @property
    def client(self) -> str | None:
        """The best-known client address, for logs."""
        return self.clients[0] if self.clients else self.peer

    @property
    def on_this_machine(self) -> bool:
        """The peer is loopback and every account of the client says loopback too (a
        trusted proxy elsewhere that names 127.0.0.1 means its own machine, not this one)."""
        if self.unbelieved:
            return False
        return is_loopback(self.peer) and all(is_loopback(a) for a in self.clients)

    def describe(self) -> str:
        """``203.0.113.5 via 127.0.0.1``, ``127.0.0.1 (forwarding headers not believed)``."""
        peer = self.peer or "unknown peer"
        if self.unbelieved:
            return f"{peer} (forwarding headers from an untrusted peer not believed)"
        named = dict.fromkeys(_shown(c) for c in self.clients)  # in order, once each
        if not named:
            return peer
        return " / ".join(named) + f" via {peer}"


def request_origin(
    peer: str | None, headers: HeaderLookup, trusted: TrustedProxies
) -> RequestOrigin:
    """Who ``headers`` say the request is for, believed only if ``peer`` is trusted."""
    chains = [
        _forwarded_for(headers.getlist("Forwarded")),
        _hops(headers.getlist("X-Forwarded-For")),
        _hops(headers.getlist("X-Real-IP")),
    ]
    present = [
        chain
        for name, chain in zip(FORWARDING_HEADERS, chains, strict=True)
        if headers.getlist(name)
    ]
    if not present:
        return RequestOrigin(peer)
    if peer not in trusted:
        return RequestOrigin(peer, unbelieved=True)
    return RequestOrigin(peer, tuple(_client_in(chain, trusted) for chain in present))


def _client_in(chain: list[str], trusted: TrustedProxies) -> str:
    """The right-most hop of ``chain`` that is not a trusted proxy (the left-most when all
    are); an empty header names nobody, which is not this machine either."""
    for hop in reversed(chain):
        if hop not in trusted:
            return hop
    return chain[0] if chain else "unknown"


def _hops(values: list[str]) -> list[str]:
    """``X-Forwarded-For``/``X-Real-IP`` lines, joined in order, as addresses."""
    return [_address(hop) for value in values for hop in value.split(",") if hop.strip()]


def _forwarded_for(values: list[str]) -> list[str]:
    """The ``for=`` of each element of ``Forwarded`` lines (RFC 7239 §4); an element
    without one names an unknown hop."""
    hops = []
    for value in values:
        for element in value.split(","):
            if not element.strip():
                continue
            found = "unknown"
            for pair in element.split(";"):
                name, _, token = pair.partition("=")
                if name.strip().lower() == "for":
                    found = _address(token)
            hops.append(found)
    return hops


def _address(token: str) -> str:
    """One hop as an address string: quotes, ``[...]`` around IPv6 and a port taken off;
    anything else is kept as it is (and so never counts as this machine or a proxy)."""
    text = token.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    ip = ip_address(text)
    return str(ip) if ip is not None else text


def _shown(token: str) -> str:
    return token if len(token) <= _SHOWN_CHARS else token[:_SHOWN_CHARS] + "…"
