"""Quality checks on a reference recording before it becomes a voice profile.

Runs in the web process while the upload request is open, so it loads no neural model: duration,
loudness, clipping and an energy-based measure of how much of the recording is voiced. A reference
that fails is refused at once with the reasons, instead of producing an embedding that would match
the wrong people (noise, silence and clipping all push embeddings towards each other).

Fail reasons are stable strings a client can act on: ``too_short``, ``too_long``,
``too_little_speech``, ``clipped``, ``too_quiet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from django.conf import settings

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
TOO_LITTLE_SPEECH = "too_little_speech"
CLIPPED = "clipped"
TOO_QUIET = "too_quiet"

FRAME_SECONDS = 0.03
# A sample at or above this magnitude is counted as clipped: a converter or an encoder at full
# scale rarely lands exactly on 1.0.
CLIP_LEVEL = 0.99
# A frame is voiced above max(this absolute floor, the noise floor + _NOISE_MARGIN_DB). The floor
# keeps a faint hiss from counting as speech in a recording with digital silence between words.
_VOICED_FLOOR_DBFS = -45.0
_NOISE_MARGIN_DB = 12.0
# The recording's quietest frames (this percentile) stand for its noise floor.
_NOISE_PERCENTILE = 10
_SILENT_DBFS = -120.0


@dataclass(frozen=True)
class PreflightResult:
    duration_s: float
    speech_ratio: float  # share of 30 ms frames that are voiced
    clipped_ratio: float  # share of samples at |x| >= CLIP_LEVEL
    rms_dbfs: float  # loudness of the voiced frames (of the whole recording when none is voiced)
    fail_reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.fail_reasons

    def measurements(self) -> dict[str, float]:
        return {
            "duration_s": round(self.duration_s, 3),
            "speech_ratio": round(self.speech_ratio, 3),
            "clipped_ratio": round(self.clipped_ratio, 5),
            "rms_dbfs": round(self.rms_dbfs, 1),
        }


def _dbfs(rms: np.ndarray | float) -> np.ndarray:
    return 20.0 * np.log10(np.maximum(rms, 10 ** (_SILENT_DBFS / 20)))


def preflight_reference(audio: np.ndarray, *, sample_rate: int = 16_000) -> PreflightResult:
    """Measure ``audio`` (mono float32 in [-1, 1]) and list what makes it unfit as a reference.

    Bounds come from the ``SCAIECHO_SPEAKER_*`` settings. Loudness is judged on the voiced frames
    only, so a quiet pause does not make a clear speaker "too quiet".
    """
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    duration_s = samples.size / sample_rate
    min_seconds = settings.SCAIECHO_SPEAKER_MIN_SECONDS
    max_seconds = settings.SCAIECHO_SPEAKER_MAX_SECONDS
    min_speech_ratio = settings.SCAIECHO_SPEAKER_MIN_SPEECH_RATIO
    max_clipped_ratio = settings.SCAIECHO_SPEAKER_MAX_CLIPPED_RATIO
    min_rms_dbfs = settings.SCAIECHO_SPEAKER_MIN_RMS_DBFS

    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    clipped_ratio = float(np.mean(np.abs(samples) >= CLIP_LEVEL)) if samples.size else 0.0

    frame = max(1, int(FRAME_SECONDS * sample_rate))
    count = samples.size // frame
    if count:
        frames = samples[: count * frame].reshape(count, frame).astype(np.float64)
        frame_db = _dbfs(np.sqrt(np.mean(frames**2, axis=1)))
        noise_db = float(np.percentile(frame_db, _NOISE_PERCENTILE))
        voiced = frame_db > max(_VOICED_FLOOR_DBFS, noise_db + _NOISE_MARGIN_DB)
        speech_ratio = float(np.mean(voiced))
        loud = frames[voiced] if voiced.any() else frames
        rms_dbfs = float(_dbfs(np.sqrt(np.mean(loud**2))))
    else:
        speech_ratio = 0.0
        rms_dbfs = float(_dbfs(float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0))

    reasons = []
    if duration_s < min_seconds:
        reasons.append(TOO_SHORT)
    if duration_s > max_seconds:
        reasons.append(TOO_LONG)
    if speech_ratio < min_speech_ratio:
        reasons.append(TOO_LITTLE_SPEECH)
    if clipped_ratio > max_clipped_ratio:
        reasons.append(CLIPPED)
    if rms_dbfs < min_rms_dbfs:
        reasons.append(TOO_QUIET)
    return PreflightResult(
        duration_s=duration_s,
        speech_ratio=speech_ratio,
        clipped_ratio=clipped_ratio,
        rms_dbfs=rms_dbfs,
        fail_reasons=reasons,
    )
