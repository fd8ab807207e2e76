"""The media-stream call: one Trio nursery per call owning the Telnyx media socket, the
Deepgram link and the replies spoken back into the call."""
