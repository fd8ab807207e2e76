"""What the fallback mode says to Telnyx and reads from it: pure functions over settings
and webhook payloads (``shared/docs/protocols/telnyx.md`` §1.5, §1.7, §2.3)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("voice_trio.calls")

# Telnyx ``speak`` accepts these ``language`` values (telnyx-python ActionSpeakParams).
SPEAK_LANGUAGES = frozenset(
    "arb cmn-CN cy-GB da-DK de-DE en-AU en-GB en-GB-WLS en-IN en-US es-ES es-MX es-US fr-CA "
    "fr-FR hi-IN is-IS it-IT ja-JP ko-KR nb-NO nl-NL pl-PL pt-BR pt-PT ro-RO ru-RU sv-SE "
    "tr-TR".split()
)
# A bare or unlisted variant goes to one listed region. Spanish: Colombian (the project's
# default) and es-419 are not in the list; es-MX is its Latin-American Spanish.
SPEAK_REGIONS = {"es": "es-MX", "en": "en-US", "pt": "pt-BR", "fr": "fr-FR", "de": "de-DE"}


def speak_language(agent_language: str) -> str | None:
    """``language`` for Telnyx ``speak`` from ``AGENT_LANGUAGE``: an exact entry of Telnyx's
    list (``es-ES``), else the list's region for that language (``es``, ``es-CO``, ``es-419``
    → ``es-MX``), else None (left out: the voice decides)."""
    wanted = agent_language.strip()
    for known in SPEAK_LANGUAGES:
        if known.lower() == wanted.lower():
            return known
    return SPEAK_REGIONS.get(base_language(wanted))


def base_language(agent_language: str) -> str:
    """The language without its region (``es-419`` → ``es``): what Telnyx's Google
    transcription engine takes."""
    return agent_language.strip().split("-")[0].split("_")[0].lower()


def caller_words(payload: dict[str, Any], min_confidence: float) -> str | None:
    """The caller's words in a ``call.transcription`` payload, if they make a turn: a final
    result, of the inbound track (the caller), at least ``min_confidence`` sure."""
    data = payload.get("transcription_data")
    if not isinstance(data, dict) or data.get("is_final") is not True:
        return None
    if data.get("transcription_track", "inbound") != "inbound":
        return None
    text = data.get("transcript")
    if not isinstance(text, str) or not text.strip():
        return None
    confidence = data.get("confidence")
    if isinstance(confidence, int | float) and confidence < min_confidence:
        log.debug("🎤 Ignored a low-confidence final (%.2f): %s", confidence, text)
        return None
    return " ".join(text.split())
