"""``/console``: the operator console, served by the server itself (docs in README.md)."""

from voice_trio.web.console.routes import register_console

__all__ = ["register_console"]
