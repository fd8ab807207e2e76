"""What a run shows and writes: a one-line progress display, JSON results, the optional
matplotlib charts, megabytes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any


class Progress:
    """One status line rewritten in place with ``\\r`` (plain lines when not a terminal)."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 10.0
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str = "") -> None:
        if self.tty:
            if text:
                self.update(text, force=True)
            self.stream.write("\n")
            self._width = 0
        elif text:
            self.stream.write(text + "\n")
        self.stream.flush()


def bar(done: float, total: float, width: int = 24) -> str:
    share = 0.0 if total <= 0 else min(1.0, done / total)
    filled = int(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def load_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, or None (it is not a project dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 2)
