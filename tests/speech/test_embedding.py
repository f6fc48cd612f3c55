"""Speaker embeddings: the packaged model is verified, matches speechbrain, and tells voices apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from django.conf import settings

from speech.audio import decode_audio
from speech.embedding import (
    ECAPA_SHA256,
    EMBEDDING_DIM,
    SpeakerEncoder,
    SpeakerModelError,
    cosine_similarity,
    model_dir,
)
from tests.voices import real_speech, synth_speech

pytestmark = pytest.mark.slow

ENROLL_TEXT = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."
PROBE_TEXT = "Four hours of steady work faced us, and the meal was cooked before the bell rang."
# Clearly different espeak-ng speakers (../shared/models.md). Not "en+m3": it is en-us's voice with
# a variant, and its speech scores closer to an en-us profile than to its own (0.86 against 0.80).
VOICES = ["en-us", "en+m7", "en-gb-scotland+david", "en+f3", "en-us+Annie", "en-029+Andy"]


def espeak(text: str, voice: str) -> np.ndarray:
    return decode_audio(synth_speech(text, voice=voice)).samples


def match_threshold() -> float:
    return float(settings.SCAIECHO_SPEAKER_MATCH_THRESHOLD)


@pytest.fixture(scope="module")
def real() -> dict[str, list[np.ndarray]]:
    return real_speech()


def _model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for path in model_dir().iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path)
    return folder


def test_an_altered_checkpoint_is_refused(tmp_path: Path) -> None:
    # Given a copy of the model whose checkpoint differs from the published one in one byte
    folder = _model_copy(tmp_path)
    checkpoint = folder / "embedding_model.ckpt"
    data = bytearray(checkpoint.read_bytes())
    checkpoint.unlink()
    data[len(data) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(data))

    # When it is loaded, then it fails naming the expected hash, before any weight is used
    with pytest.raises(SpeakerModelError, match=ECAPA_SHA256):
        SpeakerEncoder(folder=folder).load()


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    assert model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(SpeakerModelError, match="missing"):
        SpeakerEncoder(folder=tmp_path).load()


def test_embeddings_equal_speechbrains_own_pipeline(encoder: SpeakerEncoder, tmp_path: Path, real) -> None:
    from speechbrain.inference.speaker import EncoderClassifier

    # speechbrain's loader, offline: the hyperparameters' download path pointed at the local copy,
    # and the label file under the name the hub uses (the package ships it as speechbrain saved it).
    folder = _model_copy(tmp_path)
    (folder / "label_encoder.txt").symlink_to(model_dir() / "label_encoder.ckpt")
    reference = EncoderClassifier.from_hparams(
        source=str(folder),
        savedir=str(tmp_path / "saved"),
        overrides={"pretrained_path": str(folder)},
        run_opts={"device": "cpu"},
    )
    for audio in (real["librivox"][0], espeak(ENROLL_TEXT, "en+f3")):
        with torch.inference_mode():
            theirs = reference.encode_batch(torch.from_numpy(audio)).reshape(-1).numpy()
        assert cosine_similarity(encoder.embed(audio), theirs) > 0.999


def test_an_embedding_is_a_unit_vector_of_192_floats(encoder: SpeakerEncoder, real) -> None:
    vector = encoder.embed(real["librivox"][1])
    assert vector.shape == (EMBEDDING_DIM,)
    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(encoder.embed(real["librivox"][1]), vector, atol=1e-6)  # deterministic


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(0, dtype=np.float32), "too short"),
        (np.zeros(3_000, dtype=np.float32), "too short"),
        (np.zeros((2, 16_000), dtype=np.float32), "mono"),
        (np.full(16_000, np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_unusable_audio_is_refused(encoder: SpeakerEncoder, audio: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encoder.embed(audio)


def test_long_audio_is_embedded_in_chunks_and_still_matches(encoder: SpeakerEncoder, real) -> None:
    # Given 21 s of one reader (embedded as two ~10 s chunks) and another recording of him
    long = np.concatenate(real["librivox"][:4])
    assert long.size > 2 * encoder.chunk_samples
    # When the long recording is embedded, then it is still clearly him and not anyone else
    vector = encoder.embed(long)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert cosine_similarity(vector, encoder.embed(real["librivox"][4])) > 0.6
    assert all(cosine_similarity(vector, encoder.embed(real[other][0])) < 0.35 for other in ("alsa", "cards", "dhd"))


def test_each_synthetic_voice_is_closest_to_its_own_profile(encoder: SpeakerEncoder) -> None:
    # Given six voices enrolled from one sentence each, when each says something else
    profiles = {voice: encoder.embed(espeak(ENROLL_TEXT, voice)) for voice in VOICES}
    for voice in VOICES:
        probe = encoder.embed(espeak(PROBE_TEXT, voice))
        scores = {name: cosine_similarity(probe, profile) for name, profile in profiles.items()}
        # Then the closest profile is the speaker's own
        assert max(scores, key=scores.__getitem__) == voice, scores


@pytest.fixture(scope="module")
def real_voices(encoder: SpeakerEncoder, real) -> dict[str, list[np.ndarray]]:
    return {person: [encoder.embed(clip) for clip in clips] for person, clips in real.items()}


def _profiles_without(voices: dict[str, list[np.ndarray]], speaker: str, held_out: int) -> dict[str, np.ndarray]:
    """Each person's profile (the mean of their recordings' embeddings), leaving out the probe."""
    profiles = {}
    for person, vectors in voices.items():
        mean = np.mean([v for i, v in enumerate(vectors) if (person, i) != (speaker, held_out)], axis=0)
        profiles[person] = mean / np.linalg.norm(mean)
    return profiles


def test_real_voices_are_closest_to_their_own_profile(real_voices: dict[str, list[np.ndarray]]) -> None:
    for speaker, vectors in real_voices.items():
        for i, probe in enumerate(vectors):
            scores = {p: cosine_similarity(probe, v) for p, v in _profiles_without(real_voices, speaker, i).items()}
            assert max(scores, key=scores.__getitem__) == speaker, (speaker, i, scores)


def test_the_default_threshold_accepts_the_same_real_person_and_rejects_others(
    real_voices: dict[str, list[np.ndarray]],
) -> None:
    """Four real people (a LibriVox reader, the ALSA voice, the pocketsphinx "cards" speaker and
    David Huggins-Daines): every recording against a profile of each person made from the others."""
    threshold = match_threshold()
    false_rejects, false_accepts = [], []
    for speaker, vectors in real_voices.items():
        for i, probe in enumerate(vectors):
            for person, profile in _profiles_without(real_voices, speaker, i).items():
                score = round(cosine_similarity(probe, profile), 3)
                if person == speaker and score < threshold:
                    false_rejects.append((speaker, i, score))
                if person != speaker and score >= threshold:
                    false_accepts.append((speaker, i, person, score))
    assert not false_rejects, f"same person rejected at {threshold}: {false_rejects}"
    assert not false_accepts, f"another person accepted at {threshold}: {false_accepts}"
