"""Bytes on sockets: what the media socket and the provider links share below the protocols."""
