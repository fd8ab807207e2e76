"""Summarise a ``py-spy record -f raw`` file: the top functions by self and by total samples.

    .venv/bin/python scripts/pyspy_top.py results/prof40/pyspy.txt [--top 30] [--grep wsproto]

Each raw line is ``frame;frame;...;leaf count`` (root first). "Total" counts a function once
per sample even when it recurses; shares are of all samples in the file.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--grep", default=None, help="only total rows matching this regex")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    files: Counter[str] = Counter()
    samples = 0
    with open(args.path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            samples += n
            frames = [short(f) for f in stack.split(";") if f and not f.startswith("process ")]
            frames = [f for f in frames if not f.startswith("thread ")]
            if not frames:
                continue
            own[frames[-1]] += n
            for f in set(frames):
                total[f] += n
            leaf_file = frames[-1].rsplit("(", 1)[-1].split("/")[0].rstrip(")")
            files[leaf_file] += n
    print(f"{samples} samples")
    print("\nself:")
    for f, n in own.most_common(args.top):
        print(f"{n / samples * 100:5.1f}%  {f}")
    print("\ntotal:")
    pattern = re.compile(args.grep) if args.grep else None
    shown = 0
    for f, n in total.most_common():
        if pattern and not pattern.search(f):
            continue
        print(f"{n / samples * 100:5.1f}%  {f}")
        shown += 1
        if shown >= args.top:
            break
    print("\nself by top-level package of the leaf:")
    for f, n in files.most_common(15):
        print(f"{n / samples * 100:5.1f}%  {f}")


if __name__ == "__main__":
    main()
