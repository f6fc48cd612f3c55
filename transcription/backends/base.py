"""What every speech backend returns, and the language names they share.

Backend A (Whisper in-process) and backend B (the OpenAI-shaped relay) both produce a
:class:`TranscriptionResult`, so the task, the endpoints and the renderers in
``transcription.formats`` never need to know which backend answered. Nothing here imports Django.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    # Whisper reports a probability per word; an OpenAI-shaped relay does not, so ``None`` there
    # rather than an invented number.
    probability: float | None = None


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] | None = None
    # Filled in by diarization; ``None`` when no speaker was attributed.
    speaker_id: str | None = None
    speaker_label: str | None = None
    # Whisper's decoder confidence for this segment (mean token log probability, and the
    # probability of its "no speech" token); ``None`` from backends that do not report them.
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    # ISO 639-1 code ("en"), or ``None`` when neither detected nor requested.
    language: str | None
    duration_s: float
    segments: list[Segment]


@cache
def _whisper_languages() -> tuple[dict[str, str], dict[str, str]]:
    # Imported on first use: importing ``whisper`` pulls in torch, which a relay-only process or a
    # formats-only test should not pay for at import time.
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    return LANGUAGES, TO_LANGUAGE_CODE


def language_code(value: str | None) -> str | None:
    """Map a language code or English name ("en", "english", "castilian") to its ISO code.

    Returns ``None`` for ``None``, an empty string, or a name Whisper does not know, so that an
    upstream's odd label never reaches a client as if it were a code.
    """
    if not value:
        return None
    key = value.strip().lower()
    codes, names = _whisper_languages()
    if key in codes:
        return key
    return names.get(key)


def language_name(code: str | None) -> str | None:
    """The lowercase English name OpenAI's ``verbose_json`` uses ("en" → "english")."""
    if not code:
        return None
    codes, _ = _whisper_languages()
    return codes.get(code.strip().lower())
