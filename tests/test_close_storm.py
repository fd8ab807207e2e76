"""The Hypercorn 0.18 close race (research/trio-stack.md, gotcha 11), forced, and survived.

How the race goes. A carrier sends a Close frame; Hypercorn's reader task answers it: it takes
the connection's ``send_lock`` and, one scheduling point later (``Lock.acquire`` yields), calls
``stream.send_all(close reply)``. If in that gap another task of the same connection runs
``TCPServer._close`` — the app task does, when its handler ends before Hypercorn reported the
disconnect (our media handler's drain cut short by shutdown or by its timeout) — then
``send_eof`` holds the stream's conflict detector across a checkpoint without the lock, the
reader's ``send_all`` raises ``trio.BusyResourceError``, ``protocol_send`` does not catch it,
it escapes ``TCPServer.run`` into the worker's connection nursery and cancels every
connection of the process: every call on the instance ends at once.

Our media handler normally waits for the disconnect before it returns, so the gap is a single
scheduling point and does not show up in a natural storm (``test_hardening.py`` runs one as a
survival guard). The test here forces the interleaving instead: the server's close replies
wait at that point until the app task has reached ``_close`` (and until ``send_eof`` holds the
stream, if it gets that far without the lock). Without ``compat/hypercorn.py`` (close_race) the process
dies with ``BusyResourceError``; with it, every other call goes on.

Both tests run the media sockets through Hypercorn (``MEDIA_SOCKET=asgi``), where its reader
answers Close frames. On the lean path (the default) our socket answers them itself, under
the same ``send_lock``, and Hypercorn's ``_close`` runs only once the socket has released
the connection: that interleaving cannot happen there, and ``test_hardening.py``'s natural
storm is its survival guard.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket
from conftest import LiveServer, Signer, start_lab_server, webhook_body
from hypercorn.trio.tcp_server import TCPServer
from test_hardening import media_frame, start_frame

from voice_trio.sim.speech import encode_speech, silence
from voice_trio.web.media_socket import AsgiWebSocket

DOOMED = 6
SURVIVORS = 6


def _is_server_close_frame(data: bytes) -> bool:
    # Unmasked (server to client) WebSocket frame, FIN + opcode 8.
    return len(data) >= 2 and data[0] == 0x88 and not data[1] & 0x80


class CloseRace:
    """Holds each gated close reply at the yield between taking ``send_lock`` and
    ``send_all`` until the same connection has entered ``_close`` (and, if it can without
    the lock, ``send_eof``), so the unfixed overlap happens every time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.gated = 0
        self.close_entered: dict[trio.SocketStream, trio.Event] = {}
        self.eof_entered: dict[trio.SocketStream, trio.Event] = {}

    def _ours(self, stream: trio.SocketStream) -> bool:
        try:
            return self.armed and stream.socket.getsockname()[1] == self.port
        except OSError:
            return False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        send_all = trio.SocketStream.send_all
        send_eof = trio.SocketStream.send_eof
        close = TCPServer._close  # the fixed one, or the original if a test restored it

        async def gated_send_all(stream: trio.SocketStream, data: bytes) -> None:
            if self._ours(stream) and _is_server_close_frame(bytes(data[:2])):
                self.gated += 1
                with trio.move_on_after(5):
                    await self.close_entered.setdefault(stream, trio.Event()).wait()
                with trio.move_on_after(0.1):  # the fix makes _close wait for our lock
                    await self.eof_entered.setdefault(stream, trio.Event()).wait()
            await send_all(stream, data)

        async def widened_send_eof(stream: trio.SocketStream) -> None:
            if self._ours(stream):
                # send_eof holds the conflict detector across a checkpoint; hold it while
                # the gated reply goes in.
                with stream._send_conflict_detector:
                    self.eof_entered.setdefault(stream, trio.Event()).set()
                    await trio.sleep(0.05)
            await send_eof(stream)

        async def observed_close(server: TCPServer) -> None:
            if self._ours(server.stream):
                self.close_entered.setdefault(server.stream, trio.Event()).set()
            await close(server)

        monkeypatch.setattr(trio.SocketStream, "send_all", gated_send_all)
        monkeypatch.setattr(trio.SocketStream, "send_eof", widened_send_eof)
        monkeypatch.setattr(TCPServer, "_close", observed_close)


async def _open_call(server: LiveServer, nursery: trio.Nursery, ccid: str):
    ws = await trio_websocket.connect_websocket_url(nursery, server.media_url(ccid))
    await ws.send_message(start_frame(ccid))
    assert json.loads(await ws.get_message())["event"] == "media"  # the greeting: call is up
    return ws


async def _storm(
    server: LiveServer, race: CloseRace, signer: Signer, connections: trio.Nursery
) -> list[trio_websocket.WebSocketConnection]:
    """Open the calls (their sockets live in ``connections``), then close the doomed ones
    from both ends at once; returns the survivors' sockets."""
    sockets: dict[str, trio_websocket.WebSocketConnection] = {}
    async with trio.open_nursery() as opening:

        async def open_one(ccid: str) -> None:
            sockets[ccid] = await _open_call(server, connections, ccid)

        for i in range(DOOMED):
            opening.start_soon(open_one, f"v3:doomed-{i}")
        for i in range(SURVIVORS):
            opening.start_soon(open_one, f"v3:survivor-{i}")
    assert (await server.client.get("/health")).json()["active_calls"] == DOOMED + SURVIVORS

    race.armed = True
    async with trio.open_nursery() as storm:
        for i in range(DOOMED):
            # The carrier hangs up: its Close frame; the server's reply is held at the gap.
            storm.start_soon(sockets[f"v3:doomed-{i}"].aclose)
        with trio.fail_after(5):
            while race.gated < DOOMED:  # noqa: ASYNC110
                await trio.sleep(0.01)
        for i in range(DOOMED):
            # ...and at that moment the server ends the same calls.
            body = webhook_body("call.hangup", f"v3:doomed-{i}", hangup_cause="normal_clearing")
            storm.start_soon(
                lambda b=body: server.client.post(
                    "/webhook/telnyx", content=b, headers=signer.headers(b)
                )
            )
    with trio.fail_after(10):
        while len(server.app.center.registry) > SURVIVORS:  # noqa: ASYNC110
            await trio.sleep(0.02)
    race.armed = False
    return [sockets[f"v3:survivor-{i}"] for i in range(SURVIVORS)]


async def _still_talking(server: LiveServer, lab, ws, ccid: str) -> None:
    """The call hears the caller and answers: a new utterance reaches Claude and bot audio
    comes back."""
    text = f"Hola, soy {ccid.rsplit('-', 1)[-1]}."
    audio = silence(200) + encode_speech(text, 25) + silence(900)
    deadline = trio.current_time()
    for chunk, start in enumerate(range(0, len(audio), 160), start=100):
        await ws.send_message(media_frame(chunk, audio[start : start + 160]))
        deadline += 0.02
        await trio.sleep_until(deadline)
    with trio.fail_after(10):
        while not any(text in json.dumps(r.body) for r in lab.anthropic.requests):  # noqa: ASYNC110
            await trio.sleep(0.05)


def _drain_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler stops waiting for the peer's disconnect at once (the drain timed out or
    shutdown cancelled it): its task reaches Hypercorn's ``_close`` itself."""
    original = AsgiWebSocket.drain

    async def drain(self: AsgiWebSocket, timeout: float = 35.0) -> None:
        await original(self, 0.0)

    monkeypatch.setattr(AsgiWebSocket, "drain", drain)


async def test_close_race_is_survived_by_every_other_call(nursery, lab, monkeypatch) -> None:
    signer = Signer()
    async with trio.open_nursery() as connections:
        server = await start_lab_server(
            nursery, lab, TELNYX_PUBLIC_KEY=signer.public_b64, MEDIA_SOCKET="asgi"
        )
        race = CloseRace(int(server.base.rsplit(":", 1)[1]))
        race.install(monkeypatch)
        _drain_cut_short(monkeypatch)
        survivors = await _storm(server, race, signer, connections)
        assert race.gated == DOOMED and len(race.close_entered) == DOOMED
        # The process still serves: health, every survivor's conversation, and a new call.
        r = await server.client.get("/health")
        assert r.status_code == 200 and r.json()["active_calls"] == SURVIVORS
        async with trio.open_nursery() as talking:
            for i, ws in enumerate(survivors):
                talking.start_soon(_still_talking, server, lab, ws, f"v3:survivor-{i}")
        fresh = await _open_call(server, connections, "v3:after-the-race")
        await fresh.aclose()
        for ws in survivors:
            await ws.aclose()
        server.stop.set()
        connections.cancel_scope.cancel()


async def test_without_the_fix_the_close_race_takes_the_whole_server_down(
    nursery, lab, monkeypatch
) -> None:
    """The same interleaving on Hypercorn as shipped: this is what the fix is for. If this
    test ever fails, Hypercorn has fixed the race and ``compat.hypercorn.CLOSE_RACE`` may go."""
    monkeypatch.setattr(TCPServer, "_close", TCPServer._close.__wrapped__)
    signer = Signer()
    with pytest.RaisesGroup(trio.BusyResourceError, flatten_subgroups=True):
        async with trio.open_nursery() as serving:
            server = await start_lab_server(
                serving, lab, TELNYX_PUBLIC_KEY=signer.public_b64, MEDIA_SOCKET="asgi"
            )
            race = CloseRace(int(server.base.rsplit(":", 1)[1]))
            race.install(monkeypatch)
            _drain_cut_short(monkeypatch)
            await _storm(server, race, signer, nursery)
            await trio.sleep(5)  # the crash cancels this
            raise AssertionError("the server survived the race without the fix")
