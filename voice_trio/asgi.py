"""The ASGI application: ``hypercorn -k trio voice_trio.asgi:app`` serves it directly.

``/stream/media`` WebSockets go to a lean ASGI handler; everything else (HTTP routes and
the lifespan) goes to the Quart-Trio app. Both share one ``CallCenter``.
"""

from __future__ import annotations

import logging
from typing import Any

from voice_trio.calls.center import CallCenter
from voice_trio.config import Settings
from voice_trio.observability import setup_logging
from voice_trio.web import hypercorn_fixes
from voice_trio.web.app import create_app
from voice_trio.web.media import serve_media_stream
from voice_trio.web.media_socket import Receive, Scope, Send

log = logging.getLogger("voice_trio")

MEDIA_PATH = "/stream/media"


class VoiceApp:
    """ASGI dispatcher over the Quart app and the media-stream handler."""

    def __init__(self, center: CallCenter) -> None:
        self.center = center
        self.quart = create_app(center)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope.get("path") == MEDIA_PATH:
            await serve_media_stream(self.center, scope, receive, send)
        else:
            await self.quart(scope, receive, send)


def build_app(settings: Settings, center: CallCenter | None = None) -> VoiceApp:
    hypercorn_fixes.apply()
    return VoiceApp(center or CallCenter(settings))


def _from_environment() -> Any:
    settings = Settings.load()
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    return build_app(settings)


def __getattr__(name: str) -> Any:
    # Built on first access, so importing this module for build_app() reads no environment.
    if name == "app":
        globals()["app"] = _from_environment()
        return globals()["app"]
    raise AttributeError(name)
