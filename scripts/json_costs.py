"""What JSON and base64 cost on the media path, with the standard library and, where they
are importable, orjson and msgspec: the numbers behind "adopt one only if it pays".

    .venv/bin/python scripts/json_costs.py          # the standard library only
    .venv/bin/python -m pip install --target /tmp/jsonlibs orjson msgspec   # or any pip
    PYTHONPATH=/tmp/jsonlibs .venv/bin/python scripts/json_costs.py   # all three

Per message, in microseconds, best and median of 7 repeats of 20 000 (timeit): an inbound
Telnyx media frame (20 ms of audio) parsed the way the server does (``parse_frame``: JSON,
then base64), and an outbound 100 ms chunk built (the server's string template against a
JSON encoder). Run it on a quiet core.
"""

from __future__ import annotations

import binascii
import json
import os
import statistics
import timeit
from base64 import b64encode
from collections.abc import Callable
from typing import Any

from voice_trio.providers.telnyx.media import build_media, parse_frame

NUMBER = 20_000
REPEATS = 7
AUDIO_IN = os.urandom(160)  # 20 ms of mu-law, as Telnyx sends it
AUDIO_OUT = os.urandom(800)  # 100 ms, as the server sends it
FRAME = json.dumps(
    {
        "event": "media",
        "sequence_number": "4",
        "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "5",
            "payload": b64encode(AUDIO_IN).decode(),
        },
        "stream_id": "32de0dea-53cb-4b21-89a4-9f44fd53d5c1",
    }
)
FRAME_BYTES = FRAME.encode()


def cases() -> dict[str, Callable[[], Any]]:
    found: dict[str, Callable[[], Any]] = {
        "in: parse_frame (json + base64, checked)": lambda: parse_frame(FRAME),
        "in: json.loads + a2b_base64": lambda: binascii.a2b_base64(
            json.loads(FRAME)["media"]["payload"], strict_mode=True
        ),
        "out: build_media (string template)": lambda: build_media(AUDIO_OUT),
        "out: json.dumps + b64encode": lambda: json.dumps(
            {"event": "media", "media": {"payload": b64encode(AUDIO_OUT).decode()}}
        ),
    }
    try:
        import orjson
    except ImportError:
        pass
    else:
        found["in: orjson.loads + a2b_base64"] = lambda: binascii.a2b_base64(
            orjson.loads(FRAME_BYTES)["media"]["payload"], strict_mode=True
        )
        found["out: orjson.dumps + b64encode"] = lambda: orjson.dumps(
            {"event": "media", "media": {"payload": b64encode(AUDIO_OUT).decode()}}
        )
    try:
        import msgspec
    except ImportError:
        pass
    else:
        decoder, encoder = msgspec.json.Decoder(), msgspec.json.Encoder()
        found["in: msgspec decode + a2b_base64"] = lambda: binascii.a2b_base64(
            decoder.decode(FRAME_BYTES)["media"]["payload"], strict_mode=True
        )
        found["out: msgspec encode + b64encode"] = lambda: encoder.encode(
            {"event": "media", "media": {"payload": b64encode(AUDIO_OUT).decode()}}
        )
    return found


def main() -> None:
    for name, fn in cases().items():
        runs = [timeit.timeit(fn, number=NUMBER) / NUMBER * 1e6 for _ in range(REPEATS)]
        print(f"{name:44s} best {min(runs):6.2f} µs   median {statistics.median(runs):6.2f} µs")


if __name__ == "__main__":
    main()
