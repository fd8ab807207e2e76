"""How a call runs and why it ended: the closed sets the store, the metrics and both call
modes share.

Both are ``StrEnum``: a member *is* its string, so records written before these existed,
metric labels and JSON bodies read the same, and a value from the store compares equal to
the member it names.
"""

from __future__ import annotations

from enum import StrEnum


class CallMode(StrEnum):
    MEDIA = "media"  # audio over the Telnyx media stream (the normal case)
    FALLBACK = "fallback"  # webhook-only from the start (USE_MEDIA_STREAMS=false)
    DEGRADED = "degraded"  # webhook-only after the media stream failed


class EndReason(StrEnum):
    # The people on the line
    HANGUP = "hangup"  # Telnyx said the call hung up (call.hangup)
    CALLER_HANGUP = "caller_hangup"  # the media stream stopped with the call
    CALLER_ENDED = "caller_ended"  # a key the caller pressed (DTMF_SHORTCUTS end_call)
    AGENT_ENDED = "agent_ended"  # the model called end_call
    OPERATOR_HANGUP = "operator_hangup"  # POST /api/calls/{id}/hangup
    TRANSFERRED = "transferred"
    VOICEMAIL = "voicemail"  # a machine answered and the message was left
    # Limits
    MAX_DURATION = "max_duration"
    SILENCE_TIMEOUT = "silence_timeout"
    DRAIN = "drain"  # the server drained and the call said goodbye
    SHUTDOWN = "shutdown"  # the server stopped with the call still up
    # Failures (the first four hand a media call over to the fallback mode)
    STREAM_LOST = "stream_lost"  # the media socket closed without a stop frame
    STREAM_FAILED = "stream_failed"  # Telnyx reported streaming.failed
    STT_LOST = "stt_lost"  # Deepgram went away and did not come back
    STT_UNAVAILABLE = "stt_unavailable"  # Deepgram could not be reached at the start
    SERVER_LOST = "server_lost"  # the instance holding the call died
    ERROR = "error"
    UNKNOWN = "unknown"
    # Not recorded: a fallback call's task here stops because another instance ended it.
    ENDED_ELSEWHERE = "ended_elsewhere"


# The end reasons of a media call that carries on in fallback mode instead of ending.
DEGRADE_REASONS = frozenset(
    {EndReason.STREAM_LOST, EndReason.STREAM_FAILED, EndReason.STT_LOST, EndReason.STT_UNAVAILABLE}
)
