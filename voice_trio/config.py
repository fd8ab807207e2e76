"""Settings: read once from the environment and ``.env``, validated, then passed down.

No other module reads ``os.environ``. A bad value stops start-up with a ``ConfigError``
that names the variable and the expected form.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

from voice_trio.forwarded import TrustedProxies
from voice_trio.languages import agent_language
from voice_trio.tools_file import HttpToolSpec, ToolsFileError, load_tools_file

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting has a value the server cannot use."""

    def __init__(
        self, name: str, expected: str, value: str | None = None, *, reason: str = ""
    ) -> None:
        shown = "" if value is None else f" (got {value!r})"
        # ``reason``: a setting that is fine alone but needs others (WORKERS > 1).
        super().__init__(f"{name}: {reason}" if reason else f"{name}: expected {expected}{shown}")
        self.name = name


def _str(name: str, raw: str) -> str:
    return raw.strip()


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, "true or false", raw)


def _int_range(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(name, f"an integer from {lo} to {hi}", raw) from None
        if not lo <= value <= hi:
            raise ConfigError(name, f"an integer from {lo} to {hi}", raw)
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(name, f"a number from {lo} to {hi}", raw) from None
        if not lo <= value <= hi:
            raise ConfigError(name, f"a number from {lo} to {hi}", raw)
        return value

    return parse


def _choice(*options: str, upper: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ConfigError(name, "one of " + ", ".join(options), raw)
        return value

    return parse


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise ConfigError(
                name, "a URL starting with " + " or ".join(f"{s}://" for s in schemes), raw
            )
        return value

    return parse


def _e164(name: str, raw: str) -> str:
    value = raw.strip()
    if not E164.match(value):
        raise ConfigError(name, "an E.164 phone number such as +573001234567", raw)
    return value


def _timezone(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(name, "an IANA time zone such as America/Bogota", raw) from None
    return value


def _ed25519_key(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(name, "base64 of a raw 32-byte Ed25519 public key", raw) from None
    if len(key) != 32:
        raise ConfigError(name, "base64 of a raw 32-byte Ed25519 public key", raw)
    return value


def _path(name: str, raw: str) -> str:
    value = raw.strip()
    if value and not Path(value).is_file():
        raise ConfigError(name, "the path of a readable text file", raw)
    return value


def _secret_key(name: str, raw: str) -> str:
    value = raw.strip()
    if len(value) < 16:
        raise ConfigError(name, "a random string of at least 16 characters")
    return value


def _trusted_proxies(name: str, raw: str) -> TrustedProxies:
    try:
        return TrustedProxies.parse(raw)
    except ValueError:
        expected = "addresses or networks separated by commas (e.g. 127.0.0.1,10.0.0.0/8), or *"
        raise ConfigError(name, expected, raw) from None


def _database_url(name: str, raw: str) -> str:
    value = raw.strip()
    if urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise ConfigError(name, "a URL starting with postgresql:// (or empty for SQLite)")
    return value


DTMF_KEYS = frozenset("0123456789*#ABCD")


class KeyAction(StrEnum):
    """What a shortcut key (``DTMF_SHORTCUTS``) does at once. The caller's, not Claude's:
    Claude's tools are conversation.tools (``end_call`` is a name in both)."""

    TRANSFER = "transfer"
    END_CALL = "end_call"


DTMF_ACTIONS = tuple(KeyAction)
AMD_MODES = ("disabled", "detect", "detect_beep", "detect_words", "greeting_end", "premium")


def _optional_e164(name: str, raw: str) -> str:
    value = raw.strip()
    return _e164(name, value) if value else ""


def _dtmf_shortcuts(name: str, raw: str) -> tuple[tuple[str, KeyAction], ...]:
    """``0=transfer,9=end_call``: keys the caller presses to act at once."""
    expected = "key=action pairs separated by commas, e.g. 0=transfer,9=end_call (keys 0-9 * #"
    expected += " A-D; actions " + ", ".join(DTMF_ACTIONS) + ")"
    pairs: dict[str, KeyAction] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, action = (part.strip() for part in item.partition("="))
        key = key.upper()
        if not sep or key not in DTMF_KEYS or action not in DTMF_ACTIONS or key in pairs:
            raise ConfigError(name, expected, raw)
        pairs[key] = KeyAction(action)
    return tuple(pairs.items())


def _setting(
    env: str,
    default: Any,
    parse: Callable[[str, str], Any],
    *,
    secret: bool = False,
    doc: str = "",
    aliases: tuple[str, ...] = (),
) -> Any:
    return field(
        default=default,
        metadata={"env": env, "parse": parse, "secret": secret, "doc": doc, "aliases": aliases},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    telnyx_api_key: str = _setting(
        "TELNYX_API_KEY", "", _str, secret=True, doc="Telnyx API v2 key (Bearer)"
    )
    telnyx_connection_id: str = _setting(
        "TELNYX_CONNECTION_ID", "", _str, doc="Call Control Application id used to dial"
    )
    telnyx_phone_number: str = _setting(
        "TELNYX_PHONE_NUMBER", "", _e164, doc="our number in E.164, the caller id of outbound calls"
    )
    telnyx_public_key: str = _setting(
        "TELNYX_PUBLIC_KEY",
        "",
        _ed25519_key,
        doc="base64 Ed25519 public key that signs Telnyx webhooks",
    )
    telnyx_api_base: str = _setting(
        "TELNYX_API_BASE",
        "https://api.telnyx.com/v2",
        _url("https", "http"),
        doc="Telnyx REST base URL",
    )
    deepgram_api_key: str = _setting(
        "DEEPGRAM_API_KEY", "", _str, secret=True, doc="Deepgram key for live STT and Aura TTS"
    )
    deepgram_api_base: str = _setting(
        "DEEPGRAM_API_BASE",
        "https://api.deepgram.com",
        _url("https", "http"),
        doc="Deepgram base URL",
    )
    deepgram_stt_model: str = _setting(
        "DEEPGRAM_STT_MODEL", "nova-3", _str, doc="Deepgram live STT model"
    )
    deepgram_tts_model: str = _setting(
        "DEEPGRAM_TTS_MODEL",
        "aura-2-celeste-es",
        _str,
        doc="Deepgram Aura voice (celeste = Colombian Spanish)",
    )
    stt_endpointing_ms: int = _setting(
        "STT_ENDPOINTING_MS",
        300,
        _int_range(10, 5000),
        doc="Deepgram endpointing: silence that ends a turn",
    )
    stt_utterance_end_ms: int = _setting(
        "STT_UTTERANCE_END_MS",
        1000,
        _int_range(1000, 5000),
        doc="Deepgram utterance_end_ms (backup turn end)",
    )
    stt_finalize_silence_ms: int = _setting(
        "STT_FINALIZE_SILENCE_MS",
        150,
        _int_range(0, 5000),
        doc="caller silence (own voice detector) that sends Finalize; 0 or >= endpointing: never",
    )
    speculative_replies: bool = _setting(
        "SPECULATIVE_REPLIES",
        True,
        _bool,
        doc="start Claude on a stable transcript before the turn ends (kept if it matches)",
    )
    anthropic_api_key: str = _setting(
        "ANTHROPIC_API_KEY",
        "",
        _str,
        secret=True,
        aliases=("CLAUDE_API_KEY",),
        doc="Anthropic key (CLAUDE_API_KEY also accepted)",
    )
    anthropic_base_url: str = _setting(
        "ANTHROPIC_BASE_URL",
        "https://api.anthropic.com",
        _url("https", "http"),
        doc="Anthropic base URL",
    )
    claude_model: str = _setting("CLAUDE_MODEL", "claude-haiku-4-5", _str, doc="Claude model id")
    port: int = _setting("PORT", 3000, _int_range(0, 65535), doc="HTTP port")
    host: str = _setting("HOST", "0.0.0.0", _str, doc="bind address")
    workers: int = _setting(
        "WORKERS",
        1,
        _int_range(1, 64),
        doc="server processes sharing the port (voice-trio serve --workers); more than 1"
        " needs SERVER_SECRET and DATABASE_URL",
    )
    webhook_base_url: str = _setting(
        "WEBHOOK_BASE_URL", "", _url("https", "http"), doc="public base URL Telnyx reaches us on"
    )
    ws_stream_url: str = _setting(
        "WS_STREAM_URL",
        "",
        _url("wss", "ws"),
        doc="public wss:// URL of /stream/media (default: derived)",
    )
    use_media_streams: bool = _setting(
        "USE_MEDIA_STREAMS",
        True,
        _bool,
        doc="true: media streams; false: Telnyx speak+transcription",
    )
    media_socket: str = _setting(
        "MEDIA_SOCKET",
        "lean",
        _choice("lean", "asgi"),
        doc="lean: /stream/media frames are read and written by the server itself after the"
        " 101 (asgi where Hypercorn cannot hand the connection over); asgi: through"
        " Hypercorn's WebSocket layers",
    )
    api_token: str = _setting(
        "API_TOKEN",
        "",
        _secret_key,
        secret=True,
        doc="bearer token for /api/* (at least 16 characters); empty: /api/* is closed",
    )
    api_loopback_without_token: bool = _setting(
        "API_LOOPBACK_WITHOUT_TOKEN",
        False,
        _bool,
        doc="with API_TOKEN empty, serve /api/* to clients on this machine without a token"
        " (unsafe behind a local proxy that sends no X-Forwarded-For)",
    )
    forwarded_allow_ips: TrustedProxies = _setting(  # noqa: RUF009 (a frozen value)
        "FORWARDED_ALLOW_IPS",
        TrustedProxies.parse("127.0.0.1"),
        _trusted_proxies,
        doc="proxies whose Forwarded/X-Forwarded-For/X-Real-IP are believed: addresses or"
        " networks, comma-separated; * for any",
    )
    allow_unsigned_webhooks: bool = _setting(
        "ALLOW_UNSIGNED_WEBHOOKS",
        False,
        _bool,
        doc="with TELNYX_PUBLIC_KEY empty, accept webhooks without a signature (anyone could"
        " hang up your calls); false: they are refused",
    )
    max_connections: int = _setting(
        "MAX_CONNECTIONS",
        1000,
        _int_range(1, 100000),
        doc="open connections at most (HTTP and media); more get 503 and are closed",
    )
    max_connections_per_client: int = _setting(
        "MAX_CONNECTIONS_PER_CLIENT",
        200,
        _int_range(1, 100000),
        doc="open connections at most from one address (a proxy or Telnyx's media servers"
        " count as one)",
    )
    request_timeout_s: int = _setting(
        "REQUEST_TIMEOUT",
        10,
        _int_range(1, 600),
        doc="seconds an HTTP request body may take to arrive whole; then 408 and close",
    )
    log_format: str = _setting(
        "LOG_FORMAT", "human", _choice("human", "json"), doc="human or json (one object per line)"
    )
    log_level: str = _setting(
        "LOG_LEVEL", "INFO", _choice(*LOG_LEVELS, upper=True), doc="DEBUG, INFO, WARNING or ERROR"
    )
    agent_language: str = _setting(
        "AGENT_LANGUAGE",
        "es",
        _str,
        doc="language of the agent and of STT: es or en as DEEPGRAM_STT_MODEL spells it "
        "(nova-3: es, es-419, en, en-US)",
    )
    timezone: str = _setting(
        "TIMEZONE", "America/Bogota", _timezone, doc="time zone for greetings and timestamps"
    )
    max_response_length: int = _setting(
        "MAX_RESPONSE_LENGTH",
        300,
        _int_range(40, 4000),
        doc="max characters the bot speaks per reply",
    )
    conversation_history_limit: int = _setting(
        "CONVERSATION_HISTORY_LIMIT",
        20,
        _int_range(2, 500),
        doc="messages of history sent to Claude",
    )
    transcription_min_confidence: float = _setting(
        "TRANSCRIPTION_MIN_CONFIDENCE",
        0.5,
        _float_range(0.0, 1.0),
        doc="finals below this are ignored",
    )
    silence_timeout_ms: int = _setting(
        "SILENCE_TIMEOUT_MS",
        10000,
        _int_range(1000, 600000),
        doc="caller silence before a reprompt (then goodbye)",
    )
    max_call_seconds: int = _setting(
        "MAX_CALL_SECONDS", 900, _int_range(1, 14400), doc="hard limit on one call's length"
    )
    persona_prompt_file: str = _setting(
        "PERSONA_PROMPT_FILE", "", _path, doc="system prompt file (default: Spanish receptionist)"
    )
    telnyx_speak_voice: str = _setting(
        "TELNYX_SPEAK_VOICE",
        "Azure.es-CO-SalomeNeural",
        _str,
        doc="Telnyx speak voice for the fallback mode",
    )
    stream_connect_timeout_ms: int = _setting(
        "STREAM_CONNECT_TIMEOUT_MS",
        5000,
        _int_range(100, 60000),
        doc="no media socket this long after streaming_start: fallback mode",
    )
    stream_lost_grace_ms: int = _setting(
        "STREAM_LOST_GRACE_MS",
        1500,
        _int_range(0, 10000),
        doc="media socket closed without stop: wait this for call.hangup, then fallback",
    )
    database_url: str = _setting(
        "DATABASE_URL",
        "",
        _database_url,
        secret=True,
        doc="postgresql://user:pass@host/db shared by all instances; empty: SQLite",
    )
    sqlite_path: str = _setting(
        "SQLITE_PATH",
        "voice_trio.sqlite3",
        _str,
        doc="SQLite file of call records when DATABASE_URL is empty",
    )
    record_calls: bool = _setting(
        "RECORD_CALLS",
        False,
        _bool,
        doc="save both sides of each media call as a stereo WAV (inform callers: README)",
    )
    recordings_dir: str = _setting(
        "RECORDINGS_DIR",
        "",
        _str,
        doc="local directory of recordings; empty: recordings/ beside SQLITE_PATH",
    )
    recording_retention_days: int = _setting(
        "RECORDING_RETENTION_DAYS",
        30,
        _int_range(1, 3650),
        doc="recordings older than this many days are deleted",
    )
    recording_notice: str = _setting(
        "RECORDING_NOTICE",
        "",
        _str,
        doc="said before the greeting when RECORD_CALLS=true; empty: a default in AGENT_LANGUAGE",
    )

    tts_provider: str = _setting(
        "TTS_PROVIDER",
        "deepgram",
        _choice("deepgram", "elevenlabs"),
        doc="bot voice: deepgram (Aura) or elevenlabs",
    )
    elevenlabs_api_key: str = _setting(
        "ELEVENLABS_API_KEY", "", _str, secret=True, doc="ElevenLabs key (TTS_PROVIDER=elevenlabs)"
    )
    elevenlabs_voice_id: str = _setting(
        "ELEVENLABS_VOICE_ID", "", _str, doc="ElevenLabs voice id (the original system's voice)"
    )
    elevenlabs_model: str = _setting(
        "ELEVENLABS_MODEL", "eleven_flash_v2_5", _str, doc="ElevenLabs model (Spanish-capable)"
    )
    elevenlabs_api_base: str = _setting(
        "ELEVENLABS_API_BASE",
        "https://api.elevenlabs.io",
        _url("https", "http"),
        doc="ElevenLabs base URL",
    )
    server_secret: str = _setting(
        "SERVER_SECRET",
        "",
        _secret_key,
        secret=True,
        doc="signs media stream tokens; same on every instance (empty: random per process)",
    )
    tools_file: str = _setting(
        "TOOLS_FILE",
        "",
        _path,
        doc="the operator's HTTP tools, TOML or JSON (docs/tools.md; empty: none)",
    )
    tools_secret: str = _setting(
        "TOOLS_SECRET",
        "",
        _secret_key,
        secret=True,
        doc="signs every tool request (HMAC-SHA256); required with TOOLS_FILE",
    )
    tool_result_max_chars: int = _setting(
        "TOOL_RESULT_MAX_CHARS",
        4000,
        _int_range(100, 100_000),
        doc="a tool's answer is cut to this many characters before it reaches Claude",
    )
    tool_wait_ms: int = _setting(
        "TOOL_WAIT_MS",
        700,
        _int_range(100, 10_000),
        doc="a tool answer slower than this gets its waiting phrase said",
    )
    # Read from TOOLS_FILE by from_env, not a variable of its own.
    http_tools: tuple[HttpToolSpec, ...] = field(
        default=(), metadata={"env": None, "secret": False, "doc": "", "aliases": ()}
    )
    transfer_number: str = _setting(
        "TRANSFER_NUMBER",
        "",
        _optional_e164,
        doc="E.164 number of the people calls are transferred to; empty: no transfers",
    )
    dtmf_shortcuts: tuple[tuple[str, KeyAction], ...] = _setting(
        "DTMF_SHORTCUTS",
        (("0", KeyAction.TRANSFER),),
        _dtmf_shortcuts,
        doc="keys that act at once: key=action,... (actions: transfer, end_call)",
    )
    answering_machine_detection: str = _setting(
        "ANSWERING_MACHINE_DETECTION",
        "disabled",
        _choice(*AMD_MODES),
        doc="Telnyx AMD on outbound calls (greeting_end: leave voicemail after the greeting)",
    )
    amd_wait_ms: int = _setting(
        "AMD_WAIT_MS",
        0,
        _int_range(0, 10000),
        doc="with AMD, hold the greeting this long for a human/machine verdict",
    )
    voicemail_greeting_timeout_ms: int = _setting(
        "VOICEMAIL_GREETING_TIMEOUT_MS",
        30000,
        _int_range(0, 120000),
        doc="on a machine, wait at most this long for its greeting to end",
    )
    drain_timeout_s: int = _setting(
        "DRAIN_TIMEOUT",
        15,
        _int_range(0, 3600),
        doc="on SIGTERM, seconds calls may finish on their own; the process exits within this + 10 s",
    )

    @classmethod
    def load(cls, env_file: str | Path | None = ".env") -> Settings:
        """Settings of this process: its environment over ``env_file``."""
        return cls.from_env(os.environ, env_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], env_file: str | Path | None = ".env") -> Settings:
        """Build from ``environ`` over ``env_file`` (a real variable wins over ``.env``)."""
        source: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            source.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        source.update(environ)
        values: dict[str, Any] = {}
        for f in _variables(cls):
            meta = f.metadata
            raw = source.get(meta["env"])
            for alias in meta["aliases"]:
                if raw in (None, "") and source.get(alias):
                    raw = source[alias]
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = meta["parse"](meta["env"], raw)
        settings = cls(**values).with_checked_language().with_workers(values.get("workers", 1))
        return settings.with_tools(source).with_recordings()

    def with_recordings(self) -> Settings:
        """These settings with ``RECORDINGS_DIR`` filled in and checked when calls are
        recorded: beside the SQLite file by default; PostgreSQL has no local file to be
        beside, so there it must be set. The directory may not exist yet (it is created
        with the first recording), but then the nearest existing parent must be writable."""
        if not self.record_calls:
            return self
        directory = self.recordings_dir
        if not directory:
            if self.database_url or self.sqlite_path == ":memory:":
                store = "DATABASE_URL" if self.database_url else "an in-memory SQLite store"
                raise ConfigError(
                    "RECORDINGS_DIR",
                    "",
                    reason=f"RECORD_CALLS=true with {store}: set RECORDINGS_DIR to a local"
                    " directory for the recordings",
                )
            directory = str(Path(self.sqlite_path).parent / "recordings")
        path = Path(directory)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if (path.exists() and not path.is_dir()) or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                "RECORDINGS_DIR",
                "",
                reason=f"RECORD_CALLS=true but {directory!r} is not a writable directory",
            )
        return self if directory == self.recordings_dir else replace(self, recordings_dir=directory)

    def with_tools(self, environ: Mapping[str, str]) -> Settings:
        """These settings with ``TOOLS_FILE`` read and checked (``${VAR}`` in endpoints
        filled from ``environ``); declared tools need ``TOOLS_SECRET`` to sign with."""
        if not self.tools_file:
            return self
        try:
            tools = load_tools_file(self.tools_file, environ)
        except ToolsFileError as exc:
            raise ConfigError("TOOLS_FILE", "", reason=str(exc)) from None
        if tools and not self.tools_secret:
            raise ConfigError(
                "TOOLS_SECRET",
                "",
                reason="TOOLS_FILE declares tools: set TOOLS_SECRET (at least 16 characters)"
                " to sign their requests",
            )
        return replace(self, http_tools=tools)

    def with_workers(self, count: int) -> Settings:
        """These settings for ``count`` worker processes on one port. More than one need a
        shared ``SERVER_SECRET`` (a stream token minted by one worker must verify on the
        others) and PostgreSQL (``DATABASE_URL``): the workers share call records, stream
        claims, fallback-call state and the call-event bus, and SQLite's single writer
        cannot carry that."""
        if not 1 <= count <= 64:
            raise ConfigError("WORKERS", "an integer from 1 to 64", str(count))
        if count > 1:
            missing = [
                name
                for name, value in (
                    ("SERVER_SECRET", self.server_secret),
                    ("DATABASE_URL", self.database_url),
                )
                if not value
            ]
            if missing:
                raise ConfigError(
                    "WORKERS",
                    "",
                    reason=f"{count} workers need SERVER_SECRET (one secret for every worker's"
                    " stream tokens) and DATABASE_URL (PostgreSQL, shared by the workers);"
                    " missing: " + ", ".join(missing),
                )
        return self if count == self.workers else replace(self, workers=count)

    def with_checked_language(self) -> Settings:
        """These settings with ``AGENT_LANGUAGE`` checked against the languages the agent
        speaks and, when calls use media streams, against what ``DEEPGRAM_STT_MODEL`` takes
        (voice_trio/languages.py); spelt as the model spells it."""
        model = self.deepgram_stt_model if self.use_media_streams else None
        try:
            code = agent_language(self.agent_language, model)
        except ValueError as exc:
            raise ConfigError("AGENT_LANGUAGE", str(exc), self.agent_language) from None
        return self if code == self.agent_language else replace(self, agent_language=code)

    @property
    def stream_url(self) -> str:
        """Where Telnyx should open the media WebSocket."""
        if self.ws_stream_url:
            return self.ws_stream_url
        if self.webhook_base_url:
            base = self.webhook_base_url
            scheme = "wss" if base.startswith("https://") else "ws"
            return f"{scheme}://{base.split('://', 1)[1]}/stream/media"
        return ""

    @property
    def deepgram_ws_base(self) -> str:
        """Deepgram's base URL for WebSockets (live STT)."""
        scheme, rest = self.deepgram_api_base.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest

    @property
    def webhook_url(self) -> str:
        return f"{self.webhook_base_url}/webhook/telnyx" if self.webhook_base_url else ""

    @property
    def dtmf_actions(self) -> dict[str, KeyAction]:
        """Key -> action; ``transfer`` only while there is a number to transfer to."""
        return {
            key: action
            for key, action in self.dtmf_shortcuts
            if action != KeyAction.TRANSFER or self.transfer_number
        }

    @property
    def mode(self) -> str:
        return "media" if self.use_media_streams else "fallback"

    def missing(self) -> dict[str, list[str]]:
        """What each mode still lacks, by variable name."""
        telnyx = [
            n
            for n, v in (
                ("TELNYX_API_KEY", self.telnyx_api_key),
                ("TELNYX_CONNECTION_ID", self.telnyx_connection_id),
                ("TELNYX_PHONE_NUMBER", self.telnyx_phone_number),
                ("WEBHOOK_BASE_URL", self.webhook_base_url),
            )
            if not v
        ]
        claude = [] if self.anthropic_api_key else ["ANTHROPIC_API_KEY"]
        media = list(telnyx) + claude
        if not self.deepgram_api_key:
            media.append("DEEPGRAM_API_KEY")
        if not self.stream_url and "WEBHOOK_BASE_URL" not in media:
            media.append("WS_STREAM_URL")
        signed = self.telnyx_public_key or self.allow_unsigned_webhooks
        security = [] if signed else ["TELNYX_PUBLIC_KEY"]
        api = [] if self.api_token or self.api_loopback_without_token else ["API_TOKEN"]
        return {
            "media": media,
            "fallback": telnyx + claude,
            "webhook signatures": security,
            "api": api,
        }

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value with secrets masked, meaning) for every setting."""
        rows = []
        for f in _variables(self):
            value = getattr(self, f.name)
            shown = _shown(value)
            if f.metadata["secret"] and value:
                shown = mask(value)
            rows.append((f.metadata["env"], shown, f.metadata["doc"]))
        return rows

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for ``.env.example`` and the README."""
        return [
            (
                f.metadata["env"],
                _shown(f.default),
                f.metadata["doc"],
            )
            for f in _variables(cls)
        ]

    def secrets(self) -> list[str]:
        """Secret values that must never reach a log line or an error body."""
        return [
            getattr(self, f.name)
            for f in _variables(self)
            if f.metadata["secret"] and getattr(self, f.name)
        ]


def _variables(settings: Any) -> list[Any]:
    """The settings read from environment variables (not those derived from them)."""
    return [f for f in fields(settings) if f.metadata["env"]]


def _shown(value: Any) -> str:
    """A setting's value written the way the environment gives it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{k}={v}" for k, v in value)
    return str(value)


def mask(secret: str) -> str:
    return "****" if len(secret) <= 8 else f"{secret[:3]}…{secret[-2:]}"
