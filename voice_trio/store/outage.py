"""Store writes a call depends on but must never be harmed by: the call's record.

A call record is written when the call starts and when it ends. The store may be down at
either moment (SQLite file unwritable, PostgreSQL unreachable, a pool that times out); the
call must go on and end exactly as it would otherwise, so :func:`keep` never raises: it
runs the write shielded from the call's cancellation and bounded by ``SAVE_TIMEOUT_S``.

Retried, not buffered. Every write passed here is idempotent (``start_call`` keeps a row
already there, ``save_call`` rewrites the whole call, ``delete_state`` and ``get_call``
change nothing twice), so a failed one is tried again after ``RETRY_DELAYS_S`` while the
bound lasts: that rides out a blip (a failover, a lock held too long). It is not kept in
memory for later: a record buffered in a process dies with it, and an outage long enough
to outlast the bound is the operator's to see and fix. The row written as a call starts
is the exception: the caller is waiting, so it gets one try within ``START_TIMEOUT_S``
(``first=True``) — ``save_call`` at the end writes the whole row anyway. What is lost is visible instead:
every write given up is logged at ERROR with the call id (the log line carries it) and
counted in ``voice_store_errors_total{operation}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from voice_trio.store.errors import StaleState, StoreError

log = logging.getLogger("voice_trio.store")

T = TypeVar("T")

SAVE_TIMEOUT_S = 5.0  # the whole of one write, retries included
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0)  # between attempts, while SAVE_TIMEOUT_S lasts
START_TIMEOUT_S = 1.0  # the row of a call starting: the caller is waiting meanwhile

OnFailure = Callable[[str], None]  # called with the operation's name when it is given up


async def keep(
    write: Callable[..., Awaitable[T]],
    *args: Any,
    on_failure: OnFailure | None = None,
    first: bool = False,
) -> T | None:
    """``await write(*args)``, shielded, retried on ``StoreError`` and bounded (module
    docstring; ``first``: one short try); None if it was given up. ``StaleState`` is a
    lost race, not an outage: it is raised."""
    operation = getattr(write, "__name__", "write")
    limit = START_TIMEOUT_S if first else SAVE_TIMEOUT_S
    failure: str | None = None
    with trio.CancelScope(shield=True), trio.move_on_after(limit) as scope:
        for delay in (*(() if first else RETRY_DELAYS_S), None):
            try:
                return await write(*args)
            except StaleState:
                raise
            except StoreError as exc:
                failure = str(exc)
                if delay is None:
                    break
                log.warning("Store %s failed (%s): retrying in %.1f s", operation, exc, delay)
                await trio.sleep(delay)
    if scope.cancelled_caught:
        failure = f"the store took longer than {limit:.0f} s" + (
            f" (last error: {failure})" if failure else ""
        )
    log.error("Call record not saved: store %s failed: %s", operation, failure)
    if on_failure is not None:
        on_failure(operation)
    return None
