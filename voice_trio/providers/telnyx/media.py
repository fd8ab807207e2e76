"""Telnyx media-streaming WebSocket frames: parse what Telnyx sends, build what we send.

Pure functions over ``str``/``bytes`` (``protocols/telnyx.md`` §3); the socket code around
them is thin. ``parse_frame`` runs ~50 times a second per call, so the ``media`` case does
``json.loads`` + one base64 decode and little else.

Leniency follows the protocol notes: counters may be strings or numbers, the codec may be
spelled ``PCMU`` or ``audio/x-mulaw``, and an ``error`` frame may carry its object under
``error`` or ``payload``. A ``start`` frame fails only for what the call cannot do without
(the ``start`` object and its ``call_control_id``); a codec the media path cannot carry is
reported, not refused, so that the call can be carried another way. A field the server does not
rely on (``stream_id``, ``custom_parameters``, ``tags``, ``sample_rate``, ...) or an optional
one of the wrong type is taken as absent, since one odd field must never cost the caller the
media stream. Anything else that is wrong raises :class:`FrameError` with a short reason the
caller logs and counts; unknown event types parse to ``None`` so a newer Telnyx feature never
breaks a call.
"""

from __future__ import annotations

import json
from binascii import a2b_base64, b2a_base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "G711_CODECS",
    "Connected",
    "Dtmf",
    "FrameError",
    "FrameReorderer",
    "Mark",
    "Media",
    "MediaFrame",
    "Start",
    "Stop",
    "StreamError",
    "TelnyxFrame",
    "build_clear",
    "build_mark",
    "build_media",
    "parse_frame",
]

# The codecs the media path carries (8 kHz G.711, one byte a sample). Telnyx may stream
# another one than streaming_start asked for (telnyx.md §1.6: "when transcoding is not
# possible, the codec from the call will be used"); ``Start.encoding`` names it all the same.
G711_CODECS = frozenset({"PCMU", "PCMA"})

_ENCODINGS = {
    "PCMU": "PCMU",
    "AUDIO/X-MULAW": "PCMU",
    "PCMA": "PCMA",
    "AUDIO/X-ALAW": "PCMA",
}
MAX_CODEC_NAME = 24  # a codec name is kept (for logs) up to this length


class FrameError(ValueError):
    """A frame that cannot be used; ``reason`` is short enough for a log line or a metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ``stream_auth_token`` comes back under this name, as an upgrade header and as a field of
# the ``connected`` frame (telnyx.md §3.1).
AUTH_TOKEN_FIELD = "x-telnyx-streaming-auth-token"


@dataclass(frozen=True, slots=True)
class Connected:
    version: str | None
    auth_token: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    """The ``start`` event: who the call is and what audio to expect.

    ``client_state`` is the raw base64 string Telnyx echoes back; decoding it is the
    session's business. ``call_session_id``, ``from_`` and ``to`` are absent in older
    Telnyx payloads, hence optional; so is everything else but the call id (None when
    absent or of the wrong type, see the module docstring). ``encoding`` is ``PCMU`` or
    ``PCMA`` whatever the spelling, any other codec by its (upper-cased, bounded) name, or
    None if the frame names none: only ``G711_CODECS`` can be carried.
    """

    stream_id: str | None
    call_control_id: str
    call_session_id: str | None
    from_: str | None
    to: str | None
    client_state: str | None
    custom_parameters: dict[str, Any]
    encoding: str | None
    sample_rate: int | None


@dataclass(frozen=True, slots=True)
class Media:
    """One inbound audio frame; ``payload`` is the decoded codec bytes (no RTP header)."""

    sequence: int | None
    chunk: int | None
    timestamp: int | None
    track: str
    payload: bytes


MediaFrame = Media


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class StreamError:
    code: str
    title: str
    detail: str


TelnyxFrame = Connected | Start | Media | Dtmf | Mark | Stop | StreamError


def parse_frame(raw: str | bytes) -> TelnyxFrame | None:
    """Parse one text frame from Telnyx; ``None`` for event types we do not know.

    Raises :class:`FrameError` for non-JSON, a non-object, a missing or ill-typed field,
    an unsupported codec or a payload that is not base64.
    """
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FrameError("frame is not valid JSON") from None
    if type(msg) is not dict:
        raise FrameError("frame is not a JSON object")
    event = msg.get("event")
    if event == "media":
        return _parse_media(msg)
    if event is None:
        raise FrameError("frame has no event")
    if type(event) is not str:
        raise FrameError("event is not a string")
    parse = _PARSERS.get(event)
    return parse(msg) if parse is not None else None


def _parse_media(msg: dict[str, Any]) -> Media:
    media = msg.get("media")
    if type(media) is not dict:
        raise FrameError("media frame has no media object")
    payload = media.get("payload")
    if type(payload) is not str:
        raise FrameError("media.payload is missing or not a string")
    try:
        audio = a2b_base64(payload, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise FrameError("media.payload is not valid base64") from None
    track = media.get("track", "inbound")
    if type(track) is not str:
        raise FrameError("media.track is not a string")
    sequence = msg.get("sequence_number")
    chunk = media.get("chunk")
    timestamp = media.get("timestamp")
    # Telnyx documents these as strings; ints are accepted as they are. Inlined: hot path.
    try:
        if type(sequence) is str:
            sequence = int(sequence)
        if type(chunk) is str:
            chunk = int(chunk)
        if type(timestamp) is str:
            timestamp = int(timestamp)
    except ValueError:
        raise _counter_error(msg, media) from None
    if (
        type(sequence) not in _COUNTER_TYPES
        or type(chunk) not in _COUNTER_TYPES
        or type(timestamp) not in _COUNTER_TYPES
    ):
        raise _counter_error(msg, media)
    return Media(sequence, chunk, timestamp, track, audio)


_COUNTER_TYPES = frozenset((int, type(None)))


def _counter_error(msg: dict[str, Any], media: dict[str, Any]) -> FrameError:
    """Name the bad counter; only reached once the fast path has failed."""
    for where, obj, key in (
        ("", msg, "sequence_number"),
        ("media.", media, "chunk"),
        ("media.", media, "timestamp"),
    ):
        value = obj.get(key)
        if value is not None and type(value) is not int:
            try:
                _counter(value, where + key)
            except FrameError as exc:
                return exc
    return FrameError("media counter is not an integer")


def _counter(value: object, name: str) -> int:
    if type(value) is str:
        try:
            return int(value)
        except ValueError:
            pass
    raise FrameError(f"{name} is not an integer")


def _object(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if type(value) is not dict:
        raise FrameError(f"{msg['event']} frame has no {key} object")
    return value


def _required_str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if type(value) is not str or not value:
        raise FrameError(f"{where}{key} is missing or not a string")
    return value


def _parse_connected(msg: dict[str, Any]) -> Connected:
    return Connected(_lenient_str(msg, "version"), _lenient_str(msg, AUTH_TOKEN_FIELD))


def _parse_start(msg: dict[str, Any]) -> Start:
    start = _object(msg, "start")
    # stream_id is top-level per the docs; some clients read it from `start`, so accept both.
    stream_id = _lenient_str(msg, "stream_id") or _lenient_str(start, "stream_id")
    custom = start.get("custom_parameters")
    media_format = start.get("media_format")
    if type(media_format) is not dict:
        media_format = {}
    return Start(
        stream_id=stream_id,
        call_control_id=_required_str(start, "call_control_id", "start."),
        call_session_id=_lenient_str(start, "call_session_id"),
        from_=_lenient_str(start, "from"),
        to=_lenient_str(start, "to"),
        client_state=_lenient_str(start, "client_state"),
        custom_parameters=custom if type(custom) is dict else {},
        encoding=_codec(media_format.get("encoding")),
        sample_rate=_lenient_rate(media_format.get("sample_rate")),
    )


def _lenient_str(obj: dict[str, Any], key: str) -> str | None:
    """An optional string field: absent, empty or of another type is None."""
    value = obj.get(key)
    return value if type(value) is str and value else None


def _codec(value: object) -> str | None:
    if type(value) is not str or not value:
        return None
    name = value.strip().upper()[:MAX_CODEC_NAME]
    return _ENCODINGS.get(name, name)


def _lenient_rate(value: object) -> int | None:
    """``media_format.sample_rate`` (a number or a numeric string); None if unusable."""
    if type(value) is str and value.isdigit():
        value = int(value)
    return value if type(value) is int and value > 0 else None


def _parse_dtmf(msg: dict[str, Any]) -> Dtmf:
    return Dtmf(_required_str(_object(msg, "dtmf"), "digit", "dtmf."))


def _parse_mark(msg: dict[str, Any]) -> Mark:
    return Mark(_required_str(_object(msg, "mark"), "name", "mark."))


def _parse_stop(msg: dict[str, Any]) -> Stop:
    return _STOP


def _parse_error(msg: dict[str, Any]) -> StreamError:
    # Documented under `error`; one third-party adapter reads `payload` (telnyx.md §3.2).
    err = msg.get("error")
    if type(err) is not dict:
        err = msg.get("payload")
        if type(err) is not dict:
            raise FrameError("error frame has no error object")
    return StreamError(_text(err.get("code")), _text(err.get("title")), _text(err.get("detail")))


def _text(value: object) -> str:
    """Error fields are informational: keep whatever arrived as text, never fail on them."""
    if value is None:
        return ""
    return value if type(value) is str else str(value)


_STOP = Stop()

_PARSERS: dict[str, Callable[[dict[str, Any]], TelnyxFrame]] = {
    "connected": _parse_connected,
    "start": _parse_start,
    "dtmf": _parse_dtmf,
    "mark": _parse_mark,
    "stop": _parse_stop,
    "error": _parse_error,
}

_CLEAR = '{"event":"clear"}'


def build_media(payload: bytes) -> str:
    """A ``media`` frame carrying ``payload`` (raw codec bytes) to Telnyx.

    Built by concatenation: base64 text never needs JSON escaping.
    """
    b64 = b2a_base64(payload, newline=False).decode("ascii")
    return '{"event":"media","media":{"payload":"' + b64 + '"}}'


def build_mark(name: str) -> str:
    """A ``mark`` frame; Telnyx echoes it once the audio sent before it has played."""
    return '{"event":"mark","mark":{"name":' + json.dumps(name) + "}}"


def build_clear() -> str:
    """The ``clear`` frame: stop playback and drop queued audio (barge-in)."""
    return _CLEAR


@dataclass(slots=True)
class FrameReorderer:
    """Put inbound media frames back in order, waiting only briefly for a missing one.

    Telnyx does not guarantee frame order (telnyx.md §3.1). The policy, in order of the
    checks made by :meth:`push`:

    - A frame without the ordering counter passes straight through.
    - The first numbered frame sets the expected position.
    - A frame older than the last one released, or a copy of one already held, is dropped
      and counted in ``late_dropped``: its audio has been overtaken and feeding it to the
      recogniser now would only garble it.
    - The expected frame is released together with every consecutive held frame after it.
    - A frame from the future is held. When more than ``window`` frames are held, the gap in
      front of them is given up as lost (counted in ``skipped``) and the held run is
      released. At 20 ms a frame and Telnyx's steady 50 frames a second (silence included),
      the default window of 4 bounds the added delay to ~80 ms, and only when a frame is
      actually missing; in-order frames are released on arrival.
    - :meth:`flush` releases everything held, for the end of the stream or a stall.

    The counter is ``media.chunk`` by default, not ``sequence_number``: the latter numbers
    *every* frame of the stream (``mark`` echoes, ``dtmf``, …), so media frames show gaps
    that are not losses and would each cost a window of delay. Use ``key="sequence"`` for a
    peer that only numbers frames that way. Use one reorderer per track.
    """

    window: int = 4
    key: Literal["chunk", "sequence"] = "chunk"
    late_dropped: int = 0
    skipped: int = 0
    _next: int | None = None
    _held: dict[int, Media] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError("window must be >= 0")
        if self.key not in ("chunk", "sequence"):
            raise ValueError("key must be 'chunk' or 'sequence'")

    @property
    def held(self) -> int:
        """How many frames are waiting for a missing predecessor."""
        return len(self._held)

    def push(self, frame: Media) -> list[Media]:
        """Add one frame; return the frames now releasable, in order (often just ``[frame]``)."""
        n = frame.chunk if self.key == "chunk" else frame.sequence
        if n is None:
            return [frame]
        expected = self._next
        if expected is None or (n == expected and not self._held):
            self._next = n + 1
            return [frame]
        if n < expected or n in self._held:
            self.late_dropped += 1
            return []
        self._held[n] = frame
        if n == expected:
            return self._release_run()
        if len(self._held) <= self.window:
            return []
        first = min(self._held)
        self.skipped += first - expected
        self._next = first
        return self._release_run()

    def flush(self) -> list[Media]:
        """Release every held frame in order, skipping the gaps in between."""
        out: list[Media] = []
        held = self._held
        for n in sorted(held):
            out.append(held[n])
            if self._next is not None and n > self._next:
                self.skipped += n - self._next
            self._next = n + 1
        held.clear()
        return out

    def _release_run(self) -> list[Media]:
        out: list[Media] = []
        held = self._held
        n = self._next
        assert n is not None
        while n in held:
            out.append(held.pop(n))
            n += 1
        self._next = n
        return out
