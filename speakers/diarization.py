"""Who spoke each word: enrolled speakers by voice, everyone else as a stable ``SPEAKER_n``.

Runs on workers only (it computes embeddings). Two modes share the embeddings (ECAPA windows of
:mod:`speech.clustering`) and the thresholds (``SCAIECHO_SPEAKER_CLUSTER_THRESHOLD`` between
voices, ``..._NARROWBAND`` for phone audio, ``SCAIECHO_SPEAKER_MATCH_THRESHOLD`` against enrolled
speakers):

- **Batch** (:func:`diarize_recording`): the whole recording is known, so its speech is clustered
  at once — windows → clusters → cluster centroids matched one-to-one to the enrolled speakers
  (Hungarian assignment) → each word to the speaker of the windows around it → segments split
  where the speaker changes. One voice is one cluster is one label, however often it speaks.
- **Stream** (:func:`attribute_final`): finals arrive one by one, so a :class:`SpeakerTracker`
  lives for the session, takes its band's cluster threshold from the first final's audio, and
  keeps the anonymous voices it has met as running-mean centroids; a final in which the voice
  changes is split there.

The enrolled candidates are passed in on every call (read fresh by
``speakers.selectors.speaker_candidates``), so an erased speaker stops matching at once. A voice
is compared with both of a candidate's references, the recording's own and its phone-band copy
(:func:`similarity`): ECAPA places one person on a phone line far from their wideband self, and a
caller enrolled from a wideband clip would otherwise go unnamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from django.conf import settings

from speakers.selectors import Candidate
from speech import clustering
from speech.audio import SAMPLE_RATE
from speech.clustering import Encoder
from speech.embedding import cosine_similarity
from speech.engines.base import Segment, Word

__all__ = [
    "Attribution",
    "Encoder",
    "Piece",
    "SpeakerTracker",
    "attribute_final",
    "diarize_recording",
]

# Shortest audio worth an embedding; shorter spans borrow context from around them.
MIN_EMBED_SECONDS = 1.0
# A stream final at least this long is scanned in windows for a change of speaker.
SPLIT_MIN_SECONDS = 3.0
# A run of words shorter than this between two runs of one speaker is that speaker's too
# (a window's resolution is ~0.75 s: a shorter "turn" is more often a boundary wobble).
MIN_TURN_SECONDS = 0.4


def _cluster_threshold() -> float:
    return settings.SCAIECHO_SPEAKER_CLUSTER_THRESHOLD


def _recording_threshold(audio: np.ndarray) -> float:
    """The cluster threshold for this recording's band: voices on a phone line sit closer together."""
    if clustering.narrowband(audio):
        return settings.SCAIECHO_SPEAKER_CLUSTER_THRESHOLD_NARROWBAND
    return settings.SCAIECHO_SPEAKER_CLUSTER_THRESHOLD


def _match_threshold() -> float:
    return settings.SCAIECHO_SPEAKER_MATCH_THRESHOLD


def similarity(embedding: np.ndarray, candidate: Candidate) -> float:
    """How alike ``embedding`` is to an enrolled speaker: the better of their reference recording
    and its phone-band copy, this one less ``SCAIECHO_SPEAKER_PHONE_REFERENCE_MARGIN``. A speaker
    enrolled before the phone-band reference was stored is compared with the recording's alone.

    Whatever the band of the audio: on wideband audio the phone-band reference seldom wins, and
    preferring the band's own reference (phone audio is told by ``clustering.narrowband``) named
    fewer turns, since a recording of a narrowband source is narrowband however it is sent.
    Measured on the test conversations (tests/conversations.py), enrolling each choice of one or two
    of their people from wideband clips, turns of 1.5 s or more, named in batch / stream: over a
    phone line 152 / 122 of 161 with the recording's reference alone, 161 / 155 with both at the
    margin 0.15, wrong names as before (batch 0, stream 5 turns; at no margin batch 15 of 146
    strangers' turns, 6 at 0.10: a stranger merged into an enrolled voice's cluster took its name);
    wideband 161 / 158 either way (``bench/phone_enrollment.py``).
    """
    score = cosine_similarity(embedding, candidate.embedding)
    if candidate.phone_embedding is not None:
        margin = settings.SCAIECHO_SPEAKER_PHONE_REFERENCE_MARGIN
        score = max(score, cosine_similarity(embedding, candidate.phone_embedding) - margin)
    return score


@dataclass(frozen=True)
class Attribution:
    speaker_id: str | None
    label: str
    score: float


# --- Batch: cluster the whole recording -----------------------------------------------------------


def _match_clusters(means: dict[int, np.ndarray], candidates: list[Candidate], threshold: float) -> dict[int, Candidate]:
    """Enrolled speakers for clusters, at most one each way (Hungarian assignment on similarity),
    kept where the similarity reaches ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    if not means or not candidates:
        return {}
    keys = list(means)
    scores = np.array([[similarity(means[key], c) for c in candidates] for key in keys])
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return {keys[r]: candidates[c] for r, c in zip(rows, cols, strict=True) if scores[r, c] >= threshold}


def _smooth(labels: list[int], words: list[Word]) -> list[int]:
    """Relabel a short run of words sandwiched between two runs of one speaker."""
    labels = list(labels)
    index = 0
    while index < len(labels):
        end = index
        while end + 1 < len(labels) and labels[end + 1] == labels[index]:
            end += 1
        if 0 < index and end + 1 < len(labels) and labels[index - 1] == labels[end + 1]:
            if words[end].end - words[index].start < MIN_TURN_SECONDS:
                labels[index : end + 1] = [labels[index - 1]] * (end + 1 - index)
                index = 0  # runs merged: start over (short lists, cheap)
                continue
        index = end + 1
    return labels


def _pieces(segment: Segment, words: list[Word], labels: list[int]) -> list[tuple[Segment, int]]:
    """The segment cut into runs of words with one label each (no empty piece)."""
    runs: list[tuple[list[Word], int]] = []
    for word, label in zip(words, labels, strict=True):
        if runs and runs[-1][1] == label:
            runs[-1][0].append(word)
        else:
            runs.append(([word], label))
    out = []
    for piece, label in runs:
        text = "".join(word.word for word in piece).strip()
        if text:
            start = segment.start if not out else piece[0].start
            out.append((replace(segment, start=min(start, piece[0].start), end=piece[-1].end, text=text, words=piece), label))
    if out:  # the last piece keeps the segment's end (the words may stop short of it)
        last, label = out[-1]
        out[-1] = (replace(last, end=max(last.end, segment.end)), label)
    return out


def diarize_recording(
    audio: np.ndarray,
    segments: list[Segment],
    *,
    encoder: Encoder,
    candidates: list[Candidate],
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    cluster_threshold: float | None = None,
    match_threshold: float | None = None,
    regions: list[tuple[float, float]] | None = None,
) -> list[Segment]:
    """Attribute every word of ``segments`` to a speaker and split segments where it changes.

    Segments with word timestamps are split between words; a segment without them (a relay that
    returned none) is attributed whole, to the speaker of most of its span. Enrolled speakers keep
    their name and id; every other voice is ``SPEAKER_n``, numbered by first appearance.
    Segments without text are dropped.
    """
    match_threshold = _match_threshold() if match_threshold is None else match_threshold
    segments = [segment for segment in segments if segment.text.strip()]
    if not segments:
        return []
    duration = audio.size / SAMPLE_RATE
    if regions is None:
        regions = clustering.speech_regions(audio)
    if not regions:  # VAD heard nothing, yet there is text: the decoder's segments stand in
        regions = [(max(0.0, s.start), min(duration, s.end)) for s in segments if s.end > s.start]
    windows = clustering.embedding_windows(audio, regions, encoder=encoder)
    if not windows:  # too little audio for any embedding: one unknown voice
        return [replace(segment, speaker_id=None, speaker_label="SPEAKER_1") for segment in segments]
    labels = clustering.cluster_windows(
        windows,
        threshold=_recording_threshold(audio) if cluster_threshold is None else cluster_threshold,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
    )
    embeddings = np.stack([window.embedding for window in windows])
    matched = _match_clusters(clustering.centroids(embeddings, labels), candidates, match_threshold)
    frames = clustering.timeline(windows, labels, duration=duration)

    attributed: list[tuple[Segment, int]] = []
    for segment in segments:
        words = [word for word in segment.words or [] if word.word.strip()]
        if not words:
            attributed.append((segment, frames.at(segment.start, segment.end)))
            continue
        word_labels = _smooth([frames.at(word.start, word.end) for word in words], words)
        attributed += _pieces(segment, words, word_labels)

    names: dict[int, tuple[str | None, str]] = {}
    anonymous = 0
    out: list[Segment] = []
    for segment, label in attributed:
        if label not in names:
            if label in matched:
                names[label] = (matched[label].speaker_id, matched[label].label)
            else:
                anonymous += 1
                names[label] = (None, f"SPEAKER_{anonymous}")
        speaker_id, name = names[label]
        out.append(replace(segment, speaker_id=speaker_id, speaker_label=name))
    return out


# --- Stream: online, stable within a session --------------------------------------------------------


@dataclass
class _Anonymous:
    label: str
    centroid: np.ndarray
    count: int = 1


@dataclass
class SpeakerTracker:
    """Attributes voices within one stream session: enrolled speakers at the match threshold,
    unknown voices at the cluster threshold against running-mean centroids of the voices met.

    Without an ``anon_threshold``, the first final fixes it from the session's band (see
    :meth:`tune`), as batch does per recording: on a phone line voices sit closer together, and at
    the wideband threshold two callers would share one ``SPEAKER_n``.
    """

    match_threshold: float = field(default_factory=_match_threshold)
    anon_threshold: float | None = None
    anonymous: list[_Anonymous] = field(default_factory=list)

    def tune(self, audio: np.ndarray) -> float:
        """The threshold between anonymous voices, fixed on the first call by the band of ``audio``
        (the session's audio so far); one session is one line, so later audio does not change it."""
        if self.anon_threshold is None:
            self.anon_threshold = _recording_threshold(audio)
        return self.anon_threshold

    def _closest(self, embedding: np.ndarray, candidates: list[Candidate]) -> tuple[Candidate | None, float]:
        best, best_score = None, -1.0
        for candidate in candidates:
            score = similarity(embedding, candidate)
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

    def attribute(self, embedding: np.ndarray, candidates: list[Candidate]) -> Attribution:
        """The closest enrolled speaker at or above the threshold, else a stable anonymous label."""
        candidate, score = self._closest(embedding, candidates)
        if candidate is not None and score >= self.match_threshold:
            return Attribution(speaker_id=candidate.speaker_id, label=candidate.label, score=score)
        voice, anon_score = self._closest_anonymous(embedding)
        anon_threshold = _cluster_threshold() if self.anon_threshold is None else self.anon_threshold
        if voice is not None and anon_score >= anon_threshold:
            total = voice.centroid * voice.count + embedding
            voice.centroid = total / (np.linalg.norm(total) or 1.0)
            voice.count += 1
            return Attribution(speaker_id=None, label=voice.label, score=anon_score)
        voice = _Anonymous(label=f"SPEAKER_{len(self.anonymous) + 1}", centroid=embedding.copy())
        self.anonymous.append(voice)
        return Attribution(speaker_id=None, label=voice.label, score=0.0)


@dataclass(frozen=True)
class Piece:
    """A final (or part of one) and its speaker, times in the caller's seconds."""

    start: float
    end: float
    text: str
    speaker_id: str | None
    speaker_label: str | None


def _clip(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    """``audio`` from ``start`` to ``end`` seconds, widened around the middle to MIN_EMBED_SECONDS."""
    if end - start < MIN_EMBED_SECONDS:
        middle = (start + end) / 2
        start, end = middle - MIN_EMBED_SECONDS / 2, middle + MIN_EMBED_SECONDS / 2
    first = max(0, int(start * SAMPLE_RATE))
    last = min(audio.size, int(end * SAMPLE_RATE))
    return audio[first:last]


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal labels as (label, first index, last index); a one-window run joins a neighbour."""

    def merge(runs: list[list[Any]]) -> list[list[Any]]:
        merged: list[list[Any]] = []
        for run in runs:
            if merged and merged[-1][0] == run[0]:
                merged[-1][2] = run[2]
            else:
                merged.append(run)
        return merged

    runs = merge([[label, index, index] for index, label in enumerate(labels)])
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
    return [(label, first, last) for label, first, last in runs]


def _change_points(audio: np.ndarray, start: float, end: float, *, encoder: Encoder, threshold: float) -> list[float]:
    """Where the voice changes inside [start, end] (seconds of ``audio``): the span's windows
    clustered at the cluster threshold, a turn being a run of at least two windows."""
    spans = clustering.window_spans([(start, end)])
    if len(spans) < 4:
        return []
    embeddings = np.stack([encoder.embed(_clip(audio, s, e)) for s, e, _ in spans])
    runs = _runs(list(clustering.cluster_embeddings(embeddings, threshold=threshold)))
    # A turn starts in the middle of the overlap between the last window of one run and the next.
    return [spans[first][0] + clustering.WINDOW_SECONDS / 2 for _, first, _ in runs[1:]]


def _timed_words(text: str, words: list[Word] | None, start: float, end: float) -> list[Word]:
    """The final's words with times: its own when the transcriber gave them, else spread evenly
    over the span (only the cut between two speakers depends on them, and it is then approximate:
    to the nearest word by speaking rate, not by alignment)."""
    if words:
        return [word for word in words if word.word.strip()]
    tokens = text.split()
    if not tokens:
        return []
    step = (end - start) / len(tokens)
    return [Word(start=start + i * step, end=start + (i + 1) * step, word=f" {token}") for i, token in enumerate(tokens)]


def attribute_final(
    audio: np.ndarray,
    *,
    start: float,
    end: float,
    text: str,
    encoder: Encoder,
    tracker: SpeakerTracker,
    candidates: list[Candidate],
    words: list[Word] | None = None,
    embed_until: float | None = None,
    split: bool = True,
) -> list[Piece]:
    """Who spoke a stream final spanning [start, end] seconds of ``audio``; with ``split``, a
    final in which the voice changes comes back as one piece per speaker, cut between words.

    ``embed_until`` lets a short final be embedded with the audio after it (the same speaker going
    on, or the pause after the turn); pieces still report the final's own span.
    """
    threshold = tracker.tune(audio)
    cuts: list[float] = []
    if split and end - start >= SPLIT_MIN_SECONDS and len(text.split()) > 1:
        cuts = _change_points(audio, start, end, encoder=encoder, threshold=threshold)
    groups: list[tuple[float, float, str]] = [(start, end, text)]
    if cuts:
        timed = _timed_words(text, words, start, end)
        parts: list[list[Word]] = [[]]
        remaining = list(cuts)
        for word in timed:
            if remaining and (word.start + word.end) / 2 >= remaining[0] and parts[-1]:
                parts.append([])
                remaining.pop(0)
            parts[-1].append(word)
        bounds = [start] + [part[0].start for part in parts[1:]] + [end]
        groups = [
            (bounds[i], bounds[i + 1], "".join(w.word for w in part).strip()) for i, part in enumerate(parts) if part
        ]
    pieces: list[Piece] = []
    for index, (first, last, piece_text) in enumerate(groups):
        until = last
        if index == len(groups) - 1 and embed_until is not None:
            until = max(last, embed_until)
        clip = _clip(audio, first, until)
        if clip.size < SAMPLE_RATE // 4:  # no voice to read: the previous piece's, or nobody's
            if pieces:
                previous = pieces.pop()
                pieces.append(replace(previous, end=last, text=f"{previous.text} {piece_text}".strip()))
            else:
                pieces.append(Piece(start=first, end=last, text=piece_text, speaker_id=None, speaker_label=None))
            continue
        who = tracker.attribute(encoder.embed(clip), candidates)
        if pieces and pieces[-1].speaker_label == who.label:  # the same voice after all: one piece
            previous = pieces.pop()
            pieces.append(replace(previous, end=last, text=f"{previous.text} {piece_text}".strip()))
            continue
        pieces.append(Piece(start=first, end=last, text=piece_text, speaker_id=who.speaker_id, speaker_label=who.label))
    return pieces
