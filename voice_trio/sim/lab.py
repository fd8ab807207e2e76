"""All the simulators together: Telnyx (with its carrier), Deepgram, Anthropic, ElevenLabs.

``open_lab`` starts them on loopback in the caller's nursery and returns their addresses
plus ``server_env()``, the settings that point a voice-trio server at them. Used by
``voice-trio demo``, the end-to-end tests, ``voice-trio sim all`` and the load and soak
scripts (which run the lab in one process and the server in another).

With ``tools=True`` (``voice-trio sim all``, the demo) the lab also serves a clinic's
scheduling backend (:mod:`.clinic`) and ``server_env()`` declares its HTTP tools
(``TOOLS_FILE`` = :data:`CLINIC_TOOLS`, ``TOOLS_SECRET``, ``CLINIC_URL``; docs/tools.md).
"""

from __future__ import annotations

import argparse
import re
import secrets
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

import trio
from dotenv import dotenv_values

from voice_trio.sim import anthropic, clinic, deepgram, elevenlabs, telnyx
from voice_trio.sim.caller import BargeIn, Say, ScriptedCaller, Step, WaitForBot

TELNYX_KEY = "KEYsim0123456789"
DEEPGRAM_KEY = "dg-test-key"
ANTHROPIC_KEY = "sk-ant-sim-key"
ELEVENLABS_KEY = "el-test-key"
ELEVENLABS_VOICE = "sim-voice-sofia"
CONNECTION_ID = "1684641123236054244"
OUR_NUMBER = "+5716000000"
# The clinic's tools, shipped with the package (examples/clinic-tools.toml links to it).
CLINIC_TOOLS = str(resources.files("voice_trio.sim").joinpath("clinic_tools.toml"))

# A Spanish-speaking patient: three questions, one of them said over the bot, a goodbye.
DEMO_SCRIPT: list[Step] = [
    WaitForBot(min_ms_silence=500),
    Say("Hola, buenos días. Quisiera pedir una cita con medicina general.", 300),
    WaitForBot(min_ms_silence=500),
    Say("¿Tienen disponibilidad el jueves en la mañana?", 300),
    BargeIn(after_bot_ms=900, text="Perdón, mejor el viernes."),
    WaitForBot(min_ms_silence=500),
    Say("Perfecto, muchas gracias. Adiós.", 300),
    WaitForBot(min_ms_silence=500, timeout_ms=15_000),
]


@dataclass
class Lab:
    telnyx: telnyx.TelnyxSim
    deepgram: deepgram.DeepgramSim
    anthropic: anthropic.AnthropicSim
    elevenlabs: elevenlabs.ElevenLabsSim
    telnyx_url: str
    deepgram_url: str
    anthropic_url: str
    elevenlabs_url: str
    # The server's /api is closed without a token; a new one per lab, never a published one.
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    clinic: clinic.ClinicSim | None = None  # with tools=True: the HTTP tools' backend
    clinic_url: str = ""

    @property
    def api_auth(self) -> dict[str, str]:
        """The header a client of the lab's server sends to ``/api/*``."""
        return {"Authorization": f"Bearer {self.api_token}"}

    def server_env(self) -> dict[str, str]:
        """Settings (as environment variables) for a server that uses this lab."""
        return {
            "API_TOKEN": self.api_token,
            "TELNYX_API_KEY": TELNYX_KEY,
            "TELNYX_CONNECTION_ID": CONNECTION_ID,
            "TELNYX_PHONE_NUMBER": OUR_NUMBER,
            "TELNYX_PUBLIC_KEY": self.telnyx.public_key_b64,
            "TELNYX_API_BASE": self.telnyx_url + "/v2",
            "DEEPGRAM_API_KEY": DEEPGRAM_KEY,
            "DEEPGRAM_API_BASE": self.deepgram_url,
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "ANTHROPIC_BASE_URL": self.anthropic_url,
            "ELEVENLABS_API_KEY": ELEVENLABS_KEY,
            "ELEVENLABS_VOICE_ID": ELEVENLABS_VOICE,
            "ELEVENLABS_API_BASE": self.elevenlabs_url,
        } | self.tools_env()

    def tools_env(self) -> dict[str, str]:
        """The clinic's HTTP tools, for a server of a lab that serves the clinic."""
        if self.clinic is None or self.clinic.secret is None:
            return {}
        return {
            "TOOLS_FILE": CLINIC_TOOLS,
            "TOOLS_SECRET": self.clinic.secret,
            "CLINIC_URL": self.clinic_url,
        }


async def open_lab(
    nursery: trio.Nursery,
    *,
    ms_per_char: int = 65,
    llm_ttft: float = 0.4,
    tts_ttfb_ms: float = 150.0,
    webhook_url: str | None = None,
    host: str = "127.0.0.1",
    ports: tuple[int, int, int] = (0, 0, 0),
    tools: bool = False,
    tools_secret: str | None = None,
) -> Lab:
    tel = telnyx.TelnyxSim(
        api_key=TELNYX_KEY, default_webhook_url=webhook_url, speak_ms_per_char=ms_per_char
    )
    dg = deepgram.DeepgramSim(
        api_key=DEEPGRAM_KEY, ms_per_char=ms_per_char, tts_ttfb_ms=tts_ttfb_ms
    )
    an = anthropic.AnthropicSim(api_key=ANTHROPIC_KEY, ttft=llm_ttft)
    el = elevenlabs.ElevenLabsSim(
        api_key=ELEVENLABS_KEY, ms_per_char=ms_per_char, ttfb_ms=tts_ttfb_ms
    )
    tel_url = await nursery.start(partial(telnyx.serve, tel, host=host, port=ports[0]))
    dg_url = await nursery.start(partial(deepgram.serve, dg, host=host, port=ports[1]))
    an_url = await nursery.start(partial(anthropic.serve, an, host=host, port=ports[2]))
    el_port = ports[2] + 10 if ports[2] else 0
    el_url = await nursery.start(partial(elevenlabs.serve, el, host=host, port=el_port))
    lab = Lab(tel, dg, an, el, tel_url, dg_url, an_url, el_url)
    if tools:
        lab.clinic = clinic.ClinicSim(secret=tools_secret or secrets.token_urlsafe(24))
        clinic_port = ports[2] + 20 if ports[2] else 0
        lab.clinic_url = await nursery.start(
            partial(clinic.serve, lab.clinic, host=host, port=clinic_port)
        )
    return lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--telnyx-port", type=int, default=4010)
    parser.add_argument("--deepgram-port", type=int, default=4020)
    parser.add_argument("--anthropic-port", type=int, default=4030)
    parser.add_argument(
        "--webhook-url",
        default="http://127.0.0.1:3000/webhook/telnyx",
        help="where inbound-call webhooks go",
    )
    parser.add_argument("--ms-per-char", type=int, default=65)
    parser.add_argument(
        "--write-env",
        metavar="PATH",
        help="also write the server settings to this file (e.g. .env)",
    )


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve every simulator; dialled numbers are answered by the demo's scripted patient."""
    async with trio.open_nursery() as nursery:
        lab = await open_lab(
            nursery,
            ms_per_char=args.ms_per_char,
            webhook_url=args.webhook_url,
            host=args.host,
            ports=(args.telnyx_port, args.deepgram_port, args.anthropic_port),
            tools=True,
            # Like the token below: a server started earlier from the file keeps its secret.
            tools_secret=_kept_tools_secret(args.write_env) if args.write_env else None,
        )

        def patient(number: str) -> ScriptedCaller:
            caller = ScriptedCaller(DEMO_SCRIPT, ms_per_char=args.ms_per_char, name=number)
            nursery.start_soon(caller.run)
            return caller

        lab.telnyx.callee_factory = patient
        print(f"Telnyx simulator listening on {lab.telnyx_url}")
        print(f"Deepgram simulator listening on {lab.deepgram_url}")
        print(f"Anthropic simulator listening on {lab.anthropic_url}")
        print(f"ElevenLabs simulator listening on {lab.elevenlabs_url}")
        print(f"Clinic simulator listening on {lab.clinic_url}")
        if args.write_env:
            # A server started earlier from this file keeps working with its token.
            lab.api_token = _kept_token(args.write_env) or lab.api_token
        webhook_base = args.webhook_url.removesuffix("/webhook/telnyx")
        env = lab.server_env() | {"WEBHOOK_BASE_URL": webhook_base}
        lines = [f"{name}={value}" for name, value in env.items()]
        print("\n# Settings for `voice-trio serve` (e.g. put them in .env):")
        print("\n".join(lines), flush=True)
        if args.write_env:
            header = "# Written by `voice-trio sim all`: the server talks to the simulators.\n"
            await trio.Path(args.write_env).write_text(header + "\n".join(lines) + "\n")
            print(f"(written to {args.write_env})", flush=True)


def _kept_tools_secret(path: str) -> str | None:
    """``TOOLS_SECRET`` of an env file written before, commented out or not."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = re.search(r"^#?\s*TOOLS_SECRET=(\S{16,})\s*$", text, re.M)
    return found[1] if found else None


def _kept_token(path: str) -> str | None:
    """``API_TOKEN`` of an env file written before, if it is one the server accepts."""
    try:
        token = dotenv_values(path).get("API_TOKEN") or ""
    except OSError:
        return None
    return token.strip() if len(token.strip()) >= 16 else None
