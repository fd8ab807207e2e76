"""One media-stream call from socket accept to teardown.

The Telnyx socket speaks first (``connected``, then ``start``). Once ``start`` names the
call, the socket must prove it (a stream token, ``calls.stream_token``) and be the first to
claim the call's stream, deployment-wide, before any provider connection is opened; then
the call is registered, runs inside its own cancel scope, and is unregistered in
``finally`` — whatever ended it: ``stop``, the socket closing, a ``call.hangup`` webhook,
the conversation ending itself, or server shutdown. If the stream failed while the call is
up (the socket closed without ``stop``, or ``streaming.failed``), the call is handed over
to fallback mode with its conversation in the same step (``voice_trio.fallback.calls``).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

from voice_trio.calls import stream_token
from voice_trio.calls.ends import DEGRADE_REASONS, CallMode, EndReason
from voice_trio.calls.registry import ActiveCall
from voice_trio.calls.services import CallServices
from voice_trio.conversation.history import Conversation
from voice_trio.media.session import CallSession
from voice_trio.observability import call_id_var
from voice_trio.providers.deepgram.stt import SttError
from voice_trio.providers.telnyx.control import decode_client_state
from voice_trio.providers.telnyx.media import (
    AUTH_TOKEN_FIELD,
    G711_CODECS,
    Connected,
    FrameError,
    Start,
    Stop,
    parse_frame,
)
from voice_trio.store import CallRecord, TurnEntry
from voice_trio.store.outage import keep

log = logging.getLogger("voice_trio.calls")

START_TIMEOUT_SECONDS = 10.0


class StreamFallback(Protocol):
    """Where a call goes when its media stream cannot carry it: the webhook-only mode
    (``fallback.calls.FallbackCalls``), which this module never imports."""

    def stream_started(self, call_control_id: str) -> None:
        """The call's socket came, proved the call and claimed its stream."""

    def stream_unusable(self, call_control_id: str, client_state: str | None, why: str) -> None:
        """The socket came but cannot carry the call (``why``): go on without it at once."""

    def take_over(
        self, media_call: ActiveCall, client_state: str | None, conversation: Conversation
    ) -> bool:
        """Carry on a call whose stream failed (its end reason says how), with the
        conversation so far; False if the call is over instead."""
        ...


class MediaSocket(Protocol):
    """What a call needs of the Telnyx media WebSocket (``web`` provides it)."""

    closed: bool  # the peer closed, or a send found it gone
    # At least this many seconds between reads of the socket, when it can (0: as frames
    # come); and, for what a read so held back handed out, when those bytes began to
    # arrive (None otherwise).
    read_gap: float
    gathered_since: float | None

    async def receive(self) -> str | bytes | None: ...
    def done_reading(self) -> None:
        """The call reads no more: what the peer still sends (its close) is answered
        without it, while the call winds down."""

    async def send_text(self, text: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    @property
    def query_string(self) -> bytes: ...
    def header(self, name: str) -> str | None: ...


async def wait_for_start(
    services: CallServices, socket: MediaSocket
) -> tuple[Start | None, str | None]:
    """Read frames until ``start``; return it (None if the socket closes or stays silent
    too long) and the stream token of the ``connected`` frame, if one came with it.

    The peer is not authenticated yet: what it sends is counted, and a socket sending bad
    frames is only noted in the bounded summary (``services.refused_streams``)."""
    connected_token: str | None = None
    malformed = 0
    with trio.move_on_after(START_TIMEOUT_SECONDS):
        while True:
            raw = await socket.receive()
            if raw is None:
                return None, None
            try:
                frame = parse_frame(raw)
            except FrameError:
                services.metrics.frames_dropped.labels("malformed").inc()
                malformed += 1
                if malformed == 1:
                    services.refused_streams.note("malformed frames before start")
                continue
            if isinstance(frame, Connected):
                connected_token = frame.auth_token or connected_token
            elif isinstance(frame, Start):
                return frame, connected_token
            elif isinstance(frame, Stop):
                return None, None
    services.metrics.stream_rejected.labels("no_start").inc()
    await socket.close(1008, "no start event")
    return None, None


async def run_media_call(
    services: CallServices, fallback: StreamFallback, socket: MediaSocket
) -> None:
    start, connected_token = await wait_for_start(services, socket)
    if start is None:
        return
    proof, channel = stream_token.presented(
        socket.header(AUTH_TOKEN_FIELD), connected_token, socket.query_string
    )
    try:
        stream_token.verify(services.stream_secret, proof, start.call_control_id)
    except stream_token.StreamTokenError as exc:
        # Before any provider connection: a socket that cannot prove its call costs nothing.
        # Nothing the stranger sent is logged, and strangers cannot flood the log.
        services.metrics.stream_rejected.labels("bad_token").inc()
        services.refused_streams.note(f"{exc} (by {channel})")
        await socket.close(1008, "invalid stream token")
        return
    if not await services.claim_stream(start.call_control_id):
        # A valid token, but its stream is taken: a second socket for a call streaming
        # somewhere, a replay after the call ended, or one the deployment gave up on.
        services.metrics.stream_rejected.labels("replayed").inc()
        services.refused_streams.note("stream already claimed")
        await socket.close(1008, "stream already claimed")
        return
    if start.encoding not in G711_CODECS:
        # Telnyx streams the call's own codec when it cannot transcode to the PCMU we asked
        # for (G722, OPUS on SIP/WebRTC legs): waiting would only delay the fallback.
        services.metrics.stream_rejected.labels("codec").inc()
        token = call_id_var.set(start.call_control_id)
        try:
            fallback.stream_unusable(
                start.call_control_id, start.client_state, f"codec {start.encoding!r}"
            )
        finally:
            call_id_var.reset(token)
        await socket.close(1003, "codec not supported: G.711 (PCMU, PCMA) only")
        return
    record = call_record(start, holder=services.instance_id)
    call = ActiveCall(start.call_control_id, mode=CallMode.MEDIA, party=party_of(record))
    try:
        services.registry.add(call)
    except KeyError:
        services.metrics.stream_rejected.labels("duplicate_call").inc()
        await socket.close(1008, "call already streaming")
        return
    fallback.stream_started(start.call_control_id)
    token = call_id_var.set(start.call_control_id)
    session: CallSession | None = None
    origin = trio.current_time()
    await keep_record(services, record, [], first=True)
    try:
        log.info(
            "Media stream started (codec %s, stream %s, token by %s)",
            start.encoding,
            start.stream_id,
            channel,
        )
        with call.cancel_scope:
            session = CallSession(services, socket, start, call)
            await session.run()
    except SttError as exc:
        # Deepgram refused us (401, 1011, unreachable): the call goes on with Telnyx's own
        # speech recognition and voice (fallback mode) rather than failing.
        log.error("🔌 Deepgram unavailable (%s): the call continues in fallback mode", exc)
        call.end_reason = call.end_reason or EndReason.STT_UNAVAILABLE
    except Exception as exc:
        if socket.closed and call.end_reason is None:
            # Sending found the socket gone before reading did: the same as a close.
            log.info("🔌 Media socket gone while sending (%s)", type(exc).__name__)
            call.end_reason = EndReason.STREAM_LOST
        else:
            # The boundary of one call: its failure is logged and recorded, never propagated.
            log.exception("Call failed")
            await _hang_up(services, call, EndReason.ERROR)
    finally:
        if call.end_reason is None:
            # Cut without a reason: by the server's own stop (Hypercorn's shutdown, outside
            # voice-trio serve's drain). Never leave the caller on a line nobody answers.
            await _hang_up(services, call, EndReason.SHUTDOWN)
        services.registry.remove(call)
        handed_over = (
            session is not None
            and call.end_reason in DEGRADE_REASONS
            and fallback.take_over(call, start.client_state, session.handover())
        )
        if not handed_over:
            services.metrics.calls.labels(
                CallMode.MEDIA, call.end_reason or EndReason.UNKNOWN
            ).inc()
            log.info("📴 Call ended (%s)", call.end_reason or "unknown")
        record.end_reason = call.end_reason or "unknown"
        if handed_over:
            record.mode = CallMode.DEGRADED
        else:
            record.status, record.ended_at = "ended", time.time()
        turns: list[TurnEntry] = []
        if session is not None:
            turns = [TurnEntry.from_turn(i, t, origin) for i, t in enumerate(session.records)]
            record.tts_characters = session.tts_characters
            record.llm_input_tokens = sum(t.llm_input_tokens for t in session.records)
            record.llm_output_tokens = sum(t.llm_output_tokens for t in session.records)
            record.stt_audio_seconds = round(session.stt.audio_seconds, 3) if session.stt else 0.0
            services.metrics.stt_reconnects.inc(session.stt.reconnects if session.stt else 0)
        await keep_record(services, record, turns)
        call_id_var.reset(token)


async def _hang_up(services: CallServices, call: ActiveCall, reason: EndReason) -> None:
    if call.end_reason is not None:
        return
    call.end_reason = reason
    await services.hang_up(call.call_control_id)


def call_record(start: Start, holder: str) -> CallRecord:
    context = decode_client_state(start.client_state)
    return CallRecord(
        call_control_id=start.call_control_id,
        call_session_id=start.call_session_id or "",
        direction="inbound" if context.get("dir") == "inbound" else "outbound",
        from_number=start.from_ or "",
        to_number=start.to or "",
        nombre=str(context.get("nombre") or ""),
        contexto=str(context.get("contexto") or ""),
        answered_at=time.time(),
        mode=CallMode.MEDIA,
        holder=holder,
    )


def party_of(record: CallRecord) -> dict[str, str]:
    """Who is on the line, as the operator console shows it (``ActiveCall.party``)."""
    number = record.from_number if record.direction == "inbound" else record.to_number
    return {"nombre": record.nombre, "number": number, "direction": record.direction}


async def keep_record(
    services: CallServices, record: CallRecord, turns: list[TurnEntry], *, first: bool = False
) -> None:
    """Write the call record even while the call is being cancelled (shielded, bounded);
    a store outage is logged, never a reason for the call to fail."""
    if services.store is None:
        return

    def failed(operation: str) -> None:
        services.metrics.store_errors.labels(operation).inc()

    if first:
        await keep(services.store.start_call, record, on_failure=failed, first=True)
    else:
        await keep(services.store.save_call, record, turns, on_failure=failed)
