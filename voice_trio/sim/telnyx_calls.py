"""One simulated Telnyx call leg: state machine, line, media streams, announcements.

The flows are described in :mod:`voice_trio.sim.telnyx`. A :class:`SimCall` is driven by REST
commands (synchronous state changes that start tasks in the call's nursery) and by the party
on the line; :meth:`SimCall.run` is that nursery: the call's webhook queue outlives its media
tasks, so ``streaming.stopped`` and ``call.hangup`` are delivered after everything else.
"""

from __future__ import annotations

import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import trio

from voice_trio.sim.carrier import (
    PLAYABLE_CODECS,
    AudioPort,
    Line,
    MediaStream,
    StreamConnectError,
    StreamParams,
)
from voice_trio.sim.speech import SpeechDecoder
from voice_trio.sim.telnyx_webhooks import (
    CallWebhooks,
    WebhookSender,
    event,
    is_loopback_url,
    utc_now,
)

COMMAND_ID_WINDOW_S = 60.0
# AMD modes after which Telnyx reports the end of a machine's greeting (protocols/telnyx.md
# §2.3; developers.telnyx.com/docs/voice/programmable-voice/answering-machine-detection).
GREETING_MODES = frozenset({"detect_beep", "detect_words", "greeting_end", "premium"})
GREETING_LIMIT_S = 30.0  # detect_words listens this long for the greeting's end


def telnyx_stream_codec(requested: str, call_codec: str) -> str:
    """The codec Telnyx streams in when ``requested`` was asked for on a ``call_codec`` call:
    "When set to 'default' or when transcoding is not possible, the codec from the call will
    be used. Currently, transcoding is only supported between PCMU and PCMA codecs."
    (protocols/telnyx.md §1.6)."""
    if requested == "default" or requested == call_codec:
        return call_codec
    if {requested, call_codec} <= PLAYABLE_CODECS:
        return requested
    return call_codec


class GreetingEnd:
    """Tap on the answering machine's audio: set ``ended`` once its greeting (voiced audio)
    is followed by ``silence_ms`` of silence."""

    def __init__(self, silence_ms: float) -> None:
        self._decoder = SpeechDecoder()
        self._silence_bytes = int(silence_ms * 8)
        self.ended = trio.Event()

    def feed(self, audio: bytes) -> None:
        decoder = self._decoder
        decoder.feed(audio)
        if decoder.voiced_until and decoder.offset - decoder.voiced_until >= self._silence_bytes:
            self.ended.set()


class Transcriber:
    """Telnyx transcription emulation: decodes simulated speech into ``call.transcription``."""

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        *,
        track: str,
        final_silence_ms: int,
        interim_every_ms: int | None,
    ) -> None:
        self._emit = emit
        self._track = track
        self._decoder = SpeechDecoder()
        self._chars: list[str] = []
        self._final_bytes = final_silence_ms * 8
        self._interim_bytes = interim_every_ms * 8 if interim_every_ms else 0
        self._interim_at = 0
        self._fresh = False

    def feed(self, audio: bytes) -> None:
        decoder = self._decoder
        symbols = decoder.feed(audio)
        if symbols:
            self._chars.extend(s.char for s in symbols)
            self._fresh = True
        if not self._chars:
            return
        if decoder.offset - decoder.voiced_until >= self._final_bytes:
            self._send(True)
            self._chars.clear()
            self._fresh = False
        elif (
            self._interim_bytes
            and self._fresh
            and decoder.offset - self._interim_at >= self._interim_bytes
        ):
            self._interim_at = decoder.offset
            self._fresh = False
            self._send(False)

    def _send(self, final: bool) -> None:
        text = "".join(self._chars).strip()
        if text:
            self._emit(
                {
                    "transcript": text,
                    "is_final": final,
                    "confidence": 0.95 if final else 0.8,
                    "transcription_track": self._track,
                }
            )


class TelnyxSim(Protocol):
    """What a simulated call reads of ``sim.telnyx.TelnyxSim``: its knobs, its webhook
    sender, and the two calls back (a protocol, so this module need not import it)."""

    webhooks: WebhookSender
    rng: random.Random
    user_id: str
    ring_ms: float
    answer_timeout_s: float
    no_answer_timeout_s: float | None
    call_codec: str
    stream_codec: str | None
    strip_stream_query: bool
    stream_auth_header: bool
    stream_auth_in_connected: bool
    out_of_order_share: float
    transcription_silence_ms: int
    transcription_interim_ms: int
    amd_ms: float
    amd_greeting_silence_ms: float
    stream_connect_timeout_s: float
    dtmf_frames: bool
    stream_lingers_after_hangup_s: float
    record_audio_s: float
    allow_remote: bool

    def _call_ended(self, call: SimCall) -> None: ...

    def _callee_for(self, number: str) -> Callee: ...


@dataclass
class Callee:
    """Who picks up when the server dials a number (``party=None``: nobody answers)."""

    party: AudioPort | None
    behaviour: str = "answer"  # answer | busy | no_answer
    ring_ms: float | None = None
    machine: bool = False  # what answering machine detection reports


class SimCall:
    """One call leg: its state, its webhooks queue, its line; ``run`` is the call's nursery."""

    def __init__(
        self,
        sim: TelnyxSim,
        *,
        direction: str,
        from_: str,
        to: str,
        connection_id: str,
        webhook_url: str | None,
        client_state: str | None,
        party: AudioPort | None,
        options: dict[str, Any],
    ) -> None:
        self.sim = sim
        self.call_control_id = "v3:" + secrets.token_urlsafe(33)
        self.call_leg_id = str(uuid.uuid4())
        self.call_session_id = str(uuid.uuid4())
        self.direction = direction
        self.from_ = from_
        self.to = to
        self.connection_id = connection_id
        self.webhook_url = webhook_url
        self.client_state = client_state
        self.options = options
        self.state = "parked" if direction == "incoming" else "bridging"
        self.start_time = utc_now()
        self.end_time: str | None = None
        self.line = Line(
            party or AudioPort(), on_dtmf=self._on_dtmf, on_hang_up=self._party_hung_up
        )
        self.webhooks = CallWebhooks(sim.webhooks)
        self.events: list[str] = []
        self.streams: list[MediaStream] = []
        self.spoken: list[str] = []
        self.transcripts: list[dict[str, Any]] = []
        self.dtmf_sent: list[str] = []
        self.transferred_to: str | None = None
        self.transfer_legs: list[TransferLeg] = []
        self.hangup_cause: str | None = None
        self.hangup_source: str | None = None
        self.sip_hangup_cause: str | None = None
        self.ended = trio.Event()
        self._ended_by = "network"
        self._end_requested = trio.Event()
        self._media: trio.Nursery | None = None
        self._clock_started = False
        self._commands: dict[str, float] = {}
        self._announcements: deque[tuple[str, bytes, dict[str, Any]]] = deque()
        self._announcing: tuple[str, dict[str, Any]] | None = None
        self._announcer_running = False
        self._playback_stopped = False
        self._transcriber_taps: list[tuple[list[Callable[[bytes], None]], Callable]] = []
        if party is not None:
            party.attach(self.line)

    def record(self, *, full: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "is_alive": full and self.state != "hangup",
            "record_type": "call",
        }
        if full:
            data.update(
                client_state=self.client_state, start_time=self.start_time, end_time=self.end_time
            )
        return data

    def emit(self, event_type: str, fields: dict[str, Any] | None = None) -> None:
        payload = {
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call_session_id,
            "connection_id": self.connection_id,
            "client_state": self.client_state,
        }
        if fields:
            payload.update(fields)
        self.events.append(event_type)
        self.webhooks.emit(self.webhook_url, event(event_type, payload))

    def seen_command(self, command_id: str) -> bool:
        at = self._commands.get(command_id)
        return at is not None and time.monotonic() - at < COMMAND_ID_WINDOW_S

    def remember_command(self, command_id: Any) -> None:
        if isinstance(command_id, str):
            self._commands[command_id] = time.monotonic()

    async def run(self, callee: Callee | None = None) -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(self.webhooks.run)
            try:
                async with trio.open_nursery() as media:
                    self._media = media
                    if self.direction == "incoming":
                        media.start_soon(self._incoming)
                    else:
                        media.start_soon(self._outgoing, callee or Callee(AudioPort()))
                    await self._end_requested.wait()
                    linger = self.sim.stream_lingers_after_hangup_s
                    stream = self.line.stream
                    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                        await self._wind_down(stop_stream=not linger)
                    if linger and stream is not None and stream.is_open:
                        # The stop frame was lost: the call is over, its socket is not.
                        self._hung_up()
                        with trio.move_on_after(linger):
                            await stream.closed.wait()
                    media.cancel_scope.cancel()
            finally:
                self._media = None
                self._finish()

    async def _incoming(self) -> None:
        with trio.move_on_after(self.sim.answer_timeout_s):
            await self.line.answered.wait()
        if not self.line.answered.is_set():
            self.end("originator_cancel", "caller", "487", by="caller")  # the caller gave up
            return
        await self._limit_duration()

    async def _outgoing(self, callee: Callee) -> None:
        opts = self.options
        if opts.get("stream_url") and opts.get("stream_establish_before_call_originate"):
            self.start_stream(opts)
        ring = (callee.ring_ms if callee.ring_ms is not None else self.sim.ring_ms) / 1000
        if callee.behaviour == "busy":
            await trio.sleep(ring)
            self.end("user_busy", "callee", "486", by="caller")
            return
        if callee.party is None or callee.behaviour == "no_answer":
            await trio.sleep(self.sim.no_answer_timeout_s or opts.get("timeout_secs") or 30)
            self.end("timeout", "unknown", "408")
            return
        await trio.sleep(ring)
        self.line.party = callee.party
        callee.party.attach(self.line)
        self.answer(opts, machine=callee.machine)
        await self._limit_duration()

    async def _limit_duration(self) -> None:
        await trio.sleep(self.options.get("time_limit_secs") or 14400)
        self.end("time_limit", "unknown", "unspecified")

    def answer(self, opts: dict[str, Any], *, machine: bool = False) -> None:
        self.state = "answered"
        self.emit(
            "call.answered",
            {
                "from": self.from_,
                "to": self.to,
                "state": "answered",
                "start_time": self.start_time,
                "custom_headers": [],
                "sip_headers": [],
                "tags": [],
            },
        )
        self.line.answered.set()
        self.line.party.on_event("answered", "", trio.current_time())
        self._ensure_clock()
        if opts.get("stream_url") and not self.streams:
            self.start_stream(opts)
        if opts.get("transcription"):
            self.start_transcription(opts.get("transcription_config") or {})
        amd = opts.get("answering_machine_detection")
        if amd and amd != "disabled" and self._media is not None:
            self._media.start_soon(self._detect_machine, amd, machine)

    async def _detect_machine(self, mode: str, machine: bool) -> None:
        """The verdict after ``amd_ms``; on a machine, for the modes that listen for it, the
        end of its greeting: ``amd_greeting_silence_ms`` of silence after its voice (a beep
        for ``detect_beep``/``premium``, which report only beeps), at most 30 s."""
        greeting = GreetingEnd(self.sim.amd_greeting_silence_ms)
        if machine and mode in GREETING_MODES:
            self.line.caller_taps.append(greeting.feed)
        try:
            await trio.sleep(self.sim.amd_ms / 1000)
            fields = {"from": self.from_, "to": self.to}
            premium = mode == "premium"
            if premium:
                result = "machine" if machine else "human_residence"
                self.emit("call.machine.premium.detection.ended", {**fields, "result": result})
            else:
                result = "machine" if machine else "human"
                self.emit("call.machine.detection.ended", {**fields, "result": result})
            if not (machine and mode in GREETING_MODES):
                return
            with trio.move_on_after(GREETING_LIMIT_S):
                await greeting.ended.wait()
            if premium:
                self.emit(
                    "call.machine.premium.greeting.ended", {**fields, "result": "beep_detected"}
                )
            elif greeting.ended.is_set() or mode == "detect_words":
                result = "beep_detected" if mode == "detect_beep" else "ended"
                self.emit("call.machine.greeting.ended", {**fields, "result": result})
        finally:
            if greeting.feed in self.line.caller_taps:
                self.line.caller_taps.remove(greeting.feed)

    def _ensure_clock(self) -> None:
        if not self._clock_started and self._media is not None:
            self._clock_started = True
            self._media.start_soon(self.line.run)

    def end(self, cause: str, source: str, sip: str, *, by: str = "network") -> None:
        if self.hangup_cause is not None:
            return
        self.hangup_cause, self.hangup_source, self.sip_hangup_cause = cause, source, sip
        self._ended_by = by
        self._end_requested.set()

    def hang_up_by_server(self) -> None:
        if self.state == "bridging":
            self.end("originator_cancel", "caller", "487", by="bot")
        else:
            self.end(
                "normal_clearing",
                "callee" if self.direction == "incoming" else "caller",
                "200",
                by="bot",
            )

    def _party_hung_up(self) -> None:
        if self.state == "parked":
            self.end("originator_cancel", "caller", "487", by="caller")
        else:
            self.end(
                "normal_clearing",
                "caller" if self.direction == "incoming" else "callee",
                "200",
                by="caller",
            )

    async def _wind_down(self, *, stop_stream: bool = True) -> None:
        stream = self.line.stream
        if stream is not None and stop_stream:
            await stream.stop()
        if self._announcing is not None:
            prefix, fields = self._announcing
            self._announcing = None
            self.emit(f"{prefix}.ended", {**fields, "status": "call_hangup"})

    def _finish(self) -> None:
        self._hung_up()
        self.webhooks.close()
        self.ended.set()
        self.sim._call_ended(self)

    def _hung_up(self) -> None:
        """The call is over: ``call.hangup`` (once)."""
        if self.state == "hangup":
            return
        if self.hangup_cause is None:
            self.hangup_cause, self.hangup_source, self.sip_hangup_cause = (
                "unspecified",
                "unknown",
                "unspecified",
            )
        self.state = "hangup"
        self.end_time = utc_now()
        self.line.end(self._ended_by)
        packets = str(self.line.ticks)
        self.emit(
            "call.hangup",
            {
                "from": self.from_,
                "to": self.to,
                "state": "hangup",
                "hangup_cause": self.hangup_cause,
                "hangup_source": self.hangup_source,
                "sip_hangup_cause": self.sip_hangup_cause,
                "start_time": self.start_time,
                "call_quality_stats": {
                    "inbound": {
                        "mos": "4.50",
                        "jitter_max_variance": "0.00",
                        "jitter_packet_count": "0",
                        "packet_count": packets,
                        "skip_packet_count": "0",
                    },
                    "outbound": {
                        "packet_count": str(self.line.played_frames),
                        "skip_packet_count": "0",
                    },
                },
            },
        )

    def start_stream(self, opts: dict[str, Any]) -> None:
        if self._media is not None:
            self._media.start_soon(self._run_stream, opts, self._media)

    async def _run_stream(self, opts: dict[str, Any], nursery: trio.Nursery) -> None:
        sim = self.sim
        url = opts["stream_url"]
        track = opts.get("stream_track") or "inbound_track"
        codec = sim.stream_codec or telnyx_stream_codec(
            opts.get("stream_codec") or "default", sim.call_codec
        )
        bidi_codec = opts.get("stream_bidirectional_codec") or "PCMU"
        rate = opts.get("stream_bidirectional_sampling_rate") or 8000
        params = StreamParams(
            url=url,
            stream_id=str(uuid.uuid4()),
            call_control_id=self.call_control_id,
            call_session_id=self.call_session_id,
            from_=self.from_,
            to=self.to,
            user_id=sim.user_id,
            client_state=self.client_state,
            custom_parameters={p["name"]: p["value"] for p in opts.get("custom_parameters") or []},
            auth_token=opts.get("stream_auth_token"),
            auth_header=sim.stream_auth_header,
            auth_in_connected=sim.stream_auth_in_connected,
            strip_query=sim.strip_stream_query,
            codec=codec,
            track=track,
            bidirectional_mode=opts.get("stream_bidirectional_mode") or "mp3",
            bidirectional_codec=bidi_codec,
            dtmf_frames=sim.dtmf_frames,
        )
        if bidi_codec not in PLAYABLE_CODECS or rate != 8000:
            self._stream_failed(params, "the simulator plays back only PCMU or PCMA at 8000 Hz")
            return
        if not sim.allow_remote and not is_loopback_url(url):
            self._stream_failed(params, "refused: stream_url is not a loopback URL (allow_remote)")
            return
        stream = self._new_stream(params)
        self.streams.append(stream)
        try:
            await nursery.start(stream.run)
        except StreamConnectError as exc:
            self._stream_failed(params, str(exc))
            return
        self.line.stream = stream
        self._ensure_clock()
        self.emit("streaming.started", {"stream_url": url})
        self.line.party.on_event("stream_started", params.stream_id, trio.current_time())

    def _new_stream(self, params: StreamParams) -> MediaStream:
        """The carrier's end of a media stream (a subclass may bring a leaner one)."""
        sim = self.sim
        return MediaStream(
            params,
            on_event=self._on_stream_event,
            on_closed=self._on_stream_closed,
            out_of_order_share=sim.out_of_order_share,
            rng=sim.rng,
            record_audio_bytes=int(sim.record_audio_s * 8000),
            connect_timeout=sim.stream_connect_timeout_s,
        )

    def _stream_failed(self, params: StreamParams, reason: str) -> None:
        self.emit(
            "streaming.failed",
            {
                "failure_reason": reason,
                "stream_id": params.stream_id,
                "stream_type": "websocket",
                "stream_params": {"stream_url": params.url, "track": params.track},
            },
        )

    def _on_stream_event(self, kind: str, detail: str) -> None:
        self.line.party.on_event(kind, detail, trio.current_time())

    def _on_stream_closed(self, stream: MediaStream) -> None:
        if self.line.stream is stream:
            self.line.stream = None
        self.emit("streaming.stopped", {"stream_url": stream.params.url})
        self.line.party.on_event("stream_stopped", stream.close_reason or "", trio.current_time())

    def stop_stream(self) -> None:
        stream = self.line.stream
        if stream is not None and self._media is not None:
            self._media.start_soon(stream.stop)

    def drop_stream(self) -> None:
        """The media path breaks: the socket closes without ``stop`` and the call stays up
        (``streaming.stopped`` follows, as for any stream that ends)."""
        stream = self.line.stream
        if stream is not None and self._media is not None:
            self._media.start_soon(stream.drop)

    def announce(self, kind: str, audio: bytes, fields: dict[str, Any]) -> None:
        self._announcements.append((kind, audio, fields))
        if not self._announcer_running and self._media is not None:
            self._announcer_running = True
            self._media.start_soon(self._announce_all)

    async def _announce_all(self) -> None:
        try:
            while self._announcements:
                kind, audio, fields = self._announcements.popleft()
                prefix = "call.speak" if kind == "speak" else "call.playback"
                self._announcing = (prefix, fields)
                self._playback_stopped = False
                self.emit(f"{prefix}.started", fields)
                await self.line.announce(audio).wait()
                if self._announcing is None:  # the call ended meanwhile
                    return
                self._announcing = None
                status = "stopped" if self._playback_stopped else "completed"
                self.emit(f"{prefix}.ended", {**fields, "status": status})
        finally:
            self._announcer_running = False

    def stop_playback(self) -> None:
        if self._announcing is not None and self._announcing[0] == "call.playback":
            self._playback_stopped = True
            self.line.cancel_announcements()

    def start_transcription(self, config: dict[str, Any], tracks: str = "inbound") -> None:
        self.stop_transcription()
        interim = bool(config.get("interim_results"))
        for track, taps in (
            ("inbound", self.line.caller_taps),
            ("outbound", self.line.played_taps),
        ):
            if tracks in (track, "both"):
                transcriber = Transcriber(
                    partial(self._transcribed, track),
                    track=track,
                    final_silence_ms=self.sim.transcription_silence_ms,
                    interim_every_ms=self.sim.transcription_interim_ms if interim else None,
                )
                taps.append(transcriber.feed)
                self._transcriber_taps.append((taps, transcriber.feed))

    def stop_transcription(self) -> None:
        for taps, tap in self._transcriber_taps:
            if tap in taps:
                taps.remove(tap)
        self._transcriber_taps.clear()

    def _transcribed(self, track: str, data: dict[str, Any]) -> None:
        self.transcripts.append(data)
        self.emit("call.transcription", {"transcription_data": data})

    def _on_dtmf(self, digit: str) -> None:
        self.emit("call.dtmf.received", {"digit": digit, "from": self.from_, "to": self.to})

    def transfer(self, to: str, opts: dict[str, Any]) -> None:
        """Telnyx dials ``to`` (leg B) and bridges this call to it. This leg's media stream
        stops at once (``stop``, ``streaming.stopped``): the call's audio now goes to the
        person, no longer to the server. Leg B reports ``call.initiated``, then
        ``call.answered`` and ``call.bridged`` (on both legs), or ``call.hangup`` if nobody
        answers, and this leg stays up (developers.telnyx.com call-control/transfer-call).
        Who answers is registered like a dialled callee (``answer_with``); the two parties'
        audio is not connected."""
        self.transferred_to = to
        self.stop_stream()
        self.line.party.on_event("transferred", to, trio.current_time())
        if self._media is not None:
            self._media.start_soon(self._bridge, to, opts)

    async def _bridge(self, to: str, opts: dict[str, Any]) -> None:
        sim = self.sim
        callee = sim._callee_for(to)
        leg = TransferLeg(self, to, opts)
        self.transfer_legs.append(leg)
        leg.emit("call.initiated", {"direction": "outgoing", "state": "bridging"})
        ring = (callee.ring_ms if callee.ring_ms is not None else sim.ring_ms) / 1000
        if callee.behaviour == "busy":
            await trio.sleep(ring)
            leg.hang_up("user_busy", "486")
            return
        if callee.party is None or callee.behaviour == "no_answer":
            await trio.sleep(sim.no_answer_timeout_s or opts.get("timeout_secs") or 30)
            leg.hang_up("timeout", "408")
            return
        await trio.sleep(ring)
        leg.party = callee.party
        leg.emit("call.answered", {"state": "answered"})
        self.emit("call.bridged", {"from": self.from_, "to": to, "state": "bridged"})
        leg.emit("call.bridged", {"state": "bridged"})
        callee.party.on_event("answered", "", trio.current_time())


class TransferLeg:
    """Leg B of a transfer: its own ids and webhooks (to the transfer's ``webhook_url`` or
    the call's), the same call session as the leg it was transferred from."""

    def __init__(self, call: SimCall, to: str, opts: dict[str, Any]) -> None:
        self.call = call
        self.call_control_id = "v3:" + secrets.token_urlsafe(33)
        self.call_leg_id = str(uuid.uuid4())
        self.to = to
        self.from_ = opts.get("from") or (call.to if call.direction == "incoming" else call.from_)
        self.webhook_url = opts.get("webhook_url") or call.webhook_url
        self.client_state = opts.get("target_leg_client_state")
        self.party: AudioPort | None = None
        self.events: list[str] = []
        self.hangup_cause: str | None = None

    def emit(self, event_type: str, fields: dict[str, Any]) -> None:
        payload = {
            "call_control_id": self.call_control_id,
            "call_leg_id": self.call_leg_id,
            "call_session_id": self.call.call_session_id,
            "connection_id": self.call.connection_id,
            "client_state": self.client_state,
            "from": self.from_,
            "to": self.to,
            **fields,
        }
        self.events.append(event_type)
        self.call.webhooks.emit(self.webhook_url, event(event_type, payload))

    def hang_up(self, cause: str, sip: str) -> None:
        self.hangup_cause = cause
        self.emit(
            "call.hangup",
            {
                "state": "hangup",
                "hangup_cause": cause,
                "hangup_source": "callee",
                "sip_hangup_cause": sip,
                "start_time": utc_now(),
            },
        )
