"""How long a fact or an order takes to reach a call held by another instance (loopback).

    .venv/bin/python scripts/event_latency.py [--events 300] [--postgres "host=... user=..."]

Two instances of one deployment on one PostgreSQL (a database made for the run and dropped
after), each its own process: the *holder* (this script, run with ``--holder``) holds fake
media calls, and the *receiver* (this process) gets what is sent to them. Measured, one
event at a time, on the same host clock:

- ``webhook → call``: a ``call.dtmf.received`` webhook POSTed to the receiver, until the
  holder's session gets the key (the webhook's store claim, its reaction, NOTIFY, LISTEN);
- ``bus → call``: the same fact handed to the bus by the receiver (NOTIFY, LISTEN only);
- ``order round trip``: ``POST /api/calls/{id}/say`` to the receiver, until its answer,
  which the holder gave over the bus (lookup in the store, request, reply).

Prints p50/p90/p99/max per path. The target is p99 within 50 ms for a fact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from functools import partial
from typing import Any

import httpx
import psycopg
import trio

from voice_trio.calls.ends import CallMode
from voice_trio.calls.orders import accepted
from voice_trio.calls.registry import ActiveCall
from voice_trio.config import Settings
from voice_trio.server import reserve_listener, serve
from voice_trio.store import CallRecord
from voice_trio.web.dispatch import build_app

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TOKEN = "event-latency-token-0123456789"
CALLS = 20


def settings_for(dsn: str, port: int) -> Settings:
    env = {
        "API_TOKEN": TOKEN,
        "TELNYX_API_KEY": "KEY_unused",
        "TELNYX_CONNECTION_ID": "1",
        "TELNYX_PHONE_NUMBER": "+5716000000",
        "TELNYX_API_BASE": "http://127.0.0.1:9/v2",
        "DEEPGRAM_API_BASE": "http://127.0.0.1:9",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
        "WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "DATABASE_URL": dsn,
        "SERVER_SECRET": "event-latency-secret-0123456789",
        "ALLOW_UNSIGNED_WEBHOOKS": "true",
        "DRAIN_TIMEOUT": "0",
        "LOG_LEVEL": "WARNING",
    }
    return Settings.from_env(env, env_file=None)


async def start_instance(nursery: trio.Nursery, dsn: str) -> tuple[Any, trio.Event]:
    listener = reserve_listener("127.0.0.1")
    settings = settings_for(dsn, listener.getsockname()[1])
    app = build_app(settings)
    stop = trio.Event()
    await nursery.start(
        partial(serve, settings, app=app, listener=listener, shutdown_trigger=stop.wait)
    )
    return app.center, stop


class Obedient:
    def obey(self, order: Any) -> Any:
        return accepted(status="queued", waiting=1)


async def run_holder(dsn: str) -> None:
    """Hold ``CALLS`` fake media calls; print ``got <call> <key> <epoch>`` per key received."""
    async with trio.open_nursery() as nursery:
        center, stop = await start_instance(nursery, dsn)
        for i in range(CALLS):
            ccid = f"v3:latency-{i}"
            center.registry.add(ActiveCall(ccid, mode=CallMode.MEDIA))
            record = CallRecord(ccid, "inbound", "+573001234567", "+5716000000")
            record.holder = center.instance_id
            await center.store.start_call(record)

            def got(kind: str, payload: dict[str, Any], ccid: str = ccid) -> None:
                print(f"got {ccid} {payload.get('digit')} {time.time():.6f}", flush=True)

            center.signals.attach(ccid, got)
            center.live.hold(ccid, Obedient())
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the receiver is done
        for call in center.registry:
            center.registry.remove(call)  # fake calls: nothing to hang up
        stop.set()


async def run_receiver(dsn: str, events: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "webhook → call": [],
        "bus → call": [],
        "order round trip": [],
    }
    arrived: dict[str, float] = {}
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        holder = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, __file__, "--holder", "--dsn", dsn],
                stdin=-1,
                stdout=-1,
            )
        )

        async def read_holder() -> None:
            buffer = b""
            async for chunk in holder.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    words = line.decode().split()
                    if words[:1] == ["ready"]:
                        ready.set()
                    elif words[:1] == ["got"]:
                        arrived[f"{words[1]} {words[2]}"] = float(words[3])

        nursery.start_soon(read_holder)
        with trio.fail_after(30):
            await ready.wait()
        center, stop = await start_instance(nursery, dsn)
        base = center.settings.webhook_base_url
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=10) as client:
            for path in ("webhook → call", "bus → call"):
                for n in range(events + 10):  # the first 10 warm connections and caches up
                    ccid, key = f"v3:latency-{n % CALLS}", str(n % 10)
                    sent = time.time()
                    if path == "bus → call":  # what the webhook's reaction does, alone
                        await center.live.pass_on(ccid, "call.dtmf.received", {"digit": key})
                    else:
                        await client.post("/webhook/telnyx", content=webhook(ccid, key))
                    with trio.fail_after(5):
                        while f"{ccid} {key}" not in arrived:  # noqa: ASYNC110
                            await trio.sleep(0.0005)
                    if n >= 10:
                        results[path].append(arrived.pop(f"{ccid} {key}") - sent)
                    else:
                        arrived.pop(f"{ccid} {key}")
                    await trio.sleep(0.005)
            for n in range(events // 3 + 10):
                ccid = f"v3:latency-{n % CALLS}"
                sent = time.time()
                r = await client.post(f"/api/calls/{ccid}/say", json={"text": "Un momento."})
                assert r.status_code == 200, r.text
                if n >= 10:
                    results["order round trip"].append(time.time() - sent)
        stop.set()
        await holder.stdin.aclose()
    return results


def webhook(ccid: str, digit: str) -> bytes:
    data = {
        "record_type": "event",
        "event_type": "call.dtmf.received",
        "id": str(uuid.uuid4()),
        "occurred_at": "2026-11-25T10:00:00.000Z",
        "payload": {"call_control_id": ccid, "digit": digit, "from": "+57300", "to": "+57"},
    }
    return json.dumps({"data": data, "meta": {"attempt": 1}}).encode()


def report(results: dict[str, list[float]]) -> None:
    print(f"{'path':<20} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for path, seconds in results.items():
        ms = sorted(s * 1000 for s in seconds)
        cuts = statistics.quantiles(ms, n=100)
        print(
            f"{path:<20} {len(ms):>5} {cuts[49]:>8.1f} {cuts[89]:>8.1f} {cuts[98]:>8.1f}"
            f" {ms[-1]:>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--postgres", default=ADMIN, help="admin connection (makes the db)")
    parser.add_argument("--holder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.holder:
        trio.run(run_holder, args.dsn)
        return
    name = f"voice_trio_latency_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        info = admin.info
        dsn = f"postgresql://{info.user}@{info.host}:{info.port}/{name}"
    try:
        report(trio.run(run_receiver, dsn, args.events))
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
