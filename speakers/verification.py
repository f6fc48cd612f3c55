"""Consent verification: does the consent recording say the consent text, in the reference voice?"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings

REASON_WORDS = "consent_words_mismatch"
REASON_VOICE = "consent_voice_mismatch"


@cache
def _normalizer(language: str) -> Any:
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def word_error_rate(reference: str, hypothesis: str, *, language: str = "en") -> float:
    """(substitutions + deletions + insertions) / reference words, after Whisper's normalizer."""
    normalize = _normalizer(language)
    ref = normalize(reference).split()
    hyp = normalize(hypothesis).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / len(ref)


@dataclass(frozen=True)
class ConsentVerdict:
    consent_wer: float
    voice_similarity: float
    fail_reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.fail_reasons

    def scores(self) -> dict[str, float]:
        return {
            "consent_wer": round(self.consent_wer, 4),
            "voice_similarity": round(self.voice_similarity, 4),
            "max_consent_wer": settings.SCAIECHO_SPEAKER_CONSENT_MAX_WER,
            "min_voice_similarity": settings.SCAIECHO_SPEAKER_CONSENT_MIN_SIMILARITY,
        }


def consent_verdict(*, consent_text: str, transcript: str, voice_similarity: float, language: str) -> ConsentVerdict:
    wer = word_error_rate(consent_text, transcript, language=language)
    reasons = []
    if wer > settings.SCAIECHO_SPEAKER_CONSENT_MAX_WER:
        reasons.append(REASON_WORDS)
    if voice_similarity < settings.SCAIECHO_SPEAKER_CONSENT_MIN_SIMILARITY:
        reasons.append(REASON_VOICE)
    return ConsentVerdict(consent_wer=wer, voice_similarity=voice_similarity, fail_reasons=reasons)
