"""Recordings over HTTP: served to a signed-in console session and to the API token only,
as audio/wav with Range requests; deleted with their call (DELETE /api/calls/{id}, the
console's delete button); swept after RECORDING_RETENTION_DAYS."""

from __future__ import annotations

import os
import time
import wave
from pathlib import Path

import httpx
import trio
from test_console_http import TOKEN, csrf_of, serve, sign_in

from voice_trio.recordings import recording_path
from voice_trio.store import CallRecord

CCID = "v3:rec-1"


def write_wav(path: Path, seconds: float = 1.0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(b"\x01\x00\x02\x00" * int(8000 * seconds))
    return path.read_bytes()


async def ended_call(center, ccid: str = CCID, mode: str = "media") -> None:
    record = CallRecord(ccid, "inbound", "+573001234567", "+5716000000", mode=mode)
    record.status, record.end_reason, record.ended_at = "ended", "caller_hangup", time.time()
    await center.store.save_call(record, [])


async def test_a_recording_is_served_to_a_signed_in_session_only(nursery, tmp_path) -> None:
    rec_dir = tmp_path / "rec"
    server = await serve(nursery, tmp_path, RECORD_CALLS="true", RECORDINGS_DIR=str(rec_dir))
    center = server.app.center
    await ended_call(center)
    body = write_wav(recording_path(rec_dir, CCID))
    url = f"/console/calls/{CCID}/recording.wav"
    client = server.client
    anonymous = await client.get(url)
    assert anonymous.status_code == 302 and "/console/login" in anonymous.headers["location"]
    bare = await client.get(f"/api/calls/{CCID}/recording")
    assert bare.status_code == 401
    await sign_in(client)
    page = await client.get(f"/console/calls/{CCID}")
    assert '<audio id="recording" controls' in page.text and url in page.text
    whole = await client.get(url)
    assert whole.status_code == 200 and whole.headers["content-type"] == "audio/wav"
    assert whole.content == body
    part = await client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == body[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(body)}"
    api = await client.get(
        f"/api/calls/{CCID}/recording", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert api.status_code == 200 and api.content == body
    missing = await client.get("/console/calls/v3:none/recording.wav")
    assert missing.status_code == 404
    await ended_call(center, "v3:fallback", mode="fallback")
    page = await client.get("/console/calls/v3:fallback")
    assert "<audio" not in page.text and "fallback mode" in page.text
    server.stop.set()


async def test_deleting_a_call_removes_its_record_and_recording(nursery, tmp_path) -> None:
    rec_dir = tmp_path / "rec"
    server = await serve(nursery, tmp_path, RECORD_CALLS="true", RECORDINGS_DIR=str(rec_dir))
    center = server.app.center
    api = httpx.AsyncClient(
        base_url=str(server.client.base_url), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    async with api:
        await ended_call(center)
        path = recording_path(rec_dir, CCID)
        write_wav(path)
        assert (await server.client.delete(f"/api/calls/{CCID}")).status_code == 401
        gone = await api.delete(f"/api/calls/{CCID}")
        assert gone.status_code == 200 and gone.json()["status"] == "deleted"
        assert not path.exists() and await center.store.get_call(CCID) is None
        again = await api.delete(f"/api/calls/{CCID}")
        assert again.status_code == 404 and again.json()["error"] == "not_found"
        active = CallRecord("v3:active", "inbound", "+573001234567", "+5716000000")
        await center.store.start_call(active)
        assert (await api.delete("/api/calls/v3:active")).status_code == 409
    # The console's button: a POST with the session's CSRF token.
    await ended_call(center, "v3:rec-2")
    path = recording_path(rec_dir, "v3:rec-2")
    write_wav(path)
    client = server.client
    await sign_in(client)
    page = await client.get("/console/calls/v3:rec-2")
    assert "Delete this call" in page.text
    refused = await client.post("/console/calls/v3:rec-2/delete", data={"csrf": "wrong"})
    assert refused.status_code == 403 and path.exists()
    done = await client.post("/console/calls/v3:rec-2/delete", data={"csrf": csrf_of(page.text)})
    assert done.status_code == 302 and done.headers["location"] == "/console/calls"
    assert not path.exists() and await center.store.get_call("v3:rec-2") is None
    server.stop.set()


async def test_recordings_past_retention_are_swept_at_start(nursery, tmp_path) -> None:
    rec_dir = tmp_path / "rec"
    old, new = recording_path(rec_dir, "v3:old"), recording_path(rec_dir, "v3:new")
    write_wav(old)
    write_wav(new)
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))
    server = await serve(
        nursery,
        tmp_path,
        RECORD_CALLS="true",
        RECORDINGS_DIR=str(rec_dir),
        RECORDING_RETENTION_DAYS="7",
    )
    with trio.fail_after(5):
        while old.exists():  # noqa: ASYNC110 (a file on disk, not an event)
            await trio.sleep(0.05)
    assert new.exists()
    server.stop.set()
