"""Run the server: Hypercorn's trio worker, signal-aware shutdown."""

from __future__ import annotations

import gc
import logging
import signal
import socket
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from voice_trio.config import Settings
from voice_trio.web.dispatch import VoiceApp, build_app

log = logging.getLogger("voice_trio")

SHUTDOWN_GRACE_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30


def reserve_listener(host: str, port: int = 0) -> socket.socket:
    """A bound TCP socket: its port is known before the settings that mention it are made
    (tests and the demo serve on an ephemeral port that must appear in WEBHOOK_BASE_URL)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def hypercorn_config(settings: Settings, listener: socket.socket | None = None) -> Config:
    config = Config()
    if listener is not None:
        config.bind = [f"fd://{listener.detach()}"]
    else:
        config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.graceful_timeout = SHUTDOWN_GRACE_SECONDS
    config.websocket_ping_interval = None
    # A connection that sends nothing for this long is closed: a live call's media socket
    # carries a frame every 20 ms, so this reaps half-closed peers and idle keep-alive
    # connections that would otherwise hold a socket and two tasks forever.
    config.read_timeout = READ_TIMEOUT_SECONDS
    # Telnyx frames are small JSON; nothing legitimate comes near this.
    config.websocket_max_message_size = 256 * 1024
    return config


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("Received %s, shutting down", signal.Signals(signum).name)
            return


async def serve(
    settings: Settings,
    *,
    app: VoiceApp | None = None,
    shutdown_trigger: object = None,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` (default: SIGINT/SIGTERM) returns, then end the
    calls still running (each closes its socket politely) before Hypercorn stops."""
    app = app or build_app(settings)
    trigger = shutdown_trigger or wait_for_signal

    async def shutdown() -> None:
        await trigger()  # type: ignore[operator]
        await app.center.shut_down(settings.drain_timeout_s)

    config = hypercorn_config(settings, listener)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=shutdown)
        )
        address = binds[0].split("://", 1)[-1].replace("[::]", "0.0.0.0")
        log.info("Server listening on %s (mode: %s)", address, settings.mode)
        if not settings.telnyx_public_key:
            log.warning("⚠️ TELNYX_PUBLIC_KEY is not set: webhook signatures are NOT verified")
        # Objects alive now (imports, app, clients) live as long as the process: keep them
        # out of the cyclic collector, whose full passes over them paused the event loop
        # for 100-200 ms under load and made outbound frames late (docs/benchmarks.md).
        gc.freeze()
        task_status.started(binds[0])
