"""The HTTP/WebSocket surface: parse, authenticate, hand over to ``voice_trio.calls``."""
