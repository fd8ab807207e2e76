"""Run the server: Hypercorn's trio worker, signal-aware shutdown.

SIGINT/SIGTERM are received for the whole life of the process: the first starts the drain
(``CallCenter.shut_down``), each later one hurries it a stage (``CallCenter.hurry``) —
never the default handler, which would kill the process with calls up and records
unwritten. From the first signal the process exits within ``drain_bound()`` seconds.
"""

from __future__ import annotations

import gc
import logging
import resource
import signal
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from voice_trio.compat.hypercorn import ConnectionLimits
from voice_trio.config import Settings
from voice_trio.instance.center import (
    BACKGROUND_GRACE_SECONDS,
    GOODBYE_SECONDS,
    HANG_UP_SECONDS,
    CallCenter,
)
from voice_trio.web.dispatch import VoiceApp, build_app

log = logging.getLogger("voice_trio")

# After the drain, what HTTP requests still in flight get before their connections close.
SHUTDOWN_GRACE_SECONDS = 1.0
# A connection may be idle, or send its request head, this long (Hypercorn's keep-alive
# timer runs from connect or the last response until a request head is complete).
KEEP_ALIVE_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30


def drain_bound(settings: Settings) -> float:
    """Seconds from the first signal to the end of the process, at most (closing the store
    and clients takes well under the second allowed for it)."""
    tail = GOODBYE_SECONDS + HANG_UP_SECONDS + SHUTDOWN_GRACE_SECONDS + BACKGROUND_GRACE_SECONDS
    return settings.drain_timeout_s + tail + 1.0


def reserve_listener(host: str, port: int = 0) -> socket.socket:
    """A bound TCP socket: its port is known before the settings that mention it are made
    (tests and the demo serve on an ephemeral port that must appear in WEBHOOK_BASE_URL)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def hypercorn_config(
    settings: Settings,
    listener: socket.socket | None = None,
    limits: ConnectionLimits | None = None,
) -> Config:
    config = Config()
    config.connection_limits = limits  # type: ignore[attr-defined]  # compat.hypercorn, connection_limits
    if listener is not None:
        config.bind = [f"fd://{listener.detach()}"]
    else:
        config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.graceful_timeout = SHUTDOWN_GRACE_SECONDS
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.websocket_ping_interval = None
    # A connection that sends nothing for this long is closed: a live call's media socket
    # carries a frame every 20 ms, so this reaps half-closed peers and idle keep-alive
    # connections that would otherwise hold a socket and two tasks forever.
    config.read_timeout = READ_TIMEOUT_SECONDS
    # Telnyx frames are small JSON; nothing legitimate comes near this.
    config.websocket_max_message_size = 256 * 1024
    return config


def fit_descriptor_limit(connections: int) -> None:
    """Raise this process's descriptor limit towards what ``connections`` media calls need
    (each holds the carrier's socket and one to Deepgram), or say it is too low."""
    wanted = 2 * connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "Open-file limit %d is below the %d that MAX_CONNECTIONS=%d may need: lower it"
            " or raise the limit (ulimit -n, LimitNOFILE=)",
            target,
            wanted,
            connections,
        )


class Signals:
    """SIGINT and SIGTERM, received until the server has finished (module docstring):
    this process's own, or those its supervisor relays (``voice_trio.workers``)."""

    RELAYED = frozenset({"SIGINT", "SIGTERM"})

    def __init__(self, center: CallCenter, bound: float) -> None:
        self.center = center
        self.bound = bound
        self.first = trio.Event()

    def receive(self, name: str, why: str = "") -> None:
        """The signal ``name`` came: the first starts the drain, later ones hurry it."""
        if not self.first.is_set():
            why = why or f"Received {name}"
            log.info("%s, shutting down (exit within %.0f s)", why, self.bound)
            self.first.set()
        else:
            log.warning("Received %s again: %s", name, self.center.hurry())

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                self.receive(signal.Signals(signum).name)

    async def watch_supervisor(
        self, orders: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Signal names the supervisor relays, one per line on the pipe ``orders``. The
        pipe's end means the supervisor is gone: nobody would relay a signal any more, so
        that ends this worker too, as a SIGTERM would."""
        pending = b""
        async with trio.lowlevel.FdStream(orders) as pipe:
            task_status.started()
            while chunk := await pipe.receive_some(256):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if (name := line.decode("ascii", "replace")) in self.RELAYED:
                        self.receive(name)
        if not self.first.is_set():
            self.receive("SIGTERM", "The supervisor is gone")


async def serve(
    settings: Settings,
    *,
    app: VoiceApp | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    listener: socket.socket | None = None,
    orders: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` (default: the first SIGINT/SIGTERM) returns, then
    drain the calls still running before Hypercorn stops. A worker of several takes its
    signals from its supervisor, through the pipe ``orders``."""
    app = app or build_app(settings)
    center = app.center
    refused = center.metrics.connections_refused
    limits = ConnectionLimits(
        settings.max_connections,
        settings.max_connections_per_client,
        on_refused=lambda reason: refused.labels(reason).inc(),
    )
    fit_descriptor_limit(settings.max_connections)
    config = hypercorn_config(settings, listener, limits)
    async with trio.open_nursery() as nursery:
        trigger: Callable[[], Awaitable[object]]
        if shutdown_trigger is None:
            signals = Signals(center, drain_bound(settings))
            if orders is None:
                await nursery.start(signals.watch)
            else:
                await nursery.start(signals.watch_supervisor, orders)
            trigger = signals.first.wait
        else:
            trigger = shutdown_trigger

        async def shutdown() -> None:
            await trigger()
            await center.shut_down(settings.drain_timeout_s)

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(app, config, shutdown_trigger=shutdown, task_status=task_status)
            nursery.cancel_scope.cancel()  # the signal watcher's work is over

        binds = await nursery.start(run_hypercorn)
        address = binds[0].split("://", 1)[-1].replace("[::]", "0.0.0.0")
        log.info("Server listening on %s (mode: %s)", address, settings.mode)
        # Objects alive now (imports, app, clients) live as long as the process: keep them
        # out of the cyclic collector, whose full passes over them paused the event loop
        # for 100-200 ms under load and made outbound frames late (docs/benchmarks.md).
        gc.freeze()
        task_status.started(binds[0])
