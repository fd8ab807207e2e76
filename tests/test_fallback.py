"""Fallback mode (Telnyx speak + transcription, driven by webhooks) and the degrade from a
failed media stream, end to end: scripted caller <-> simulated Telnyx (its speak and
transcription emulation) <-> server <-> simulated Anthropic (and Deepgram while a call is
still in media mode)."""

import socket
from collections import Counter
from functools import partial

import pytest
import trio
from conftest import FAST_SPEECH_MS, count_fds, start_lab_server, task_names

from voice_trio.conversation.dtmf import key_note
from voice_trio.providers.telnyx.speech import base_language, caller_words, speak_language
from voice_trio.sim.caller import Dtmf, HangUp, Say, ScriptedCaller, Wait, WaitForBot
from voice_trio.sim.lab import OUR_NUMBER

PATIENT = "+573001234567"
CALLER_MS_PER_CHAR = FAST_SPEECH_MS // 2
FALLBACK = {"USE_MEDIA_STREAMS": "false"}


def caller(script, **kw) -> ScriptedCaller:
    return ScriptedCaller(
        script, ms_per_char=CALLER_MS_PER_CHAR, turn_gap_ms=300, timeout_s=30, **kw
    )


@pytest.fixture
async def lab(lab):
    """conftest's lab, but the bot speaks (Telnyx speak, Deepgram TTS) and Telnyx finalises
    transcripts quicker than a person would: fast tests."""
    lab.telnyx.speak_ms_per_char = lab.deepgram.ms_per_char = 10
    lab.telnyx.transcription_silence_ms = 250
    return lab


def commands(lab, action: str) -> list:
    return [r for r in lab.telnyx.requests if r.path.endswith(f"/actions/{action}")]


def claude_messages(lab) -> list[list[dict]]:
    return [req.body["messages"] for req in lab.anthropic.requests]


async def settle(server) -> None:
    with trio.fail_after(5):
        await server.app.center.registry.wait_until_empty()


async def wait_for(condition, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


def squash(text: str) -> str:
    """Text without spaces: consecutive speak commands play back to back, so the caller
    hears no pause between sentences, hence no word gap either."""
    return "".join(text.split())


def heard_reply_to(results, words: str) -> bool:
    return any(squash(f'usted dijo: "{words}"') in squash(t.text) for t in results.bot_turns)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUESTION_AND_GOODBYE = [
    WaitForBot(min_ms_silence=300),
    Say("Quiero una cita para el lunes.", 100),
    WaitForBot(min_ms_silence=300),
    Say("Eso es todo, gracias. Adiós.", 100),
    WaitForBot(min_ms_silence=300),
    Wait(1500),
]


@pytest.mark.parametrize(
    ("agent_language", "speak", "transcribe"),
    [
        ("es", "es-MX", "es"),
        ("es-CO", "es-MX", "es"),
        ("es-419", "es-MX", "es"),
        ("es-ES", "es-ES", "es"),
        ("es-us", "es-US", "es"),
        ("en", "en-US", "en"),
        ("en-GB", "en-GB", "en"),
        ("eu", None, "eu"),
    ],
)
def test_language_mapping(agent_language, speak, transcribe) -> None:
    assert speak_language(agent_language) == speak
    assert base_language(agent_language) == transcribe


def test_only_confident_final_caller_words_make_a_turn() -> None:
    def payload(**data):
        base = {
            "transcript": " Quiero  una cita ",
            "is_final": True,
            "confidence": 0.9,
            "transcription_track": "inbound",
        }
        return {"transcription_data": {**base, **data}}

    assert caller_words(payload(), 0.5) == "Quiero una cita"
    assert caller_words(payload(is_final=False), 0.5) is None
    assert caller_words(payload(confidence=0.3), 0.5) is None
    assert caller_words(payload(transcription_track="outbound"), 0.5) is None
    assert caller_words(payload(transcript="  "), 0.5) is None
    assert caller_words({"transcription_data": "x"}, 0.5) is None
    no_confidence = payload()
    del no_confidence["transcription_data"]["confidence"]
    assert caller_words(no_confidence, 0.5) == "Quiero una cita"


async def test_a_fallback_conversation_end_to_end(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, **FALLBACK)
    party = caller(QUESTION_AND_GOODBYE, hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    health: list[dict] = []

    async def look_mid_call() -> None:
        await wait_for(lambda: party.results.bot_turns)
        health.append((await server.client.get("/health")).json())

    nursery.start_soon(look_mid_call)
    results = await party.run()
    await settle(server)
    assert not results.errors and not results.timed_out
    heard = [t.text for t in results.bot_turns]
    # The greeting came through Telnyx speak, in the configured voice and language.
    assert "Le habla Sofía, de la Clínica Santa Lucía." in heard[0]
    speak = commands(lab, "speak")[0].json
    assert speak["voice"] == "Azure.es-CO-SalomeNeural" and speak["language"] == "es-MX"
    [start] = commands(lab, "transcription_start")
    assert start.json["transcription_engine"] == "Google"
    assert start.json["transcription_engine_config"]["language"] == "es"
    assert start.json["transcription_tracks"] == "inbound"
    assert commands(lab, "streaming_start") == []
    # The caller's words reached Claude through Telnyx transcription, with the history.
    first, second = claude_messages(lab)
    assert first[-1] == {"role": "user", "content": "Quiero una cita para el lunes."}
    assert first[-2]["role"] == "assistant" and "Le habla Sofía" in first[-2]["content"]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant", "user"]
    assert second[-1]["content"] == "Eso es todo, gracias. Adiós."
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    # end_call: the goodbye was heard, then one hang-up.
    assert "Gracias por llamar." in heard[-1]
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    assert call.spoken[0].startswith(heard[0][:10])
    assert health[0]["active_calls"] == 1 and health[0]["mode"] == "fallback"
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="fallback"} 1.0' in metrics
    server.stop.set()


async def test_fallback_silence_gets_one_reprompt_then_a_goodbye(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, SILENCE_TIMEOUT_MS=1000, **FALLBACK)
    party = caller([WaitForBot(min_ms_silence=300), Wait(8000)], hang_up_when_done=False)
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(server)
    heard = " ".join(t.text for t in results.bot_turns)
    assert heard.count("¿Sigue ahí?") == 1
    assert "voy a terminar la llamada" in heard
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    assert lab.anthropic.request_count == 0
    server.stop.set()


async def test_duplicated_and_reordered_webhooks_act_once_in_order(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, **FALLBACK)
    faults = lab.telnyx.webhooks.faults
    faults.duplicate = faults.reorder = 1000
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 100),
            WaitForBot(min_ms_silence=300),
            Say("A las tres de la tarde.", 100),
            WaitForBot(min_ms_silence=300),
            Say("Eso es todo, gracias. Adiós.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1500),
        ],
        hang_up_when_done=False,
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(server)
    assert not results.errors
    sent = [d.fault for d in lab.telnyx.webhooks.log if d.call_control_id == call.call_control_id]
    assert sent.count("duplicate") >= 8  # every event came twice...
    # ...yet each caller turn reached Claude once, in the order it was said,
    said = [m[-1]["content"] for m in claude_messages(lab)]
    assert said == [
        "Quiero una cita para el lunes.",
        "A las tres de la tarde.",
        "Eso es todo, gracias. Adiós.",
    ]
    # the bot spoke each reply once, the greeting once, and hung up once.
    assert "Le habla Sofía" in call.spoken[0]
    assert call.spoken[1:] == [
        "Entendido, usted dijo:",
        '"Quiero una cita para el lunes.".',
        "¿En qué más le puedo ayudar?",
        "Entendido, usted dijo:",
        '"A las tres de la tarde.".',
        "¿En qué más le puedo ayudar?",
        "Gracias por llamar.",
        "¡Que tenga un buen día!",
    ]
    assert len(commands(lab, "transcription_start")) == 1
    assert len(commands(lab, "hangup")) == 1
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_webhooks_total{event_type="call.transcription",outcome="duplicate"}' in metrics
    server.stop.set()


async def test_streaming_failed_continues_in_fallback_mode(nursery, lab) -> None:
    ws_url = f"ws://127.0.0.1:{closed_port()}/stream/media"  # nothing listens: refused
    server = await start_lab_server(nursery, lab, WS_STREAM_URL=ws_url)
    party = caller(QUESTION_AND_GOODBYE, hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    modes: list[str] = []

    async def look_mid_call() -> None:
        await wait_for(lambda: party.results.bot_turns)
        modes.extend(c.mode for c in server.app.center.registry)

    nursery.start_soon(look_mid_call)
    results = await party.run()
    await settle(server)
    assert not results.errors
    assert "streaming.failed" in call.events
    assert modes == ["degraded"]
    heard = [t.text for t in results.bot_turns]
    assert "Le habla Sofía" in heard[0]  # nothing was heard before: the greeting, once
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert "Gracias por llamar." in heard[-1]
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="degraded"} 1.0' in metrics
    server.stop.set()


async def test_no_media_socket_in_time_continues_in_fallback_mode(nursery, lab) -> None:
    # The stream URL accepts TCP but never answers the upgrade (it drops the connection
    # after 0.8 s). The carrier gives up after a second, long after STREAM_CONNECT_TIMEOUT_MS:
    # its late streaming.failed must change nothing.
    async def never_upgrade(stream: trio.abc.Stream) -> None:
        async with stream:
            await trio.sleep(0.8)

    lab.telnyx.stream_connect_timeout_s = 1.0
    [listener] = await nursery.start(partial(trio.serve_tcp, never_upgrade, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    server = await start_lab_server(
        nursery,
        lab,
        WS_STREAM_URL=f"ws://127.0.0.1:{port}/stream/media",
        STREAM_CONNECT_TIMEOUT_MS=300,
    )
    party = caller(QUESTION_AND_GOODBYE, hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(server)
    assert not results.errors
    assert "streaming.failed" in call.events  # the carrier gave up later...
    assert sum("Le habla Sofía" in s for s in call.spoken) == 1  # ...and it changed nothing
    assert len(commands(lab, "streaming_stop")) == 1
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="degraded"} 1.0' in metrics
    server.stop.set()


@pytest.mark.parametrize("codec", ["G722", "OPUS"])
async def test_a_stream_in_a_codec_the_media_path_cannot_carry_degrades_at_once(
    nursery, lab, caplog, codec
) -> None:
    """An HD SIP (G722) or WebRTC (OPUS) leg: Telnyx cannot transcode to the PCMU asked for
    and streams the call's codec. The call goes on in fallback mode at once (not after
    STREAM_CONNECT_TIMEOUT_MS), says which codec, and never opens a Deepgram session."""
    lab.telnyx.call_codec = codec
    server = await start_lab_server(nursery, lab, STREAM_CONNECT_TIMEOUT_MS=5000)
    party = caller(QUESTION_AND_GOODBYE, hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    nursery.start_soon(party.run)
    await wait_for(lambda: call.spoken, timeout=2.5)  # the greeting, well inside the 5 s
    await wait_for(call.ended.is_set, timeout=30)
    await settle(server)
    results = party.results
    assert not results.errors
    assert [s.params.codec for s in call.streams] == [codec]
    assert sum("Le habla Sofía" in s for s in call.spoken) == 1
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert lab.deepgram.stt_connections_opened == 0
    assert len(commands(lab, "streaming_stop")) == 1
    assert call.streams[0].close_code == 1003
    assert any(f"codec {codec!r}" in m for m in caplog.messages)
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_stream_rejected_total{reason="codec"} 1.0' in metrics
    assert 'voice_calls_total{end_reason="agent_ended",mode="degraded"} 1.0' in metrics
    server.stop.set()


async def test_a_dropped_media_socket_hands_the_conversation_over(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, STREAM_LOST_GRACE_MS=300)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1200),  # the stream drops here
            Say("A las tres de la tarde.", 100),
            WaitForBot(min_ms_silence=300),
            Say("Eso es todo, gracias. Adiós.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1500),
        ],
        hang_up_when_done=False,
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(
            lambda: lab.anthropic.request_count == 1 and len(party.results.bot_turns) == 2
        )
        await wait_for(lambda: party.results.bot_turns[1].ended_at is not None)
        stream = call.line.stream
        call.drop_stream()
    results = party.results
    await settle(server)
    assert not results.errors
    assert stream.close_reason == "dropped" and "call.hangup" in call.events
    heard = [t.text for t in results.bot_turns]
    # Before: media streams (no speak). After: Telnyx speak, with no second greeting.
    assert 'usted dijo: "Quiero una cita para el lunes."' in heard[1]
    assert call.spoken[0] == "Disculpe, ¿me decía?"
    assert not any("Le habla Sofía" in s for s in call.spoken)
    # Claude got the media part of the conversation as history.
    after = claude_messages(lab)[1]
    assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant", "user"]
    assert after[2]["content"] == "Quiero una cita para el lunes."
    assert after[3]["content"].startswith('Entendido, usted dijo: "Quiero una cita')
    assert after[3]["content"].endswith("Disculpe, ¿me decía?")
    assert after[4]["content"] == "A las tres de la tarde."
    assert heard_reply_to(results, "A las tres de la tarde.")
    assert "Gracias por llamar." in heard[-1]
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="degraded"} 1.0' in metrics
    assert 'mode="media"' not in metrics.split("voice_calls_total", 1)[1].split("# HELP")[0]
    stats = (await server.client.get("/api/sessions/stats")).json()
    assert stats["total_calls"] == 1
    server.stop.set()


async def test_caller_words_pending_when_the_stream_fails_are_answered(nursery, lab) -> None:
    lab.anthropic.ttft = 0.8  # the stream fails while Claude is still thinking
    server = await start_lab_server(nursery, lab)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 100),
            WaitForBot(min_ms_silence=300),
            Wait(1000),
        ],
        hang_up_when_done=True,
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(lambda: lab.anthropic.request_count == 1)
        stream = call.line.stream
        call.emit(
            "streaming.failed",
            {
                "failure_reason": "media server restarted",
                "stream_id": stream.params.stream_id,
                "stream_type": "websocket",
                "stream_params": {"stream_url": stream.params.url, "track": "inbound_track"},
            },
        )
    results = party.results
    await settle(server)
    assert not results.errors
    assert stream.close_code == 1000  # the server let the failed stream go
    # The words the media session had not answered yet were answered through speak.
    first, second = claude_messages(lab)
    assert first == second
    assert second[-1] == {"role": "user", "content": "Quiero una cita para el lunes."}
    assert heard_reply_to(results, "Quiero una cita para el lunes.")
    assert "Disculpe, ¿me decía?" not in call.spoken
    assert call.spoken[0] == "Entendido, usted dijo:"
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="hangup",mode="degraded"} 1.0' in metrics
    server.stop.set()


async def test_a_dropped_socket_then_a_hangup_is_just_the_end_of_the_call(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, STREAM_LOST_GRACE_MS=1500)
    party = caller([WaitForBot(min_ms_silence=300), Wait(5000)], hang_up_when_done=False)
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    async with trio.open_nursery() as inner:
        inner.start_soon(party.run)
        await wait_for(lambda: party.results.bot_turns and party.results.bot_turns[0].ended_at)
        call.drop_stream()
        await wait_for(lambda: [c.mode for c in server.app.center.registry] == ["degraded"])
        # The caller hangs up without Telnyx sending stop: call.hangup alone says so.
        call.line.hang_up()
    await settle(server)
    assert commands(lab, "speak") == [] and commands(lab, "transcription_start") == []
    assert commands(lab, "hangup") == []
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="hangup",mode="degraded"} 1.0' in metrics
    server.stop.set()


async def test_fallback_calls_leave_nothing_behind(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, **FALLBACK)
    center = server.app.center
    # A first call opens the keep-alive pools (Telnyx REST, Claude) later calls reuse.
    warm_up = caller([WaitForBot(300), Say("Hola.", 100), WaitForBot(300), HangUp()])
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, warm_up)
    await warm_up.run()
    await settle(server)
    await trio.sleep(0.5)
    tasks_before, fds_before = task_names(), count_fds()
    party = caller(QUESTION_AND_GOODBYE, hang_up_when_done=False)
    lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    await party.run()
    await settle(server)
    assert len(center.registry) == 0 and len(center.fallback) == 0
    assert center.fallback.waiting_for_streams == 0
    with trio.move_on_after(3):
        while len(task_names()) > len(tasks_before) or count_fds() > fds_before:  # noqa: ASYNC110
            await trio.sleep(0.05)
    left = Counter(task_names()) - Counter(tasks_before)
    assert not left, f"tasks left behind: {left}"
    assert count_fds() <= fds_before  # idle pooled connections may have closed meanwhile
    metrics = (await server.client.get("/metrics")).text
    assert 'voice_calls_total{end_reason="agent_ended",mode="fallback"} 1.0' in metrics
    server.stop.set()


async def test_keys_reach_a_fallback_conversation_and_end_call_ends_it(nursery, lab) -> None:
    server = await start_lab_server(nursery, lab, DTMF_SHORTCUTS="9=end_call", **FALLBACK)
    party = caller(
        [
            WaitForBot(min_ms_silence=300),
            Dtmf("1"),
            Dtmf("2"),
            Dtmf("3"),
            Wait(1000),  # the keys are answered KEY_GAP_S after the last one
            WaitForBot(min_ms_silence=300),
            Dtmf("9"),
            WaitForBot(min_ms_silence=300),
            Wait(1500),
        ],
        hang_up_when_done=False,
    )
    call = lab.telnyx.place_inbound_call(PATIENT, OUR_NUMBER, party)
    results = await party.run()
    await settle(server)
    assert not results.errors
    # The three keys, pressed in a row, were one caller turn: dtmf.py's note.
    note = key_note(["1", "2", "3"], "es")
    [request] = claude_messages(lab)
    assert request[-1] == {"role": "user", "content": note}
    assert heard_reply_to(results, note)
    # 9 = end_call: the goodbye, then one hang-up of ours; Claude was not asked about it.
    assert "Gracias por llamar." in results.bot_turns[-1].text
    assert len(commands(lab, "hangup")) == 1 and results.hangup_by == "bot"
    record, turns = await server.app.center.store.get_call(call.call_control_id)
    assert record.mode == "fallback" and record.end_reason == "caller_ended"
    assert [t.user_text for t in turns if t.kind == "reply"] == [note]
    server.stop.set()
