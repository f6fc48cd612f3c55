"""Who spoke when, over a whole recording: speaker-embedding windows over speech, clustered.

Pure math on 16 kHz mono float32 audio; nothing here imports Django. The pipeline:

1. :func:`speech_regions` — where someone speaks (Silero VAD), so silence and noise are never
   embedded (an embedding of silence is close to every voice and would glue clusters together).
2. :func:`embedding_windows` — an ECAPA embedding every ``HOP_SECONDS`` over ``WINDOW_SECONDS`` of
   speech inside each region. A region shorter than a window is embedded once, with the audio
   around it for context, and marked ``short``: it says less about the voice.
3. :func:`cluster_windows` — agglomerative clustering (scikit-learn, average linkage on cosine
   distance) of the full windows, cut where the clusters' average similarity falls below a
   calibrated threshold, or at the number of speakers the caller knows (``num_speakers``) or
   bounds (``min_speakers``/``max_speakers``). A threshold cut can say "one speaker", which an
   eigengap estimate never does. A lone window close to a cluster joins it; short windows go to
   the closest cluster, unless they are far from every one: then they are a voice of their own
   (in a conversation of short turns, someone may say only "yes" and "front centre").
   :func:`narrowband` tells phone audio (nothing above 4 kHz) from wideband, so that a caller can
   cut each at its own threshold: voices on a phone line are closer together.
4. :func:`timeline` — the windows' labels as a 10 ms frame timeline (each window votes over its
   span, weighted towards its centre), from which a caller reads the speaker of any word.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from speech.audio import SAMPLE_RATE

WINDOW_SECONDS = 1.5
HOP_SECONDS = 0.75
# A region with less speech than this is embedded once and clustered afterwards (see ``short``).
FULL_WINDOW_SECONDS = 1.0
# Audio around a short region borrowed for its embedding (ECAPA needs a second or so).
SHORT_CONTEXT_SECONDS = 1.0
# VAD: speech starts above START and ends below STOP; gaps shorter than MERGE_GAP join regions.
VAD_START = 0.5
VAD_STOP = 0.35
MERGE_GAP_SECONDS = 0.3
MIN_REGION_SECONDS = 0.2
FRAME_SECONDS = 0.01  # resolution of :func:`timeline`
# A one-window cluster joins the closest bigger one only when at least this similar to it;
# below, it is more likely a speaker with a single turn than a cough or an overlap.
ABSORB_SIMILARITY = 0.2
# A short window less similar than this on average to the windows of every cluster is a voice of its
# own (free count only).
NEW_VOICE_SIMILARITY = 0.15
# Share of the energy above 4 kHz under which audio is narrowband (phone): 8 kHz telephone audio
# has ~1e-7 there once resampled, wideband speech 1e-3 and more (also in recordings that mix
# 16 kHz and 8 kHz sources).
NARROWBAND_HIGH_SHARE = 1e-4


class Encoder(Protocol):
    def embed(self, audio: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Window:
    """One embedding: ``start``/``end`` in seconds of the audio it stands for."""

    start: float
    end: float
    embedding: np.ndarray
    short: bool = False  # less than FULL_WINDOW_SECONDS of speech: clustered after the others

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


# --- 1. speech regions ----------------------------------------------------------------------------


def speech_regions(
    audio: np.ndarray, *, probabilities: Callable[[np.ndarray], np.ndarray] | None = None
) -> list[tuple[float, float]]:
    """Spans of speech, in seconds, by Silero VAD (``probabilities`` maps audio to per-frame
    speech probabilities; the default runs :class:`speech.vad.Vad` over 32 ms frames)."""
    from speech.vad import VAD_FRAME

    probs = (probabilities or _silero_probabilities)(audio)
    frame_s = VAD_FRAME / SAMPLE_RATE
    regions: list[list[float]] = []
    inside = False
    for index, p in enumerate(probs):
        if not inside and p >= VAD_START:
            inside = True
            regions.append([index * frame_s, (index + 1) * frame_s])
        elif inside and p >= VAD_STOP:
            regions[-1][1] = (index + 1) * frame_s
        elif inside:
            inside = False
    merged: list[list[float]] = []
    for start, end in regions:
        if merged and start - merged[-1][1] < MERGE_GAP_SECONDS:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    duration = audio.size / SAMPLE_RATE
    return [(round(s, 3), round(min(e, duration), 3)) for s, e in merged if e - s >= MIN_REGION_SECONDS]


def _silero_probabilities(audio: np.ndarray) -> np.ndarray:
    from speech.vad import VAD_FRAME, Vad

    vad = Vad()
    count = audio.size // VAD_FRAME
    samples = np.asarray(audio[: count * VAD_FRAME], dtype=np.float32)
    return np.array([vad.probability(samples[i * VAD_FRAME : (i + 1) * VAD_FRAME]) for i in range(count)])


def narrowband(audio: np.ndarray) -> bool:
    """Whether ``audio`` (16 kHz) carries next to nothing above 4 kHz in its louder half of 32 ms
    frames: telephone (8 kHz) speech, resampled."""
    size = 512
    count = audio.size // size
    if count < 4:
        return False
    frames = np.asarray(audio[: count * size], dtype=np.float64).reshape(count, size) * np.hanning(size)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    loud = power[power.sum(axis=1) >= np.median(power.sum(axis=1))]
    total = float(loud.sum())
    if total <= 0.0:
        return False
    high = np.fft.rfftfreq(size, 1 / SAMPLE_RATE) >= 4000
    return float(loud[:, high].sum()) / total < NARROWBAND_HIGH_SHARE


# --- 2. embedding windows -------------------------------------------------------------------------


def window_spans(regions: Sequence[tuple[float, float]]) -> list[tuple[float, float, bool]]:
    """(start, end, short) of the windows over ``regions``: every HOP_SECONDS, the last one flush
    with the region's end; a region shorter than a window is one window."""
    spans: list[tuple[float, float, bool]] = []
    for start, end in regions:
        length = end - start
        if length <= WINDOW_SECONDS:
            spans.append((start, end, length < FULL_WINDOW_SECONDS))
            continue
        starts = list(np.arange(start, end - WINDOW_SECONDS + 1e-6, HOP_SECONDS))
        if end - (starts[-1] + WINDOW_SECONDS) > HOP_SECONDS / 3:
            starts.append(end - WINDOW_SECONDS)
        spans += [(float(s), float(s) + WINDOW_SECONDS, False) for s in starts]
    return spans


def embedding_windows(
    audio: np.ndarray, regions: Sequence[tuple[float, float]], *, encoder: Encoder
) -> list[Window]:
    """Embed every window of :func:`window_spans` (a short one with context around it)."""
    windows: list[Window] = []
    for start, end, short in window_spans(regions):
        first, last = start, end
        if short:
            middle = (start + end) / 2
            half = max(end - start, SHORT_CONTEXT_SECONDS) / 2
            first, last = middle - half, middle + half
        clip = audio[max(0, int(first * SAMPLE_RATE)) : min(audio.size, int(last * SAMPLE_RATE))]
        if clip.size < 0.3 * SAMPLE_RATE:  # nothing the model can read
            continue
        windows.append(Window(start=start, end=end, embedding=encoder.embed(clip), short=short))
    return windows


# --- 3. clustering --------------------------------------------------------------------------------


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def centroids(embeddings: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """The L2-normalised mean embedding of each label."""
    return {int(label): _normalised(embeddings[labels == label].mean(axis=0)) for label in np.unique(labels)}


def _agglomerate(embeddings: np.ndarray, *, threshold: float, n_clusters: int | None) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    if embeddings.shape[0] == 1:
        return np.zeros(1, dtype=int)
    if n_clusters is not None:
        n_clusters = min(n_clusters, embeddings.shape[0])
        model = AgglomerativeClustering(n_clusters=n_clusters, metric="cosine", linkage="average")
    else:
        model = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=1.0 - threshold
        )
    return model.fit_predict(embeddings).astype(int)


def cluster_embeddings(
    embeddings: np.ndarray,
    *,
    threshold: float,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    lone: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster labels (0..k-1) of L2-normalised ``embeddings`` (rows).

    Clusters merge while their average cosine similarity is at least ``threshold``; with
    ``num_speakers`` the cut is at exactly that many clusters (at most one per embedding), and
    with ``min_speakers``/``max_speakers`` a threshold cut outside the bounds is redone at the
    nearest bound. Rows flagged in ``lone`` (short windows) take no part in the cut and join the
    closest centroid afterwards; so does a cluster of one full window when the count is free
    (one window of a voice is more often a cough, a laugh or an overlap than a speaker).
    """
    embeddings = _normalised(np.asarray(embeddings, dtype=np.float32))
    count = embeddings.shape[0]
    if count == 0:
        return np.zeros(0, dtype=int)
    lone = np.zeros(count, dtype=bool) if lone is None else np.asarray(lone, dtype=bool)
    core = ~lone if (~lone).sum() >= max(1, num_speakers or 1, min_speakers or 1) else np.ones(count, dtype=bool)
    core_rows = embeddings[core]
    if num_speakers is not None:
        labels = _agglomerate(core_rows, threshold=threshold, n_clusters=num_speakers)
    else:
        labels = _agglomerate(core_rows, threshold=threshold, n_clusters=None)
        found = len(np.unique(labels))
        low = min_speakers or 1
        high = max_speakers or max(found, low)
        if found < low or found > high:
            labels = _agglomerate(core_rows, threshold=threshold, n_clusters=min(max(found, low), high))
        else:
            labels = _absorb_singletons(core_rows, labels, keep_at_least=low)
    result = np.empty(count, dtype=int)
    result[core] = labels
    if (~core).any():
        free = num_speakers is None and max_speakers is None
        result[~core] = _join_short(embeddings[~core], core_rows, labels, new_voices=free)
    return _renumber(result)


def _join_short(
    rows: np.ndarray, core_rows: np.ndarray, core_labels: np.ndarray, *, new_voices: bool
) -> np.ndarray:
    """Each row's closest cluster by its average similarity to the cluster's windows (average
    linkage, as the cut above); with ``new_voices``, a row below NEW_VOICE_SIMILARITY with every
    cluster starts a voice of its own, which later rows can join.

    Not the similarity to the cluster's centroid: the normalised mean of a spread cluster is closer
    to everything than its windows are. On a phone line, a voice heard only in half-second bursts
    ("front left", cards-ast-alsa in tests/conversations.py) scored 0.18-0.21 with both other
    speakers' centroids, so it was joined to one of them, but 0.13-0.14 on average with their
    windows: now a voice of its own. Over the 20 test conversations the speaker count is right on
    18 (17 with centroids); NEW_VOICE_SIMILARITY 0.14-0.16 gives 18, 0.13 and 0.17 give 17.
    """
    members = {int(label): core_rows[core_labels == label] for label in np.unique(core_labels)}
    labels = np.empty(rows.shape[0], dtype=int)
    for index, row in enumerate(rows):
        scores = {label: float((windows @ row).mean()) for label, windows in members.items()}
        best = max(scores, key=scores.__getitem__)
        if new_voices and scores[best] < NEW_VOICE_SIMILARITY:
            best = max(members) + 1
            members[best] = row[np.newaxis]
        labels[index] = best
    return labels


def _absorb_singletons(embeddings: np.ndarray, labels: np.ndarray, *, keep_at_least: int) -> np.ndarray:
    """Give each one-window cluster to the closest bigger cluster when at least ABSORB_SIMILARITY
    alike, keeping ``keep_at_least`` clusters."""
    sizes = {int(label): int((labels == label).sum()) for label in np.unique(labels)}
    big = [label for label, size in sizes.items() if size > 1]
    if not big:
        return labels
    labels = labels.copy()
    means = centroids(embeddings, labels)
    singles = sorted((label for label, size in sizes.items() if size == 1), key=lambda label: -max(
        float(means[label] @ means[b]) for b in big
    ))
    remaining = len(sizes)
    for label in singles:
        if remaining <= keep_at_least:
            break
        target = max(big, key=lambda b: float(means[label] @ means[b]))
        if float(means[label] @ means[target]) < ABSORB_SIMILARITY:
            continue
        labels[labels == label] = target
        remaining -= 1
    return labels


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels numbered 0, 1, ... in order of first appearance."""
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return np.array([order[int(label)] for label in labels], dtype=int)


def cluster_windows(
    windows: Sequence[Window],
    *,
    threshold: float,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> np.ndarray:
    """:func:`cluster_embeddings` over the windows' embeddings, short windows joining afterwards."""
    if not windows:
        return np.zeros(0, dtype=int)
    return cluster_embeddings(
        np.stack([w.embedding for w in windows]),
        threshold=threshold,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        lone=np.array([w.short for w in windows]),
    )


# --- 4. the timeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """A label per FRAME_SECONDS frame (-1: no window covers it)."""

    labels: np.ndarray

    def at(self, start: float, end: float) -> int:
        """The label that holds most of [start, end]; the closest labelled frame when none does."""
        first = max(0, int(start / FRAME_SECONDS))
        last = max(first + 1, int(np.ceil(end / FRAME_SECONDS)))
        span = self.labels[first:last]
        span = span[span >= 0]
        if span.size:
            return int(np.bincount(span).argmax())
        known = np.flatnonzero(self.labels >= 0)
        if not known.size:
            return -1
        middle = (first + last) / 2
        return int(self.labels[known[np.abs(known - middle).argmin()]])


def timeline(windows: Sequence[Window], labels: np.ndarray, *, duration: float) -> Timeline:
    """Each window votes for its label over its span, most at its centre (a triangle), so that
    where windows of two speakers overlap the frame goes to the window centred nearer to it."""
    frames = max(1, int(np.ceil(duration / FRAME_SECONDS)) + 1)
    count = int(labels.max()) + 1 if len(labels) else 0
    votes = np.zeros((max(count, 1), frames), dtype=np.float32)
    for window, label in zip(windows, labels, strict=True):
        first = max(0, int(window.start / FRAME_SECONDS))
        last = min(frames, max(first + 1, int(np.ceil(window.end / FRAME_SECONDS))))
        positions = (np.arange(first, last) + 0.5) * FRAME_SECONDS
        half = max((window.end - window.start) / 2, FRAME_SECONDS)
        weight = 1.0 - np.abs(positions - window.centre) / (half + FRAME_SECONDS)
        votes[label, first:last] += np.clip(weight, 0.05, None) * (0.5 if window.short else 1.0)
    result = votes.argmax(axis=0)
    result[votes.max(axis=0) <= 0] = -1
    return Timeline(labels=result.astype(int))
