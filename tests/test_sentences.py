"""SentenceChunker and clip_reply."""

from __future__ import annotations

import pytest

from voice_trio.conversation.sentences import SentenceChunker, clip_reply


def chunk(deltas: list[str], max_clause: int = 120) -> tuple[list[list[str]], list[str]]:
    c = SentenceChunker(max_clause)
    return [c.push(d) for d in deltas], c.flush()


def by_char(text: str, max_clause: int = 120) -> list[str]:
    c = SentenceChunker(max_clause)
    out: list[str] = []
    for ch in text:
        out += c.push(ch)
    return out + c.flush()


def test_sentence_is_released_by_the_delta_that_ends_it() -> None:
    pushed, rest = chunk(["Hola, buenas", " tardes.", " ¿En qué", " puedo ayudarle?"])
    assert pushed == [[], ["Hola, buenas tardes."], [], ["¿En qué puedo ayudarle?"]]
    assert rest == []


def test_a_terminator_after_a_digit_waits_for_the_next_delta() -> None:
    pushed, rest = chunk(["Son las 10:", "30. Bien"])
    assert pushed == [[], ["Son las 10:30."]]
    assert rest == ["Bien"]


def test_several_sentences_in_one_delta() -> None:
    pushed, rest = chunk(["Sí. Claro! ¿Algo más? Bien… Adiós"])
    assert pushed == [["Sí.", "Claro!", "¿Algo más?", "Bien…"]]
    assert rest == ["Adiós"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Cuesta 3.5 euros. Gracias.", ["Cuesta 3.5 euros.", "Gracias."]),
        ("Son las 10:30 de la mañana.", ["Son las 10:30 de la mañana."]),
        ("Le atiende el Dr. García. Un momento.", ["Le atiende el Dr. García.", "Un momento."]),
        ("La Sra. López llamó.", ["La Sra. López llamó."]),
        ("Pan, leche, etc. y nada más.", ["Pan, leche, etc. y nada más."]),
        ("Hable con J. Pérez mañana.", ["Hable con J. Pérez mañana."]),
        ("Tiene dos opciones: A o B; elija.", ["Tiene dos opciones:", "A o B;", "elija."]),
        ("Espere... ya está.", ["Espere...", "ya está."]),
        ("¿De verdad?! Qué bien.", ["¿De verdad?!", "Qué bien."]),
        ('Dijo "hola." Luego colgó.', ['Dijo "hola."', "Luego colgó."]),
        ("Claro.¿Algo más?", ["Claro.", "¿Algo más?"]),
        ("¡Perfecto! ¿Le va bien el lunes?", ["¡Perfecto!", "¿Le va bien el lunes?"]),
        ("Primera línea\nSegunda línea", ["Primera línea", "Segunda línea"]),
        ("Su asiento es el 12A. Buen viaje.", ["Su asiento es el 12A.", "Buen viaje."]),
        ("   ", []),
    ],
)
def test_boundaries(text: str, expected: list[str]) -> None:
    pushed, rest = chunk([text])
    assert pushed[0] + rest == expected
    # Fed one character at a time, a sentence may end before a trailing "..", "!" or
    # closing quote arrives; those pieces are dropped, so the words spoken are the same.
    assert [_words(p) for p in by_char(text)] == [_words(p) for p in expected]


def _words(sentence: str) -> str:
    return sentence.strip(".?!…;:\"'”’»)]")


def test_decimal_split_across_deltas() -> None:
    pushed, rest = chunk(["Son 3.", "5 euros."])
    assert pushed == [[], ["Son 3.5 euros."]]
    assert rest == []


def test_question_with_opener_split_across_deltas() -> None:
    pushed, rest = chunk(["Perfecto. ", "¿", "Algo", " más?", " Adiós."])
    assert pushed == [["Perfecto."], [], [], ["¿Algo más?"], ["Adiós."]]
    assert rest == []


def test_long_clause_is_cut_at_a_comma() -> None:
    text = "Tenemos citas disponibles el lunes por la mañana, " + "y también " * 10 + "el martes"
    out = by_char(text, max_clause=80)
    assert out[0] == "Tenemos citas disponibles el lunes por la mañana,"
    assert " ".join(out) == text


def test_long_clause_without_comma_is_cut_at_a_space() -> None:
    words = ["palabra"] * 40
    out = by_char(" ".join(words), max_clause=50)
    assert len(out) > 1
    assert all(len(piece) <= 50 for piece in out)
    assert " ".join(out).split() == words


def test_long_clause_never_leaves_an_opener_alone() -> None:
    text = "x" * 45 + " ¡ hola amigo mío, qué tal"
    out = by_char(text, max_clause=48)
    assert all(not piece.endswith(("¡", "¿")) for piece in out)


def test_flush_empties_the_chunker() -> None:
    c = SentenceChunker()
    assert c.push("Hola") == []
    assert c.pending == "Hola"
    assert c.flush() == ["Hola"]
    assert c.flush() == []
    assert c.pending == ""


def test_bad_max_clause() -> None:
    with pytest.raises(ValueError):
        SentenceChunker(0)


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("Hola. ¿Qué tal?", 100, "Hola. ¿Qué tal?"),
        ("Hola. ¿Qué tal? Muy bien", 16, "Hola. ¿Qué tal?"),
        ("Hola. ¿Qué tal? Muy bien", 15, "Hola. ¿Qué tal?"),
        ("Hola. ¿Qué tal? Muy bien", 14, "Hola."),
        ("La Dra. Ruiz vendrá. Mañana", 10, "La Dra.…"),
        ("una frase larga sin final", 12, "una frase…"),
        ("supercalifragilístico", 8, "superca…"),
        ("Hola", 0, ""),
    ],
)
def test_clip_reply(text: str, limit: int, expected: str) -> None:
    clipped = clip_reply(text, limit)
    assert clipped == expected
    assert len(clipped) <= max(limit, 0)
