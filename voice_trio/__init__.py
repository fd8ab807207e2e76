"""voice-trio: AI phone agents on Telnyx, one Trio nursery per call."""

__version__ = "0.1.0"
