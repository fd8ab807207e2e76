"""The call center: what every call on this instance shares, and how webhooks act on calls.

One ``CallCenter`` per server. It owns the shared HTTP client, the Telnyx control client,
the registry of running calls and the metrics. Webhook reactions run as background tasks
in the center's own nursery so the webhook itself is answered at once, and each reaction
catches its own errors: a failing command for one call never disturbs another. At the end
that work is given ``BACKGROUND_GRACE_SECONDS`` to finish (then cancelled) *before* the
store and the clients close, and webhooks that come later are refused (``accepting_work``)
so that Telnyx retries them elsewhere instead of losing them.

A call in fallback mode (``voice_trio.fallback.calls``) keeps its state in the store, so its
webhooks may land on any instance; ``call.hangup`` ends any call here through the registry
(and a fallback call everywhere, through the store). A fact for a media call held by another
process is passed on to it over the call-event bus (``calls.bus``, ``instance.live``), which
runs in the background nursery while the store is open (PostgreSQL only).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from voice_trio.calls import stream_token
from voice_trio.calls.bus import EventBus
from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.registry import CallRegistry, RecentCalls, SeenEvents
from voice_trio.calls.services import CallServices
from voice_trio.calls.signals import SIGNAL_EVENTS, CallSignals
from voice_trio.calls.tool_desk import ToolDesk
from voice_trio.config import Settings
from voice_trio.conversation.persona import load_persona, persona_is_cacheable
from voice_trio.conversation.phrases import PhraseCache, local_now, phrases_for
from voice_trio.conversation.sentences import SentenceChunker
from voice_trio.conversation.thinking import Mind
from voice_trio.conversation.tools import offered_tools, tool_specs
from voice_trio.fallback.calls import FallbackCalls
from voice_trio.instance.live import LiveCalls
from voice_trio.observability import LogSummary, Metrics, call_id_var
from voice_trio.providers.claude import ClaudeClient
from voice_trio.providers.claude_cache import min_cacheable_tokens, tokens_at_least
from voice_trio.providers.deepgram.stt import SttOptions
from voice_trio.providers.deepgram.tts import DeepgramTTS
from voice_trio.providers.elevenlabs_tts import ElevenLabsTTS
from voice_trio.providers.telnyx.control import (
    CALL_ALREADY_ENDED,
    DialResult,
    TelnyxControl,
    TelnyxError,
    decode_client_state,
    encode_client_state,
)
from voice_trio.providers.telnyx.webhooks import WebhookEvent
from voice_trio.providers.tool_http import ToolClient
from voice_trio.recordings import SWEEP_EVERY_SECONDS, sweep
from voice_trio.store import CallStore, StoreError, store_for
from voice_trio.store.records import SERVER_LOST

log = logging.getLogger("voice_trio.calls")

# What webhook reactions already running at shutdown get to finish (a hang-up, a record).
BACKGROUND_GRACE_SECONDS = 2.0
# The drain after DRAIN_TIMEOUT: a goodbye, then a hang-up for whatever is left. With the
# server's own closing (server.CLOSE_SECONDS) the process exits within DRAIN_TIMEOUT +
# DRAIN_TAIL_SECONDS of the first signal (docs/deploy.md).
GOODBYE_SECONDS = 4.0
HANG_UP_SECONDS = 2.0
# Liveness in the shared store: an instance not seen for STALE_AFTER is dead, and the calls
# it held are ended (SERVER_LOST) by whichever instance notices first, or at the next start.
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 35.0


@dataclass(frozen=True, slots=True)
class CallRequest:
    """An outbound call as the API asked for it."""

    telefono: str
    nombre: str
    contexto: str = ""
    saludo: str = ""

    def client_state(self) -> str:
        state: dict[str, Any] = {"dir": "outbound", "nombre": self.nombre}
        if self.contexto:
            state["contexto"] = self.contexto
        if self.saludo:
            state["saludo"] = self.saludo
        return encode_client_state(state)


class CallCenter:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        worker: str = "w1",
        shares_port: bool = False,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        # Which process of the host this is (``w1`` … under ``voice-trio serve``); with
        # ``shares_port``, other processes serve the same host and port.
        self.worker = worker
        self.registry = CallRegistry()
        self.seen_events = SeenEvents()
        # Sockets that could not prove their call: a summary, never what they sent.
        self.refused_streams = LogSummary(log, "🔌 Media streams refused before any provider")
        self.signals = CallSignals()  # key presses and machine detection for media calls
        self._claimed_streams = RecentCalls()  # media streams claimed through this instance
        self.started_monotonic = time.monotonic()
        self.going_away = trio.Event()
        self.phrases = phrases_for(settings.agent_language)
        self.persona = load_persona(settings.persona_prompt_file, settings.agent_language)
        # Whether the persona gets a prompt-cache breakpoint (``Mind.cache_persona``).
        self.cache_persona = {
            can_transfer: persona_is_cacheable(
                settings.claude_model,
                self.persona,
                can_transfer=can_transfer,
                http=settings.http_tools,
            )
            for can_transfer in (False, True)
        }
        self.stt_options = SttOptions(
            model=settings.deepgram_stt_model,
            language=settings.agent_language,
            endpointing_ms=settings.stt_endpointing_ms,
            utterance_end_ms=settings.stt_utterance_end_ms,
        )
        self.http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self._background_done = trio.Event()
        self._stopped = trio.Event()
        self._hurried = 0
        self._drained = False
        self._stage_scope: trio.CancelScope | None = None
        # Set by start(); a CallCenter that has not started serves no call.
        self.telnyx: TelnyxControl = None  # type: ignore[assignment]
        self.tts: DeepgramTTS = None  # type: ignore[assignment]
        self.claude: ClaudeClient = None  # type: ignore[assignment]
        self.phrase_cache: PhraseCache = None  # type: ignore[assignment]
        self.store: CallStore | None = None
        # What calls may use of this instance, and the fallback-mode calls: set by start().
        self.services: CallServices = None  # type: ignore[assignment]
        self.fallback: FallbackCalls = None  # type: ignore[assignment]
        self.live: LiveCalls = None  # type: ignore[assignment]  # live calls here or elsewhere
        # Stream tokens must verify on every instance: set SERVER_SECRET when there are
        # several; a single instance can make up its own.
        self.stream_secret = (settings.server_secret or secrets.token_hex(32)).encode()
        # This process in the store. A restart on the same host and port takes the same
        # name, which tells the store that the previous process is gone (port 0: never).
        # Workers sharing a port are told apart by their worker: with one name, each
        # start would drop its siblings' rows and end their calls as ``server_lost``.
        self.instance_id = secrets.token_hex(8)
        host = socket.gethostname()
        self.instance_name = f"{host}:{settings.port or self.instance_id}"
        # Local until the store is open; PostgreSQL gives it other processes to talk to.
        self.bus = EventBus(None, self.instance_id, self.metrics)
        if shares_port:
            self.instance_name += f"/{worker}"

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def accepting_work(self) -> bool:
        """False once ``stop()`` has begun: new webhooks are refused with 503."""
        return self._nursery is not None and not self._stopping.is_set()

    async def start(self, nursery: trio.Nursery) -> None:
        """Open shared clients; the center's background work runs in a nursery of its own
        inside ``nursery`` (the server's), which ``stop()`` winds down before closing them."""
        await nursery.start(self._run_background)
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
        self.tts = self._voice()
        self.claude = ClaudeClient(
            api_key=self.settings.anthropic_api_key or "unset",
            base_url=self.settings.anthropic_base_url,
            model=self.settings.claude_model,
            max_tokens=max(64, self.settings.max_response_length // 2 + 64),
            timeout=10.0,
            usage_sink=self.metrics.count_llm_usage,
        )
        self._log_prompt_caching()
        self.phrase_cache = PhraseCache(self._synthesize)
        if self.settings.deepgram_api_key or self.settings.elevenlabs_api_key:
            self.spawn(self.phrase_cache.warm, self.phrases.fixed())
        store = store_for(self.settings)
        try:
            await store.open()
            self.store = store
        except StoreError as exc:
            log.error("Call records are not being kept: the store is unavailable (%s)", exc)
        self.services = self._services()
        self.fallback = FallbackCalls(self.services)
        if self.store is not None:
            try:
                await store.register_instance(self.instance_id, self.instance_name)
                await self._end_orphaned_calls()
            except StoreError as exc:
                log.warning("Could not check for calls left by a stopped server: %s", exc)
            self.spawn(self._keep_alive, store)
            self.bus = EventBus(store, self.instance_id, self.metrics)
        if self.settings.recordings_dir:
            self.spawn(self._sweep_recordings)
        self.live = LiveCalls(self.services, self.fallback, self.bus)
        if self.bus.shared and self._nursery is not None:
            await self._nursery.start(self._run_bus)

    async def _run_bus(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Hear other processes' events until ``stop()`` begins (not background work that
        stop() should wait for: calls have ended by then)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run, self.live.on_event)
            # The consoles of every process see every live call (calls.feed).
            self.registry.feed.on_publish = self.live.share_feed
            nursery.start_soon(self.live.relay_feed)
            task_status.started()
            await self._stopping.wait()
            nursery.cancel_scope.cancel()

    async def _keep_alive(self, store: CallStore) -> None:
        """Heartbeat in the shared store, and end the calls of instances that died."""
        while True:
            with trio.move_on_after(HEARTBEAT_SECONDS):
                await self._stopping.wait()
                return  # not background work that stop() should wait for
            try:
                await store.heartbeat(self.instance_id, self.instance_name)
                await self._end_orphaned_calls()
            except StoreError as exc:
                log.warning("Store heartbeat failed: %s", exc)

    async def _sweep_recordings(self) -> None:
        """Delete recordings older than ``RECORDING_RETENTION_DAYS``: now, then hourly."""
        directory = self.settings.recordings_dir
        max_age = self.settings.recording_retention_days * 86400.0
        while True:
            try:
                removed = await trio.to_thread.run_sync(sweep, directory, max_age)
            except OSError as exc:
                log.warning("🎙️ Recording sweep failed: %s", exc)
            else:
                if removed:
                    log.info("🎙️ %d recording(s) past retention deleted", removed)
            with trio.move_on_after(SWEEP_EVERY_SECONDS):
                await self._stopping.wait()
                return  # not background work that stop() should wait for

    async def _end_orphaned_calls(self) -> None:
        assert self.store is not None
        idle = self.settings.max_call_seconds + STALE_AFTER_SECONDS
        ended = await self.store.end_orphaned_calls(STALE_AFTER_SECONDS, idle)
        for ccid in ended:
            log.warning("📴 Call %s ended (%s): the server that held it stopped", ccid, SERVER_LOST)

    def _services(self) -> CallServices:
        s = self.settings
        desk = None
        if s.http_tools:
            assert self.http is not None
            client = ToolClient(self.http, s.tools_secret, s.tool_result_max_chars)
            desk = ToolDesk(client, self.spawn, self.metrics, self.store)
        mind = Mind(
            claude=self.claude,
            persona=self.persona,
            cache_persona=self.cache_persona,
            apology=self.phrases.apology,
            timezone=s.timezone,
            max_response_length=s.max_response_length,
            history_limit=s.conversation_history_limit,
            http_tools=s.http_tools,
            tool_runner=desk,
            tool_wait_s=s.tool_wait_ms / 1000,
            waiting_phrase=self.phrases.waiting,
        )
        return CallServices(
            settings=s,
            metrics=self.metrics,
            registry=self.registry,
            signals=self.signals,
            going_away=self.going_away,
            telnyx=self.telnyx,
            tts=self.tts,
            mind=mind,
            phrases=self.phrases,
            phrase_cache=self.phrase_cache,
            stt_options=self.stt_options,
            store=self.store,
            instance_id=self.instance_id,
            stream_secret=self.stream_secret,
            refused_streams=self.refused_streams,
            spawn=self.spawn,
            hang_up=self.hang_up,
            claim_stream=self.claim_stream,
        )

    def _log_prompt_caching(self) -> None:
        s = self.settings
        tools = tool_specs(offered_tools(can_transfer=bool(s.transfer_number), http=s.http_tools))
        tokens = tokens_at_least(tools, [self.persona])
        minimum = min_cacheable_tokens(s.claude_model)
        if self.cache_persona[bool(s.transfer_number)]:
            log.info("⚡ Prompt caching on: tools + persona ≥ %d tokens", tokens)
        else:
            log.info(
                "⚡ Prompt caching off: tools + persona ≈ %d+ tokens, %s caches %d or more",
                tokens,
                s.claude_model,
                minimum,
            )

    def _voice(self) -> Any:
        """The TTS client TTS_PROVIDER names; both yield mu-law 8 kHz audio."""
        s = self.settings
        if s.tts_provider == "elevenlabs":
            return ElevenLabsTTS(
                api_key=s.elevenlabs_api_key,
                voice_id=s.elevenlabs_voice_id,
                base_url=s.elevenlabs_api_base,
                model_id=s.elevenlabs_model,
            )
        assert self.http is not None
        return DeepgramTTS(self.http, s.deepgram_api_base, s.deepgram_api_key, s.deepgram_tts_model)

    async def _synthesize(self, text: str) -> bytes:
        async with self.tts.synthesize(text) as audio:
            return b"".join([chunk async for chunk in audio])

    async def shut_down(self, drain_timeout: float) -> None:
        """Graceful drain, in three stages; ``hurry()`` (a further signal) skips the rest of
        the stage under way:

        1. new calls are refused (inbound rejected, API 503); running ones may finish on
           their own for ``drain_timeout`` seconds;
        2. each says goodbye and hangs up (``GOODBYE_SECONDS`` at most);
        3. whatever still runs is ended (record: ``shutdown``) and hung up, shielded and
           bounded (``HANG_UP_SECONDS``). No call is left up, whatever the signals.
        """
        self.going_away.set()
        if len(self.registry):
            log.info(
                "Draining: %d call(s) may finish within %ss", len(self.registry), drain_timeout
            )
        await self._drain_stage(1, drain_timeout)
        for call in self.registry:
            call.wind_down.set()
        await self._drain_stage(2, GOODBYE_SECONDS)
        await self._hang_up_the_rest()
        self._drained = True

    def hurry(self) -> str:
        """Skip the rest of the drain stage under way; say what happens now."""
        self._hurried += 1
        if self._stage_scope is not None:
            self._stage_scope.cancel()
        if not self.going_away.is_set():
            return "not draining yet"
        if self._drained:
            return "every call has ended; the server is closing"
        return {1: "saying goodbye on every call now"}.get(
            self._hurried, "hanging up every call now"
        )

    async def _drain_stage(self, stage: int, seconds: float) -> None:
        if self._hurried >= stage:
            return
        with trio.move_on_after(seconds) as self._stage_scope:
            await self.registry.wait_until_empty()
        self._stage_scope = None

    async def _hang_up_the_rest(self) -> None:
        rest = list(self.registry)
        if not rest:
            return
        log.warning("Hanging up %d call(s) still running", len(rest))
        self.registry.end_all(EndReason.SHUTDOWN)
        async with trio.open_nursery() as nursery:
            for call in rest:
                if call.mode == CallMode.MEDIA:  # a fallback call's state decides its own end
                    nursery.start_soon(self.hang_up, call.call_control_id, HANG_UP_SECONDS)
        with trio.CancelScope(shield=True), trio.move_on_after(HANG_UP_SECONDS):
            await self.registry.wait_until_empty()

    async def _run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._stopping.wait()
                nursery.cancel_scope.deadline = trio.current_time() + BACKGROUND_GRACE_SECONDS
        finally:
            self._nursery = None
            self._background_done.set()

    async def stop(self) -> None:
        """End whatever still runs, let background work finish (bounded), then close the
        store and the clients: nothing started here outlives what it needs. Idempotent."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self.going_away.set()
        self._stopping.set()
        self.registry.end_all(EndReason.SHUTDOWN)
        with trio.CancelScope(shield=True):
            if self._nursery is not None:
                await self._background_done.wait()
            if self.store is not None:
                with trio.move_on_after(2):
                    try:
                        await self.store.forget_instance(self.instance_id)
                    except StoreError as exc:
                        log.debug("Instance not forgotten: %s", exc)
                await self.store.aclose()
            if self.claude is not None:
                await self.claude.aclose()
            if self.http is not None:
                await self.http.aclose()
        self._stopped.set()

    async def hang_up(self, call_control_id: str, within: float = 5.0) -> None:
        """Hang a call up even while its task is being cancelled (shielded, at most
        ``within`` seconds); a failure is logged, never raised: the call is ending anyway."""
        with trio.CancelScope(shield=True), trio.move_on_after(within):
            try:
                await self.telnyx.hangup(call_control_id)
            except Exception as exc:
                log.warning("Hang-up failed: %s", exc)

    def spawn(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the background; its errors are logged, never propagated."""
        # During stop()'s grace this still runs (a reaction's follow-up, bounded by the
        # same deadline); after it, nothing may start.
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
            answering_machine_detection=self.settings.answering_machine_detection,
        )
        # The phone rings for seconds: time enough to have the greeting's audio ready.
        greeting = self.phrases.greeting(
            nombre=request.nombre, saludo=request.saludo, now=local_now(self.settings.timezone)
        )
        chunker = SentenceChunker()
        self.spawn(self.phrase_cache.warm, chunker.push(greeting) + chunker.flush())
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
            if self.registry.end(ccid, EndReason.HANGUP):
                log.info("📴 Call hung up (%s)", cause)
            else:
                log.debug("call.hangup for a call not running here (%s)", cause)
                await self.live.pass_on(ccid, kind, event.payload)
        elif await self.fallback.deliver(event):
            return  # applied to the call's fallback-mode state, shared by every instance
        elif kind == "call.initiated":
            if event.payload.get("direction") == "incoming":
                if self.going_away.is_set():
                    log.info("📵 Inbound call refused: server is shutting down")
                    await self.telnyx.command(ccid, "reject", {"cause": "USER_BUSY"})
                    return
                log.info("📞 Inbound call from %s, answering", event.payload.get("from"))
                state = event.client_state or encode_client_state({"dir": "inbound"})
                await self.telnyx.answer(ccid, client_state=state)
        elif kind == "call.answered":
            if self.settings.use_media_streams:
                await self._start_stream(ccid, event.client_state)
            else:
                self.fallback.answered(event)
        elif kind in SIGNAL_EVENTS:
            here = self.signals.deliver(ccid, kind, event.payload)
            if not here and self.registry.get(ccid) is None:
                # Kept here in case the call's socket comes here; passed on in case it
                # came (or comes) to another process.
                await self.live.pass_on(ccid, kind, event.payload)
        elif kind == "streaming.failed":
            if not await self.fallback.stream_failed(event):
                # Claimed by a socket elsewhere: the process holding it hands the call over.
                await self.live.pass_on(ccid, kind, event.payload)
        else:
            log.debug("Webhook %s: nothing to do", kind)

    async def _start_stream(self, ccid: str, client_state: str | None) -> None:
        """``streaming_start``; the call degrades to fallback mode if no socket comes."""
        self.fallback.expect_stream(ccid)
        log.info("Streaming Start requested → %s", self.settings.stream_url)
        token = stream_token.issue(self.stream_secret, ccid)
        try:
            await self.telnyx.streaming_start(
                ccid,
                stream_url=self.settings.stream_url,
                client_state=client_state,
                auth_token=token,
            )
        except TelnyxError as exc:
            if exc.code == CALL_ALREADY_ENDED:
                self.fallback.hung_up(ccid)
            log.warning("⚠️ Streaming Start failed: %s", exc)
        await self.fallback.await_stream(ccid, client_state)

    async def claim_stream(self, call_control_id: str) -> bool:
        """True for the first claim, deployment-wide, on the call's media stream: by the
        socket that proved the call, or by the decision that none will come. Asks this
        instance's memory first, then the shared store; if the store cannot answer, memory
        decides alone (the token was valid: an outage must not cost the call its stream)."""
        if call_control_id in self._claimed_streams:
            return False
        self._claimed_streams.add(call_control_id)
        if self.store is None:
            return True
        try:
            return await self.store.claim_stream(call_control_id)
        except StoreError as exc:
            self.metrics.store_errors.labels("claim_stream").inc()
            log.warning("🔌 Stream claims not shared (store unavailable: %s)", exc)
            return True

    def client_context(self, client_state: str | None) -> dict[str, Any]:
        return decode_client_state(client_state)
