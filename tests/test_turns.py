"""TurnDetector: Deepgram result sequences -> turn signals (deepgram.md §A7)."""

from __future__ import annotations

from voice_trio.media.turns import CallerSpeaking, TurnDetector, TurnSignal, UserTurn


def interim(d: TurnDetector, text: str, confidence: float = 0.9) -> TurnSignal | None:
    return d.on_transcript(text, confidence, is_final=False, speech_final=False)


def final(
    d: TurnDetector, text: str, confidence: float = 0.9, speech_final: bool = False
) -> TurnSignal | None:
    return d.on_transcript(text, confidence, is_final=True, speech_final=speech_final)


def test_finals_accumulate_until_speech_final() -> None:
    d = TurnDetector()
    assert d.on_speech_started() == CallerSpeaking()
    assert interim(d, "quiero") == CallerSpeaking("quiero")
    assert interim(d, "quiero cambiar") is None
    assert d.last_interim == "quiero cambiar"
    assert final(d, " Quiero cambiar ") is None
    assert d.pending_text == "Quiero cambiar"
    assert d.last_interim == ""
    assert interim(d, "mi") is None
    assert final(d, "mi cita.", speech_final=True) == UserTurn("Quiero cambiar mi cita.")
    assert d.pending_text == ""
    assert not d.in_utterance


def test_utterance_end_after_speech_final_is_ignored() -> None:
    d = TurnDetector()
    interim(d, "hola")
    assert final(d, "Hola.", speech_final=True) == UserTurn("Hola.")
    assert d.on_utterance_end() is None


def test_utterance_end_without_speech_final_emits_the_finals() -> None:
    d = TurnDetector()
    assert final(d, "Sí,") == CallerSpeaking("Sí,")
    assert final(d, "de acuerdo.") is None
    assert d.on_utterance_end() == UserTurn("Sí, de acuerdo.")
    assert d.on_utterance_end() is None


def test_utterance_end_with_nothing_collected() -> None:
    d = TurnDetector()
    assert d.on_speech_started() == CallerSpeaking()
    assert d.on_utterance_end() is None
    assert d.on_speech_started() == CallerSpeaking()  # a new utterance is news again


def test_speech_final_alone_when_first_words() -> None:
    d = TurnDetector()
    assert final(d, "Sí.", speech_final=True) == UserTurn("Sí.")


def test_empty_speech_final_ends_nothing_but_resets() -> None:
    d = TurnDetector()
    assert d.on_speech_started() == CallerSpeaking()
    assert final(d, "", confidence=0.0, speech_final=True) is None
    assert d.low_confidence_dropped == 0
    assert d.on_speech_started() == CallerSpeaking()


def test_caller_speaking_is_not_repeated_within_an_utterance() -> None:
    d = TurnDetector()
    signals = [d.on_speech_started(), d.on_speech_started()]
    signals += [interim(d, "uno"), interim(d, "uno dos"), final(d, "uno dos")]
    signals += [d.on_speech_started(), interim(d, "tres")]
    assert [s for s in signals if s is not None] == [CallerSpeaking(), CallerSpeaking("uno")]
    assert final(d, "tres", speech_final=True) == UserTurn("uno dos tres")
    # Next utterance (e.g. barge-in over the reply) is reported again.
    assert interim(d, "espere") == CallerSpeaking("espere")


def test_words_are_reported_after_a_bare_speech_started() -> None:
    d = TurnDetector()
    assert d.on_speech_started() == CallerSpeaking()
    assert interim(d, "oiga") == CallerSpeaking("oiga")
    assert d.on_speech_started() is None


def test_empty_transcripts_are_not_speech() -> None:
    d = TurnDetector()
    assert interim(d, "  ", confidence=0.0) is None
    assert final(d, "") is None
    assert not d.in_utterance
    assert d.on_utterance_end() is None


def test_low_confidence_final_is_dropped_and_counted() -> None:
    d = TurnDetector(min_confidence=0.6)
    assert final(d, "mmm", confidence=0.3) is None
    assert d.low_confidence_dropped == 1
    assert d.pending_text == ""
    assert d.on_utterance_end() is None
    assert final(d, "Buenas tardes.", confidence=0.95) == CallerSpeaking("Buenas tardes.")
    assert final(d, "eh", confidence=0.2, speech_final=True) == UserTurn("Buenas tardes.")
    assert d.low_confidence_dropped == 2


def test_low_confidence_interim_is_not_speech() -> None:
    d = TurnDetector(min_confidence=0.6)
    assert interim(d, "ruido", confidence=0.1) is None
    assert d.last_interim == ""
    assert not d.in_utterance
    assert d.low_confidence_dropped == 0
    assert interim(d, "hola", confidence=0.8) == CallerSpeaking("hola")


def test_confidence_at_threshold_counts() -> None:
    d = TurnDetector(min_confidence=0.5)
    assert final(d, "vale", confidence=0.5, speech_final=True) == UserTurn("vale")
