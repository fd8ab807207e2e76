"""The call center: what every call on this instance shares, and how webhooks act on calls.

One ``CallCenter`` per server. It owns the shared HTTP client, the Telnyx control client,
the registry of running calls and the metrics. Webhook reactions run as background tasks
in the server's nursery so the webhook itself is answered at once, and each reaction
catches its own errors: a failing command for one call never disturbs another.

A call in fallback mode (``voice_trio.calls.degrade``) consumes its own webhooks, in order,
from its inbox; ``call.hangup`` ends any call here through the registry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from voice_trio.calls.degrade import FallbackCalls
from voice_trio.calls.persona import load_persona
from voice_trio.calls.phrases import PhraseCache, phrases_for
from voice_trio.calls.registry import CallRegistry, SeenEvents
from voice_trio.config import Settings
from voice_trio.observability import Metrics, call_id_var
from voice_trio.providers.claude import ClaudeClient
from voice_trio.providers.deepgram_stt import SttOptions
from voice_trio.providers.deepgram_tts import DeepgramTTS
from voice_trio.providers.telnyx_control import (
    CALL_ALREADY_ENDED,
    DialResult,
    TelnyxControl,
    TelnyxError,
    decode_client_state,
    encode_client_state,
)
from voice_trio.providers.telnyx_webhooks import WebhookEvent

log = logging.getLogger("voice_trio.calls")


@dataclass(frozen=True, slots=True)
class CallRequest:
    """An outbound call as the API asked for it."""

    telefono: str
    nombre: str
    contexto: str = ""
    saludo: str = ""

    def client_state(self) -> str:
        state: dict[str, Any] = {"nombre": self.nombre}
        if self.contexto:
            state["contexto"] = self.contexto
        if self.saludo:
            state["saludo"] = self.saludo
        return encode_client_state(state)


class CallCenter:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = CallRegistry()
        self.seen_events = SeenEvents()
        self.fallback = FallbackCalls(self)
        self.started_monotonic = time.monotonic()
        self.going_away = trio.Event()
        self.phrases_text = phrases_for(settings.agent_language)
        self.persona = load_persona(settings.persona_prompt_file)
        self.stt_options = SttOptions(
            model=settings.deepgram_stt_model,
            language=settings.agent_language,
            endpointing_ms=settings.stt_endpointing_ms,
            utterance_end_ms=settings.stt_utterance_end_ms,
        )
        self.http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        # Set by start(); a CallCenter that has not started serves no call.
        self.telnyx: TelnyxControl = None  # type: ignore[assignment]
        self.tts: DeepgramTTS = None  # type: ignore[assignment]
        self.claude: ClaudeClient = None  # type: ignore[assignment]
        self.phrase_cache: PhraseCache = None  # type: ignore[assignment]

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic

    async def start(self, nursery: trio.Nursery) -> None:
        """Open shared clients; background work goes into ``nursery`` (the server's)."""
        self._nursery = nursery
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            timeout=httpx.Timeout(10.0, connect=3.0),
        )
        self.telnyx = TelnyxControl(
            self.http,
            api_key=self.settings.telnyx_api_key,
            base_url=self.settings.telnyx_api_base,
            on_command=lambda action, outcome: self.metrics.telnyx_commands.labels(
                action, outcome
            ).inc(),
        )
        self.tts = DeepgramTTS(
            self.http,
            self.settings.deepgram_api_base,
            self.settings.deepgram_api_key,
            self.settings.deepgram_tts_model,
        )
        self.claude = ClaudeClient(
            api_key=self.settings.anthropic_api_key or "unset",
            base_url=self.settings.anthropic_base_url,
            model=self.settings.claude_model,
            max_tokens=max(64, self.settings.max_response_length // 2 + 64),
            timeout=10.0,
        )
        self.phrase_cache = PhraseCache(self._synthesize)
        if self.settings.deepgram_api_key:
            self.spawn(self.phrase_cache.warm, self.phrases_text.fixed())

    async def _synthesize(self, text: str) -> bytes:
        async with self.tts.synthesize(text) as audio:
            return b"".join([chunk async for chunk in audio])

    async def shut_down(self, grace: float) -> None:
        """Refuse new calls, end the running ones, and wait (bounded) until they are gone."""
        self.going_away.set()
        self.registry.end_all("shutdown")
        with trio.move_on_after(grace):
            await self.registry.wait_until_empty()

    async def stop(self) -> None:
        self.going_away.set()
        self.registry.end_all("shutdown")
        with trio.CancelScope(shield=True):
            if self.claude is not None:
                await self.claude.aclose()
            if self.http is not None:
                await self.http.aclose()

    def spawn(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the background; its errors are logged, never propagated."""
        if self._nursery is None:
            raise RuntimeError("call center is not running")
        self._nursery.start_soon(self._guarded, fn, args)

    async def _guarded(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except TelnyxError as exc:
            log.warning("⚠️ Telnyx command failed: %s", exc)
        except Exception:
            log.exception("background task failed")

    async def place_call(self, request: CallRequest) -> DialResult:
        assert self.telnyx is not None
        result = await self.telnyx.dial(
            connection_id=self.settings.telnyx_connection_id,
            to=request.telefono,
            from_=self.settings.telnyx_phone_number,
            webhook_url=self.settings.webhook_url,
            client_state=request.client_state(),
        )
        token = call_id_var.set(result.call_control_id)
        try:
            log.info("📞 Outbound call to %s placed (%s)", request.telefono, request.nombre)
        finally:
            call_id_var.reset(token)
        return result

    async def handle_event(self, event: WebhookEvent) -> None:
        """React to one (verified, first-seen) Telnyx webhook event."""
        ccid = event.call_control_id
        token = call_id_var.set(ccid or "-")
        try:
            await self._react(event, ccid)
        finally:
            call_id_var.reset(token)

    async def _react(self, event: WebhookEvent, ccid: str) -> None:
        assert self.telnyx is not None
        kind = event.event_type
        if kind == "call.hangup":
            cause = event.payload.get("hangup_cause", "")
            self.fallback.hung_up(ccid)
            if self.registry.end(ccid, "hangup"):
                log.info("📴 Call hung up (%s)", cause)
            else:
                log.debug("call.hangup for a call not running here (%s)", cause)
        elif self.fallback.deliver(event):
            return  # a call in fallback mode handles its own events, one at a time
        elif kind == "call.initiated":
            if event.payload.get("direction") == "incoming":
                if self.going_away.is_set():
                    log.info("📵 Inbound call refused: server is shutting down")
                    await self.telnyx.command(ccid, "reject", {"cause": "USER_BUSY"})
                    return
                log.info("📞 Inbound call from %s, answering", event.payload.get("from"))
                await self.telnyx.answer(ccid, client_state=event.client_state or None)
        elif kind == "call.answered":
            if self.settings.use_media_streams:
                await self._start_stream(ccid, event.client_state)
            else:
                self.fallback.answered(event)
        elif kind == "streaming.failed":
            self.fallback.stream_failed(event)
        else:
            log.debug("Webhook %s: nothing to do", kind)

    async def _start_stream(self, ccid: str, client_state: str | None) -> None:
        """``streaming_start``; the call degrades to fallback mode if no socket comes."""
        self.fallback.expect_stream(ccid)
        log.info("Streaming Start requested → %s", self.settings.stream_url)
        try:
            await self.telnyx.streaming_start(
                ccid, stream_url=self.settings.stream_url, client_state=client_state
            )
        except TelnyxError as exc:
            if exc.code == CALL_ALREADY_ENDED:
                self.fallback.hung_up(ccid)
            log.warning("⚠️ Streaming Start failed: %s", exc)
        await self.fallback.await_stream(ccid, client_state)

    def client_context(self, client_state: str | None) -> dict[str, Any]:
        return decode_client_state(client_state)
