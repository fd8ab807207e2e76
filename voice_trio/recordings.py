"""Where call recordings live on disk: one stereo WAV per media call (``RECORD_CALLS``).

A file's name comes from its call_control_id, which arrives from the network and is never
used as a path: it is reduced to ``[A-Za-z0-9_-]`` and followed by a hash of the whole id,
so two ids never share a file and no id can leave the directory. Files are written as
``.<name>.part`` and renamed into place when complete (``media.recording``): a ``.wav``
is always whole. Old files are swept (``RECORDING_RETENTION_DAYS``), and a call's file goes
when its record is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger("voice_trio.store")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
SWEEP_EVERY_SECONDS = 3600.0
PART_SUFFIX = ".part"


def file_name(call_control_id: str) -> str:
    """The recording's file name: filesystem-safe, unique per call_control_id."""
    digest = hashlib.sha256(call_control_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = _UNSAFE.sub("_", call_control_id)[:80]
    return f"{readable}-{digest}.wav"


def recording_path(directory: str | Path, call_control_id: str) -> Path:
    return Path(directory) / file_name(call_control_id)


def part_path(directory: str | Path, call_control_id: str) -> Path:
    """Where the recording is written while the call goes on."""
    return Path(directory) / f".{file_name(call_control_id)}{PART_SUFFIX}"


def find_recording(directory: str, call_control_id: str) -> Path | None:
    """The call's finished recording, if there is one."""
    if not directory:
        return None
    path = recording_path(directory, call_control_id)
    return path if path.is_file() else None


def delete_recording(directory: str, call_control_id: str) -> bool:
    """Remove the call's recording; True if there was one."""
    if not directory:
        return False
    try:
        recording_path(directory, call_control_id).unlink()
    except FileNotFoundError:
        return False
    return True


def sweep(directory: str | Path, max_age_seconds: float, now: float | None = None) -> int:
    """Delete recordings (and parts left by a crash) last written more than
    ``max_age_seconds`` ago; returns how many went. Blocking: run it in a thread."""
    cutoff = (time.time() if now is None else now) - max_age_seconds
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not (entry.name.endswith(".wav") or entry.name.endswith(".wav" + PART_SUFFIX)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
