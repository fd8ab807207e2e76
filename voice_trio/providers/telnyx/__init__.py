"""Telnyx: Call Control commands, the media-stream wire format, webhooks and speech
settings."""
