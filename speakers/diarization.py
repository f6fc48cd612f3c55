"""Who spoke each segment: enrolled speakers by voice, everyone else as a stable ``SPEAKER_n``.

Runs on workers only (it computes embeddings). A :class:`SpeakerTracker` lives for one batch job
or one stream session; it keeps the anonymous voices it has met so that the same unknown voice
keeps its label, and forgets them when the job or session ends. The enrolled candidates are passed
in on every call (read fresh by ``speakers.selectors.speaker_candidates``), so an erased speaker
stops matching at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from django.conf import settings

from speakers.selectors import Candidate
from speech.audio import SAMPLE_RATE
from speech.embedding import cosine_similarity
from speech.engines.base import Segment, Word

# Shortest audio worth an embedding; shorter segments borrow context from around them.
MIN_EMBED_SECONDS = 1.0
# A segment at least this long is scanned in windows for a change of speaker.
SPLIT_MIN_SECONDS = 3.0
WINDOW_SECONDS = 1.5
HOP_SECONDS = 0.75


class Encoder(Protocol):
    def embed(self, audio: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Attribution:
    speaker_id: str | None
    label: str
    score: float


@dataclass
class _Anonymous:
    label: str
    centroid: np.ndarray
    count: int = 1


@dataclass
class SpeakerTracker:
    """Attributes voices within one job or session."""

    match_threshold: float = field(default_factory=lambda: settings.SCAIECHO_SPEAKER_MATCH_THRESHOLD)
    anon_threshold: float = field(default_factory=lambda: settings.SCAIECHO_SPEAKER_ANON_THRESHOLD)
    anonymous: list[_Anonymous] = field(default_factory=list)

    def _closest(self, embedding: np.ndarray, candidates: list[Candidate]) -> tuple[Candidate | None, float]:
        best, best_score = None, -1.0
        for candidate in candidates:
            score = cosine_similarity(embedding, candidate.embedding)
            if score > best_score:
                best, best_score = candidate, score
        return best, best_score

    def _closest_anonymous(self, embedding: np.ndarray) -> tuple[_Anonymous | None, float]:
        best, best_score = None, -1.0
        for voice in self.anonymous:
            score = cosine_similarity(embedding, voice.centroid)
            if score > best_score:
                best, best_score = voice, score
        return best, best_score

    def peek(self, embedding: np.ndarray, candidates: list[Candidate]) -> str:
        """A key for whose voice this is, without learning anything (for change detection)."""
        candidate, score = self._closest(embedding, candidates)
        if candidate is not None and score >= self.match_threshold:
            return candidate.speaker_id
        voice, score = self._closest_anonymous(embedding)
        if voice is not None and score >= self.anon_threshold:
            return voice.label
        return "unknown"

    def attribute(self, embedding: np.ndarray, candidates: list[Candidate]) -> Attribution:
        """The closest enrolled speaker at or above the threshold, else a stable anonymous label."""
        candidate, score = self._closest(embedding, candidates)
        if candidate is not None and score >= self.match_threshold:
            return Attribution(speaker_id=candidate.speaker_id, label=candidate.label, score=score)
        voice, anon_score = self._closest_anonymous(embedding)
        if voice is not None and anon_score >= self.anon_threshold:
            total = voice.centroid * voice.count + embedding
            voice.centroid = total / (np.linalg.norm(total) or 1.0)
            voice.count += 1
            return Attribution(speaker_id=None, label=voice.label, score=anon_score)
        voice = _Anonymous(label=f"SPEAKER_{len(self.anonymous) + 1}", centroid=embedding.copy())
        self.anonymous.append(voice)
        return Attribution(speaker_id=None, label=voice.label, score=0.0)


def _clip(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    """``audio`` from ``start`` to ``end`` seconds, widened around the middle to MIN_EMBED_SECONDS."""
    if end - start < MIN_EMBED_SECONDS:
        middle = (start + end) / 2
        start, end = middle - MIN_EMBED_SECONDS / 2, middle + MIN_EMBED_SECONDS / 2
    first = max(0, int(start * SAMPLE_RATE))
    last = min(audio.size, int(end * SAMPLE_RATE))
    return audio[first:last]


def _runs(keys: list[str]) -> list[tuple[str, int, int]]:
    """Runs of equal keys as (key, first index, last index); a one-window run joins a neighbour."""

    def merge(runs: list[list[Any]]) -> list[list[Any]]:
        merged: list[list[Any]] = []
        for run in runs:
            if merged and merged[-1][0] == run[0]:
                merged[-1][2] = run[2]
            else:
                merged.append(run)
        return merged

    runs = merge([[key, index, index] for index, key in enumerate(keys)])
    while len(runs) > 1:
        lone = next((index for index, run in enumerate(runs) if run[1] == run[2]), None)
        if lone is None:
            break
        if lone > 0:  # a lone window is noise, not a turn
            runs[lone - 1][2] = runs[lone][2]
        else:
            runs[1][1] = runs[0][1]
        runs.pop(lone)
        runs = merge(runs)
    return [(key, first, last) for key, first, last in runs]


def _split_words(segment: Segment, cuts: list[float]) -> list[Segment]:
    """Split a segment's words at the word boundaries nearest to ``cuts`` (seconds)."""
    words = segment.words or []
    pieces: list[list[Word]] = [[]]
    remaining = sorted(cuts)
    for word in words:
        middle = (word.start + word.end) / 2
        if remaining and middle >= remaining[0] and pieces[-1]:
            pieces.append([])
            remaining.pop(0)
        pieces[-1].append(word)
    return [
        replace(
            segment,
            start=piece[0].start,
            end=piece[-1].end,
            text="".join(word.word for word in piece).strip(),
            words=piece,
        )
        for piece in pieces
        if piece
    ]


def split_by_speaker(
    audio: np.ndarray, segment: Segment, *, encoder: Encoder, tracker: SpeakerTracker, candidates: list[Candidate]
) -> list[Segment]:
    """Cut a long segment where the voice changes (needs word timestamps to cut between words)."""
    if not segment.words or segment.end - segment.start < SPLIT_MIN_SECONDS:
        return [segment]
    starts = np.arange(segment.start, segment.end - WINDOW_SECONDS + 1e-6, HOP_SECONDS)
    keys = [
        tracker.peek(encoder.embed(_clip(audio, start, start + WINDOW_SECONDS)), candidates) for start in starts
    ]
    runs = _runs(keys)
    if len(runs) < 2:
        return [segment]
    # A turn starts in the middle of the overlap between the last window of one run and the next.
    cuts = [float(starts[first]) + WINDOW_SECONDS / 2 for _, first, _ in runs[1:]]
    return _split_words(segment, cuts)


def diarize_segments(
    audio: np.ndarray,
    segments: list[Segment],
    *,
    encoder: Encoder,
    tracker: SpeakerTracker,
    candidates: list[Candidate],
) -> list[Segment]:
    """Attribute every segment to a speaker, splitting segments in which the speaker changes."""
    attributed: list[Segment] = []
    for segment in segments:
        for piece in split_by_speaker(audio, segment, encoder=encoder, tracker=tracker, candidates=candidates):
            clip = _clip(audio, piece.start, piece.end)
            if clip.size < SAMPLE_RATE // 4:
                attributed.append(piece)
                continue
            who = tracker.attribute(encoder.embed(clip), candidates)
            attributed.append(replace(piece, speaker_id=who.speaker_id, speaker_label=who.label))
    return attributed
