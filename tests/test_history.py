"""Conversation history in Messages API shape."""

from __future__ import annotations

import pytest

from voice_trio.conversation.history import DEFAULT_OPENING, Conversation, Turn


def roles(messages: list[dict[str, str]]) -> list[str]:
    return [m["role"] for m in messages]


def test_user_first_alternates() -> None:
    c = Conversation()
    c.add_user("Hola")
    c.add_assistant("Buenas, ¿en qué le ayudo?")
    c.add_user(" Quiero una cita. ")
    assert c.window(10) == [
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": "Buenas, ¿en qué le ayudo?"},
        {"role": "user", "content": "Quiero una cita."},
    ]


def test_bot_greeting_first_gets_a_synthetic_user_turn() -> None:
    c = Conversation()
    c.add_assistant("Buenos días, le llamo de la clínica.")
    c.add_user("Sí, dígame.")
    assert c.window(10) == [
        {"role": "user", "content": DEFAULT_OPENING},
        {"role": "assistant", "content": "Buenos días, le llamo de la clínica."},
        {"role": "user", "content": "Sí, dígame."},
    ]
    assert c.turns == (
        Turn("assistant", "Buenos días, le llamo de la clínica."),
        Turn("user", "Sí, dígame."),
    )


def test_custom_opening() -> None:
    c = Conversation(opening="(call connected)")
    c.add_assistant("Hello")
    assert c.window(5)[0] == {"role": "user", "content": "(call connected)"}


def test_same_role_messages_merge_but_turns_stay_separate() -> None:
    c = Conversation()
    c.add_user("Hola")
    c.add_user("¿me oye?")
    c.add_assistant("Sí.")
    c.add_assistant("¿Sigue ahí?")
    assert c.window(10) == [
        {"role": "user", "content": "Hola ¿me oye?"},
        {"role": "assistant", "content": "Sí. ¿Sigue ahí?"},
    ]
    assert len(c.turns) == 4


def test_interrupted_reply_keeps_what_was_heard_with_a_marker() -> None:
    c = Conversation()
    c.add_user("¿Qué horarios tienen?")
    c.add_assistant("Abrimos de lunes a", interrupted=True)
    c.add_user("Perdone, el sábado")
    assert c.window(10)[1] == {"role": "assistant", "content": "Abrimos de lunes a —"}
    assert c.turns[1] == Turn("assistant", "Abrimos de lunes a", interrupted=True)


def test_blank_text_is_ignored() -> None:
    c = Conversation()
    c.add_user("Hola")
    c.add_assistant("", interrupted=True)  # cut off before any audio was heard
    c.add_user("  ")
    c.add_user("¿hay alguien?")
    assert c.window(10) == [{"role": "user", "content": "Hola ¿hay alguien?"}]
    assert c.turns == (Turn("user", "Hola"), Turn("user", "¿hay alguien?"))


def test_window_starts_with_user_and_respects_limit() -> None:
    c = Conversation()
    for i in range(5):
        c.add_user(f"u{i}")
        c.add_assistant(f"a{i}")
    c.add_user("u5")
    assert [m["content"] for m in c.window(3)] == ["u4", "a4", "u5"]
    window = c.window(4)  # would start on a4's predecessor a3: dropped
    assert [m["content"] for m in window] == ["u4", "a4", "u5"]
    assert roles(window)[0] == "user"
    assert c.window(1) == [{"role": "user", "content": "u5"}]
    assert c.window(0) == []
    assert len(c.window(100)) == 11


def test_window_returns_copies() -> None:
    c = Conversation()
    c.add_user("Hola")
    c.window(5)[0]["content"] = "changed"
    assert c.window(5)[0]["content"] == "Hola"


def test_window_of_empty_conversation() -> None:
    assert Conversation().window(10) == []
    assert Conversation().turns == ()


USE = {"type": "tool_use", "id": "toolu_1", "name": "free_slots", "input": {}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"slots": []}'}


def test_a_tool_exchange_sits_between_the_question_and_the_answer() -> None:
    c = Conversation()
    c.add_user("Quiero una cita.")
    c.add_tool_exchange([{"type": "text", "text": "Reviso."}, USE], [RESULT])
    c.add_assistant("Reviso. No hay espacios esta semana.")
    c.add_user("Gracias.")
    assert c.window(10) == [
        {"role": "user", "content": "Quiero una cita."},
        {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [RESULT]},
        {"role": "assistant", "content": "Reviso. No hay espacios esta semana."},
        {"role": "user", "content": "Gracias."},
    ]
    assert [t.text for t in c.turns] == [
        "Quiero una cita.",
        "Reviso. No hay espacios esta semana.",
        "Gracias.",
    ]


def test_a_cut_turn_s_exchange_comes_back_with_the_new_words() -> None:
    """Barge-in while a tool ran: what was heard, the request, then its result together
    with what the caller said over the bot."""
    c = Conversation()
    c.add_user("Quiero una cita.")
    c.add_assistant("Con gusto, reviso", interrupted=True)
    c.add_tool_exchange([USE], [RESULT])
    c.add_user("Mejor el martes.")
    window = c.window(10)
    assert window[1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Con gusto, reviso —"}, USE]},
        {"role": "user", "content": [RESULT, {"type": "text", "text": "Mejor el martes."}]},
    ]
    window[2]["content"].append("changed")  # a fresh copy: the history is not touched
    assert len(c.window(10)[2]["content"]) == 2


def test_the_window_never_starts_with_a_result_whose_request_it_cut() -> None:
    c = Conversation()
    c.add_user("Quiero una cita.")
    c.add_tool_exchange([USE], [RESULT])
    c.add_user("¿Y el martes?")
    c.add_assistant("El martes hay a las 9.")
    assert c.window(3) == [
        {"role": "user", "content": [{"type": "text", "text": "¿Y el martes?"}]},
        {"role": "assistant", "content": "El martes hay a las 9."},
    ]
    c.add_tool_exchange([USE], [RESULT])
    assert c.window(1) == []  # only a result, whose request is cut off


def test_server_overhead_of_a_speculative_reply_starts_when_the_turn_ends() -> None:
    """A speculation's first sentence may be ready before the caller stopped talking: the
    wait for the caller is not the server's time (DESIGN §5, t3 from max(t2s, t0))."""
    from voice_trio.conversation.turn_record import TurnRecord

    plain = TurnRecord("hola", t0=10.0, t1=10.002, t2=10.4, t2s=10.5, t3=10.501, t4=10.6, t5=10.603)
    assert plain.overhead() == pytest.approx(0.002 + 0.001 + 0.003)
    early = TurnRecord("hola", t0=10.0, t1=9.6, t2=9.7, t2s=9.75, t3=10.004, t4=10.1, t5=10.102)
    assert early.overhead() == pytest.approx(0.0 + 0.004 + 0.002)  # not 0.254
