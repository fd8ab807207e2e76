"""A bare epoll loop with timers, for the load generator's per-frame work.

Why not Trio here: on the project's 2-core VM a Trio task that wakes up (a timer, a socket
that became readable) costs about 60-80 µs of CPU, against 15-20 µs for ``epoll.poll`` and
a callback (measured: a task doing ``trio.sleep_until`` every millisecond, and
``wait_readable`` + ``recv`` on a socket fed every millisecond, against the same with a plain
``select.epoll``). The lean carrier and the lean Deepgram wake up 50 to 100 times per call
per second, so at that price the load generator would cost as much CPU as the server it
measures. Everything that happens once per call (REST, webhooks, the call's state) stays in
Trio; only the per-frame work runs here, in a thread of its own.

The loop is single-threaded: callbacks run one at a time on the reactor's thread and must
not block. Other threads hand it work with :meth:`Reactor.call_soon_threadsafe`. Times are
``time.monotonic()`` seconds. A callback that raises is logged and the loop goes on: one
broken stream must not stop every other call.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_BROKEN = select.EPOLLHUP | select.EPOLLERR  # reported whatever was asked for


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callable[..., None] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False, default=())
    cancelled: bool = field(compare=False, default=False)

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """``epoll`` readiness callbacks, timers and a thread-safe queue of calls."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {}
        self._timers: list[Timer] = []
        self._seq = 0
        self._calls: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self.thread: threading.Thread | None = None
        self.callback_errors = 0

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def watch(
        self,
        fd: int,
        on_readable: Callable[[], None] | None,
        on_writable: Callable[[], None] | None = None,
    ) -> None:
        """Call ``on_readable``/``on_writable`` whenever ``fd`` is ready (None: not watched).
        Calling it again replaces both."""
        mask = (select.EPOLLIN if on_readable else 0) | (select.EPOLLOUT if on_writable else 0)
        if fd in self._handlers:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._handlers[fd] = (on_readable, on_writable)

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Timer:
        self._seq += 1
        timer = Timer(when, self._seq, callback, args)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        return self.call_at(time.monotonic() + delay, callback, *args)

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the reactor's thread, soon; callable from any thread."""
        self._calls.append((callback, args))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop is awake
        except OSError:
            pass  # the reactor is closed: nothing will run it

    def stop(self) -> None:
        """End :meth:`run` (callable from any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def start(self, name: str = "reactor") -> threading.Thread:
        """Run the loop in a daemon thread of its own."""
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()
        return self.thread

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        epoll, handlers, timers, calls = self._epoll, self._handlers, self._timers, self._calls
        wake = self._wake_r
        while not self._stopping:
            timeout = -1.0
            if calls:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0].when - time.monotonic())
            for fd, events in epoll.poll(timeout):
                if fd == wake:
                    try:
                        os.read(wake, 4096)
                    except BlockingIOError:
                        pass
                    continue
                readable, writable = handlers.get(fd, (None, None))
                if writable is not None and events & (select.EPOLLOUT | _BROKEN):
                    self._run(writable, ())
                if readable is not None and events & (select.EPOLLIN | _BROKEN):
                    if handlers.get(fd, (None,))[0] is readable:  # not closed meanwhile
                        self._run(readable, ())
            while calls:
                callback, args = calls.popleft()
                self._run(callback, args)
            if timers:
                now = time.monotonic()
                while timers and timers[0].when <= now:
                    timer = heapq.heappop(timers)
                    if not timer.cancelled:
                        self._run(timer.callback, timer.args)
        self._epoll.close()

    def close(self) -> None:
        """Release the wake-up pipe, once the loop has ended (after :meth:`join`)."""
        if self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _run(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            self.callback_errors += 1
            log.exception("reactor callback %r failed", callback)


class Connection:
    """A non-blocking socket on a reactor: ``on_data(bytes)`` for what arrives, ``on_end()``
    once when it is over (the peer closed, an error, or :meth:`close`), and :meth:`send`,
    which writes at once and keeps what the socket does not take for when it is writable.
    Reactor thread only."""

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        on_data: Callable[[bytes], None],
        on_end: Callable[[], None],
        *,
        max_backlog: int = 1 << 20,
    ) -> None:
        self.reactor = reactor
        self.sock: socket.socket | None = sock
        self.on_data = on_data
        self.on_end = on_end
        self.max_backlog = max_backlog
        self.backlog_peak = 0
        self._fd = sock.fileno()
        self._outbox = bytearray()
        self._close_when_sent = False
        sock.setblocking(False)
        reactor.watch(self._fd, self._readable)

    @property
    def open(self) -> bool:
        return self.sock is not None

    def send(self, data: bytes) -> None:
        sock = self.sock
        if sock is None or self._close_when_sent:
            return
        outbox = self._outbox
        if outbox:
            outbox += data
        else:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                return
            outbox += data[sent:]
            self.reactor.watch(self._fd, self._readable, self._writable)
        self.backlog_peak = max(self.backlog_peak, len(outbox))
        if len(outbox) > self.max_backlog:
            log.warning("the peer left %d bytes unread: closing", len(outbox))
            self.close()

    def close_after_sending(self) -> None:
        """Close once everything sent so far has left (at once if nothing waits)."""
        if not self._outbox:
            self.close()
        else:
            self._close_when_sent = True

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.reactor.unwatch(self._fd)
        sock.close()
        self._outbox.clear()
        self.on_end()

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.on_data(data)
        else:
            self.close()

    def _writable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        outbox = self._outbox
        try:
            sent = sock.send(outbox)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del outbox[:sent]
        if not outbox:
            if self._close_when_sent:
                self.close()
            else:
                self.reactor.watch(self._fd, self._readable)


def listen(
    reactor: Reactor, host: str, port: int, on_accept: Callable[[socket.socket], None]
) -> socket.socket:
    """A listening TCP socket on the reactor; ``on_accept(sock)`` for each connection."""
    server = socket.create_server((host, port), backlog=1024)
    server.setblocking(False)

    def accept() -> None:
        while True:
            try:
                sock, _ = server.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            on_accept(sock)

    reactor.watch(server.fileno(), accept)
    return server
