"""The real-speech conversation set is built as designed: same audio every time, turns where the
RTTM says, natural gaps, only the designed overlaps, and a phone band that is really a phone band."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy import signal

from tests import conversations as convs
from tests.conversations import GAP_S, OVERLAP_S, RATE, Conversation


@pytest.fixture(scope="module")
def everything() -> list[Conversation]:
    return convs.build_all()


@pytest.fixture(scope="module")
def wideband(everything: list[Conversation]) -> list[Conversation]:
    return [c for c in everything if c.band == "wideband"]


def test_assembly_is_deterministic(tmp_path: Path, wideband: list[Conversation]) -> None:
    # given a fresh cache, when the set is built again from the packaged recordings
    fresh = convs.conversations(with_text=False, cache_dir=tmp_path)
    # then it is the same audio and the same turns as the cached set
    assert [c.name for c in fresh] == [c.name for c in wideband]
    for a, b in zip(fresh, wideband, strict=True):
        assert a.turns == b.turns
        assert np.array_equal(a.samples, b.samples)


def test_the_set_has_the_shape_the_benchmark_needs(wideband: list[Conversation]) -> None:
    texted = convs.conversations()
    assert 8 <= len(wideband) <= 12
    assert len(texted) >= 6
    assert all(c.has_text and c.reference_text for c in texted)
    for c in wideband:
        assert 2 <= len(c.speakers) <= 4, c.name
        assert 20 <= c.duration_s <= 60, c.name
        assert c.samples.dtype == np.float32
        # every texted conversation mixes only transcribed speakers, every untexted one none
        assert all(t.text is None for t in c.turns) or c.has_text
    with pytest.raises(ValueError, match="without transcripts"):
        _ = next(c for c in wideband if not c.has_text).reference_text


def test_turns_overlap_only_where_designed(wideband: list[Conversation]) -> None:
    designed = 0
    for c in wideband:
        assert c.turns == sorted(c.turns, key=lambda t: t.start)
        found = [
            (b.start, a.end) for a, b in itertools.combinations(c.turns, 2) if min(a.end, b.end) > max(a.start, b.start)
        ]
        assert found == c.overlaps, c.name
        for start, end in c.overlaps:
            assert OVERLAP_S[0] - 0.01 <= end - start <= OVERLAP_S[1] + 0.01
        designed += len(c.overlaps)
        gaps = [b.start - a.end for a, b in itertools.pairwise(c.turns) if b.start >= a.end]
        assert all(GAP_S[0] - 0.01 <= g <= GAP_S[1] + 0.01 for g in gaps), (c.name, gaps)
    assert designed >= 5  # some overlap, not everywhere


def test_turns_hold_speech_and_gaps_hold_none(wideband: list[Conversation]) -> None:
    for c in wideband:
        for t in c.turns:
            inside = c.samples[int(t.start * RATE) : int(t.end * RATE)]
            assert np.sqrt(np.mean(inside**2)) > 0.03, (c.name, t)
        for a, b in itertools.pairwise(c.turns):
            if b.start - a.end >= 0.2:  # away from the clips' kept margins
                gap = c.samples[int((a.end + 0.05) * RATE) : int((b.start - 0.05) * RATE)]
                assert np.sqrt(np.mean(gap**2)) < 0.02, (c.name, a, b)


def test_backchannels_are_real_clips_of_the_asterisk_voice(wideband: list[Conversation]) -> None:
    short = [t for c in wideband for t in c.turns if t.text in ("Thank you.", "no", "Hello.")]
    assert short
    assert {t.speaker for t in short} == {"asterisk"}


def test_rttm_lines_match_the_turns(wideband: list[Conversation]) -> None:
    c = wideband[0]
    lines = c.rttm()
    assert len(lines) == len(c.turns)
    for line, turn in zip(lines, c.turns, strict=True):
        kind, name, channel, start, dur, _, _, speaker, _, _ = line.split()
        assert (kind, name, channel, speaker) == ("SPEAKER", c.name, "1", turn.speaker)
        assert float(start) == pytest.approx(turn.start, abs=1e-3)
        assert float(start) + float(dur) == pytest.approx(turn.end, abs=2e-3)
    assert convs.rttm([c]).splitlines() == lines


def _band_energy(samples: np.ndarray, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / RATE)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum() / spectrum.sum())


def test_phone_band_is_band_limited(everything: list[Conversation]) -> None:
    phone = {c.name: c for c in everything if c.band == "phone"}
    for wide in (c for c in everything if c.band == "wideband" and "librivox" in c.speakers):
        narrow = phone[wide.name]
        assert narrow.turns == wide.turns
        assert narrow.samples.size == wide.samples.size
        # the wideband LibriVox reader has energy above 4 kHz; the phone line keeps none of it
        assert _band_energy(wide.samples, 4000, 8000) > 1e-3
        assert _band_energy(narrow.samples, 3700, 8000) < 1e-4
        assert _band_energy(narrow.samples, 0, 200) < 1e-3
        assert _band_energy(narrow.samples, 300, 3400) > 0.98


def test_enrollment_clips_are_not_in_any_conversation(wideband: list[Conversation]) -> None:
    for speaker in (*convs.TEXTED_SPEAKERS, "ve9qrp", "vk5qi"):
        clip = convs.enrollment_clip(speaker)
        assert clip.size >= 2.5 * RATE, speaker
        # a 0.5 s stretch of the enrollment speech, searched for in every conversation
        first = int(np.flatnonzero(np.abs(clip) > 0.05)[0])
        probe = clip[first : first + RATE // 2]
        for c in wideband:
            if speaker not in c.speakers:
                continue
            hit = signal.correlate(c.samples, probe / np.linalg.norm(probe), mode="valid", method="fft")
            energy = np.sqrt(np.maximum(signal.fftconvolve(c.samples**2, np.ones(probe.size), mode="valid"), 0))
            loud = energy > 1.0  # speech, not the digital silence between turns
            assert np.max(hit[loud] / energy[loud]) < 0.9, (speaker, c.name)
    with pytest.raises(KeyError):
        convs.enrollment_clip("hts1a")
