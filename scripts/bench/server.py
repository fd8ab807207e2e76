"""The server under test as a child process: ``python -m voice_trio.cli serve`` (or one of
this package's launchers), pointed at the simulators of the script's process, reachable on
127.0.0.1 only; its environment, readiness, stop, and what its descriptors are."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import httpx
import trio

from bench.scrape import scrape

# Launchers that replace ``python -m voice_trio.cli``. They run as files with ``-P``: their
# folder (this package's) is not put first on sys.path, where its modules would shadow any
# top-level module of the same name in the server.
TRACED_SERVE = [sys.executable, "-P", str(Path(__file__).with_name("traced_serve.py"))]
VARIANT_SERVE = [sys.executable, "-P", str(Path(__file__).with_name("variant_serve.py"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setting_names() -> set[str]:
    from voice_trio.config import Settings

    names: set[str] = set()
    for f in dataclasses.fields(Settings):
        names.add(f.metadata["env"])
        names.update(f.metadata.get("aliases", ()))
    return names


def server_env(
    lab_env: dict[str, str],
    port: int,
    data_dir: Path,
    extra: dict[str, str] | None = None,
    *,
    workers: int = 1,
    database_url: str = "",
) -> dict:
    """The server's environment: this one without any voice-trio setting of its own (a
    developer's shell must not change the run), plus the lab's, loopback host and port, and
    the call-records file (the default SQLite store) in ``data_dir``, not in the checkout.
    ``workers`` > 1 needs ``database_url`` (PostgreSQL) and gets a random shared secret."""
    names = _setting_names()
    env = {k: v for k, v in os.environ.items() if k not in names}
    if "SQLITE_PATH" in names:
        env["SQLITE_PATH"] = str(data_dir.resolve() / "calls.sqlite3")
    env.update(lab_env)
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if "MAX_CONNECTIONS_PER_CLIENT" in names:
        # Every simulated carrier connects from 127.0.0.1: one client, hundreds of calls.
        env["MAX_CONNECTIONS_PER_CLIENT"] = "5000"
        env["MAX_CONNECTIONS"] = "5000"
    if workers > 1:
        env["WORKERS"] = str(workers)
        env["SERVER_SECRET"] = os.urandom(16).hex()
        # Each worker's metric files go here; the supervisor removes them at the end.
        env["TMPDIR"] = str(data_dir.resolve())
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


def sigterm_as_interrupt() -> None:
    """SIGTERM (``timeout``, a CI runner) ends the script like Ctrl-C: ``finally`` blocks
    run and the server child is stopped instead of orphaned."""

    def handler(signum: int, frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class ServerProcess:
    """``python -m voice_trio.cli serve`` as a child process; stderr goes to ``log_path``.

    Ready when ``GET /health`` answers (at ``LOG_LEVEL=WARNING`` the INFO line "Server
    listening" is not printed). :meth:`stop` sends SIGTERM (the server ends its calls
    politely), then SIGKILL after ``timeout``.
    """

    def __init__(
        self,
        env: dict[str, str],
        port: int,
        log_path: Path,
        launcher: list[str] | None = None,
        workers: int = 1,
    ) -> None:
        # ``launcher`` replaces ``python -m voice_trio.cli`` (e.g. TRACED_SERVE).
        self.launcher = launcher or [sys.executable, "-m", "voice_trio.cli"]
        self.env = env
        self.port = port
        self.workers = workers
        self.worker_pids: dict[str, int] = {}  # with several workers: the last ones seen
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: trio.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float = 30.0) -> None:
        self._log = self._open_log()
        # A settings file that does not exist: the environment alone configures the run.
        missing_env_file = str(self.log_path.with_suffix(".no-env-file"))
        self.process = await trio.lowlevel.open_process(
            [*self.launcher, "--env-file", missing_env_file, "serve"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2, trust_env=False) as c:
            with trio.move_on_after(timeout):
                while self.process.poll() is None:
                    try:
                        if (await c.get("/health")).status_code == 200 and (
                            self.workers == 1 or len(await self.live_workers(c)) == self.workers
                        ):
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)
        code = self.process.poll()
        await self.stop(2.0)
        raise RuntimeError(
            f"server did not become ready (exit code {code}); last log lines:\n{self.log_tail()}"
        )

    async def live_workers(self, client: httpx.AsyncClient) -> dict[str, int]:
        """The workers ``/metrics`` lists (every one has started serving)."""
        self.worker_pids = (await scrape(client)).worker_pids()
        return self.worker_pids

    @property
    def pids(self) -> list[int]:
        """The processes that serve: the workers, or the server itself."""
        if self.workers > 1:
            return sorted(self.worker_pids.values())
        return [self.pid] if self.pid is not None else []

    def _open_log(self) -> IO[bytes]:
        return open(self.log_path, "wb")  # closed in stop()

    async def stop(self, timeout: float = 20.0) -> int | None:
        process = self.process
        if process is None:
            return None
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(timeout):
                    await process.wait()
            if process.poll() is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def kill_now(self) -> None:
        """Last resort (the harness itself is failing): no server outlives the script."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> dict[str, int]:
        """Lines at WARNING/ERROR and tracebacks in the server's log."""
        counts = {"warning": 0, "error": 0, "traceback": 0}
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return counts
        for line in text.splitlines():
            if " WARNING " in line or " WARN " in line:
                counts["warning"] += 1
            elif " ERROR " in line or " CRITICAL " in line:
                counts["error"] += 1
            if line.startswith("Traceback"):
                counts["traceback"] += 1
        return counts

    def socket_peers(
        self, names: dict[int, str] | None = None, pid: int | None = None
    ) -> dict[str, int]:
        """The server's TCP sockets by direction, peer and state, e.g. ``"out deepgram
        ESTABLISHED": 3``, ``"in CLOSE_WAIT": 1`` (``in``: accepted on the server's port):
        what a descriptor leak is made of. ``pid``: one worker's (default: every serving
        process's, summed)."""
        if pid is None:
            total: dict[str, int] = {}
            for each in self.pids:
                for key, count in self.socket_peers(names, each).items():
                    total[key] = total.get(key, 0) + count
            return total
        names = names or {}
        inodes: set[str] = set()
        try:
            for entry in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(entry)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            return {}
        peers: dict[str, int] = {}
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) < 10 or cols[9] not in inodes:
                    continue
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                state = _TCP_STATES.get(cols[3], cols[3])
                if state == "LISTEN":
                    key = "listen"
                elif local_port == self.port:
                    key = f"in {state}"
                else:
                    key = f"out {names.get(remote_port, remote_port)} {state}"
                peers[key] = peers.get(key, 0) + 1
        return peers

    def fd_kinds(self, pid: int | None = None) -> dict[str, int]:
        """What the server's descriptors are (socket, pipe, file, ...), for leak reports:
        one worker's, or every serving process's summed."""
        kinds: dict[str, int] = {}
        if pid is None:
            for each in self.pids:
                for key, count in self.fd_kinds(each).items():
                    kinds[key] = kinds.get(key, 0) + count
            return kinds
        base = Path(f"/proc/{pid}/fd")
        try:
            entries = list(base.iterdir())
        except OSError:
            return kinds
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            kind = target.split(":", 1)[0] if ":" in target else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds
