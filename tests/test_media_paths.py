"""The media handler on both of its paths: the lean socket (``MEDIA_SOCKET=lean``, the
default) and Hypercorn's WebSocket layers (``asgi``, and the fallback wherever Hypercorn
cannot hand the connection over). The call does the same on either; the carrier sees the
same frames and close codes."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket
from conftest import start_lab_server
from hypercorn.trio.tcp_server import TCPServer
from test_stream_auth import refused_with, start_frame

from voice_trio.compat._guard import shipped
from voice_trio.web import lean_socket, media

STOP = json.dumps({"event": "stop", "stop": {}})


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which socket carried each media connection."""
    taken: list[str] = []

    class CountedLean(lean_socket.LeanWebSocket):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            taken.append("lean")
            super().__init__(*args, **kwargs)

    class CountedAsgi(media.AsgiWebSocket):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            taken.append("asgi")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lean_socket, "LeanWebSocket", CountedLean)
    monkeypatch.setattr(media, "AsgiWebSocket", CountedAsgi)
    return taken


async def a_call_streams(server, ccid: str) -> None:
    base = server.ws_base + "/stream/media"
    headers = server.media_headers(ccid)
    async with trio_websocket.open_websocket_url(base, extra_headers=headers) as ws:
        await ws.send_message(start_frame(ccid))
        greeting = json.loads(await ws.get_message())
        assert greeting["event"] == "media" and greeting["media"]["payload"]
        await ws.ping(b"still there?")
        await ws.send_message(STOP)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(5):
                while True:
                    await ws.get_message()  # the rest of the greeting, then the close
    assert closed.value.reason.code == 1000
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()


@pytest.mark.parametrize("mode", ["lean", "asgi"])
async def test_a_call_streams_on_either_path(nursery, lab, paths, mode: str) -> None:
    server = await start_lab_server(nursery, lab, MEDIA_SOCKET=mode)
    await a_call_streams(server, f"v3:{mode}")
    # A stranger is refused the same way on either.
    url = server.ws_base + "/stream/media?token=v1.1.x"
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(start_frame("v3:stranger"))
        assert await refused_with(ws) == 1008
    assert paths == [mode, mode]
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="caller_hangup",mode="media"} 1.0' in metrics
    assert 'voice_stream_rejected_total{reason="bad_token"} 1.0' in metrics
    server.stop.set()


async def test_where_hypercorn_cannot_hand_over_the_asgi_path_carries_the_call(
    nursery, lab, paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hypercorn's own read loop (a release the handover was not checked against would
    have it too): ``websocket_handover`` finds no connection to hand over."""
    monkeypatch.setattr(TCPServer, "_read_data", shipped(TCPServer, "_read_data"))
    server = await start_lab_server(nursery, lab)
    assert server.app.center.settings.media_socket == "lean"
    await a_call_streams(server, "v3:fallback")
    assert paths == ["asgi"]
    server.stop.set()


@pytest.mark.parametrize("mode", ["lean", "asgi"])
async def test_at_shutdown_the_carrier_hears_going_away(nursery, lab, mode: str) -> None:
    server = await start_lab_server(nursery, lab, MEDIA_SOCKET=mode)
    ccid = f"v3:shutdown-{mode}"
    base = server.ws_base + "/stream/media"
    async with trio_websocket.open_websocket_url(
        base, extra_headers=server.media_headers(ccid)
    ) as ws:
        await ws.send_message(start_frame(ccid))
        assert json.loads(await ws.get_message())["event"] == "media"
        server.stop.set()
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(10):
                while True:
                    await ws.get_message()
    assert closed.value.reason.code == 1001


@pytest.mark.parametrize("mode", ["lean", "asgi"])
async def test_a_carriers_close_is_answered_while_the_call_winds_down(
    nursery, lab, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Telnyx sends ``stop`` and closes at once; the call then takes its time (here, a
    slow store): the close handshake must not wait for it."""
    from voice_trio.media import call as media_call

    keep_record = media_call.keep_record

    async def slow_keep_record(services, record, turns, *, first: bool = False) -> None:  # type: ignore[no-untyped-def]
        if not first:
            await trio.sleep(3)
        await keep_record(services, record, turns, first=first)

    monkeypatch.setattr(media_call, "keep_record", slow_keep_record)
    server = await start_lab_server(nursery, lab, MEDIA_SOCKET=mode)
    ccid = f"v3:wind-down-{mode}"
    base = server.ws_base + "/stream/media"
    async with trio_websocket.open_websocket_url(
        base, extra_headers=server.media_headers(ccid)
    ) as ws:
        await ws.send_message(start_frame(ccid))
        assert json.loads(await ws.get_message())["event"] == "media"
        await ws.send_message(STOP)
        with trio.fail_after(1):
            await ws.aclose(1000)
    assert ws.closed is not None and ws.closed.code == 1000
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()
    server.stop.set()
