"""What the bot says on its own (greeting, reprompt, goodbye, apology), and their audio cache.

Fixed phrases are synthesized once and kept, so the greeting plays without a provider
round trip: the phrases every call uses are synthesized when the server starts, and a
personalised greeting is synthesized while an outbound call is still ringing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from voice_trio.conversation.sentences import SentenceChunker

log = logging.getLogger("voice_trio.calls")


@dataclass(frozen=True, slots=True)
class Phrases:
    morning: str
    afternoon: str
    evening: str
    introduction: str
    question: str
    reprompt: str
    goodbye: str
    timeout_goodbye: str
    apology: str
    handoff: str  # before a transfer to a person
    transfer_failed: str
    voicemail_intro: str  # "{opener}, {nombre}." comes before it
    voicemail_reason: str  # with {contexto}
    voicemail_close: str
    waiting: str  # while a tool's answer is slow and the tool has no phrase of its own
    recording_notice: str  # before the greeting when calls are recorded (RECORD_CALLS)

    def time_greeting(self, now: datetime) -> str:
        if now.hour < 12:
            return self.morning
        return self.afternoon if now.hour < 19 else self.evening

    def greeting(self, *, nombre: str = "", saludo: str = "", now: datetime) -> str:
        """``saludo`` when given, else a time-of-day greeting (with the name when known)."""
        if saludo:
            return saludo
        opener = self.time_greeting(now)
        opener = f"{opener}, {nombre}." if nombre else f"{opener}."
        return f"{opener} {self.introduction} {self.question}"

    def voicemail(self, *, nombre: str = "", contexto: str = "", now: datetime) -> str:
        """The message left on an answering machine: who called, why, and to call back."""
        opener = self.time_greeting(now)
        parts = [f"{opener}, {nombre}." if nombre else f"{opener}.", self.voicemail_intro]
        reason = contexto.strip().rstrip(".")
        if reason:
            parts.append(self.voicemail_reason.format(contexto=reason))
        parts.append(self.voicemail_close)
        return " ".join(parts)

    def fixed(self) -> list[str]:
        """Phrases every call may use: synthesized at start-up."""
        openers = [f"{g}." for g in (self.morning, self.afternoon, self.evening)]
        return [
            *openers,
            self.introduction,
            self.question,
            self.reprompt,
            self.goodbye,
            self.timeout_goodbye,
            self.apology,
            self.waiting,
        ]


SPANISH = Phrases(
    morning="Buenos días",
    afternoon="Buenas tardes",
    evening="Buenas noches",
    introduction="Le habla Sofía, de la Clínica Santa Lucía.",
    question="¿En qué le puedo ayudar?",
    reprompt="¿Sigue ahí? Estoy para ayudarle.",
    goodbye="Gracias por llamar. Que tenga un buen día.",
    timeout_goodbye="Como no le escucho, voy a terminar la llamada. Hasta luego.",
    apology="Disculpe, tuve un problema técnico. ¿Me lo puede repetir, por favor?",
    handoff="Un momento, por favor. Le comunico con una persona de nuestro equipo.",
    transfer_failed="Disculpe, en este momento no pude comunicarle. ¿Le puedo ayudar en algo más?",
    voicemail_intro="Le habla Sofía, de la Clínica Santa Lucía.",
    voicemail_reason="Le llamábamos por lo siguiente: {contexto}.",
    voicemail_close="Por favor, devuélvanos la llamada cuando pueda. Gracias, hasta luego.",
    waiting="Un momento, por favor.",
    recording_notice="Esta llamada puede ser grabada para fines de calidad.",
)

ENGLISH = Phrases(
    morning="Good morning",
    afternoon="Good afternoon",
    evening="Good evening",
    introduction="This is Sofia from Santa Lucia Clinic.",
    question="How can I help you?",
    reprompt="Are you still there? I'm here to help.",
    goodbye="Thank you for calling. Have a nice day.",
    timeout_goodbye="I can't hear you, so I'll end the call now. Goodbye.",
    apology="Sorry, I had a technical problem. Could you say that again, please?",
    handoff="One moment, please. I'm transferring you to a member of our team.",
    transfer_failed="Sorry, I couldn't transfer you right now. Can I help with anything else?",
    voicemail_intro="This is Sofia from Santa Lucia Clinic.",
    voicemail_reason="We were calling about the following: {contexto}.",
    voicemail_close="Please call us back when you can. Thank you, goodbye.",
    waiting="One moment, please.",
    recording_notice="This call may be recorded for quality purposes.",
)


def phrases_for(language: str) -> Phrases:
    return ENGLISH if language.lower().startswith("en") else SPANISH


def local_now(timezone: str) -> datetime:
    return datetime.now(ZoneInfo(timezone))


Synthesize = Callable[[str], Awaitable[bytes]]


class PhraseCache:
    """Audio of recently spoken fixed phrases (bounded LRU, about 8 KB per second of audio)."""

    def __init__(self, synthesize: Synthesize, capacity: int = 256) -> None:
        self._synthesize = synthesize
        self._audio: OrderedDict[str, bytes] = OrderedDict()
        self._capacity = capacity

    def get(self, text: str) -> bytes | None:
        audio = self._audio.get(text)
        if audio is not None:
            self._audio.move_to_end(text)
        return audio

    def put(self, text: str, audio: bytes) -> None:
        self._audio[text] = audio
        self._audio.move_to_end(text)
        while len(self._audio) > self._capacity:
            self._audio.popitem(last=False)

    async def warm(self, texts: list[str]) -> None:
        """Synthesize what is not cached yet; failures are logged and retried on use."""
        sentences: list[str] = []
        for text in texts:  # cached per sentence, as bot turns look them up
            chunker = SentenceChunker()
            sentences += chunker.push(text) + chunker.flush()
        for text in dict.fromkeys(sentences):
            if text in self._audio:
                continue
            try:
                self.put(text, await self._synthesize(text))
            except Exception as exc:
                log.warning("Could not pre-synthesize %r: %s", text, exc)

    def __len__(self) -> int:
        return len(self._audio)
