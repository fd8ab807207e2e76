"""The configuration files docs/deploy.md shows, read out of it for the tests.

A block is found by its first line (the path it is installed at, as a comment), so the
tests run exactly what a reader copies. Turning the guide's nginx site into one that runs
on this machine replaces a few exact strings (ports, certificate paths, upstream
addresses); each must occur once, so an edit of the guide that moves one of them fails
with a message naming it rather than testing something else.
"""

from __future__ import annotations

import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"

NGINX_SITE = "# /etc/nginx/sites-available/voice-trio"
SYSTEMD_UNIT = "# /etc/systemd/system/voice-trio.service"
ENV_FILE = "# /etc/voice-trio/voice-trio.env"
CADDYFILE = "# /etc/caddy/Caddyfile"
SINGLE_UPSTREAM = "upstream voice_trio {\n    server 127.0.0.1:3000;\n}"
GUIDE_HOSTS = ("10.0.1.11:3000", "10.0.1.12:3000")


def blocks() -> list[str]:
    """Every fenced code block of the guide, without its fences."""
    return re.findall(r"^```[a-z]*\n(.*?)^```$", GUIDE.read_text(), flags=re.M | re.S)


def block(first_line: str) -> str:
    """The one block that starts with ``first_line``."""
    found = [b for b in blocks() if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"docs/deploy.md: {len(found)} blocks start with {first_line!r}"
    return found[0]


def several_hosts_upstream() -> str:
    """The guide's ``upstream`` for several hosts (the block that lists its example hosts)."""
    found = [b for b in blocks() if b.startswith("upstream voice_trio {") and GUIDE_HOSTS[0] in b]
    assert len(found) == 1, "docs/deploy.md: no single upstream block for several hosts"
    return found[0].strip()


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"docs/deploy.md's block no longer has {old!r} exactly once"
    return text.replace(old, new)


def nginx_site_here(
    *, upstreams: list[int], http_port: int, https_port: int, cert: Path, key: Path
) -> str:
    """The guide's nginx site on 127.0.0.1: its ports, this certificate, and the servers
    on ``upstreams`` (one: the single-host upstream; several: the several-hosts one)."""
    site = block(NGINX_SITE)
    if len(upstreams) == 1:
        upstream = SINGLE_UPSTREAM.replace("127.0.0.1:3000", f"127.0.0.1:{upstreams[0]}")
    else:
        upstream = several_hosts_upstream()
        assert len(upstreams) == len(GUIDE_HOSTS)
        for host, port in zip(GUIDE_HOSTS, upstreams, strict=True):
            upstream = replace_once(upstream, host, f"127.0.0.1:{port}")
    site = replace_once(site, SINGLE_UPSTREAM, upstream)
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    live = "/etc/letsencrypt/live/agent.example.com"
    site = replace_once(site, f"{live}/fullchain.pem", str(cert))
    return replace_once(site, f"{live}/privkey.pem", str(key))


def settings_of(text: str) -> dict[str, str]:
    """``KEY=value`` lines (a unit, an env file), comments and trailing comments dropped."""
    found = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found
