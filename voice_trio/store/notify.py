"""PostgreSQL ``LISTEN``/``NOTIFY``: the engine under the call-event bus (``calls.bus``).

Every instance sharing the store already talks to this PostgreSQL server, so it carries the
events too: no other service to run. ``LISTEN`` needs a connection of its own, held for as
long as we listen (not one of the store's pool, whose connections come and go); ``NOTIFY``
goes through the pool (``PostgresStore.notify``), and reaches the listeners when its
transaction commits.

psycopg's async API needs asyncio, so :class:`Listener` is plain blocking code for a Trio
worker thread (``trio.to_thread.run_sync``). ``receive`` waits at most ``timeout`` seconds,
so that the thread comes back often enough for its Trio task to be cancelled.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from voice_trio.store.errors import StoreError

# PostgreSQL refuses a payload of 8000 bytes or more (default build).
MAX_PAYLOAD_BYTES = 7999
# A quiet connection is checked this often: a server that went away without closing the
# socket is found by a query, not by waiting for notifications that never come.
PING_EVERY_SECONDS = 5.0
_DRIVER_ERRORS = psycopg.Error  # every driver error: the bus loop must never crash


class Listener:
    """One ``LISTEN`` connection to ``channel``; blocking methods, for one worker thread at
    a time. Driver errors come out as ``StoreError`` (the connection is then unusable:
    ``close`` it and ``connect`` again)."""

    def __init__(self, dsn: str, channel: str, where: str, connect_timeout: float = 3.0) -> None:
        self._dsn = dsn
        self.channel = channel
        self.where = where
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._active_at = 0.0
        self._lock = threading.Lock()
        self._shut = False

    @property
    def backend_pid(self) -> int | None:
        """The server process serving this connection (None when not connected)."""
        return None if self._conn is None else self._conn.info.backend_pid

    def connect(self) -> None:
        """Connect and ``LISTEN``. May run in a thread its Trio task abandoned (a connection
        attempt is not interruptible): a connection made after ``shut`` is closed at once."""
        self.close()
        try:
            conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
            )
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"cannot listen on PostgreSQL at {self.where}: {exc}") from exc
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except _DRIVER_ERRORS as exc:
            conn.close()
            raise StoreError(f"LISTEN failed on PostgreSQL at {self.where}: {exc}") from exc
        with self._lock:
            if self._shut:
                conn.close()
                raise StoreError("the listener was shut")
            self._conn = conn
        self._active_at = time.monotonic()

    def receive(self, timeout: float) -> list[str]:
        """The payloads of the notifications that came, as soon as one comes (with any that
        arrived with it); an empty list after ``timeout`` seconds of quiet."""
        conn = self._conn
        if conn is None:
            raise StoreError("not listening")
        try:
            got = [n.payload for n in conn.notifies(timeout=timeout, stop_after=1)]
            now = time.monotonic()
            if got:
                self._active_at = now
            elif now - self._active_at >= PING_EVERY_SECONDS:
                conn.execute("SELECT 1")
                self._active_at = now
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"lost the LISTEN connection to {self.where}: {exc}") from exc
        return got

    def shut(self) -> None:
        """Close for good: a connection attempt still under way is closed when it ends."""
        with self._lock:
            self._shut = True
        self.close()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except _DRIVER_ERRORS:
                pass
