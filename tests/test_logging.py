import io
import json
import logging
import re

from voice_trio.observability import call_id_var, setup_logging


def _capture(fmt: str, secrets=()) -> tuple[logging.Logger, io.StringIO]:
    setup_logging("DEBUG", fmt, secrets)
    logger = logging.getLogger("voice_trio")
    stream = io.StringIO()
    logger.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    return logging.getLogger("voice_trio.calls"), stream


def teardown_function() -> None:
    logging.getLogger("voice_trio").handlers.clear()
    logging.getLogger("voice_trio").propagate = True


def test_human_lines_carry_ms_timestamp_level_and_call_id() -> None:
    log, out = _capture("human")
    token = call_id_var.set("v3:abc")
    try:
        log.info("🎤 Caller: hola")
    finally:
        call_id_var.reset(token)
    log.warning("no call here")
    first, second = out.getvalue().splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\.\d{3}\] INFO  \[v3:abc\] 🎤 Caller: hola", first)
    assert second.endswith("WARN  [-] no call here") or "WARNING [-] no call here" in second


def test_json_format_is_one_object_per_line() -> None:
    log, out = _capture("json")
    token = call_id_var.set("v3:xyz")
    try:
        log.info("💬 Bot: %s", "buenos días")
    finally:
        call_id_var.reset(token)
    entry = json.loads(out.getvalue())
    assert entry["call_id"] == "v3:xyz" and entry["level"] == "INFO"
    assert entry["message"] == "💬 Bot: buenos días"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


def test_secret_values_never_reach_the_log() -> None:
    log, out = _capture("human", secrets=["KEY_super_secret_value"])
    log.error("Telnyx said no to Bearer %s", "KEY_super_secret_value")
    assert "KEY_super_secret_value" not in out.getvalue()
    assert "Bearer ****" in out.getvalue()
