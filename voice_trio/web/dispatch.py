"""The ASGI application: ``/stream/media`` WebSockets go to the lean media handler;
everything else (HTTP routes and the lifespan) goes to the Quart-Trio app. Both share one
``CallCenter``.

``build_app`` takes its settings from the caller (``voice-trio serve``, the demo, tests);
``voice_trio.asgi`` builds one from the environment for ``hypercorn … voice_trio.asgi:app``.
"""

from __future__ import annotations

from typing import cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from voice_trio import compat
from voice_trio.config import Settings
from voice_trio.instance.center import CallCenter
from voice_trio.web.app import create_app
from voice_trio.web.media import serve_media_stream
from voice_trio.web.media_socket import Receive, Send
from voice_trio.web.media_socket import Scope as RawScope

MEDIA_PATH = "/stream/media"


class VoiceApp:
    """ASGI dispatcher over the Quart app and the media-stream handler."""

    def __init__(self, center: CallCenter) -> None:
        self.center = center
        self.quart = create_app(center)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket" and scope["path"] == MEDIA_PATH:
            # The media handler reads the ASGI messages as the plain dicts they are.
            raw = cast(RawScope, scope), cast(Receive, receive), cast(Send, send)
            await serve_media_stream(self.center, *raw)
        else:
            await self.quart(scope, receive, send)


def build_app(settings: Settings, center: CallCenter | None = None) -> VoiceApp:
    compat.apply()
    return VoiceApp(center or CallCenter(settings))
