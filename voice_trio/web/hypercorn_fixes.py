"""Two small corrections to Hypercorn 0.18's trio worker, applied once at start-up.

1. **Close race** (research/trio-stack.md, gotcha 11). ``TCPServer._close`` calls
   ``send_eof`` without the connection's ``send_lock`` while ``protocol_send`` may be inside
   ``send_all`` for the close-frame reply. Trio refuses the overlap with
   ``BusyResourceError``, which ``protocol_send`` does not catch, and the error escapes far
   enough to end every connection of the process. Taking ``send_lock`` in ``_close`` (unless
   this task already holds it) serialises the two.
2. **Reason phrases.** Hypercorn writes ``HTTP/1.1 101`` with an empty reason; clients and
   checklists that look for ``101 Switching Protocols`` get the standard phrase.
"""

from __future__ import annotations

import functools
import types
from http import HTTPStatus
from typing import Any

import h11
import hypercorn.protocol.h11 as hypercorn_h11
import trio
from hypercorn.trio.tcp_server import TCPServer

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    _serialise_close()
    _add_reason_phrases()


def _serialise_close() -> None:
    original = TCPServer._close

    @functools.wraps(original)  # ``__wrapped__`` keeps the original for the race test
    async def _close(self: TCPServer) -> None:
        lock: trio.Lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await original(self)
            return
        with trio.CancelScope(shield=True):
            async with lock:
                await original(self)

    TCPServer._close = _close  # type: ignore[method-assign]


def _with_reason(event_type: Any) -> Any:
    def build(*, status_code: int, headers: Any, **kwargs: Any) -> Any:
        if "reason" not in kwargs:
            try:
                kwargs["reason"] = HTTPStatus(status_code).phrase.encode()
            except ValueError:
                pass
        return event_type(status_code=status_code, headers=headers, **kwargs)

    return build


def _add_reason_phrases() -> None:
    shim = types.SimpleNamespace(**{n: getattr(h11, n) for n in dir(h11) if not n.startswith("__")})
    shim.Response = _with_reason(h11.Response)
    shim.InformationalResponse = _with_reason(h11.InformationalResponse)
    hypercorn_h11.h11 = shim  # type: ignore[attr-defined]
