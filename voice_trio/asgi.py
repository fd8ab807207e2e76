"""``hypercorn -k trio voice_trio.asgi:app``: the application, built from the environment.

Hypercorn finds ``app`` by evaluating the name in this module's namespace, so it must be a
plain attribute: importing this module reads the settings (environment, then ``.env`` in
the working directory) and builds the app, in every worker process. A bad setting stops the
process with exit code 2 and the message ``voice-trio check-config`` would print.
Code that brings its own settings imports ``voice_trio.web.dispatch.build_app`` instead.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from voice_trio.config import ConfigError, Settings
from voice_trio.instance.center import CallCenter
from voice_trio.observability import setup_logging
from voice_trio.web.dispatch import VoiceApp, build_app


def _from_environment() -> VoiceApp:
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Hypercorn's workers (-w N) are processes it spawns, all on one port: each needs a
    # name of its own in the store, or each start would end its siblings' calls.
    spawned = multiprocessing.parent_process() is not None
    worker = f"pid{os.getpid()}" if spawned else "w1"
    setup_logging(settings.log_level, settings.log_format, settings.secrets(), worker=worker)
    return build_app(settings, CallCenter(settings, worker=worker, shares_port=spawned))


app = _from_environment()
