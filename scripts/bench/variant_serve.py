"""``voice_trio.cli`` with one optimisation switched off, for before/after comparisons.

    VARIANT=no-stt-batching python -P scripts/bench/variant_serve.py --env-file ... serve
    VARIANT=no-gathered-reads,trio-stream-io ...   (several, comma-separated)

Used by ``scripts/loadtest.py --variant`` (``server.VARIANT_SERVE``); the variants are
named in ``VARIANTS``.
"""

from __future__ import annotations

import os
import sys


def no_stt_batching() -> None:
    from voice_trio.providers.deepgram import link as stt_link

    stt_link.BATCH_SECONDS = 0.0  # one WebSocket message per 20 ms carrier frame


def no_speech_batching() -> None:
    from voice_trio.providers.deepgram import link as stt_link

    stt_link.SPEECH_BATCH_SECONDS = 0.0  # while the caller speaks, every frame at once


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


def no_gathered_reads() -> None:
    from voice_trio.web.lean_socket import LeanWebSocket

    # Every media read as frames come, whatever the call sets (the class attribute, a
    # property that ignores sets, takes precedence over the instance's).
    LeanWebSocket.read_gap = property(lambda self: 0.0, lambda self, value: None)  # type: ignore[assignment]


def trio_stream_io() -> None:
    from voice_trio.wire.fastio import FastIO

    # Reads and writes through the stream's receive_some / send_all, as for TLS.
    original = FastIO.__init__

    def init(self: FastIO, stream: object) -> None:
        original(self, stream)  # type: ignore[arg-type]
        self._socket = None

    FastIO.__init__ = init  # type: ignore[method-assign]


VARIANTS = {
    "no-stt-batching": no_stt_batching,
    "hypercorn-reads": hypercorn_reads,
    "asgi-media-socket": asgi_media_socket,
    "no-gathered-reads": no_gathered_reads,
    "no-speech-batching": no_speech_batching,
    "trio-stream-io": trio_stream_io,
}


def main() -> None:
    for name in filter(None, os.environ.get("VARIANT", "").split(",")):
        VARIANTS[name]()
    from voice_trio.cli import main as cli_main

    sys.argv = ["voice-trio", *sys.argv[1:]]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
