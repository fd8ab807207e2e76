"""Deepgram: streaming speech-to-text (and the reconnecting link a call holds) and
text-to-speech."""
