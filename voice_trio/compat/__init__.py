"""Every correction this server makes to a third-party library, and the one switch for them.

A fix of someone else's code is a debt with a known end: the upstream release that no
longer needs it. Keeping all of them here, one module per library, makes that debt visible
in one place: each ``Fix`` names the library, the releases it was checked against (outside
them it is not applied and a warning says so), and has a canary in tests/test_compat.py
that fails once upstream no longer has the bug. docs/upstream.md holds each bug written as
the report we would file.

``apply()`` installs them all; it is idempotent and cheap after the first call, and is
called where a process first needs them: ``web.dispatch.build_app`` (the server) and the
import of the WebSocket provider clients (``providers.deepgram.stt``,
``providers.elevenlabs_tts``), which may run without a server.
"""

from __future__ import annotations

from voice_trio.compat import hypercorn, trio_websocket
from voice_trio.compat._guard import Fix, active

FIXES: tuple[Fix, ...] = (*hypercorn.FIXES, *trio_websocket.FIXES)

_applied = False


def apply() -> None:
    """Install every fix whose library is at a release it was checked against (once)."""
    global _applied
    if _applied:
        return
    _applied = True
    for fix in FIXES:
        # Helpers (no ``install``) are checked too, so their warning comes at start-up.
        if active(fix) and fix.install is not None:
            fix.install()


__all__ = ["FIXES", "Fix", "apply"]
