"""``voice-trio``: serve | check-config | demo | sim.  Thin: parse arguments, call the package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import trio

from voice_trio import __version__
from voice_trio.config import ConfigError, Settings
from voice_trio.languages import AGENT_LANGUAGES, accepted_languages
from voice_trio.observability import setup_logging

SIMULATORS = {
    "telnyx": ("voice_trio.sim.telnyx", "Telnyx Call Control REST, signed webhooks, carrier"),
    "deepgram": ("voice_trio.sim.deepgram", "Deepgram live STT WebSocket and Aura TTS"),
    "anthropic": ("voice_trio.sim.anthropic", "Anthropic Messages API with SSE streaming"),
    "elevenlabs": ("voice_trio.sim.elevenlabs", "ElevenLabs stream-input TTS WebSocket"),
    "clinic": ("voice_trio.sim.clinic", "a clinic's scheduling backend for HTTP tools (signed)"),
    "all": (
        "voice_trio.sim.lab",
        "every simulator at once; dialled numbers get a scripted patient",
    ),
}


def build_parser(with_simulators: bool = True) -> argparse.ArgumentParser:
    """The CLI; simulator options are only built (their modules imported) when needed."""
    parser = argparse.ArgumentParser(prog="voice-trio", description=__doc__)
    parser.add_argument("--version", action="version", version=f"voice-trio {__version__}")
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (Hypercorn, trio worker)")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port, each with its own Trio loop (default:"
        " WORKERS, 1); more than 1 needs SERVER_SECRET and DATABASE_URL",
    )
    # How the supervisor of several workers starts each of them (voice_trio.workers).
    for hidden in ("--worker-index", "--listen-fd", "--orders-fd"):
        serve.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    commands.add_parser("check-config", help="print the effective settings, secrets masked")
    demo = commands.add_parser("demo", help="a whole call against the simulators, offline")
    demo.add_argument("--wav", help="write the call audio (caller, bot) to this WAV file")
    demo.add_argument(
        "--console",
        action="store_true",
        help="after the call, keep the server up for the operator console until Ctrl-C",
    )
    sim = commands.add_parser("sim", help="run a simulator on 127.0.0.1")
    sims = sim.add_subparsers(dest="simulator", required=True)
    for name, (module, help_text) in SIMULATORS.items():
        sub = sims.add_parser(name, help=help_text)
        sub.set_defaults(sim_module=module)
        if with_simulators:
            _sim_module(module).add_arguments(sub)
    return parser


def _sim_module(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_simulators="sim" in argv).parse_args(argv)
    if args.command == "sim":
        setup_logging("INFO")
        trio.run(_sim_module(args.sim_module).run_from_args, args)
        return 0
    try:
        settings = Settings.load(args.env_file)
        if getattr(args, "workers", None) is not None:
            settings = settings.with_workers(args.workers)
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return check_config(settings)
    if args.command == "serve":
        return serve(settings, args)
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    if args.command == "demo":
        from voice_trio.demo import run_demo

        return trio.run(run_demo, settings, args.wav, args.console)
    return 2


def serve(settings: Settings, args: argparse.Namespace) -> int:
    """One process, the supervisor of several workers, or one of those workers."""
    from voice_trio import workers
    from voice_trio.server import serve

    if args.worker_index is not None:
        workers.run_worker(settings, args.worker_index, args.listen_fd, args.orders_fd)
        return 0
    if settings.workers > 1:
        setup_logging(
            settings.log_level,
            settings.log_format,
            settings.secrets(),
            worker="main",
            workers=settings.workers,
        )
        return trio.run(workers.supervise, settings, args.env_file)
    setup_logging(settings.log_level, settings.log_format, settings.secrets(), worker="w1")
    trio.run(serve, settings)
    return 0


def check_config(settings: Settings) -> int:
    rows = settings.describe()
    width = max(len(name) for name, _, _ in rows)
    for name, value, doc in rows:
        print(f"{name:<{width}}  {value or '(unset)':<28}  {doc}")
    print()
    print(f"mode: {settings.mode}   stream URL: {settings.stream_url or '(unset)'}")
    for mode, missing in settings.missing().items():
        status = "ready" if not missing else "missing " + ", ".join(missing)
        print(f"{mode}: {status}")
    print(language_line(settings))
    print(prompt_caching_line(settings))
    for line in tools_lines(settings):
        print(line)
    return 0


def tools_lines(settings: Settings) -> list[str]:
    """The tools the agent is offered: the built-in ones, then TOOLS_FILE's."""
    built_in = "end_call, transfer_call" if settings.transfer_number else "end_call"
    lines = [f"tools: {built_in} (built in); {len(settings.http_tools)} from TOOLS_FILE"]
    for tool in settings.http_tools:
        retry = "retried once" if tool.retry else "not retried"
        lines.append(f"  {tool.name}: POST {tool.endpoint} (timeout {tool.timeout:g} s, {retry})")
    return lines


def language_line(settings: Settings) -> str:
    """AGENT_LANGUAGE and the values that would work with the STT model."""
    language = settings.agent_language
    spoken = AGENT_LANGUAGES[language.split("-")[0].lower()]
    persona = "PERSONA_PROMPT_FILE" if settings.persona_prompt_file else f"{spoken} persona"
    line = f"language: {language} ({spoken} phrases, {persona})"
    model = settings.deepgram_stt_model
    if not settings.use_media_streams:
        return f"{line}; Deepgram STT not used (USE_MEDIA_STREAMS=false)"
    accepted = accepted_languages(model)
    if accepted is None:
        return f"{line}; the languages of DEEPGRAM_STT_MODEL={model} are not known here"
    return f"{line}; DEEPGRAM_STT_MODEL={model} takes " + ", ".join(accepted)


def prompt_caching_line(settings: Settings) -> str:
    """Whether the persona gets a prompt-cache breakpoint with this model, and why."""
    from voice_trio.conversation.persona import load_persona, persona_is_cacheable
    from voice_trio.conversation.tools import offered_tools, tool_specs
    from voice_trio.providers.claude_cache import min_cacheable_tokens, tokens_at_least

    can_transfer = bool(settings.transfer_number)
    persona = load_persona(settings.persona_prompt_file, settings.agent_language)
    tools = tool_specs(offered_tools(can_transfer=can_transfer, http=settings.http_tools))
    tokens = tokens_at_least(tools, [persona])
    minimum = min_cacheable_tokens(settings.claude_model)
    state = (
        "on"
        if persona_is_cacheable(
            settings.claude_model, persona, can_transfer=can_transfer, http=settings.http_tools
        )
        else "off"
    )
    return (
        f"prompt caching: {state} (tools + persona at least {tokens} tokens; "
        f"{settings.claude_model} caches {minimum} or more)"
    )


if __name__ == "__main__":
    sys.exit(main())
