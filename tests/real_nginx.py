"""A real nginx (Debian's package) run by a test: not a daemon, everything under one prefix.

The test writes the ``server`` and ``upstream`` blocks; this wraps them in a main
configuration whose pid file, logs and temporary directories live in the prefix, so nginx
runs as any user and leaves nothing behind. Tests that need it are skipped, with the
command that installs it, where the ``nginx`` program is absent.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from processes import Program, free_port

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (Debian/Ubuntu: apt-get install -y nginx); see README",
)

MAIN = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{servers}
}}
"""


@asynccontextmanager
async def running_nginx(tmp_path: Path, servers: str, ports: Iterable[int]) -> AsyncIterator[Path]:
    """nginx serving ``servers`` (blocks of its ``http`` context) until the block exits,
    once every one of ``ports`` on 127.0.0.1 accepts; yields its prefix (logs are there)."""
    assert NGINX is not None
    prefix = tmp_path / f"nginx-{free_port()}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(MAIN.format(prefix=prefix, servers=servers))
    args = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    nginx = Program(args, cwd=prefix, env={"PATH": "/usr/sbin:/usr/bin:/bin"}, log=prefix / "out")
    try:
        with trio.fail_after(15):
            for port in ports:
                while True:
                    if nginx.process.poll() is not None:
                        log = (prefix / "error.log").read_text(errors="replace")
                        raise AssertionError(f"nginx exited: {nginx.output()}{log}")
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
        yield prefix
    finally:
        if nginx.process.poll() is None:
            nginx.process.send_signal(signal.SIGTERM)
            await nginx.wait(10)
        nginx.kill()
