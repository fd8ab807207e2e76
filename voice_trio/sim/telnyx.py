"""Telnyx Call Control simulator: REST API, call state, signed webhooks, and the carrier.

Follows ``shared/docs/protocols/telnyx.md``. :class:`TelnyxSim` is a raw ASGI app served by
:func:`serve` on loopback; the API base is ``base_url + "/v2"``.

REST. ``Authorization: Bearer <key>`` (``api_key=None`` accepts any non-empty key; otherwise
401 with the Telnyx error envelope). ``POST /v2/calls`` dials; ``GET /v2/calls/{id}`` gives the
call's status; ``POST /v2/calls/{id}/actions/{action}`` runs a command and answers
``{"data":{"result":"ok"}}``. Bodies are validated strictly: missing fields are 422 code
``10004``, bad values (E.164 numbers, enums — case-sensitive — base64 ``client_state``,
``ws``/``wss`` stream URLs, ranges) 422 code ``10015``, each error with ``source.pointer``;
unknown fields are accepted and noted in ``sim.warnings``. An unknown call is 404 ``90015``;
a command to an ended call 422 ``90018`` "Call has already ended"; a command the call's state
does not allow (e.g. ``speak`` before answer) 422 ``90053``. A repeated ``command_id`` on the
same call (or on dial) within 60 s answers 200 and does nothing (a repeated dial returns the
first call). Every request is kept in ``sim.requests`` (bounded); ``sim.fail_next(n, status,
retry_after=...)`` makes the next ``n`` requests fail (429 with ``Retry-After``, 500, 503).

Flows (webhook order per call is guaranteed; see :mod:`voice_trio.sim.telnyx_webhooks`):

- Outbound: dial -> ``call.initiated`` (outgoing, bridging) -> after ``ring_ms`` the callee
  (``answer_with`` / ``callee_factory``; default a silent party) answers -> ``call.answered``;
  or declines -> ``call.hangup`` ``user_busy``; or never answers -> ``call.hangup``
  ``timeout`` after ``timeout_secs`` (or ``no_answer_timeout_s``). Dial stream fields start
  the stream after answer (before ringing with ``stream_establish_before_call_originate``).
- Inbound: :meth:`TelnyxSim.place_inbound_call` -> ``call.initiated`` (incoming, parked) to
  ``default_webhook_url`` -> the server's ``answer`` -> ``call.answered`` (+ stream if the
  answer carries ``stream_url``). Unanswered after ``answer_timeout_s``, the caller gives up.
- ``streaming_start``: the carrier opens the WebSocket, sends ``connected`` + ``start``, then
  ``streaming.started`` is sent (after the socket is up). The stream's codec is Telnyx's
  documented choice: the ``stream_codec`` asked for if the call (``call_codec``) has it or it
  can be transcoded (PCMU <-> PCMA only), else the call's own; ``stream_codec`` (the knob)
  forces one whatever was asked (a Telnyx that does not transcode). A G722, OPUS, AMR-WB or L16
  stream is opened and announced like any other, but its audio is placeholder bytes. A
  ``stream_auth_token`` comes back as the ``x-telnyx-streaming-auth-token`` upgrade header and
  in the ``connected`` frame (``stream_auth_header`` / ``stream_auth_in_connected`` turn
  either off); ``strip_stream_query`` connects without the ``stream_url``'s query string,
  as a carrier that keeps only the documented channels would. A socket
  that cannot be opened, a non-loopback URL, or a bidirectional codec the sim cannot play
  (anything but PCMU/PCMA at 8000 Hz) gives ``streaming.failed``. ``streaming_stop``/hang-up: ``stop`` frame, close 1000,
  ``streaming.stopped``; a server that closes the socket also gets ``streaming.stopped``.
  ``SimCall.drop_stream()`` (a fault knob) closes the socket without ``stop`` while the call
  stays up, as a broken media path would.
- Hang-up (REST ``hangup``, the party's ``hang_up``, time limit): ``streaming.stopped``, any
  ``call.speak.ended``/``call.playback.ended`` with status ``call_hangup``, then
  ``call.hangup`` (``normal_clearing``, ``sip_hangup_cause`` "200", ``call_quality_stats``).
  With ``stream_lingers_after_hangup_s`` (a fault knob: the ``stop`` frame is lost) the
  media socket stays open, silent, after ``call.hangup`` until the server closes it or that
  time has passed.
  ``hangup_source`` is the party that hung up in Telnyx's terms: on an inbound call the
  simulated person is the ``caller`` and the server the ``callee``; on an outbound call the
  other way round.
- ``speak``: ``call.speak.started``, the text as simulated speech (``speak_ms_per_char``)
  played to the party, ``call.speak.ended`` (completed). ``playback_start`` plays
  ``playback_ms`` of silence between ``call.playback.started``/``ended``.
- ``transcription_start``: the party's audio is decoded (:class:`SpeechDecoder`) and
  ``call.transcription`` sent: interim results every ``transcription_interim_ms`` when the
  engine config asks for ``interim_results``, a final after ``transcription_silence_ms`` of
  silence. Key presses give ``call.dtmf.received`` (and a ``dtmf`` media frame; with
  ``dtmf_frames=False`` the webhook only).
- Also: ``reject`` (``call.hangup`` ``call_rejected``/``user_busy``); ``transfer`` (the stream
  stops; leg B — answered by whoever ``answer_with`` registered for the number — reports
  ``call.initiated``, then ``call.answered`` + ``call.bridged`` on both legs after its ring, or
  ``call.hangup`` ``user_busy``/``timeout``; the transferred leg stays up); ``send_dtmf`` (the
  digits are reported to the party); ``client_state_update``; dial
  ``answering_machine_detection`` (``call.machine[.premium].detection.ended`` after
  ``amd_ms``: human unless the callee was registered with ``machine=True``; on a machine, for
  ``greeting_end``/``detect_words``/``detect_beep``/``premium``, ``call.machine[.premium]
  .greeting.ended`` once the machine's voice is followed by ``amd_greeting_silence_ms`` of
  silence); ``time_limit_secs`` (``call.hangup`` ``time_limit``).

Knobs are the keyword arguments of :class:`TelnyxSim` (all plain attributes afterwards);
webhook delivery knobs and faults live on ``sim.webhooks`` (``attempts``, ``backoff_s``,
``timeout_s``, ``faults.duplicate|reorder|stale_timestamp|bad_signature``). Only loopback
webhook and stream URLs are contacted unless ``allow_remote=True``. Not simulated: the
failover webhook URL, ``webhook_url_method: GET`` (accepted, delivered as POST), MP3
bidirectional playback, audio in codecs other than PCMU/PCMA, and the commands in
``telnyx_rest.NOOP_ACTIONS`` (accepted and ignored, with a warning).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote

import httpx
import trio

from voice_trio.sim._serve import answer_lifespan, read_body, serve_asgi
from voice_trio.sim.carrier import STREAM_CODEC_RATES, AudioPort
from voice_trio.sim.speech import DEFAULT_MS_PER_CHAR, encode_speech, silence
from voice_trio.sim.telnyx_calls import COMMAND_ID_WINDOW_S, Callee, SimCall
from voice_trio.sim.telnyx_rest import (
    ACTIONS,
    DIAL_FIELDS,
    NOOP_ACTIONS,
    Check,
    Response,
    check_dial,
    error_response,
)
from voice_trio.sim.telnyx_webhooks import WebhookSender, WebhookSigner

log = logging.getLogger(__name__)

RECORDED_HEADERS = ("authorization", "content-type", "user-agent", "idempotency-key")
_FAULT_ERRORS = {
    429: ("10011", "Too many requests"),
    500: ("10007", "Unexpected error"),
    503: ("10008", "Service unavailable"),
}
_OK: Response = (200, {"data": {"result": "ok"}}, [])


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    status: int = 0
    at: float = field(default_factory=time.time)


class TelnyxSim:
    """The simulated Telnyx account: knobs, calls, recorded requests; also the ASGI app."""

    # What a call leg is (the load generator brings one with a leaner media path).
    call_class: type[SimCall] = SimCall

    def __init__(
        self,
        *,
        api_key: str | None = None,
        default_webhook_url: str | None = None,
        connection_id: str = "1684641123236054244",
        connection_ids: set[str] | None = None,
        ring_ms: float = 300.0,
        answer_timeout_s: float = 30.0,
        no_answer_timeout_s: float | None = None,
        call_codec: str = "PCMU",
        stream_codec: str | None = None,
        strip_stream_query: bool = False,
        stream_auth_header: bool = True,
        stream_auth_in_connected: bool = True,
        out_of_order_share: float = 0.0,
        seed: int | None = None,
        speak_ms_per_char: int = DEFAULT_MS_PER_CHAR,
        playback_ms: int = 1000,
        transcription_silence_ms: int = 500,
        transcription_interim_ms: int = 300,
        amd_ms: float = 300.0,
        amd_greeting_silence_ms: float = 500.0,
        stream_connect_timeout_s: float = 5.0,
        dtmf_frames: bool = True,
        stream_lingers_after_hangup_s: float = 0.0,
        record_audio_s: float = 10.0,
        webhook_attempts: int = 3,
        webhook_backoff_ms: float = 200.0,
        webhook_timeout_s: float = 5.0,
        allow_remote: bool = False,
        history: int = 1000,
        max_ended_calls: int = 10_000,
    ) -> None:
        self.api_key = api_key
        self.default_webhook_url = default_webhook_url
        self.connection_id = connection_id
        self.connection_ids = connection_ids
        self.ring_ms = ring_ms
        self.answer_timeout_s = answer_timeout_s
        self.no_answer_timeout_s = no_answer_timeout_s
        self.call_codec = call_codec
        self.stream_codec = stream_codec
        self.strip_stream_query = strip_stream_query
        self.stream_auth_header = stream_auth_header
        self.stream_auth_in_connected = stream_auth_in_connected
        self.out_of_order_share = out_of_order_share
        self.rng = random.Random(seed)
        self.speak_ms_per_char = speak_ms_per_char
        self.playback_ms = playback_ms
        self.transcription_silence_ms = transcription_silence_ms
        self.transcription_interim_ms = transcription_interim_ms
        self.amd_ms = amd_ms
        self.amd_greeting_silence_ms = amd_greeting_silence_ms
        self.stream_connect_timeout_s = stream_connect_timeout_s
        self.dtmf_frames = dtmf_frames
        self.stream_lingers_after_hangup_s = stream_lingers_after_hangup_s
        self.record_audio_s = record_audio_s
        self.max_ended_calls = max_ended_calls
        self.user_id = str(uuid.uuid4())
        self.signer = WebhookSigner()
        self.webhooks = WebhookSender(
            self.signer,
            attempts=webhook_attempts,
            backoff_s=webhook_backoff_ms / 1000,
            timeout_s=webhook_timeout_s,
            allow_remote=allow_remote,
        )
        self.calls: dict[str, SimCall] = {}
        self.requests: deque[RecordedRequest] = deque(maxlen=history)
        self.warnings: deque[str] = deque(maxlen=history)
        self.callee_factory: Callable[[str], AudioPort | None] | None = None
        self.base_url: str | None = None
        self._callees: dict[str, deque[Callee]] = {}
        self._rest_faults: deque[tuple[int, float | None]] = deque()
        self._dial_commands: dict[str, tuple[float, SimCall]] = {}
        self._ended: deque[str] = deque()
        self._nursery: trio.Nursery | None = None

    @property
    def public_key_b64(self) -> str:
        return self.signer.public_key_b64

    @property
    def allow_remote(self) -> bool:
        return self.webhooks.allow_remote

    @allow_remote.setter
    def allow_remote(self, value: bool) -> None:
        self.webhooks.allow_remote = value

    @property
    def live_calls(self) -> int:
        return sum(1 for call in self.calls.values() if call.state != "hangup")

    def fail_next(
        self, count: int = 1, status: int = 500, *, retry_after: float | None = None
    ) -> None:
        """The next ``count`` requests fail with ``status`` (429 adds ``Retry-After``)."""
        self._rest_faults.extend([(status, retry_after)] * count)

    def answer_with(
        self,
        number: str,
        party: AudioPort | None,
        *,
        behaviour: str = "answer",
        ring_ms: float | None = None,
        machine: bool = False,
    ) -> None:
        """The next dial to ``number`` is picked up by ``party`` (one registration per dial)."""
        self._callees.setdefault(number, deque()).append(Callee(party, behaviour, ring_ms, machine))

    def place_inbound_call(
        self,
        from_: str,
        to: str,
        caller: AudioPort | None = None,
        *,
        webhook_url: str | None = None,
        client_state: str | None = None,
    ) -> SimCall:
        """Someone dials ``to``: ``call.initiated`` (incoming, parked) goes to the webhook URL."""
        if self._nursery is None:
            raise RuntimeError("the Telnyx simulator is not serving; run serve(sim) first")
        call = self.call_class(
            self,
            direction="incoming",
            from_=from_,
            to=to,
            connection_id=self.connection_id,
            webhook_url=webhook_url or self.default_webhook_url,
            client_state=client_state,
            party=caller,
            options={},
        )
        self._start_call(call, None)
        call.emit("call.initiated", self._initiated_fields(call))
        return call

    def _callee_for(self, number: str) -> Callee:
        queue = self._callees.get(number)
        if queue:
            return queue.popleft()
        if self.callee_factory is not None:
            party = self.callee_factory(number)
            return Callee(party) if party is not None else Callee(None, "no_answer")
        return Callee(AudioPort())

    def _start_call(self, call: SimCall, callee: Callee | None) -> None:
        self.calls[call.call_control_id] = call
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call, callee)

    async def _run_call(self, call: SimCall, callee: Callee | None) -> None:
        try:
            await call.run(callee)
        except Exception:
            # One broken call must not take the simulator (and every other call) down.
            log.exception("simulated call %s failed", call.call_control_id)

    def _call_ended(self, call: SimCall) -> None:
        self._ended.append(call.call_control_id)
        while len(self._ended) > self.max_ended_calls:
            self.calls.pop(self._ended.popleft(), None)

    def _initiated_fields(self, call: SimCall) -> dict[str, Any]:
        return {
            "direction": call.direction,
            "state": call.state,
            "from": call.from_,
            "to": call.to,
            "caller_id_name": call.from_,
            "start_time": call.start_time,
            "offered_codecs": self._codecs(),
            "connection_codecs": self._codecs(),
            "custom_headers": [],
            "sip_headers": [],
            "tags": [],
        }

    def _codecs(self) -> str:
        return ",".join(dict.fromkeys([self.call_codec, "PCMU", "PCMA"]))

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        body = await read_body(receive)
        if body is None:
            return
        status, document, extra = self.handle(
            scope["method"], scope["path"], scope["headers"], body
        )
        raw = json.dumps(document).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers + extra})
        await send({"type": "http.response.body", "body": raw})

    def handle(
        self, method: str, path: str, raw_headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """One REST request, synchronously (all effects are state changes and started tasks)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            data = None
        recorded = RecordedRequest(
            method, path, {k: headers[k] for k in RECORDED_HEADERS if k in headers}, data
        )
        self.requests.append(recorded)
        response = self._dispatch(method, path, headers, data)
        recorded.status = response[0]
        return response

    def _dispatch(self, method: str, path: str, headers: dict[str, str], data: Any) -> Response:
        if self._rest_faults:
            status, retry_after = self._rest_faults.popleft()
            code, title = _FAULT_ERRORS.get(status, ("10007", "Unexpected error"))
            response = error_response(status, code, title, "injected by the simulator")
            if retry_after is not None:
                response[2].append((b"retry-after", str(retry_after).encode()))
            return response
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or (self.api_key and token != self.api_key):
            return error_response(
                401,
                "10009",
                "Authentication failed",
                "Could not understand the provided credentials.",
            )
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if len(parts) < 2 or parts[:2] != ["v2", "calls"]:
            return error_response(404, "10005", "Resource not found", f"no route {method} {path}")
        if not isinstance(data, dict):
            return error_response(
                400, "10015", "Invalid request body", "the body must be a JSON object", "/"
            )
        if len(parts) == 2 and method == "POST":
            return self._dial(data)
        if len(parts) == 3 and method == "GET":
            call = self.calls.get(parts[2])
            if call is None:
                return error_response(
                    404, "90015", "Invalid Call Control ID", f"no call {parts[2]!r}"
                )
            return 200, {"data": call.record(full=True)}, []
        if len(parts) == 5 and parts[3] == "actions" and method == "POST":
            return self._action(parts[2], parts[4], data)
        return error_response(404, "10005", "Resource not found", f"no route {method} {path}")

    def _dial(self, data: dict[str, Any]) -> Response:
        check = Check(data, DIAL_FIELDS, self.warnings, "POST /v2/calls")
        check_dial(check)
        check.base64("client_state")
        check.text("command_id")
        if (
            not check.errors
            and self.connection_ids
            and str(data["connection_id"]) not in self.connection_ids
        ):
            check.fail("connection_id", "unknown connection_id")
        if check.errors:
            return 422, {"errors": check.errors}, []
        command_id = data.get("command_id")
        if command_id is not None:
            now = time.monotonic()
            if len(self._dial_commands) > 1000:  # forget ids past the window (soak runs)
                self._dial_commands = {
                    k: v for k, v in self._dial_commands.items() if now - v[0] < COMMAND_ID_WINDOW_S
                }
            seen = self._dial_commands.get(command_id)
            if seen is not None and now - seen[0] < COMMAND_ID_WINDOW_S:
                return 200, {"data": seen[1].record()}, []
        if self._nursery is None:
            return error_response(
                503, "10008", "Service unavailable", "the simulator is not serving"
            )
        to = data["to"][0] if isinstance(data["to"], list) else data["to"]
        call = self.call_class(
            self,
            direction="outgoing",
            from_=data["from"],
            to=to,
            connection_id=str(data["connection_id"]),
            webhook_url=data.get("webhook_url") or self.default_webhook_url,
            client_state=data.get("client_state"),
            party=None,
            options=data,
        )
        if command_id is not None:
            self._dial_commands[command_id] = (time.monotonic(), call)
        self._start_call(call, self._callee_for(to))
        call.emit("call.initiated", self._initiated_fields(call))
        return 200, {"data": call.record()}, []

    def _action(self, call_control_id: str, action: str, data: dict[str, Any]) -> Response:
        call = self.calls.get(call_control_id)
        if call is None:
            return error_response(
                404, "90015", "Invalid Call Control ID", f"no call {call_control_id!r}"
            )
        spec = ACTIONS.get(action)
        if spec is None and action not in NOOP_ACTIONS:
            return error_response(404, "10005", "Resource not found", f"unknown action {action!r}")
        command_id = data.get("command_id")
        if isinstance(command_id, str) and call.seen_command(command_id):
            return _OK
        if call.state == "hangup":
            return error_response(
                422, "90018", "Call has already ended", "This call is no longer active."
            )
        if spec is None:
            self.warnings.append(f"{action}: accepted but not simulated")
            call.remember_command(command_id)
            return _OK
        check = Check(data, spec.fields, self.warnings, action)
        check.base64("client_state")
        check.text("command_id")
        spec.check(check)
        if check.errors:
            return 422, {"errors": check.errors}, []
        if call.state not in spec.states:
            return error_response(
                422,
                "90053",
                "Command not allowed in the current call state",
                f"{action} is not allowed while the call is {call.state}",
            )
        if action == "streaming_start" and call.line.stream is not None:
            return error_response(
                422,
                "90053",
                "Command not allowed in the current call state",
                "a stream is already active",
            )
        if data.get("client_state"):
            call.client_state = data["client_state"]
        call.remember_command(command_id)
        self._apply(call, action, data)
        return _OK

    def _apply(self, call: SimCall, action: str, data: dict[str, Any]) -> None:
        if action == "answer":
            if data.get("webhook_url"):
                call.webhook_url = data["webhook_url"]
            call.answer(data)
        elif action == "reject":
            busy = data["cause"] == "USER_BUSY"
            call.end(
                "user_busy" if busy else "call_rejected",
                "callee",
                "486" if busy else "603",
                by="bot",
            )
        elif action == "hangup":
            call.hang_up_by_server()
        elif action == "speak":
            text = data["payload"]
            if data.get("payload_type") == "ssml":
                text = " ".join(re.sub(r"<[^>]+>", " ", text).split())
            call.spoken.append(text)
            call.announce("speak", encode_speech(text, self.speak_ms_per_char), {})
        elif action == "playback_start":
            fields = {
                "media_url": data.get("audio_url"),
                "media_name": data.get("media_name"),
                "overlay": bool(data.get("overlay", False)),
            }
            call.announce("playback", silence(self.playback_ms), fields)
        elif action == "playback_stop":
            call.stop_playback()
        elif action == "streaming_start":
            call.start_stream(data)
        elif action == "streaming_stop":
            call.stop_stream()
        elif action == "transcription_start":
            config = dict(data.get("transcription_engine_config") or {})
            call.start_transcription(config, data.get("transcription_tracks") or "inbound")
        elif action == "transcription_stop":
            call.stop_transcription()
        elif action == "transfer":
            call.transfer(data["to"] if isinstance(data["to"], str) else data["to"][0], data)
        elif action == "send_dtmf":
            call.dtmf_sent.append(data["digits"])
            call.line.party.on_event("dtmf", data["digits"], trio.current_time())


async def serve(
    sim: TelnyxSim,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API and run the calls until cancelled; ``started`` gets the base URL."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    async with httpx.AsyncClient(trust_env=False, limits=limits) as client:
        sim.webhooks.client = client
        try:
            async with trio.open_nursery() as nursery:
                sim._nursery = nursery
                sim.base_url = await nursery.start(partial(serve_asgi, sim, host=host, port=port))
                task_status.started(sim.base_url)
        finally:
            sim._nursery = None
            sim.webhooks.client = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    parser.add_argument("--webhook-url", default=None, help="the connection's webhook URL")
    parser.add_argument("--ring-ms", type=float, default=300.0)
    parser.add_argument(
        "--codec", choices=sorted(STREAM_CODEC_RATES), default="PCMU", help="the calls' codec"
    )
    parser.add_argument(
        "--stream-codec",
        choices=sorted(STREAM_CODEC_RATES),
        default=None,
        help="stream in this codec whatever streaming_start asks",
    )
    parser.add_argument("--out-of-order", type=float, default=0.0, help="share of swapped frames")
    parser.add_argument(
        "--strip-stream-query",
        action="store_true",
        help="connect to stream_url without its query string",
    )


async def run_from_args(args: argparse.Namespace) -> None:
    sim = TelnyxSim(
        api_key=args.api_key,
        default_webhook_url=args.webhook_url,
        ring_ms=args.ring_ms,
        call_codec=args.codec,
        stream_codec=args.stream_codec,
        strip_stream_query=args.strip_stream_query,
        out_of_order_share=args.out_of_order,
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(partial(serve, sim, host=args.host, port=args.port))
        print(f"Telnyx simulator listening on {base_url}", flush=True)
        print(f"Telnyx public key (TELNYX_PUBLIC_KEY): {sim.public_key_b64}", flush=True)
