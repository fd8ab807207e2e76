"""Cutting a streamed LLM reply into sentences, so speech synthesis can start early.

The first sentence goes to TTS as soon as it is complete (t3 in DESIGN.md §5); the rest
follow one by one, which also lets barge-in drop the sentences not yet spoken.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["SentenceChunker", "clip_reply"]

# A run of terminators, optional closing quotes/brackets, then whitespace, the end of the
# text, or a Spanish opener glued to the next sentence ("Claro.¿Algo más?"). A newline
# also ends a piece: LLM line breaks separate sentences or list items. Decimals and times
# ("3.5", "10:30") never match because a digit follows the terminator.
_END = re.compile(r"[.?!…;:]+[\"'”’»)\]]*(?=\s|\Z|[¿¡])|\n")
_CLOSERS = "\"'”’»)]"
_SPACE = re.compile(r"\s")
# Terminators or closers standing alone at the start of a piece (before a space or the end).
_LEFTOVER = re.compile(r"^[.?!…;:\"'”’»)\]]+(?=\s|$)")

# Words that end with a period without ending the sentence (compared in lower case).
_ABBREVIATIONS = frozenset(
    """
    sr sra srta sres sras dr dra dres lic lcdo lcda ing arq prof profa ud uds vd vds
    etc av avda núm num pág págs tel aprox ej p dto depto cía admón gral col
    ee uu mr mrs ms jr st vs inc ltd approx
    """.split()
)

DEFAULT_MAX_CLAUSE = 120


def _is_abbreviation(text: str, dot: int) -> bool:
    start = dot
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    word = text[start:dot]
    if len(word) == 1:
        return word.isupper() or word in _ABBREVIATIONS  # an initial, "J. Pérez"
    return word.lower() in _ABBREVIATIONS


def _sentence_ends(text: str, final: bool) -> Iterator[int]:
    """Positions just after each sentence end in ``text``.

    Without ``final`` a terminator at the very end after a digit is undecided (the next
    delta may turn "3." into "3.5" or "10:" into "10:30") and is not reported; after a word
    it ends the sentence at once, so TTS starts without waiting for the next delta.
    """
    size = len(text)
    for m in _END.finditer(text):
        end = m.end()
        if (
            end == size
            and not final
            and m.group() != "\n"
            and text[m.start() - 1 : m.start()].isdigit()
        ):
            return
        if m.group().rstrip(_CLOSERS) == "." and _is_abbreviation(text, m.start()):
            continue
        yield end


def _clause_cut(text: str, limit: int) -> int | None:
    """Where to cut a long run without sentence punctuation: a comma, else a space."""
    comma = text.rfind(", ", limit // 3, limit + 1)
    if comma != -1:
        return comma + 1
    for i in range(min(limit, len(text) - 1), 0, -1):
        if text[i].isspace() and text[i - 1] not in "¿¡":
            return i
    m = _SPACE.search(text, limit)
    return m.start() if m else None


class SentenceChunker:
    """Accumulate LLM text deltas and hand out complete sentences.

    A sentence ends at ``.``, ``?``, ``!``, ``…``, ``;`` or ``:`` (possibly repeated, possibly
    followed by closing quotes) when whitespace follows, and at a line break. A period after
    a known abbreviation ("Dr.", "Sra.", "etc.") or a capital initial does not end one.
    A terminator that is the last character received is held until the next delta shows
    what follows it (one delta of delay; :meth:`flush` ends the stream). Spanish ``¿``/``¡``
    open the sentence they belong to. Text that runs past ``max_clause`` characters without
    a sentence end is cut at its last comma, else at a space, so TTS is never starved by a
    long clause. Returned sentences are stripped and never empty.
    """

    __slots__ = ("_buf", "max_clause")

    def __init__(self, max_clause: int = DEFAULT_MAX_CLAUSE) -> None:
        if max_clause < 1:
            raise ValueError("max_clause must be >= 1")
        self.max_clause = max_clause
        self._buf = ""

    @property
    def pending(self) -> str:
        """Text received but not yet returned."""
        return self._buf

    def push(self, delta: str) -> list[str]:
        """Add a delta; return the sentences it completed, in order."""
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return what is left (split at any sentence ends it contains)."""
        out = self._drain(final=True)
        rest = _LEFTOVER.sub("", self._buf.strip()).lstrip()
        self._buf = ""
        if rest:
            out.append(rest)
        return out

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        buf = self._buf
        while buf:
            cut = next(_sentence_ends(buf, final), None)
            if cut is None and len(buf) > self.max_clause:
                cut = _clause_cut(buf, self.max_clause)
            if cut is None:
                break
            # A sentence never starts with a terminator or a closer: those are the tail of
            # the previous one ("..", "!", a closing quote) that arrived after it was cut.
            piece = _LEFTOVER.sub("", buf[:cut].strip()).lstrip()
            buf = buf[cut:].lstrip()
            if piece:
                out.append(piece)
        self._buf = buf
        return out


def clip_reply(text: str, max_chars: int) -> str:
    """Shorten a reply to at most ``max_chars``, ending at its last complete sentence.

    Without a sentence end inside the limit, cut at the last space and add "…" so the
    listener hears that the thought was cut, still within ``max_chars``.
    """
    text = text.strip()
    if len(text) <= max_chars:
        return text
    if max_chars <= 0:
        return ""
    # One character past the limit shows whether a terminator at the limit is followed by
    # whitespace; a sentence end counts only if it lies within the limit.
    head = text[: max_chars + 1]
    last = None
    for end in _sentence_ends(head, final=False):
        if end <= max_chars:
            last = end
    if last is not None and head[:last].strip():
        return head[:last].strip()
    head = text[: max_chars - 1]
    space = max((head.rfind(c) for c in " \n\t"), default=-1)
    if space > 0:
        head = head[:space]
    return head.rstrip(" ,;:—-") + "…"
