"""JSON lines between the load test and its generator processes (over their stdin/stdout),
and the clock they share.

Times cross processes as ``time.monotonic()`` seconds: every process's trio clock is the same
monotonic clock plus an offset of its own (trio adds a random one), so
:func:`to_monotonic` and :func:`from_monotonic` convert exactly.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import trio


def trio_offset() -> float:
    """``trio.current_time() - time.monotonic()`` in this run (both are CLOCK_MONOTONIC)."""
    return trio.current_time() - time.monotonic()


def to_monotonic(t: float, offset: float) -> float:
    return t - offset


def from_monotonic(t: float, offset: float) -> float:
    return t + offset


class JsonLines:
    """One JSON document per line over a pair of trio streams; ``send`` may be called from
    several tasks (it is serialised), ``receive`` from one."""

    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream) -> None:
        self._receive = receive
        self._send = send
        self._lock = trio.Lock()
        self._buffer = bytearray()

    @classmethod
    def stdio(cls) -> JsonLines:
        """This process's stdin and stdout (duplicated, so print() cannot interleave)."""
        receive = trio.lowlevel.FdStream(os.dup(0))
        send = trio.lowlevel.FdStream(os.dup(1))
        return cls(receive, send)

    async def send(self, document: dict[str, Any]) -> None:
        data = json.dumps(document, separators=(",", ":")).encode() + b"\n"
        async with self._lock:
            await self._send.send_all(data)

    async def receive(self) -> dict[str, Any] | None:
        """The next document; None once the other side has closed its end."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.strip():
                    document: dict[str, Any] = json.loads(line)
                    return document
                continue
            data = await self._receive.receive_some(65536)
            if not data:
                return None
            self._buffer += data

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, every thread) of process ``pid`` so far, from
    ``/proc/<pid>/stat`` (clock-tick resolution, 10 ms here); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def threads_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time so far of process ``pid``'s main thread (``main``: Trio, in the generator's
    processes) and of all its other threads together (``reactor``: the lean simulators'
    reactor, and Trio's short-lived worker threads), from ``/proc/<pid>/task``."""
    out = {"main": 0.0, "reactor": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out["main" if int(tid) == pid else "reactor"] += seconds
    return out


def own_cpu_seconds() -> float:
    return time.process_time()
