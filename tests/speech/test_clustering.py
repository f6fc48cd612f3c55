"""Clustering of speaker-embedding windows (speech/clustering.py), on constructed embeddings: the
counting rules (a threshold that can say "one", an exact count, bounds) and the timeline that
gives each moment its window's speaker. Real voices: tests/speakers/test_diarization_real.py."""

from __future__ import annotations

import numpy as np
import pytest

from speech import clustering
from speech.clustering import Window


def voices(count: int, per_voice: int, *, spread: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_voice`` noisy embeddings around each of ``count`` random directions in 192-d."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count, 192))
    rows = np.concatenate([c + spread * np.linalg.norm(c) / np.sqrt(192) * rng.normal(size=(per_voice, 192)) * 3 for c in centres])
    truth = np.repeat(np.arange(count), per_voice)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), truth


def same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}
    return len(pairs) == len(set(labels)) == len(set(truth))


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_the_threshold_finds_the_number_of_voices_one_included(count):
    rows, truth = voices(count, 12)
    labels = clustering.cluster_embeddings(rows, threshold=0.3)
    assert same_partition(labels, truth)
    assert labels[0] == 0  # numbered by first appearance


def test_num_speakers_forces_the_count_and_bounds_clamp_it():
    rows, truth = voices(3, 10)
    assert len(set(clustering.cluster_embeddings(rows, threshold=0.3, num_speakers=2))) == 2
    assert len(set(clustering.cluster_embeddings(rows, threshold=0.3, num_speakers=5))) == 5
    assert len(set(clustering.cluster_embeddings(rows, threshold=0.3, max_speakers=2))) == 2
    assert len(set(clustering.cluster_embeddings(rows, threshold=0.3, min_speakers=4))) == 4
    # Bounds the threshold's answer already satisfies change nothing.
    assert same_partition(clustering.cluster_embeddings(rows, threshold=0.3, min_speakers=2, max_speakers=4), truth)
    # More speakers than embeddings: one each.
    assert len(set(clustering.cluster_embeddings(rows[:2], threshold=0.3, num_speakers=3))) == 2


def toward(direction: np.ndarray, similarity: float, *, seed: int) -> np.ndarray:
    """A unit vector at exactly ``similarity`` (cosine) to ``direction``."""
    unit = direction / np.linalg.norm(direction)
    other = np.random.default_rng(seed).normal(size=unit.size)
    other -= (other @ unit) * unit
    other /= np.linalg.norm(other)
    return similarity * unit + np.sqrt(1 - similarity**2) * other


def test_a_lone_window_near_a_voice_joins_it_one_unlike_every_voice_stays_a_speaker():
    rows, _ = voices(1, 10)
    centre = rows.mean(axis=0)
    near = toward(centre, 0.25, seed=7)  # apart at the threshold, yet like this voice more than not
    assert set(clustering.cluster_embeddings(np.vstack([rows, near]), threshold=0.3)) == {0}
    assert set(clustering.cluster_embeddings(np.vstack([rows, near]), threshold=0.3, num_speakers=2)) == {0, 1}
    # Someone with one turn in the whole recording: not a cough of the main voice.
    stranger = toward(centre, 0.05, seed=8)
    labels = clustering.cluster_embeddings(np.vstack([rows, stranger]), threshold=0.3)
    assert list(labels) == [0] * 10 + [1]


def test_a_short_window_unlike_every_voice_is_a_voice_of_its_own_when_the_count_is_free():
    rows, truth = voices(2, 8)
    yes = toward(rows[:8].mean(axis=0) + rows[8:].mean(axis=0), 0.05, seed=3)
    again = toward(yes, 0.9, seed=4)  # the same person's second short turn
    every = np.vstack([rows, yes, again])
    short = np.zeros(len(every), dtype=bool)
    short[-2:] = True
    labels = clustering.cluster_embeddings(every, threshold=0.3, lone=short)
    assert same_partition(labels[:-2], truth)
    assert labels[-1] == labels[-2] == 2
    # With the count given or bounded, short windows only ever join a voice found among the full ones.
    assert set(clustering.cluster_embeddings(every, threshold=0.3, lone=short, max_speakers=3)) == {0, 1}
    assert set(clustering.cluster_embeddings(every, threshold=0.3, lone=short, num_speakers=2)) == {0, 1}


def test_a_short_window_is_judged_by_a_voices_windows_not_by_their_centroid():
    """A spread voice's normalised centroid is closer to everything than its windows are: a short
    window (someone else's "front left") near that centroid, yet unlike the windows themselves, is
    a voice of its own, as in a phone call where the bursts of a third person joined another."""
    rows, truth = voices(2, 8)
    first = rows[:8]
    burst = toward(first.mean(axis=0), 0.18, seed=5)
    centroid = clustering.centroids(rows, truth)
    assert burst @ centroid[0] > clustering.NEW_VOICE_SIMILARITY  # the centroid would take it
    assert (first @ burst).mean() < clustering.NEW_VOICE_SIMILARITY  # its windows do not
    assert (rows[8:] @ burst).mean() < clustering.NEW_VOICE_SIMILARITY
    short = np.zeros(17, dtype=bool)
    short[-1] = True
    labels = clustering.cluster_embeddings(np.vstack([rows, burst]), threshold=0.3, lone=short)
    assert same_partition(labels[:-1], truth)
    assert labels[-1] == 2


def test_short_windows_are_clustered_after_the_full_ones():
    rows, truth = voices(2, 8)
    short = np.zeros(rows.shape[0], dtype=bool)
    short[[3, 12]] = True
    labels = clustering.cluster_embeddings(rows, threshold=0.3, lone=short)
    assert same_partition(labels, truth)
    assert len(clustering.cluster_embeddings(rows[:1], threshold=0.3)) == 1
    assert clustering.cluster_embeddings(np.zeros((0, 192)), threshold=0.3).size == 0


def test_window_spans_cover_each_region_and_skip_the_gaps():
    spans = clustering.window_spans([(0.0, 4.2), (6.0, 6.5)])
    assert spans[0] == (0.0, 1.5, False)
    assert spans[-2][1] == pytest.approx(4.2)  # the last full window is flush with the region's end
    assert spans[-1] == (6.0, 6.5, True)  # a short region is one short window
    assert all(not (4.2 < start < 6.0) for start, _, _ in spans)


def test_the_timeline_gives_each_moment_the_speaker_of_the_window_centred_nearest():
    a, b = np.eye(192)[0], np.eye(192)[1]
    windows = [Window(0.0, 1.5, a), Window(0.75, 2.25, a), Window(1.5, 3.0, b), Window(2.25, 3.75, b)]
    frames = clustering.timeline(windows, np.array([0, 0, 1, 1]), duration=5.0)
    assert frames.at(0.2, 0.4) == 0
    assert frames.at(3.0, 3.4) == 1
    assert frames.at(4.5, 4.7) == 1  # no window there: the closest labelled moment
    assert frames.at(1.0, 1.4) == 0


def test_speech_regions_follow_the_vad_probabilities():
    frame = 512 / 16000
    probabilities = np.array([0.1] * 10 + [0.9] * 20 + [0.4] * 3 + [0.1] * 30 + [0.8] * 3 + [0.0] * 5)
    regions = clustering.speech_regions(np.zeros(probabilities.size * 512, np.float32), probabilities=lambda _: probabilities)
    assert regions == [(round(10 * frame, 3), round(33 * frame, 3))]  # the 0.1 s blip is too short


def test_phone_audio_is_told_from_wideband_audio():
    from speech.audio import decode_audio
    from tests.conversations import phone_band
    from tests.voices import synth_speech

    wide = decode_audio(synth_speech("The birch canoe slid on the smooth planks.")).samples
    assert not clustering.narrowband(wide)
    assert clustering.narrowband(phone_band(wide))
    assert not clustering.narrowband(np.zeros(16_000, dtype=np.float32))  # silence says nothing
