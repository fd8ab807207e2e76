"""``voice_trio.cli`` under tracemalloc: SIGUSR2 writes a snapshot (for scripts/memprofile.py,
and ``scripts/soak.py --slow-server``, which wants a slow server).

    python -P scripts/bench/traced_serve.py --env-file ... serve      (``server.TRACED_SERVE``)

``TRACEMALLOC_OUT`` names the directory; snapshots are ``snap-<n>.pickle``. Tracing makes
the server several times slower: use it for memory questions only, never for timings.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path


def main() -> None:
    out = Path(os.environ.get("TRACEMALLOC_OUT", "."))
    frames = int(os.environ.get("TRACEMALLOC_FRAMES", "12"))
    tracemalloc.start(frames)
    count = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal count
        count += 1
        gc.collect()
        tracemalloc.take_snapshot().dump(str(out / f"snap-{count}.pickle"))
        (out / f"snap-{count}.done").write_text("ok")

    signal.signal(signal.SIGUSR2, dump)
    from voice_trio.cli import main as cli_main

    sys.argv = ["voice-trio", *sys.argv[1:]]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
