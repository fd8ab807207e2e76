"""Validation of Telnyx Call Control request bodies, as the simulator enforces it. Pure.

Enums and ranges come from ``shared/docs/protocols/telnyx.md`` §1 (telnyx-python types).
Every problem becomes one entry of the Telnyx error envelope with ``source.pointer``:
code ``10004`` "Missing required parameter" or ``10015`` "Invalid parameter value" (the real
codes for these are unconfirmed; the envelope shape is). Enum values are case-sensitive.
Unknown fields are not errors — the real API's handling is unconfirmed — they are reported
as warnings so a test can assert that the server sends none.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Response = tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
SIP_URI = re.compile(r"^sips?:[^@\s]+@\S+$")
DTMF_DIGITS = re.compile(r"^[0-9A-D*#wW]+$")


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


TRACKS = _names("inbound_track outbound_track both_tracks")
STREAM_CODECS = _names("PCMU PCMA G722 OPUS AMR-WB L16 default")
BIDI_MODES = _names("mp3 rtp")
BIDI_CODECS = _names("PCMU PCMA G722 OPUS AMR-WB L16")
BIDI_RATES = frozenset({8000, 16000, 22050, 24000, 48000})
TARGET_LEGS = _names("both self opposite")
AMD_MODES = _names("premium detect detect_beep detect_words greeting_end disabled")
ENGINES = _names("Google Telnyx Deepgram Azure A B")
TRANSCRIPTION_TRACKS = _names("inbound outbound both")

COMMON = _names("client_state command_id")
STREAM_FIELDS = _names(
    "stream_url stream_track stream_codec stream_bidirectional_mode stream_bidirectional_codec"
    " stream_bidirectional_target_legs enable_dialogflow dialogflow_config"
)
SETUP_FIELDS = _names(
    "webhook_url webhook_url_method transcription transcription_config send_silence_when_idle"
    " preferred_codecs record record_channels record_format record_max_length"
    " record_timeout_secs record_track record_trim custom_headers sip_headers billing_group_id"
    " sound_modifications"
)
DIAL_FIELDS = (
    COMMON
    | STREAM_FIELDS
    | SETUP_FIELDS
    | _names(
        "connection_id to from from_display_name timeout_secs time_limit_secs"
        " answering_machine_detection answering_machine_detection_config"
        " stream_bidirectional_sampling_rate stream_establish_before_call_originate"
        " stream_auth_token audio_url media_name link_to bridge_intent bridge_on_answer"
        " park_after_unbridge media_encryption sip_auth_username sip_auth_password"
        " sip_transport_protocol supervise_call_control_id supervisor_role"
    )
)
# Real commands the simulator accepts (200) without simulating them.
NOOP_ACTIONS = _names(
    "bridge enqueue leave_queue fork_start fork_stop gather gather_stop gather_using_audio"
    " gather_using_speak record_start record_stop record_pause record_resume refer"
    " noise_suppression_start noise_suppression_stop siprec_start siprec_stop"
    " switch_supervisor_role"
)


def error_response(
    status: int, code: str, title: str, detail: str = "", pointer: str | None = None
) -> Response:
    """A Telnyx error envelope (``code`` is a string)."""
    item: dict[str, Any] = {"code": code, "title": title, "detail": detail}
    if pointer is not None:
        item["source"] = {"pointer": pointer}
    item["meta"] = {"url": f"https://developers.telnyx.com/api/errors/{code}"}
    return status, {"errors": [item]}, []


class Check:
    """Collects the validation errors of one request body."""

    def __init__(
        self,
        body: dict[str, Any],
        known: frozenset[str],
        warnings: MutableSequence[str],
        where: str,
    ) -> None:
        self.body = body
        self.errors: list[dict[str, Any]] = []
        for key in body:
            if key not in known:
                warnings.append(f"{where}: unknown field {key!r} ignored")

    def fail(self, key: str, detail: str, *, missing: bool = False) -> None:
        code, title = (
            ("10004", "Missing required parameter")
            if missing
            else ("10015", "Invalid parameter value")
        )
        self.errors.append(
            {"code": code, "title": title, "detail": detail, "source": {"pointer": f"/{key}"}}
        )

    def text(
        self,
        key: str,
        *,
        required: bool = False,
        choices: frozenset[str] | None = None,
        pattern: re.Pattern[str] | None = None,
        max_len: int | None = None,
    ) -> str | None:
        value = self.body.get(key)
        if value is None:
            if required:
                self.fail(key, f"{key} is required", missing=True)
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"{key} must be a non-empty string")
        elif choices is not None and value not in choices:
            self.fail(key, f"{key} must be one of {', '.join(sorted(choices))} (case-sensitive)")
        elif pattern is not None and not pattern.match(value):
            self.fail(key, f"{key} {value!r} is not valid here")
        elif max_len is not None and len(value) > max_len:
            self.fail(key, f"{key} is longer than {max_len} characters")
        else:
            return value
        return None

    def number(
        self,
        key: str,
        *,
        lo: int | None = None,
        hi: int | None = None,
        choices: frozenset[int] | None = None,
    ) -> None:
        value = self.body.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"{key} must be an integer")
        elif choices is not None and value not in choices:
            self.fail(key, f"{key} must be one of {', '.join(map(str, sorted(choices)))}")
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, f"{key} must be between {lo} and {hi}")

    def boolean(self, key: str) -> None:
        if key in self.body and not isinstance(self.body[key], bool):
            self.fail(key, f"{key} must be a boolean")

    def obj(self, key: str) -> None:
        if key in self.body and not isinstance(self.body[key], dict):
            self.fail(key, f"{key} must be an object")

    def base64(self, key: str, *, required: bool = False) -> None:
        value = self.text(key, required=required)
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                self.fail(key, f"{key} must be valid base64")

    def url(self, key: str, schemes: tuple[str, ...], *, required: bool = False) -> None:
        value = self.text(key, required=required)
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in schemes or not parts.hostname:
                self.fail(key, f"{key} must be a {' or '.join(schemes)} URL")

    def destination(self, key: str, *, required: bool = False) -> None:
        """An E.164 number or SIP URI, or a non-empty list of them."""
        value = self.body.get(key)
        if value is None:
            if required:
                self.fail(key, f"{key} is required", missing=True)
            return
        for item in value if isinstance(value, list) and value else [value]:
            if not isinstance(item, str) or not (E164.match(item) or SIP_URI.match(item)):
                self.fail(key, f"{key} must be an E.164 number (+15551234567) or a SIP URI")
                return


def check_stream(c: Check, *, url_required: bool, with_rate: bool) -> None:
    c.url("stream_url", ("wss", "ws"), required=url_required)
    c.text("stream_track", choices=TRACKS)
    c.text("stream_codec", choices=STREAM_CODECS)
    c.text("stream_bidirectional_mode", choices=BIDI_MODES)
    c.text("stream_bidirectional_codec", choices=BIDI_CODECS)
    c.text("stream_bidirectional_target_legs", choices=TARGET_LEGS)
    c.boolean("enable_dialogflow")
    if with_rate:
        c.number("stream_bidirectional_sampling_rate", choices=BIDI_RATES)
        c.text("stream_auth_token", max_len=4000)


def _check_setup(c: Check) -> None:
    c.url("webhook_url", ("https", "http"))
    c.text("webhook_url_method", choices=_names("POST GET"))
    c.boolean("transcription")
    c.obj("transcription_config")


def check_dial(c: Check) -> None:
    connection_id = c.body.get("connection_id")
    if connection_id is None:
        c.fail("connection_id", "connection_id is required", missing=True)
    elif isinstance(connection_id, bool) or not isinstance(connection_id, str | int):
        c.fail("connection_id", "connection_id must be a string")
    c.destination("to", required=True)
    c.text("from", required=True, pattern=E164)
    c.number("timeout_secs", lo=5, hi=600)
    c.number("time_limit_secs", lo=30, hi=14400)
    c.text("answering_machine_detection", choices=AMD_MODES)
    c.boolean("stream_establish_before_call_originate")
    _check_setup(c)
    check_stream(c, url_required=False, with_rate=True)


def _check_answer(c: Check) -> None:
    _check_setup(c)
    check_stream(c, url_required=False, with_rate=False)


def _check_streaming_start(c: Check) -> None:
    check_stream(c, url_required=True, with_rate=True)
    params = c.body.get("custom_parameters")
    if params is None:
        return
    ok = isinstance(params, list) and all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("value"), str)
        for p in params
    )
    if not ok:
        c.fail("custom_parameters", 'custom_parameters must be a list of {"name", "value"} strings')


def _check_speak(c: Check) -> None:
    c.text("payload", required=True, max_len=3000)
    c.text("voice", required=True)
    c.text("language")
    c.text("payload_type", choices=_names("text ssml"))
    c.text("service_level", choices=_names("basic premium"))
    c.text("target_legs", choices=TARGET_LEGS)
    c.obj("voice_settings")


def _check_playback_start(c: Check) -> None:
    if not any(c.body.get(k) for k in ("audio_url", "media_name", "playback_content")):
        c.fail(
            "audio_url", "one of audio_url, media_name, playback_content is required", missing=True
        )
    c.url("audio_url", ("https", "http"))
    c.text("media_name")
    c.base64("playback_content")
    c.text("audio_type", choices=_names("mp3 wav"))
    c.boolean("overlay")
    c.boolean("cache_audio")


def _check_transcription_start(c: Check) -> None:
    c.text("transcription_engine", choices=ENGINES)
    c.obj("transcription_engine_config")
    c.text("transcription_tracks", choices=TRANSCRIPTION_TRACKS)


def _check_transfer(c: Check) -> None:
    c.destination("to", required=True)
    c.text("from", pattern=E164)
    c.number("timeout_secs", lo=5, hi=600)
    c.number("time_limit_secs", lo=30, hi=14400)
    c.url("webhook_url", ("https", "http"))
    c.base64("target_leg_client_state")


def _check_send_dtmf(c: Check) -> None:
    c.text("digits", required=True, pattern=DTMF_DIGITS)
    c.number("duration_millis", lo=100, hi=500)


def _check_reject(c: Check) -> None:
    c.text("cause", required=True, choices=_names("CALL_REJECTED USER_BUSY"))


def _check_client_state_update(c: Check) -> None:
    c.base64("client_state", required=True)


def _check_nothing(c: Check) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Action:
    """A simulated command: its accepted fields, its body check, the call states it needs."""

    fields: frozenset[str]
    check: Callable[[Check], None]
    states: frozenset[str]


_ANSWERED = _names("answered")
_PARKED = _names("parked")
_ANY = _names("parked bridging answered")
ACTIONS: dict[str, Action] = {
    "answer": Action(
        COMMON | STREAM_FIELDS | SETUP_FIELDS | {"webhook_retries_policies"}, _check_answer, _PARKED
    ),
    "reject": Action(COMMON | {"cause"}, _check_reject, _PARKED),
    "hangup": Action(COMMON | {"custom_headers"}, _check_nothing, _ANY),
    "speak": Action(
        COMMON
        | _names(
            "payload voice language payload_type service_level stop target_legs loop voice_settings"
        ),
        _check_speak,
        _ANSWERED,
    ),
    "playback_start": Action(
        COMMON
        | _names(
            "audio_url media_name playback_content audio_type loop overlay stop target_legs"
            " cache_audio"
        ),
        _check_playback_start,
        _ANSWERED,
    ),
    "playback_stop": Action(COMMON | {"stop", "overlay"}, _check_nothing, _ANSWERED),
    "streaming_start": Action(
        COMMON
        | STREAM_FIELDS
        | _names("stream_bidirectional_sampling_rate stream_auth_token custom_parameters"),
        _check_streaming_start,
        _ANSWERED,
    ),
    "streaming_stop": Action(COMMON | {"stream_id"}, _check_nothing, _ANSWERED),
    "transcription_start": Action(
        COMMON | _names("transcription_engine transcription_engine_config transcription_tracks"),
        _check_transcription_start,
        _ANSWERED,
    ),
    "transcription_stop": Action(COMMON, _check_nothing, _ANSWERED),
    "transfer": Action(
        COMMON
        | _names(
            "to from from_display_name timeout_secs time_limit_secs answering_machine_detection"
            " audio_url webhook_url target_leg_client_state custom_headers sip_headers"
        ),
        _check_transfer,
        _ANSWERED,
    ),
    "send_dtmf": Action(COMMON | {"digits", "duration_millis"}, _check_send_dtmf, _ANSWERED),
    "client_state_update": Action(COMMON, _check_client_state_update, _ANY),
}
