"""The load generators: what places the scripted calls and simulates every service the server
talks to, seen from the load test as one object.

- :class:`LeanGenerator` (the default): two processes of its own, so that it does not share
  one core with itself. The *carrier* process (:mod:`bench.carrier_serve`) runs Telnyx's
  REST API and webhooks with the lean carrier and callers (``voice_trio.sim.lean_telnyx``);
  the *providers* process (:mod:`bench.providers_serve`) runs the reference Deepgram,
  Anthropic and ElevenLabs simulators. This process only asks for calls and collects their
  outcomes over the carrier's stdin/stdout.
- :class:`ReferenceGenerator`: the reference simulators and callers in this very process
  (``voice_trio.sim.lab``), as every run before the lean generator used them.

Both give :meth:`cpu_seconds` by process (``this process`` included: it scrapes ``/metrics``
and keeps the books), so a run can say what the generator cost next to the server.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from bench.ipc import (
    JsonLines,
    cpu_seconds,
    own_cpu_seconds,
    threads_cpu_seconds,
    trio_offset,
)
from bench.lab import (
    CallOutcome,
    LagProbe,
    lab_ports,
    open_bench_lab,
    prune_lab,
    run_inbound_call,
    script_json,
)
from bench.stats import percentile

SCRIPTS = Path(__file__).resolve().parent.parent
THIS_PROCESS = "load test"


@dataclass
class GeneratorOptions:
    ms_per_char: int
    llm_ttft: float
    tts_ttfb_ms: float
    webhook_url: str
    log_dir: Path
    keep_alive_s: float = 5.0


class ReferenceGenerator:
    """The reference simulators and callers, in this process (``--generator reference``)."""

    name = "reference"

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.lag = LagProbe()

    @classmethod
    async def start(cls, nursery: trio.Nursery, opts: GeneratorOptions) -> ReferenceGenerator:
        lab = await open_bench_lab(
            nursery,
            ms_per_char=opts.ms_per_char,
            llm_ttft=opts.llm_ttft,
            tts_ttfb_ms=opts.tts_ttfb_ms,
            webhook_url=opts.webhook_url,
            keep_alive_s=opts.keep_alive_s,
        )
        generator = cls(lab)
        nursery.start_soon(generator.lag.run)
        nursery.start_soon(generator._prune)
        return generator

    @property
    def api_token(self) -> str:
        token: str = self.lab.api_token
        return token

    def server_env(self) -> dict[str, str]:
        env: dict[str, str] = self.lab.server_env()
        return env

    def ports(self) -> dict[int, str]:
        return lab_ports(self.lab)

    def pids(self) -> dict[str, int]:
        return {}

    async def call(
        self,
        *,
        number: str,
        script: list[Any],
        turns: int,
        ms_per_char: int,
        timeout_s: float,
        say_ends_at: list[float] | None = None,
    ) -> CallOutcome:
        if say_ends_at:
            raise ValueError("only the lean generator plans when callers stop speaking")
        return await run_inbound_call(
            self.lab,
            number=number,
            script=script,
            turns=turns,
            ms_per_char=ms_per_char,
            timeout_s=timeout_s,
        )

    def cpu_seconds(self) -> dict[str, float | None]:
        return {THIS_PROCESS: own_cpu_seconds()}

    def threads_cpu_seconds(self) -> dict[str, dict[str, float]]:
        return {}

    async def lag_mark(self) -> Any:
        return self.lag.mark()

    async def stats(self, mark: Any) -> dict[str, Any]:
        samples = self.lag.since(mark)
        p99 = percentile(samples, 0.99)
        return {"lag_p99_ms": None if p99 is None else round(p99 * 1000, 2)}

    async def aclose(self) -> None:
        pass

    async def _prune(self) -> None:
        while True:
            await trio.sleep(2)
            prune_lab(self.lab)


@dataclass
class ChildProcess:
    """One process of the lean generator and the JSON-lines channel to it."""

    name: str
    process: trio.Process
    channel: JsonLines
    log: IO[bytes]
    ready: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, name: str, module: str, config: dict[str, Any], log_path: Path) -> Any:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        log = _open_log(log_path)  # closed in aclose()
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", module, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        assert process.stdin is not None and process.stdout is not None
        child = cls(name, process, JsonLines(process.stdout, process.stdin), log)
        with trio.move_on_after(30):
            first = await child.channel.receive()
            if first is not None and "ready" in first:
                child.ready = first["ready"]
                return child
        await child.aclose()
        tail = _log_tail(log_path)
        raise RuntimeError(f"the {name} process did not start; its log ends:\n{tail}")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.channel.aclose()  # its stdin closes: it ends by itself
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.poll() is None:
                self.process.kill()
                await self.process.wait()
        self.log.close()


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


class LeanGenerator:
    """The lean carrier and the provider simulators in processes of their own (see the
    module docstring)."""

    name = "lean"

    def __init__(self, carrier: ChildProcess, providers: ChildProcess) -> None:
        self.carrier = carrier
        self.providers = providers
        self.api_token = secrets.token_urlsafe(24)
        self.offset = trio_offset()
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}

    @classmethod
    async def start(cls, nursery: trio.Nursery, opts: GeneratorOptions) -> LeanGenerator:
        providers = await ChildProcess.start(
            "providers",
            "bench.providers_serve",
            {
                "ms_per_char": opts.ms_per_char,
                "llm_ttft": opts.llm_ttft,
                "tts_ttfb_ms": opts.tts_ttfb_ms,
                "keep_alive_s": opts.keep_alive_s,
            },
            opts.log_dir / "generator-providers.log",
        )
        try:
            carrier = await ChildProcess.start(
                "carrier",
                "bench.carrier_serve",
                {"webhook_url": opts.webhook_url, "keep_alive_s": opts.keep_alive_s},
                opts.log_dir / "generator-carrier.log",
            )
        except BaseException:
            await providers.aclose()
            raise
        generator = cls(carrier, providers)
        nursery.start_soon(generator._dispatch)
        return generator

    def server_env(self) -> dict[str, str]:
        from voice_trio.sim import lab

        urls = {**self.carrier.ready, **self.providers.ready}
        return {
            "API_TOKEN": self.api_token,
            "TELNYX_API_KEY": lab.TELNYX_KEY,
            "TELNYX_CONNECTION_ID": lab.CONNECTION_ID,
            "TELNYX_PHONE_NUMBER": lab.OUR_NUMBER,
            "TELNYX_PUBLIC_KEY": urls["public_key"],
            "TELNYX_API_BASE": urls["telnyx_url"] + "/v2",
            "DEEPGRAM_API_KEY": lab.DEEPGRAM_KEY,
            "DEEPGRAM_API_BASE": urls["deepgram_url"],
            "ANTHROPIC_API_KEY": lab.ANTHROPIC_KEY,
            "ANTHROPIC_BASE_URL": urls["anthropic_url"],
            "ELEVENLABS_API_KEY": lab.ELEVENLABS_KEY,
            "ELEVENLABS_VOICE_ID": lab.ELEVENLABS_VOICE,
            "ELEVENLABS_API_BASE": urls["elevenlabs_url"],
        }

    def ports(self) -> dict[int, str]:
        urls = {**self.carrier.ready, **self.providers.ready}
        ports = {}
        for name in ("telnyx", "deepgram", "anthropic", "elevenlabs"):
            url = urls.get(f"{name}_url")
            if url:
                ports[int(url.rsplit(":", 1)[1].split("/", 1)[0])] = name
        return ports

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in (self.carrier, self.providers)}

    async def call(
        self,
        *,
        number: str,
        script: list[Any],
        turns: int,
        ms_per_char: int,
        timeout_s: float,
        say_ends_at: list[float] | None = None,
    ) -> CallOutcome:
        """One inbound call; ``say_ends_at``: when each utterance must end (trio time here)."""
        answer = await self._ask(
            {
                "op": "call",
                "number": number,
                "script": script_json(script),
                "turns": turns,
                "ms_per_char": ms_per_char,
                "timeout_s": timeout_s,
                "say_ends_at": [t - self.offset for t in say_ends_at or ()],
            }
        )
        fields = answer["outcome"]
        fields["turn_starts"] = [tuple(pair) for pair in fields["turn_starts"]]
        return CallOutcome(**fields).shifted(self.offset)

    def cpu_seconds(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {THIS_PROCESS: own_cpu_seconds()}
        for child in (self.carrier, self.providers):
            out[child.name] = cpu_seconds(child.process.pid)
        return out

    def threads_cpu_seconds(self) -> dict[str, dict[str, float]]:
        """Each child's CPU by thread: ``main`` (Trio: REST, webhooks, Anthropic) and
        ``reactor`` (the per-frame work)."""
        return {c.name: threads_cpu_seconds(c.process.pid) for c in (self.carrier, self.providers)}

    async def lag_mark(self) -> Any:
        return (await self._ask({"op": "mark"}))["mark"]

    async def stats(self, mark: Any) -> dict[str, Any]:
        stats: dict[str, Any] = (await self._ask({"op": "stats", "mark": mark}))["stats"]
        return stats

    async def aclose(self) -> None:
        for child in (self.carrier, self.providers):
            await child.aclose()

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        done, slot = trio.Event(), list[dict[str, Any]]()
        self._waiting[ident] = (done, slot)
        try:
            await self.carrier.channel.send({**request, "id": ident})
            await done.wait()
        finally:
            self._waiting.pop(ident, None)
        if not slot:
            raise RuntimeError("the carrier process ended")
        return slot[0]

    async def _dispatch(self) -> None:
        """Hand each answer of the carrier process to whoever asked."""
        try:
            while True:
                answer = await self.carrier.channel.receive()
                if answer is None:
                    return
                waiting = self._waiting.get(answer.get("id", -1))
                if waiting is not None:
                    waiting[1].append(answer)
                    waiting[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            for done, _ in list(self._waiting.values()):
                done.set()  # no answer will come: the askers fail instead of hanging


Generator = LeanGenerator | ReferenceGenerator


def threads_ms_per_call_second(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    call_seconds: float,
) -> dict[str, dict[str, float]]:
    """CPU ms per call-second of each child's threads between two readings."""
    out: dict[str, dict[str, float]] = {}
    if call_seconds <= 0:
        return out
    for process, threads in after.items():
        start = before.get(process, {})
        out[process] = {
            name: round((seconds - start[name]) * 1000 / call_seconds, 2)
            for name, seconds in threads.items()
            if name in start
        }
    return out


def cpu_percent(
    before: dict[str, float | None], after: dict[str, float | None], wall: float
) -> dict[str, float]:
    """CPU between two :meth:`cpu_seconds` readings, % of one core by process, and
    ``total``; a process missing from either reading is left out."""
    out: dict[str, float] = {}
    if wall <= 0:
        return out
    for name, end in after.items():
        start = before.get(name)
        if start is not None and end is not None:
            out[name] = (end - start) / wall * 100
    if out:
        out["total"] = sum(out.values())
    return out


async def start_generator(kind: str, nursery: trio.Nursery, opts: GeneratorOptions) -> Generator:
    if kind == "reference":
        return await ReferenceGenerator.start(nursery, opts)
    return await LeanGenerator.start(nursery, opts)
