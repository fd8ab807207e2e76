"""The live STT half of the Deepgram simulator: ``/v1/listen`` options and the transcriber.

:class:`SttTranscriber` is pure (no sockets, no clock): it turns audio bytes and control
messages into the JSON messages Deepgram would send, driven only by *stream time* (samples
received divided by ``sample_rate``), so the same audio always gives the same results
however fast it is sent. The socket loop around it is in :mod:`voice_trio.sim.deepgram`.
Also here: :class:`DeepgramError`, the error shape both halves raise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from voice_trio.audio import ALAW_TO_MULAW, linear_to_mulaw
from voice_trio.sim.speech import QUIET_BYTES, REPLACEMENT, SpeechDecoder

STT_MODELS = frozenset(
    "nova-3 nova-3-general nova-3-medical nova-2 nova-2-general nova-2-meeting "
    "nova-2-phonecall nova-2-conversationalai".split()
)
ENGLISH_ONLY_MODELS = frozenset({"nova-2-phonecall", "nova-3-medical"})
AUDIO_ENCODINGS = frozenset({"mulaw", "alaw", "linear16"})
WORD_CONFIDENCE = 0.99
GARBLED_CONFIDENCE = 0.3
VAD_HANGOVER_S = 0.3  # silence after which the next voice counts as a new SpeechStarted
SLICE_SAMPLES = 160  # big chunks are walked in 20 ms steps so pauses inside them are seen
_WORD_GAP_SAMPLES = 80  # trailing silence that ends a word (10 ms at 8 kHz)

# linear16 -> mu-law through the high byte only (a C-level slice and translate); exact for
# the loud codes that carry symbols, and the two bytes around zero stay silent.
_L16_HIGH_TO_MULAW = bytes(
    0 if h in (0, 0xFF) else linear_to_mulaw((h - 256 if h > 127 else h) * 256 + 128)
    for h in range(256)
)


class DeepgramError(Exception):
    """A request Deepgram would refuse: HTTP ``status`` with its JSON error fields."""

    def __init__(self, status: int, err_code: str, err_msg: str) -> None:
        super().__init__(f"{status} {err_code}: {err_msg}")
        self.status = status
        self.err_code = err_code
        self.err_msg = err_msg


def bad_parameter(message: str) -> DeepgramError:
    return DeepgramError(400, "INVALID_QUERY_PARAMETER", message)


def unknown_model() -> DeepgramError:
    return DeepgramError(
        400, "Bad Request", "Bad Request: No such model/version combination found."
    )


def model_uuid(model: str) -> str:
    """A stable made-up UUID per model name, like the ones Deepgram reports."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"voice-trio-sim/deepgram/{model}"))


def parse_bool(params: dict[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_parameter(f"Invalid value for {name}: {value!r} (expected true or false).")


def parse_int(params: dict[str, str], name: str, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise bad_parameter(f"Invalid value for {name}: {value!r}.") from None
    if not low <= number <= high:
        raise bad_parameter(f"{name} must be between {low} and {high}, got {number}.")
    return number


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """The ``/v1/listen`` query parameters the simulator honours."""

    encoding: str = "mulaw"
    sample_rate: int = 8000
    channels: int = 1
    model: str = "nova-3"
    language: str = "en"
    interim_results: bool = False
    endpointing_ms: int | None = 10  # None: endpointing=false
    utterance_end_ms: int | None = None
    vad_events: bool = False
    punctuate: bool = False
    smart_format: bool = False

    @classmethod
    def from_query(cls, query_string: bytes) -> ListenOptions:
        """Parse and validate a query string; raises :class:`DeepgramError` (400)."""
        params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        encoding = params.get("encoding")
        if encoding is not None and encoding not in AUDIO_ENCODINGS:
            raise bad_parameter(f"Unsupported encoding for this simulator: {encoding!r}.")
        sample_rate = parse_int(params, "sample_rate", 8000, 48000)
        if encoding is not None and sample_rate is None:
            raise bad_parameter("sample_rate is required when encoding is set.")
        model = params.get("model", "nova-3")
        language = params.get("language", "en")
        if model not in STT_MODELS:
            raise unknown_model()
        if model in ENGLISH_ONLY_MODELS and not language.lower().startswith("en"):
            raise unknown_model()
        endpointing: int | None = 10
        raw_endpointing = params.get("endpointing", "10").lower()
        if raw_endpointing == "false":
            endpointing = None
        elif raw_endpointing != "true":
            endpointing = parse_int(params, "endpointing", 0, 60_000)
        return cls(
            encoding=encoding or "mulaw",
            sample_rate=sample_rate if encoding and sample_rate else 8000,
            channels=parse_int(params, "channels", 1, 8) or 1,
            model=model,
            language=language,
            interim_results=parse_bool(params, "interim_results", False),
            endpointing_ms=endpointing,
            utterance_end_ms=parse_int(params, "utterance_end_ms", 1, 60_000),
            vad_events=parse_bool(params, "vad_events", False),
            punctuate=parse_bool(params, "punctuate", False),
            smart_format=parse_bool(params, "smart_format", False),
        )


def plain_word(text: str) -> str:
    """The ``word`` field: lower case, leading and trailing punctuation removed."""
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[start:end].lower()


def utc_timestamp() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


Token = tuple[str, int, int]  # punctuated text, start and end sample


class SttTranscriber:
    """One live stream: audio in, Deepgram server messages (as dicts) out.

    Words are runs of decoded non-space symbols; a pause inside the audio also ends a
    word. A *segment* is the audio since the previous final; its words are pending until a
    final covers them: after ``endpointing`` ms of trailing silence (``speech_final``),
    when it has run ``max_segment_s`` since its first word (at a word boundary), on
    ``Finalize``, before an ``UtteranceEnd``, or on ``CloseStream``.
    """

    def __init__(
        self,
        options: ListenOptions,
        request_id: str,
        *,
        interim_interval_s: float = 1.0,
        max_segment_s: float = 5.0,
        silence_result_s: float = 2.0,
    ) -> None:
        self.options = options
        self.request_id = request_id
        self.created = utc_timestamp()
        rate = options.sample_rate
        self._rate = rate
        self._interim_every = int(interim_interval_s * rate)
        self._max_segment = int(max_segment_s * rate)
        self._silence_every = int(silence_result_s * rate)
        ms = options.endpointing_ms
        self._endpoint = None if ms is None else max(1, ms * rate // 1000)
        ue = options.utterance_end_ms if options.interim_results else None
        self._utterance_end = None if ue is None else ue * rate // 1000
        self._hangover = int(VAD_HANGOVER_S * rate)
        width = 2 if options.encoding == "linear16" else 1
        self._frame = width * options.channels
        self._table = {"alaw": ALAW_TO_MULAW, "linear16": _L16_HIGH_TO_MULAW}.get(options.encoding)
        self._carry = b""
        self._sha = hashlib.sha256()
        self._decoder = SpeechDecoder()
        self._tokens: list[Token] = []
        self._chars: list[str] = []  # the word being heard
        self._word_start = 0
        self._word_end = 0
        self._segment_start = 0
        self._interim_due: int | None = None
        self._changed = False  # words heard since the last interim
        self._speaking = False
        self._last_word_end: int | None = None  # set until its UtteranceEnd is sent
        arch = "nova-2" if options.model.startswith("nova-2") else "nova-3"
        self._metadata = {
            "request_id": request_id,
            "model_info": {"name": f"general-{arch}", "version": "2025-06-01.0", "arch": arch},
            "model_uuid": model_uuid(options.model),
        }

    @property
    def seconds(self) -> float:
        """Stream time: seconds of audio received."""
        return self._decoder.offset / self._rate

    def feed(self, audio: bytes) -> list[dict[str, Any]]:
        self._sha.update(audio)
        samples = self._to_mulaw(audio)
        out: list[dict[str, Any]] = []
        if len(samples) <= SLICE_SAMPLES:
            self._step(samples, out)
        else:
            for i in range(0, len(samples), SLICE_SAMPLES):
                self._step(samples[i : i + SLICE_SAMPLES], out)
        return out

    def finalize(self) -> list[dict[str, Any]]:
        """``Finalize``: a final for whatever is pending, flagged ``from_finalize``."""
        self._end_word()
        return [self._final(self._decoder.offset, speech_final=False, from_finalize=True)]

    def close(self) -> list[dict[str, Any]]:
        """``CloseStream``: a final for pending audio, then the ``Metadata`` summary."""
        out = []
        now = self._decoder.offset
        if self._tokens or self._chars or now > self._segment_start:
            self._end_word()
            out.append(self._final(now, speech_final=False))
        out.append(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": self._sha.hexdigest(),
                "created": self.created,
                "duration": round(self.seconds, 3),
                "channels": self.options.channels,
                "models": [self._metadata["model_uuid"]],
                "model_info": {self._metadata["model_uuid"]: self._metadata["model_info"]},
            }
        )
        return out

    def _to_mulaw(self, audio: bytes) -> bytes:
        """Channel 0 as one mu-law byte per sample (slices and translate, no byte loop)."""
        if self._frame == 1:
            return audio.translate(self._table) if self._table else audio
        if self._carry:
            audio = self._carry + audio
        usable = len(audio) - len(audio) % self._frame
        self._carry = audio[usable:]
        first = 1 if self.options.encoding == "linear16" else 0  # high byte, little-endian
        mono = audio[first : usable : self._frame]
        return mono.translate(self._table) if self._table else mono

    def _step(self, samples: bytes, out: list[dict[str, Any]]) -> None:
        decoder = self._decoder
        before = decoder.offset
        symbols = decoder.feed(samples)
        now = decoder.offset
        if decoder.voiced_until > before:
            if not self._speaking:
                self._speaking = True
                if self.options.vad_events:
                    onset = before + len(samples) - len(samples.lstrip(QUIET_BYTES))
                    out.append(
                        {"type": "SpeechStarted", "channel": [0, 1], "timestamp": self._s(onset)}
                    )
        elif self._speaking and now - decoder.voiced_until >= self._hangover:
            self._speaking = False
        for symbol in symbols:
            if symbol.char == " ":
                self._end_word()
                continue
            if not self._chars:
                self._word_start = symbol.start
            if self._interim_due is None:
                self._interim_due = symbol.start + self._interim_every
            self._chars.append(symbol.char)
            self._word_end = symbol.end
            self._last_word_end = symbol.end
            self._changed = True
        silent_for = now - decoder.voiced_until
        if self._chars and silent_for >= _WORD_GAP_SAMPLES:
            self._end_word()  # a pause ends a word (a lost symbol does not)
        pending = bool(self._tokens or self._chars)
        if pending:
            first = self._tokens[0][1] if self._tokens else self._word_start
            if self._endpoint is not None and silent_for >= self._endpoint:
                self._end_word()
                out.append(self._final(now, speech_final=True))
            elif now - first >= self._max_segment:
                out.append(self._forced_final(now))
            elif (
                self.options.interim_results
                and self._changed
                and self._interim_due is not None
                and now >= self._interim_due
            ):
                out.append(self._interim(now))
        if (
            self._utterance_end is not None
            and self._last_word_end is not None
            and now - self._last_word_end >= self._utterance_end
        ):
            if self._tokens or self._chars:
                self._end_word()
                out.append(self._final(now, speech_final=False))
            out.append(
                {
                    "type": "UtteranceEnd",
                    "channel": [0, 1],
                    "last_word_end": self._s(self._last_word_end),
                }
            )
            self._last_word_end = None
        if not (self._tokens or self._chars) and now - self._segment_start >= self._silence_every:
            out.append(self._final(now, speech_final=False))

    def _end_word(self) -> None:
        if self._chars:
            self._tokens.append(("".join(self._chars), self._word_start, self._word_end))
            self._chars = []

    def _interim(self, now: int) -> dict[str, Any]:
        tokens = self._tokens
        if self._chars:
            tokens = [*tokens, ("".join(self._chars), self._word_start, self._word_end)]
        self._interim_due = now + self._interim_every
        self._changed = False
        return self._results(tokens, now, is_final=False, speech_final=False, from_finalize=False)

    def _forced_final(self, now: int) -> dict[str, Any]:
        """A segment that ran too long: finalize the whole words, keep the one being heard."""
        if not self._tokens:
            self._end_word()
            return self._final(now, speech_final=False)
        tokens, self._tokens = self._tokens, []
        end = self._word_start if self._chars else now
        message = self._results(tokens, end, is_final=True, speech_final=False, from_finalize=False)
        self._start_segment(end)
        if self._chars:
            self._interim_due = self._word_start + self._interim_every
        return message

    def _final(
        self, end: int, *, speech_final: bool, from_finalize: bool = False
    ) -> dict[str, Any]:
        tokens, self._tokens = self._tokens, []
        message = self._results(
            tokens, end, is_final=True, speech_final=speech_final, from_finalize=from_finalize
        )
        self._start_segment(end)
        return message

    def _start_segment(self, start: int) -> None:
        self._segment_start = start
        self._interim_due = None
        self._changed = False

    def _results(
        self,
        tokens: list[Token],
        end: int,
        *,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool,
    ) -> dict[str, Any]:
        words: list[dict[str, Any]] = []
        for text, start, stop in tokens:
            word = plain_word(text)
            if not word:
                continue  # lone punctuation stays in the transcript only
            words.append(
                {
                    "word": word,
                    "start": self._s(start),
                    "end": self._s(stop),
                    "confidence": GARBLED_CONFIDENCE if REPLACEMENT in text else WORD_CONFIDENCE,
                    "punctuated_word": text,
                }
            )
        confidence = sum(w["confidence"] for w in words) / len(words) if words else 0.0
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": self._s(end - self._segment_start),
            "start": self._s(self._segment_start),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(text for text, _, _ in tokens),
                        "confidence": round(confidence, 4),
                        "words": words,
                    }
                ]
            },
            "metadata": self._metadata,
        }

    def _s(self, samples: int) -> float:
        return round(samples / self._rate, 3)
