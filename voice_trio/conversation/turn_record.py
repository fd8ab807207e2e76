"""``TurnRecord``: one bot turn's text and latency ledger, shared by both call modes.

The media session and the fallback mode fill one per bot turn; the call record stores them
(``store.records.TurnEntry.from_turn``) and ``/metrics`` observes their stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voice_trio.conversation.tools import CallAct


@dataclass
class TurnRecord:
    """One bot turn: what was said, what was heard, and its latency ledger (DESIGN.md §5)."""

    user_text: str
    kind: str = "reply"  # reply | greeting | reprompt | goodbye | apology
    bot_text: str = ""
    heard_text: str = ""
    interrupted: bool = False
    t0: float | None = None  # turn end detected
    t1: float | None = None  # LLM request sent
    t2: float | None = None  # first LLM token
    t2s: float | None = None  # the token that completed the first sentence
    t3: float | None = None  # first sentence sent to TTS
    t4: float | None = None  # first TTS audio
    t5: float | None = None  # first audio frame written to Telnyx
    tool_calls: list[str] = field(default_factory=list)  # names, as Claude called them
    acts: set[CallAct] = field(default_factory=set)  # what they ask of the call (not stored)
    llm_input_tokens: int = 0  # every request of the turn (retries too), as reported
    llm_output_tokens: int = 0
    speculative: bool = False  # adopted a reply started before t0 (t1 < t0)

    def count_usage(self, input_tokens: int, output_tokens: int) -> None:
        self.llm_input_tokens += input_tokens
        self.llm_output_tokens += output_tokens

    def overhead(self) -> float | None:
        """Time the server itself added: (t1-t0) + (t3-t2s) + (t5-t4), where t1-t0 counts
        only when positive and t3 is measured from the later of t2s and t0.

        DESIGN.md §5 writes (t3-t2); but from the first token to the end of the first
        sentence the server only waits for Claude to write it, so that span is provider
        time. ``t2s``, when the sentence's last token arrived, leaves only our own delay.
        """
        t0, t1, t2s, t3, t4, t5 = self.t0, self.t1, self.t2s, self.t3, self.t4, self.t5
        if t0 is None or t1 is None or t2s is None or t3 is None or t4 is None or t5 is None:
            return None
        # A speculative reply was asked before the turn ended: no wait of ours there. Its
        # first sentence may even be complete before then: until t0 it waits for the caller
        # to finish, not for us, so our part starts at whichever came last.
        return max(0.0, t1 - t0) + max(0.0, t3 - max(t2s, t0)) + (t5 - t4)

    def stages_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        pairs = (
            ("t0-t1", self.t0, self.t1),
            ("t1-t2", self.t1, self.t2),
            ("t2-t3", self.t2, self.t3),
            ("t3-t4", self.t3, self.t4),
            ("t4-t5", self.t4, self.t5),
            ("t0-t5", self.t0, self.t5),
        )
        for name, a, b in pairs:
            if a is not None and b is not None:
                out[name] = round((b - a) * 1000, 1)
        return out
