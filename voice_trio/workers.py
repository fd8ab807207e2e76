"""``voice-trio serve --workers N``: N server processes on one port, and their supervisor.

One Trio loop runs on one core (docs/benchmarks.md: one process carries ~60 calls), and
calls are independent, so a host's other cores are used by more processes. The supervisor
(the process started as ``voice-trio serve``) starts N workers, each running
``server.serve`` with its own Trio loop on a socket of its own bound to the same port with
``SO_REUSEPORT``: the kernel spreads new connections over the workers' sockets by a hash of
the connection's addresses. Measured against one listening socket shared by every worker
(docs/benchmarks.md), that one hands most connections of a lightly loaded host to the
worker the kernel wakes first; the hash spreads them evenly at any load.

A worker's socket is bound by the supervisor and starts listening (joins the port's group)
only when the worker is ready, and it closes with the worker: while a worker is down, its
share of new connections goes to the others. (Connections already waiting in a dead
worker's queue are reset, unless ``net.ipv4.tcp_migrate_req=1`` moves them to a sibling.)
The supervisor holds the port for its whole life with a socket that never listens, after
checking with a plain bind that no other server has it: a second server on the same port
fails to start rather than silently sharing this one's traffic. What workers share beyond
the port is in the store (PostgreSQL: ``Settings.with_workers``); the host's metrics are
in ``host_metrics``.

Signals: a worker ignores SIGINT and SIGTERM. The supervisor relays each one it receives
through a pipe (``Signals.watch_supervisor``), so every worker drains exactly as a single
process does — first signal: drain, later ones: hurry — and a signal sent to the whole
process group (Ctrl-C in a terminal, systemd's default ``KillMode=control-group``) still
counts once, not twice. If the supervisor dies, the pipe's end tells each worker to drain
as for SIGTERM. The supervisor exits 0 when every worker has exited 0.

A worker that exits while no signal came is logged and started again; its calls were cut,
and its successor (same name in the store: ``host:port/w1``) ends their records as
``server_lost`` when it starts. A worker that keeps dying at start is started again after
a growing delay; ``MAX_FAILED_STARTS`` in a row stop the server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial

import trio
from prometheus_client.multiprocess import mark_process_dead

from voice_trio.config import Settings
from voice_trio.instance.center import CallCenter
from voice_trio.observability import Metrics, setup_logging
from voice_trio.server import drain_bound, reserve_listener, serve
from voice_trio.web.dispatch import build_app

log = logging.getLogger("voice_trio")

# A worker that exits sooner than this after its start failed to start.
BOOT_SECONDS = 10.0
MAX_FAILED_STARTS = 5
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
# Beyond the drain bound, what a worker gets before it is killed.
KILL_AFTER_SECONDS = 5.0


@dataclass(eq=False)
class Worker:
    index: int
    process: trio.Process | None = None
    orders: int | None = None  # the supervisor's end of the worker's order pipe
    failed_starts: int = 0
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return f"w{self.index}"


def hold_port(host: str, port: int) -> socket.socket:
    """The port of every worker, held by the supervisor (module docstring): free, or
    ``OSError`` (address in use) as a single server's start would give."""
    with reserve_listener(host, port) as probe:  # no SO_REUSEPORT: fails if anyone has it
        port = probe.getsockname()[1]
    return worker_socket(host, port)


def worker_socket(host: str, port: int) -> socket.socket:
    """A socket in the port's ``SO_REUSEPORT`` group, bound, not yet listening: Hypercorn
    listens on it once the worker's app has started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Hypercorn binds
    sock.bind((host, port))
    return sock


class Supervisor:
    """Starts the workers, relays signals to them, starts again those that die."""

    def __init__(self, settings: Settings, env_file: str, port: socket.socket) -> None:
        self.settings = settings
        self.env_file = env_file
        self.port = port
        self.workers = [Worker(i) for i in range(1, settings.workers + 1)]
        self.relayed: list[str] = []
        self.stopping = trio.Event()
        self.metrics_dir = ""

    async def run(self) -> int:
        host, port = self.port.getsockname()[:2]
        log.info("Starting %d workers on %s:%d", len(self.workers), host, port)
        # Every worker's metric files; a fresh directory, so nothing of an earlier run
        # is counted, removed at the end.
        with tempfile.TemporaryDirectory(prefix="voice-trio-metrics-") as metrics_dir:
            self.metrics_dir = metrics_dir
            async with trio.open_nursery() as nursery:
                await nursery.start(self._relay_signals)
                nursery.start_soon(self._enforce_drain_bound)
                async with trio.open_nursery() as keepers:
                    for worker in self.workers:
                        keepers.start_soon(self._keep, worker)
                nursery.cancel_scope.cancel()
        failed = [w for w in self.workers if w.exit_code != 0]
        for worker in failed:
            log.error("Worker %s ended with exit code %s", worker.name, worker.exit_code)
        if not failed:
            log.info("Every worker has stopped")
        return 1 if failed else 0

    async def _relay_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                name = signal.Signals(signum).name
                log.info("Received %s: relayed to %d workers", name, len(self.workers))
                self._order(name)

    def _order(self, name: str) -> None:
        self.relayed.append(name)
        self.stopping.set()
        for worker in self.workers:
            self._send(worker, name)

    def _send(self, worker: Worker, name: str) -> None:
        if worker.orders is None:
            return
        try:
            os.write(worker.orders, f"{name}\n".encode())
        except OSError:
            pass  # the worker has just exited; _keep sees it

    async def _enforce_drain_bound(self) -> None:
        await self.stopping.wait()
        await trio.sleep(drain_bound(self.settings) + KILL_AFTER_SECONDS)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                log.error("Worker %s still running after the drain bound: killed", worker.name)
                worker.process.kill()

    async def _keep(self, worker: Worker) -> None:
        """Run ``worker`` until the server stops, starting it again when it dies."""
        while True:
            started = trio.current_time()
            process = await self._start(worker)
            code = await process.wait()
            self._ended(worker, process)
            if self.stopping.is_set():
                worker.exit_code = code
                log.info("Worker %s (pid %d) exited with code %d", worker.name, process.pid, code)
                return
            ran = trio.current_time() - started
            worker.failed_starts = worker.failed_starts + 1 if ran < BOOT_SECONDS else 0
            log.error(
                "Worker %s (pid %d) %s after %.1f s, while no signal came: starting it again",
                worker.name,
                process.pid,
                _how_it_ended(code),
                ran,
            )
            if worker.failed_starts >= MAX_FAILED_STARTS:
                log.error(
                    "Worker %s failed %d starts in a row: stopping the server",
                    worker.name,
                    worker.failed_starts,
                )
                worker.exit_code = code
                self._order("SIGTERM")
                return
            if worker.failed_starts:
                delay = FIRST_RESTART_DELAY * 2 ** (worker.failed_starts - 1)
                with trio.move_on_after(min(delay, MAX_RESTART_DELAY)):
                    await self.stopping.wait()
            if self.stopping.is_set():
                worker.exit_code = 0  # it was not running when the server was told to stop
                return

    async def _start(self, worker: Worker) -> trio.Process:
        host, port = self.port.getsockname()[:2]
        listener = worker_socket(host, port)  # the worker's only: it closes with the worker
        read_end, write_end = os.pipe()
        command = [
            sys.executable,
            "-m",
            "voice_trio.cli",
            "--env-file",
            self.env_file,
            "serve",
            "--workers",
            str(len(self.workers)),
            "--worker-index",
            str(worker.index),
            "--listen-fd",
            str(listener.fileno()),
            "--orders-fd",
            str(read_end),
        ]
        # PROMETHEUS_MULTIPROC_DIR before the worker imports prometheus-client, which reads
        # it once; PORT as bound (PORT=0 picked one), which names the worker in the store.
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, "PORT": str(port)}
        try:
            process = await trio.lowlevel.open_process(
                command,
                env=env,
                pass_fds=(listener.fileno(), read_end),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(read_end)
            listener.close()
        worker.process, worker.orders = process, write_end
        log.info("Worker %s started (pid %d)", worker.name, process.pid)
        for name in self.relayed:  # a signal that came while it was starting
            self._send(worker, name)
        return process

    def _ended(self, worker: Worker, process: trio.Process) -> None:
        if worker.orders is not None:
            os.close(worker.orders)
            worker.orders = None
        # Its live gauges (active calls, tasks, worker info) no longer count.
        mark_process_dead(process.pid, self.metrics_dir)


def _how_it_ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def supervise(settings: Settings, env_file: str) -> int:
    """``voice-trio serve`` with ``settings.workers`` > 1: returns the exit code."""
    try:
        port = hold_port(settings.host, settings.port)
    except OSError as exc:
        log.error("Cannot serve on %s:%d: %s", settings.host, settings.port, exc.strerror)
        return 1
    with port:
        return await Supervisor(settings, env_file, port).run()


def run_worker(settings: Settings, index: int, listen_fd: int, orders_fd: int) -> None:
    """One worker: ``server.serve`` on the socket the supervisor bound for it, its signals
    relayed by the supervisor."""
    # The supervisor relays these (module docstring); a group-wide signal must count once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = f"w{index}"
    setup_logging(
        settings.log_level,
        settings.log_format,
        settings.secrets(),
        worker=worker,
        workers=settings.workers,
    )
    center = CallCenter(settings, Metrics(worker), worker=worker, shares_port=True)
    app = build_app(settings, center)
    listener = socket.socket(fileno=listen_fd)
    trio.run(partial(serve, settings, app=app, listener=listener, orders=orders_fd))
