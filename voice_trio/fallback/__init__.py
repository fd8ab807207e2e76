"""The webhook-only call (``USE_MEDIA_STREAMS=false``, or a media call whose stream
failed): Telnyx ``speak`` and Telnyx transcription, with its state in the store."""
