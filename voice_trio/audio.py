"""G.711 audio helpers: frame sizes, silence, and mu-law <-> A-law transcoding.

Telnyx streams 8 kHz G.711 (PCMU = mu-law, PCMA = A-law) in 20 ms frames; Deepgram and
the TTS providers are asked for mu-law 8 kHz, so the only transcoding the server ever
does is a byte-for-byte table lookup (``bytes.translate``), which runs in C.
"""

from __future__ import annotations

SAMPLE_RATE = 8000
BYTES_PER_MS = SAMPLE_RATE // 1000  # one byte per sample in G.711
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS  # 160

MULAW_SILENCE = 0xFF
ALAW_SILENCE = 0xD5

_MULAW_BIAS = 0x84
_MULAW_CLIP = 32635


def mulaw_to_linear(byte: int) -> int:
    """Decode one mu-law byte to a signed 16-bit sample (ITU-T G.711)."""
    u = ~byte & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    sample = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return -sample if sign else sample


def linear_to_mulaw(sample: int) -> int:
    """Encode a signed 16-bit sample as one mu-law byte (ITU-T G.711)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), _MULAW_CLIP) + _MULAW_BIAS
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not magnitude & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def alaw_to_linear(byte: int) -> int:
    """Decode one A-law byte to a signed 16-bit sample (ITU-T G.711)."""
    a = byte ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    if exponent == 0:
        sample = (mantissa << 4) + 8
    else:
        sample = ((mantissa << 4) + 0x108) << (exponent - 1)
    return sample if a & 0x80 else -sample


def linear_to_alaw(sample: int) -> int:
    """Encode a signed 16-bit sample as one A-law byte (ITU-T G.711)."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample), 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = magnitude.bit_length() - 5
        code = (exponent << 4) | ((magnitude >> exponent) & 0x0F)
    return (sign | code) ^ 0x55


ALAW_TO_MULAW = bytes(linear_to_mulaw(alaw_to_linear(b)) for b in range(256))
MULAW_TO_ALAW = bytes(linear_to_alaw(mulaw_to_linear(b)) for b in range(256))


def alaw_to_mulaw(data: bytes) -> bytes:
    return data.translate(ALAW_TO_MULAW)


def mulaw_to_alaw(data: bytes) -> bytes:
    return data.translate(MULAW_TO_ALAW)


def mulaw_silence(ms: int) -> bytes:
    """``ms`` milliseconds of mu-law digital silence (0xFF)."""
    return bytes([MULAW_SILENCE]) * (ms * BYTES_PER_MS)


def duration_ms(audio: bytes) -> float:
    """Playing time of 8 kHz G.711 audio."""
    return len(audio) / BYTES_PER_MS


def frames(audio: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """Cut audio into frames; the last frame is padded with mu-law silence."""
    out = [audio[i : i + frame_bytes] for i in range(0, len(audio), frame_bytes)]
    if out and len(out[-1]) < frame_bytes:
        out[-1] = out[-1] + bytes([MULAW_SILENCE]) * (frame_bytes - len(out[-1]))
    return out
