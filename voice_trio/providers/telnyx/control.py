"""Telnyx Call Control REST client (protocols/telnyx.md §1).

Every command carries a fresh ``command_id`` (Telnyx ignores a repeated one for the same
call, so a retry after a timeout can never act twice). 429 and 5xx are retried with
backoff, honouring ``Retry-After``; other errors surface as ``TelnyxError`` with Telnyx's
code, title and detail. Hanging up a call that already ended (90018) counts as done.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import trio

log = logging.getLogger("voice_trio.telnyx")

CALL_ALREADY_ENDED = "90018"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class TelnyxError(Exception):
    """Telnyx refused a command, or could not be reached."""

    def __init__(self, status: int | None, code: str, title: str, detail: str = "") -> None:
        super().__init__(f"Telnyx {status or 'unreachable'} {code} {title}: {detail}".strip())
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DialResult:
    call_control_id: str
    call_leg_id: str
    call_session_id: str


def encode_client_state(state: dict[str, Any]) -> str:
    """``client_state`` is base64; ours is compact JSON inside."""
    raw = json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode("ascii")


def decode_client_state(value: str | None) -> dict[str, Any]:
    """Our JSON from a ``client_state``; anything else (absent, foreign, corrupt) is ``{}``."""
    if not value:
        return {}
    try:
        data = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def new_command_id() -> str:
    return str(uuid.uuid4())


class TelnyxControl:
    """Thin async client; ``http`` is shared by the whole server (connection pooling)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = "https://api.telnyx.com/v2",
        attempts: int = 3,
        backoff: float = 0.25,
        timeout: float = 10.0,
        on_command: Any = None,
    ) -> None:
        self._http = http
        self._key = api_key
        self._base = base_url.rstrip("/")
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._on_command = on_command  # callable(action, outcome) for metrics

    async def dial(
        self,
        *,
        connection_id: str,
        to: str,
        from_: str,
        webhook_url: str = "",
        client_state: str | None = None,
        answering_machine_detection: str = "disabled",
        extra: dict[str, Any] | None = None,
    ) -> DialResult:
        body: dict[str, Any] = {"connection_id": connection_id, "to": to, "from": from_}
        if webhook_url:
            body["webhook_url"] = webhook_url
        if client_state:
            body["client_state"] = client_state
        if answering_machine_detection and answering_machine_detection != "disabled":
            body["answering_machine_detection"] = answering_machine_detection
        body.update(extra or {})
        data = await self._post("/calls", body, action="dial")
        return DialResult(
            call_control_id=data["call_control_id"],
            call_leg_id=data.get("call_leg_id", ""),
            call_session_id=data.get("call_session_id", ""),
        )

    async def answer(self, call_control_id: str, **fields: Any) -> None:
        await self.command(call_control_id, "answer", fields)

    async def streaming_start(
        self,
        call_control_id: str,
        *,
        stream_url: str,
        client_state: str | None = None,
        codec: str = "PCMU",
        auth_token: str | None = None,
    ) -> None:
        """Stream the call to ``stream_url``; ``auth_token`` comes back with the socket (the
        ``x-telnyx-streaming-auth-token`` header and the ``connected`` frame)."""
        body: dict[str, Any] = {
            "stream_url": stream_url,
            "stream_track": "inbound_track",
            "stream_codec": codec,
            "stream_bidirectional_mode": "rtp",
            "stream_bidirectional_codec": "PCMU",
            "stream_bidirectional_sampling_rate": 8000,
        }
        if auth_token:
            body["stream_auth_token"] = auth_token
        if client_state:
            body["client_state"] = client_state
        await self.command(call_control_id, "streaming_start", body)

    async def streaming_stop(self, call_control_id: str) -> None:
        await self.command(call_control_id, "streaming_stop", {})

    async def speak(
        self, call_control_id: str, text: str, *, voice: str, language: str | None = None
    ) -> None:
        body: dict[str, Any] = {"payload": text, "voice": voice, "payload_type": "text"}
        if language:
            body["language"] = language
        await self.command(call_control_id, "speak", body)

    async def transcription_start(
        self, call_control_id: str, *, language: str, engine: str = "Google"
    ) -> None:
        body = {
            "transcription_engine": engine,
            "transcription_engine_config": {
                "transcription_engine": engine,
                "language": language,
                "interim_results": False,
            },
            "transcription_tracks": "inbound",
        }
        await self.command(call_control_id, "transcription_start", body)

    async def transcription_stop(self, call_control_id: str) -> None:
        await self.command(call_control_id, "transcription_stop", {})

    async def transfer(
        self, call_control_id: str, to: str, *, timeout_secs: int | None = None
    ) -> None:
        """Hand the call to ``to`` (§1.8): Telnyx dials it and bridges the caller over;
        if nobody answers, the call stays with us (a ``call.hangup`` for the other leg)."""
        body: dict[str, Any] = {"to": to}
        if timeout_secs is not None:
            body["timeout_secs"] = timeout_secs
        await self.command(call_control_id, "transfer", body)

    async def hangup(self, call_control_id: str) -> None:
        """Hang up; a call that already ended (90018) counts as hung up."""
        try:
            await self.command(call_control_id, "hangup", {})
        except TelnyxError as exc:
            if exc.code != CALL_ALREADY_ENDED:
                raise
            log.debug("hangup: call already ended")

    async def command(self, call_control_id: str, action: str, body: dict[str, Any]) -> None:
        path = f"/calls/{call_control_id}/actions/{action}"
        await self._post(path, dict(body), action=action)

    async def _post(self, path: str, body: dict[str, Any], *, action: str) -> dict[str, Any]:
        body.setdefault("command_id", new_command_id())
        headers = {"Authorization": f"Bearer {self._key}"}
        url = self._base + path
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._http.post(
                    url, json=body, headers=headers, timeout=self._timeout
                )
            except httpx.HTTPError as exc:
                if attempt == self._attempts:
                    self._count(action, "unreachable")
                    raise TelnyxError(None, "unreachable", type(exc).__name__, str(exc)) from exc
                await trio.sleep(self._delay(attempt, None))
                continue
            if response.status_code < 300:
                self._count(action, "ok")
                payload = response.json() if response.content else {}
                return payload.get("data", {}) if isinstance(payload, dict) else {}
            if response.status_code in RETRY_STATUSES and attempt < self._attempts:
                await trio.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            error = _error_from(response)
            self._count(action, error.code if error.code == CALL_ALREADY_ENDED else "error")
            raise error
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), 5.0)
            except ValueError:
                pass
        return self._backoff * (2 ** (attempt - 1)) * (0.75 + random.random() / 2)

    def _count(self, action: str, outcome: str) -> None:
        if self._on_command is not None:
            self._on_command(action, outcome)


def _error_from(response: httpx.Response) -> TelnyxError:
    try:
        first = response.json()["errors"][0]
        return TelnyxError(
            response.status_code,
            str(first.get("code", "")),
            str(first.get("title", "")),
            str(first.get("detail", "")),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return TelnyxError(
            response.status_code, str(response.status_code), "HTTP error", response.text[:200]
        )
