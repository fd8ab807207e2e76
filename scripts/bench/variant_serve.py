"""``voice_trio.cli`` with one optimisation switched off, for before/after comparisons.

    VARIANT=no-stt-batching python -P scripts/bench/variant_serve.py --env-file ... serve

Used by ``scripts/loadtest.py --variant`` (``server.VARIANT_SERVE``); the variants are
named in ``VARIANTS``.
"""

from __future__ import annotations

import os
import sys


def no_stt_batching() -> None:
    from voice_trio.providers.deepgram import link as stt_link

    stt_link.BATCH_SECONDS = 0.0  # one WebSocket message per 20 ms carrier frame


def hypercorn_reads() -> None:
    from hypercorn.trio.tcp_server import TCPServer

    from voice_trio.compat import hypercorn as compat_hypercorn

    # compat.apply() installs whatever this names: the shipped loop, a fresh fail_after and
    # 64 KiB per read. It cannot hand a connection over, so the media socket goes through
    # Hypercorn too: compare it with asgi-media-socket, not with the default.
    compat_hypercorn._read_data = TCPServer._read_data


def asgi_media_socket() -> None:
    # The media socket through Hypercorn's WebSocket layers instead of the lean socket (a
    # setting; a real variable wins over the env file).
    os.environ["MEDIA_SOCKET"] = "asgi"


VARIANTS = {
    "no-stt-batching": no_stt_batching,
    "hypercorn-reads": hypercorn_reads,
    "asgi-media-socket": asgi_media_socket,
}


def main() -> None:
    name = os.environ.get("VARIANT", "")
    if name:
        VARIANTS[name]()
    from voice_trio.cli import main as cli_main

    sys.argv = ["voice-trio", *sys.argv[1:]]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
