"""Simulated speech: mu-law audio that carries its own text.

The simulators never synthesise or recognise real speech. Instead, simulated speech is
mu-law 8 kHz audio in which every character of the text is one *symbol*: a short run of
loud samples that spells the character out. Anything that hears the audio — the fake
Deepgram STT, the scripted caller listening to the bot — decodes exactly the symbols that
reached it, so a transcript is only as complete as the audio that was really delivered:
cut audio gives a cut transcript, a lost or corrupted frame a garbled one.

Symbol layout (bytes are mu-law codes)::

    00 80 00 80            sync: full-scale samples that occur nowhere else
    1h 1h 1h 1h            the character's code point, four hex nibbles 0x10 | n (<= U+FFFF)
    1h 1h                  the symbol's duration in ms, two nibbles (1..255)
    filler ...             voiced filler bytes 0x20..0x6F up to the symbol's duration

A word gap is the symbol for " "; a pause between utterances is real mu-law digital
silence (0xFF). Every byte used survives mu-law -> A-law -> mu-law transcoding, so a PCMA
call carries the same text. A decoder needs no alignment: it finds sync marks with
``bytes.find``, so a symbol may be split across frames or chunks at any byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from voice_trio.audio import BYTES_PER_MS, MULAW_SILENCE

SYNC = b"\x00\x80\x00\x80"
HEADER_BYTES = len(SYNC) + 6
DEFAULT_MS_PER_CHAR = 65  # about 15 characters a second, a natural speaking rate
REPLACEMENT = "\ufffd"

# Quiet mu-law codes (|sample| <= 8): digital silence and what transcoding leaves of it.
QUIET_BYTES = bytes([0xFF, 0xFE, 0x7F, 0x7E])
_FILLER = bytes(range(0x20, 0x70))


def _nibbles(value: int, count: int) -> bytes:
    return bytes(0x10 | ((value >> (4 * i)) & 0x0F) for i in reversed(range(count)))


def _from_nibbles(raw: bytes) -> int | None:
    value = 0
    for b in raw:
        if b & 0xF0 != 0x10:
            return None
        value = (value << 4) | (b & 0x0F)
    return value


def encode_symbol(char: str, ms: int = DEFAULT_MS_PER_CHAR) -> bytes:
    """One character as a symbol lasting ``ms`` milliseconds."""
    code = ord(char)
    if code > 0xFFFF:
        code = ord("?")
    ms = max(2, min(255, ms))
    size = ms * BYTES_PER_MS
    head = SYNC + _nibbles(code, 4) + _nibbles(ms, 2)
    filler_len = size - len(head)
    start = code % len(_FILLER)
    filler = (_FILLER[start:] + _FILLER[:start]) * (filler_len // len(_FILLER) + 1)
    return head + filler[:filler_len]


def encode_speech(text: str, ms_per_char: int = DEFAULT_MS_PER_CHAR) -> bytes:
    """The audio of ``text`` spoken at ``ms_per_char`` per character (no leading silence)."""
    return b"".join(encode_symbol(c, ms_per_char) for c in text)


def speech_duration_ms(text: str, ms_per_char: int = DEFAULT_MS_PER_CHAR) -> int:
    return len(text) * max(2, min(255, ms_per_char))


def silence(ms: int) -> bytes:
    return bytes([MULAW_SILENCE]) * (ms * BYTES_PER_MS)


@dataclass(frozen=True, slots=True)
class Symbol:
    """A decoded character and where it sits in the stream (byte offsets, 8000 per second)."""

    char: str
    start: int
    end: int


class SpeechDecoder:
    """Incremental decoder for a byte stream of simulated speech.

    ``feed`` returns the symbols whose header is complete; ``voiced_until`` is the stream
    offset just past the last non-quiet byte, so ``offset - voiced_until`` is the length of
    the trailing silence. Costs a few C-level scans per chunk, never a Python loop per byte.
    """

    def __init__(self) -> None:
        self.offset = 0  # bytes consumed so far
        self.voiced_until = 0
        self._tail = b""  # bytes that may hold the start of a split header

    def feed(self, chunk: bytes) -> list[Symbol]:
        if not chunk:
            return []
        trimmed = chunk.rstrip(QUIET_BYTES)
        if trimmed:
            self.voiced_until = self.offset + len(trimmed)
        buf = self._tail + chunk
        base = self.offset - len(self._tail)
        self.offset += len(chunk)
        symbols: list[Symbol] = []
        pos = buf.find(SYNC)
        while pos != -1:
            if len(buf) - pos < HEADER_BYTES:
                self._tail = buf[pos:]
                return symbols
            code = _from_nibbles(buf[pos + 4 : pos + 8])
            ms = _from_nibbles(buf[pos + 8 : pos + 10])
            char = REPLACEMENT if code is None or not ms else chr(code)
            start = base + pos
            symbols.append(Symbol(char, start, start + (ms or 2) * BYTES_PER_MS))
            pos = buf.find(SYNC, pos + len(SYNC))
        keep = len(SYNC) - 1  # too short to hold a whole sync, so never decoded twice
        self._tail = buf[-keep:]
        return symbols


def decode_speech(audio: bytes) -> str:
    """All the text in a complete piece of simulated speech."""
    return "".join(s.char for s in SpeechDecoder().feed(audio))
