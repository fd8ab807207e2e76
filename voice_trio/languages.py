"""Which ``AGENT_LANGUAGE`` values work: a language the agent speaks, in a code the STT model takes.

The agent's own words (its fixed phrases in ``conversation/phrases.py``, the key-press notes in
``conversation/dtmf.py``, the built-in persona in ``prompts/``) exist in Spanish and English only;
any other value would get Spanish phrases on a call in another language. The caller's words
go to Deepgram as ``language=AGENT_LANGUAGE``, and a model refuses a code it lacks (HTTP 400
at the handshake): every media call would then lose its transcription and fall back. Both
are checked at start-up. Deepgram's lists, with sources: docs/protocols/deepgram.md.
"""

from __future__ import annotations

import re

AGENT_LANGUAGES = {"es": "Spanish", "en": "English"}

# Deepgram live-STT model -> the codes it takes in a language the agent speaks ("multi",
# code-switching, is left out: the agent's phrases need one language).
_NOVA_3 = ("es", "es-419", "en", "en-US")
_NOVA_2 = ("es", "es-419", "en", "en-US", "en-AU", "en-GB", "en-IN", "en-NZ")
_ENGLISH_ONLY = ("en", "en-US")
_NOVA_2_ENGLISH_ONLY = (
    "meeting",
    "phonecall",
    "finance",
    "conversationalai",
    "voicemail",
    "video",
    "medical",
    "drivethru",
    "automotive",
    "atc",
)
STT_LANGUAGES: dict[str, tuple[str, ...]] = {
    "nova-3": _NOVA_3,
    "nova-3-general": _NOVA_3,
    "nova-3-medical": _ENGLISH_ONLY,
    "nova-2": _NOVA_2,
    "nova-2-general": _NOVA_2,
    **{f"nova-2-{domain}": _ENGLISH_ONLY for domain in _NOVA_2_ENGLISH_ONLY},
}
_CODE = re.compile(r"^[a-z]{2}(-[a-z0-9]{2,8})*$", re.IGNORECASE)


def accepted_languages(stt_model: str) -> tuple[str, ...] | None:
    """The codes ``stt_model`` takes in a language the agent speaks; None for a model not
    listed (a custom or newer one), whose list is not known here."""
    return STT_LANGUAGES.get(stt_model.strip().lower())


def agent_language(code: str, stt_model: str | None) -> str:
    """``code`` as the STT model spells it, if it is a language the agent speaks that
    ``stt_model`` takes (``None``: Deepgram is not used, only the agent's side counts).
    Raises ``ValueError`` with what is expected."""
    spoken = ", ".join(AGENT_LANGUAGES.values())
    accepted = accepted_languages(stt_model) if stt_model is not None else None
    if accepted is not None:
        for known in accepted:
            if known.lower() == code.lower():
                return known
        raise ValueError(
            f"a language the agent speaks ({spoken}) that DEEPGRAM_STT_MODEL={stt_model} "
            "takes: one of " + ", ".join(accepted)
        )
    if _CODE.match(code) and code.split("-")[0].lower() in AGENT_LANGUAGES:
        return code
    raise ValueError(
        f"a language the agent speaks ({spoken}): es or en, with a region if "
        + (f"DEEPGRAM_STT_MODEL={stt_model} takes it" if stt_model else "wanted")
        + " (es-419, en-US)"
    )
