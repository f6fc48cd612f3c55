"""Reference-recording preflight: real and synthetic speech passes, unusable recordings say why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speakers.preflight import preflight_reference
from speech.audio import decode_audio
from tests.voices import real_speech, synth_speech

TEXT = "We walked along the river until the sun went down, and then we talked about the plans for the garden."
VOICES = ["en-us", "en+m3", "en-gb-scotland+david", "en+f3", "en-us+Annie", "en-029+Andy", "en-gb-x-rp+linda"]


def speech(voice: str = "en-us") -> np.ndarray:
    return decode_audio(synth_speech(TEXT, voice=voice)).samples


@pytest.mark.parametrize("voice", VOICES)
def test_synthetic_speech_passes(voice: str) -> None:
    result = preflight_reference(speech(voice))
    assert result.ok, result


def test_every_real_recording_passes() -> None:
    for speaker, clips in real_speech().items():
        for clip in clips:
            result = preflight_reference(clip)
            assert result.ok, (speaker, result)


def _noise(dbfs: float, seconds: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.standard_normal(int(seconds * 16_000)) * 10 ** (dbfs / 20)).astype(np.float32)


@pytest.mark.parametrize(
    ("make", "reasons"),
    [
        pytest.param(lambda: np.zeros(3 * 16_000, dtype=np.float32), ["too_little_speech", "too_quiet"], id="silence"),
        pytest.param(lambda: speech()[:16_000], ["too_short"], id="one-second"),
        pytest.param(lambda: _noise(-50), ["too_little_speech", "too_quiet"], id="faint-noise"),
        pytest.param(lambda: _noise(-20), ["too_little_speech"], id="loud-noise"),
        pytest.param(lambda: np.clip(speech() * 8, -1, 1), ["clipped"], id="amplified-and-clipped"),
        pytest.param(lambda: speech() * 0.005, ["too_little_speech", "too_quiet"], id="whisper-quiet"),
        pytest.param(lambda: np.tile(speech(), 25), ["too_long"], id="over-two-minutes"),
    ],
)
def test_an_unusable_recording_fails_with_its_reasons(make, reasons: list[str]) -> None:
    result = preflight_reference(make())
    assert not result.ok
    assert result.fail_reasons == reasons, result


def test_measurements_describe_the_recording() -> None:
    audio = speech()
    result = preflight_reference(np.concatenate([np.zeros(16_000, dtype=np.float32), audio]))
    assert result.duration_s == pytest.approx(audio.size / 16_000 + 1.0)
    assert 0.5 < result.speech_ratio < 1.0  # the leading second of silence is not speech
    assert result.clipped_ratio == 0.0
    assert -30 < result.rms_dbfs < -10
    assert set(result.measurements()) == {"duration_s", "speech_ratio", "clipped_ratio", "rms_dbfs"}


def test_bounds_come_from_settings(settings) -> None:
    settings.SCAIECHO_SPEAKER_MIN_SECONDS = 30.0
    settings.SCAIECHO_SPEAKER_MIN_RMS_DBFS = -10.0
    assert preflight_reference(speech()).fail_reasons == ["too_short", "too_quiet"]


def test_preflight_loads_no_model() -> None:
    # It runs in the web process, where neither torch nor a speech model may be loaded.
    code = "import sys, speakers.preflight; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
