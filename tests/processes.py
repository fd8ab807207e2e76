"""Programs run as a user runs them: a subprocess, its output in a file, waited on by text."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from voice_trio.config import Settings

BIN = Path(sys.executable).parent


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment minus any voice-trio setting of the developer's shell."""
    names: set[str] = set()
    for f in dataclasses.fields(Settings):
        names.add(f.metadata["env"])
        names.update(f.metadata.get("aliases", ()))
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({"PYTHONUNBUFFERED": "1", **overrides})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Program:
    """One subprocess; stdout and stderr go to ``log`` (read with ``output``)."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the program exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()[-4000:]}")
            await trio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.process.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> int:
        return await trio.to_thread.run_sync(self.process.wait, timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
