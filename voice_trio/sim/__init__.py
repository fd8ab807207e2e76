"""Protocol-faithful simulators of Telnyx, Deepgram, Anthropic and ElevenLabs, a clinic's
scheduling backend for HTTP tools (docs/tools.md), and a scripted caller.

They speak the real wire protocols (``shared/docs/protocols``), so the project's clients
talk to them exactly as to the real services; only base URLs differ. Nothing here imports
``voice_trio.calls`` or ``voice_trio.web``.
"""
