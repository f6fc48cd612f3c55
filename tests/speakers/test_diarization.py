"""Diarization on real embeddings of espeak-ng voices: a segment in which the speaker changes is
split at the change, and unknown voices keep stable anonymous labels."""

from __future__ import annotations

import numpy as np
import pytest

from speakers.diarization import SpeakerTracker, diarize_recording
from speakers.selectors import Candidate
from speech.audio import decode_audio
from speech.engines.base import Segment, Word
from tests.speakers.voices import ALICE, BORIS, CARL, REFERENCE_TEXT, say

SYNTHETIC_THRESHOLD = 0.6  # espeak voices are more alike than people; see tests/workers.py
SYNTHETIC_CLUSTER_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def candidates(encoder):
    return [
        Candidate(speaker_id=f"id-{voice.name}", label=voice.name, embedding=encoder.embed(decode_audio(say(voice, REFERENCE_TEXT)).samples))
        for voice in (ALICE, BORIS)
    ]


def words_over(text: str, start: float, end: float) -> list[Word]:
    """Word timings spread evenly over [start, end] (only where cuts may fall matters here)."""
    tokens = text.split()
    step = (end - start) / len(tokens)
    return [Word(start=start + i * step, end=start + (i + 1) * step, word=f" {token}") for i, token in enumerate(tokens)]


def test_a_segment_with_a_change_of_speaker_is_split_at_the_change(encoder, candidates):
    alice_text = "We should book the large room for the whole team on Monday morning."
    boris_text = "That room is taken, so I booked the one next to the kitchen instead."
    alice = decode_audio(say(ALICE, alice_text)).samples
    boris = decode_audio(say(BORIS, boris_text)).samples
    audio = np.concatenate([alice, boris])  # no pause: one segment, as Whisper would give it
    change = alice.size / 16000
    segment = Segment(
        start=0.0,
        end=audio.size / 16000,
        text=f"{alice_text} {boris_text}",
        words=words_over(alice_text, 0.0, change) + words_over(boris_text, change, audio.size / 16000),
    )
    pieces = diarize_recording(
        audio, [segment], encoder=encoder, candidates=candidates, match_threshold=SYNTHETIC_THRESHOLD, cluster_threshold=SYNTHETIC_CLUSTER_THRESHOLD
    )
    assert [piece.speaker_label for piece in pieces] == ["Alice", "Boris"]
    assert [piece.speaker_id for piece in pieces] == ["id-Alice", "id-Boris"]
    assert abs(pieces[1].start - change) <= 0.8
    assert pieces[0].text.split()[:3] == ["We", "should", "book"]
    assert pieces[1].text.split()[-2:] == ["kitchen", "instead."]
    assert " ".join(p.text for p in pieces) == segment.text


def test_one_speakers_long_segment_stays_whole(encoder, candidates):
    audio = decode_audio(say(ALICE, REFERENCE_TEXT)).samples
    segment = Segment(start=0.0, end=audio.size / 16000, text=REFERENCE_TEXT, words=words_over(REFERENCE_TEXT, 0.0, audio.size / 16000))
    [whole] = diarize_recording(
        audio, [segment], encoder=encoder, candidates=candidates, match_threshold=SYNTHETIC_THRESHOLD, cluster_threshold=SYNTHETIC_CLUSTER_THRESHOLD
    )
    assert (whole.speaker_label, whole.text) == ("Alice", REFERENCE_TEXT)


def test_unknown_voices_keep_stable_anonymous_labels(encoder, candidates):
    tracker = SpeakerTracker(match_threshold=SYNTHETIC_THRESHOLD, anon_threshold=SYNTHETIC_THRESHOLD)
    lines = ["I will take the minutes today.", "Can everyone hear me clearly?", "Let us move on to the next point."]
    labels = []
    for voice, text in [(CARL, lines[0]), (ALICE, lines[1]), (CARL, lines[2]), (CARL, lines[1])]:
        labels.append(tracker.attribute(encoder.embed(decode_audio(say(voice, text)).samples), candidates).label)
    assert labels == ["SPEAKER_1", "Alice", "SPEAKER_1", "SPEAKER_1"]
    # A new tracker (the next job or session) starts its numbering again: labels are per job.
    fresh = SpeakerTracker(match_threshold=SYNTHETIC_THRESHOLD, anon_threshold=SYNTHETIC_THRESHOLD)
    assert fresh.attribute(encoder.embed(decode_audio(say(CARL, lines[0])).samples), []).label == "SPEAKER_1"
