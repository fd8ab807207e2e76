"""Telnyx media-stream frames: parsing, building and reordering (telnyx.md §3)."""

from __future__ import annotations

import base64
import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voice_trio.providers.telnyx.media import (
    G711_CODECS,
    Connected,
    Dtmf,
    FrameError,
    FrameReorderer,
    Mark,
    Media,
    Start,
    Stop,
    StreamError,
    build_clear,
    build_mark,
    build_media,
    parse_frame,
)

AUDIO = bytes(range(160))
AUDIO_B64 = base64.b64encode(AUDIO).decode()

# The §3.2 examples verbatim; the media payload placeholder is replaced by real base64.
CONNECTED = '{"event": "connected", "version": "1.0.0"}'
START = """{"event": "start", "sequence_number": "1", "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
 "start": {"user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
           "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
           "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f",
           "from": "+13122010094", "to": "+13122123456", "tags": ["TAG1"],
           "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
           "custom_parameters": {"customer_id": "customer_123"},
           "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}"""
MEDIA = """{"event": "media", "sequence_number": "4", "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
 "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": "<base64 of 160 PCMU bytes>"}}""".replace(
    "<base64 of 160 PCMU bytes>", AUDIO_B64
)
DTMF = """{"event": "dtmf", "sequence_number": "5", "stream_id": "32DE0DEA-...",
 "occurred_at": "2025-06-05T08:54:19.698408Z", "dtmf": {"digit": "#"}}"""
MARK = '{"event": "mark", "sequence_number": "7", "stream_id": "32DE0DEA-...", "mark": {"name": "utt-3"}}'
ERROR = """{"event": "error", "sequence_number": "6", "stream_id": "32DE0DEA-...",
 "error": {"title": "rate_limit_reached", "code": "100005", "detail": "Too many requests"}}"""
STOP = """{"event": "stop", "sequence_number": "9", "stream_id": "32DE0DEA-...",
 "stop": {"user_id": "3E6F995F-...", "call_control_id": "v2:T02ll..."}}"""


def start_frame(**media_format: object) -> str:
    frame = json.loads(START)
    frame["start"]["media_format"] = media_format
    return json.dumps(frame)


def media(seq: int | None = None, chunk: int | None = None) -> Media:
    return Media(seq, chunk, None, "inbound", bytes([chunk or 0]))


def test_connected() -> None:
    assert parse_frame(CONNECTED) == Connected("1.0.0")


def test_start_documented_example() -> None:
    assert parse_frame(START) == Start(
        stream_id="32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
        call_control_id="v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
        call_session_id="ff55a038-6f5d-11ef-9692-02420aeffb1f",
        from_="+13122010094",
        to="+13122123456",
        client_state="aGF2ZSBhIG5pY2UgZGF5ID1d",
        custom_parameters={"customer_id": "customer_123"},
        encoding="PCMU",
        sample_rate=8000,
    )


def test_start_older_shape() -> None:
    """Older docs: audio/x-mulaw, no call_session_id/from/to/custom_parameters."""
    raw = json.dumps(
        {
            "event": "start",
            "stream_id": "s-1",
            "start": {
                "call_control_id": "v2:abc",
                "media_format": {"encoding": "audio/x-mulaw", "sample_rate": "8000"},
            },
        }
    )
    frame = parse_frame(raw)
    assert isinstance(frame, Start)
    assert frame.encoding == "PCMU"
    assert frame.sample_rate == 8000
    assert (frame.call_session_id, frame.from_, frame.to, frame.client_state) == (None,) * 4
    assert frame.custom_parameters == {}


@pytest.mark.parametrize(
    ("codec", "expected"), [("PCMA", "PCMA"), ("audio/x-alaw", "PCMA"), ("pcmu", "PCMU")]
)
def test_start_codecs(codec: str, expected: str) -> None:
    frame = parse_frame(start_frame(encoding=codec, sample_rate=8000))
    assert isinstance(frame, Start)
    assert frame.encoding == expected


def test_start_stream_id_inside_start_is_accepted() -> None:
    frame = json.loads(START)
    frame["start"]["stream_id"] = frame.pop("stream_id")
    parsed = parse_frame(json.dumps(frame))
    assert isinstance(parsed, Start)
    assert parsed.stream_id == "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"


@pytest.mark.parametrize("codec", ["G722", "OPUS", "L16", "AMR-WB", "opus"])
def test_a_start_names_a_codec_the_media_path_cannot_carry(codec: str) -> None:
    """Telnyx streams the call's own codec when it cannot transcode: the frame says which,
    so that the call can be carried another way (not dropped as malformed)."""
    frame = parse_frame(start_frame(encoding=codec, sample_rate=16000))
    assert isinstance(frame, Start)
    assert frame.encoding == codec.upper() and frame.encoding not in G711_CODECS
    assert frame.call_control_id and frame.sample_rate == 16000


@pytest.mark.parametrize(
    "media_format", [None, [], {}, {"encoding": 7}, {"encoding": ""}, {"sample_rate": 8000}]
)
def test_a_start_without_a_codec_names_none(media_format: object) -> None:
    frame = json.loads(START)
    frame["start"]["media_format"] = media_format
    parsed = parse_frame(json.dumps(frame))
    assert isinstance(parsed, Start) and parsed.encoding is None


def test_a_codec_name_is_bounded() -> None:
    frame = parse_frame(start_frame(encoding="X" * 10_000))
    assert isinstance(frame, Start)
    assert frame.encoding is not None and len(frame.encoding) <= 24


def test_media_documented_example() -> None:
    assert parse_frame(MEDIA) == Media(4, 2, 5, "inbound", AUDIO)


def test_media_bytes_input_and_number_counters() -> None:
    raw = json.dumps(
        {
            "event": "media",
            "sequence_number": 40,
            "media": {"track": "outbound", "chunk": 20, "timestamp": 400, "payload": AUDIO_B64},
        }
    ).encode()
    assert parse_frame(raw) == Media(40, 20, 400, "outbound", AUDIO)


def test_media_without_counters_or_track() -> None:
    raw = json.dumps({"event": "media", "media": {"payload": AUDIO_B64}})
    assert parse_frame(raw) == Media(None, None, None, "inbound", AUDIO)


def test_dtmf_mark_stop() -> None:
    assert parse_frame(DTMF) == Dtmf("#")
    assert parse_frame(MARK) == Mark("utt-3")
    assert parse_frame(STOP) == Stop()


def test_error_under_error_or_payload() -> None:
    expected = StreamError("100005", "rate_limit_reached", "Too many requests")
    assert parse_frame(ERROR) == expected
    moved = json.loads(ERROR)
    moved["payload"] = moved.pop("error")
    assert parse_frame(json.dumps(moved)) == expected
    numeric = {"event": "error", "error": {"code": 100003, "title": "malformed_frame"}}
    assert parse_frame(json.dumps(numeric)) == StreamError("100003", "malformed_frame", "")


def test_unknown_event_is_ignored() -> None:
    assert parse_frame('{"event": "transcription", "text": "hola"}') is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"media"', "not a JSON object"),
        ("{}", "no event"),
        ('{"event": 5}', "event is not a string"),
        ('{"event": ["media"]}', "event is not a string"),
        ('{"event": "media"}', "no media object"),
        ('{"event": "media", "media": []}', "no media object"),
        ('{"event": "media", "media": {}}', "payload is missing"),
        ('{"event": "media", "media": {"payload": 12}}', "payload is missing"),
        ('{"event": "media", "media": {"payload": "abc"}}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "@@@@"}}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "é"}}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "", "track": 1}}', "track"),
        ('{"event": "media", "sequence_number": "x", "media": {"payload": ""}}', "sequence"),
        ('{"event": "media", "media": {"payload": "", "chunk": "2a"}}', "chunk"),
        ('{"event": "media", "media": {"payload": "", "timestamp": 1.5}}', "timestamp"),
        ('{"event": "media", "media": {"payload": "", "chunk": true}}', "chunk"),
        ('{"event": "start"}', "no start object"),
        ('{"event": "start", "stream_id": "s", "start": {"media_format": {}}}', "call_control_id"),
        ('{"event": "dtmf", "dtmf": {}}', "dtmf.digit"),
        ('{"event": "mark", "mark": {"name": 3}}', "mark.name"),
        ('{"event": "mark"}', "no mark object"),
        ('{"event": "error"}', "no error object"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_frames_have_a_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason) as info:
        parse_frame(raw)
    assert info.value.reason == str(info.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f["start"].pop("call_control_id"), "call_control_id"),
        (lambda f: f["start"].update(call_control_id=""), "call_control_id"),
        (lambda f: f["start"].update(call_control_id=["v3:x"]), "call_control_id"),
    ],
)
def test_malformed_start(change, reason: str) -> None:
    frame = json.loads(START)
    change(frame)
    with pytest.raises(FrameError, match=reason):
        parse_frame(json.dumps(frame))


@pytest.mark.parametrize(
    ("change", "absent"),
    [
        (lambda f: f["start"].update(custom_parameters="customer_123"), "custom_parameters"),
        (lambda f: f["start"].update(custom_parameters=[{"name": "a"}]), "custom_parameters"),
        (lambda f: f["start"].update(custom_parameters=None), "custom_parameters"),
        (lambda f: f.pop("stream_id"), "stream_id"),
        (lambda f: f.update(stream_id=42), "stream_id"),
        (lambda f: f["start"].update(tags="TAG1", user_id=7), None),
        (lambda f: f["start"]["media_format"].update(channels="mono"), None),
        (lambda f: f["start"]["media_format"].update(sample_rate=0), "sample_rate"),
        (lambda f: f["start"]["media_format"].update(sample_rate="fast"), "sample_rate"),
        (lambda f: f["start"]["media_format"].update(sample_rate=8000.5), "sample_rate"),
        (lambda f: f["start"].update(client_state=7), "client_state"),
        (lambda f: f["start"].update(call_session_id={}), "call_session_id"),
        (lambda f: f["start"].update({"from": 13122010094}), "from_"),
        (lambda f: f["start"].update(to=None), "to"),
    ],
)
def test_fields_the_call_can_do_without_never_fail_a_start(change, absent) -> None:
    """One odd field the server does not rely on must not cost the call its media stream:
    it is taken as absent, and every other field still comes through."""
    frame = json.loads(START)
    change(frame)
    parsed = parse_frame(json.dumps(frame))
    assert isinstance(parsed, Start)
    expected = parse_frame(START)
    assert isinstance(expected, Start)
    if absent is not None:
        empty = {} if absent == "custom_parameters" else None
        assert getattr(parsed, absent) == empty
        expected = dataclasses.replace(expected, **{absent: empty})
    assert parsed == expected


def test_connected_without_a_usable_version() -> None:
    assert parse_frame('{"event": "connected", "version": 1}') == Connected(None)


def test_build_media_matches_protocol() -> None:
    out = build_media(AUDIO)
    assert isinstance(out, str)
    assert json.loads(out) == {"event": "media", "media": {"payload": AUDIO_B64}}
    assert parse_frame(out) == Media(None, None, None, "inbound", AUDIO)
    assert json.loads(build_media(b"")) == {"event": "media", "media": {"payload": ""}}


@pytest.mark.parametrize("name", ["utt-3", 'say "hi"\\now', "línea\n2", "😀"])
def test_build_mark_escapes_name(name: str) -> None:
    out = build_mark(name)
    assert json.loads(out) == {"event": "mark", "mark": {"name": name}}
    assert parse_frame(out) == Mark(name)


def test_build_clear() -> None:
    assert json.loads(build_clear()) == {"event": "clear"}


def chunks(frames: list[Media]) -> list[int | None]:
    return [f.chunk for f in frames]


def push_all(reorderer: FrameReorderer, order: list[int]) -> list[int | None]:
    out: list[Media] = []
    for n in order:
        out += reorderer.push(media(chunk=n))
    return chunks(out)


def test_reorderer_in_order_is_released_at_once() -> None:
    r = FrameReorderer()
    for n in range(1, 20):
        assert chunks(r.push(media(chunk=n))) == [n]
    assert (r.held, r.late_dropped, r.skipped) == (0, 0, 0)


def test_reorderer_swaps() -> None:
    r = FrameReorderer()
    assert push_all(r, [1, 3, 2, 5, 4, 6]) == [1, 2, 3, 4, 5, 6]
    assert r.late_dropped == 0


def test_reorderer_shuffled_within_window() -> None:
    rng = random.Random(7)
    order = list(range(1, 201))
    for i in range(1, 200, 4):  # shuffle blocks that fit in the window
        block = order[i : i + 4]
        rng.shuffle(block)
        order[i : i + 4] = block
    r = FrameReorderer(window=4)
    assert push_all(r, order) + chunks(r.flush()) == list(range(1, 201))
    assert (r.late_dropped, r.skipped) == (0, 0)


def test_reorderer_skips_a_lost_frame_after_the_window() -> None:
    r = FrameReorderer(window=4)
    assert push_all(r, [1, 2]) == [1, 2]
    assert push_all(r, [4, 5, 6, 7]) == []
    assert r.held == 4
    assert push_all(r, [8]) == [4, 5, 6, 7, 8]
    assert (r.held, r.skipped) == (0, 1)
    assert push_all(r, [3]) == []
    assert r.late_dropped == 1


def test_reorderer_drops_late_and_duplicate_frames() -> None:
    r = FrameReorderer()
    assert push_all(r, [10, 11, 9, 11, 13, 13, 12]) == [10, 11, 12, 13]
    assert r.late_dropped == 3


def test_reorderer_sequence_key_and_pass_through() -> None:
    r = FrameReorderer(key="sequence")
    out = r.push(media(seq=5, chunk=1)) + r.push(media(seq=7, chunk=3))
    out += r.push(media(seq=None, chunk=9))  # no sequence: straight through
    out += r.push(media(seq=6, chunk=2))
    assert chunks(out) == [1, 9, 2, 3]
    unnumbered = FrameReorderer()
    assert chunks(unnumbered.push(media())) == [None]


def test_reorderer_flush_releases_held_frames() -> None:
    r = FrameReorderer()
    assert push_all(r, [1, 3, 5]) == [1]
    assert chunks(r.flush()) == [3, 5]
    assert (r.held, r.skipped) == (0, 2)
    assert push_all(r, [6]) == [6]


def test_reorderer_window_zero_never_waits() -> None:
    r = FrameReorderer(window=0)
    assert push_all(r, [1, 3, 2, 4]) == [1, 3, 4]
    assert (r.skipped, r.late_dropped) == (1, 1)


def test_reorderer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        FrameReorderer(window=-1)
    with pytest.raises(ValueError):
        FrameReorderer(key="timestamp")  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
EVENTS = ["connected", "start", "media", "dtmf", "mark", "stop", "error", "clear"]
FIELDS = ["sequence_number", "stream_id", "start", "media", "dtmf", "mark", "error", "payload"]


@settings(max_examples=150, deadline=None)
@given(
    event=st.sampled_from(EVENTS) | json_values,
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)
def test_any_json_gives_a_frame_none_or_frame_error(event: object, body: dict) -> None:
    try:
        parse_frame(json.dumps({"event": event, **body}))
    except FrameError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_any_bytes_give_a_frame_none_or_frame_error(raw: str | bytes) -> None:
    try:
        parse_frame(raw)
    except FrameError:
        pass
