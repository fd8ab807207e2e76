"""What a call may use of the instance that runs it: ``CallServices``, built once the
instance has started and handed down to both call modes.

A call never sees the ``CallCenter`` itself. It gets these services (frozen: a call cannot
swap a client for its neighbours) and, for what crosses the line between the two modes,
a narrow protocol declared by the side that needs it (``media.call.StreamFallback``).
So nothing below ``instance/`` imports it, and a test can build a call from fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from voice_trio.calls.registry import CallRegistry
from voice_trio.calls.signals import CallSignals
from voice_trio.config import Settings
from voice_trio.conversation.phrases import PhraseCache, Phrases
from voice_trio.conversation.thinking import Mind
from voice_trio.observability import LogSummary, Metrics
from voice_trio.providers.deepgram.stt import SttOptions
from voice_trio.providers.telnyx.control import TelnyxControl
from voice_trio.store import CallStore


class SpeechSynthesizer(Protocol):
    """A TTS client (Deepgram or ElevenLabs): mu-law 8 kHz audio for ``text``."""

    def synthesize(self, text: str) -> AbstractAsyncContextManager[AsyncIterator[Any]]: ...


class Spawn(Protocol):
    """Run ``fn(*args)`` in the instance's background nursery; errors are logged there."""

    def __call__(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CallServices:
    settings: Settings
    metrics: Metrics
    registry: CallRegistry  # the calls running in this process
    signals: CallSignals  # key presses and machine detection on their way to media calls
    going_away: trio.Event  # set when the server drains: no new call, no new turn
    telnyx: TelnyxControl
    tts: SpeechSynthesizer
    mind: Mind  # Claude with the persona: the agent's side of a turn
    phrases: Phrases  # the fixed phrases in AGENT_LANGUAGE
    phrase_cache: PhraseCache  # their audio, synthesized ahead
    stt_options: SttOptions
    store: CallStore | None  # None when the store could not be opened
    instance_id: str  # this process in the store (the holder of its media calls)
    stream_secret: bytes  # what media-stream tokens are signed with
    refused_streams: LogSummary  # sockets that could not prove their call, summarised
    spawn: Spawn
    # Hang a call up even while its task is being cancelled (shielded, bounded).
    hang_up: Callable[[str], Awaitable[None]]
    # True for the first claim, deployment-wide, on a call's media stream.
    claim_stream: Callable[[str], Awaitable[bool]]
