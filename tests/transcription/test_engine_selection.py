"""Which engine a worker builds is a setting: SCAIECHO_WHISPER_ENGINE, the compute type, the model
(a packaged name or a local folder), and on CUDA a batching wrapper around it."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from scaiecho_site.engines import build_engine
from speech.engines.ctranslate2 import CTranslate2Engine
from speech.engines.weights import WeightsUnavailable, packaged_ctranslate2_dir
from speech.engines.whisper import WhisperEngine

CPU = {"SCAIECHO_WHISPER_DEVICE": "cpu", "SCAIECHO_WHISPER_COMPUTE_TYPE": ""}


@override_settings(SCAIECHO_WHISPER_ENGINE="ctranslate2", SCAIECHO_WHISPER_BATCH_SIZE=3, **CPU)
def test_ctranslate2_is_built_with_int8_on_the_cpu() -> None:
    engine = build_engine()

    assert isinstance(engine, CTranslate2Engine)
    assert engine.device == "cpu"
    assert engine.compute_type == "int8"
    assert engine.batch_size == 3


@override_settings(SCAIECHO_WHISPER_ENGINE="ctranslate2", SCAIECHO_WHISPER_COMPUTE_TYPE="int8_float32", SCAIECHO_WHISPER_DEVICE="cpu")
def test_an_explicit_compute_type_is_used() -> None:
    assert build_engine().compute_type == "int8_float32"


@override_settings(SCAIECHO_WHISPER_ENGINE="openai-whisper", **CPU)
def test_openai_whisper_is_still_available() -> None:
    engine = build_engine()

    assert isinstance(engine, WhisperEngine)
    assert engine.device == "cpu"


@override_settings(SCAIECHO_WHISPER_ENGINE="fast-whisper", **CPU)
def test_an_unknown_engine_is_refused_by_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="fast-whisper.*ctranslate2, openai-whisper"):
        build_engine()


def test_an_openai_whisper_checkpoint_with_the_ctranslate2_engine_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"a torch checkpoint")

    with override_settings(SCAIECHO_WHISPER_ENGINE="ctranslate2", SCAIECHO_WHISPER_MODEL=str(checkpoint), **CPU):
        engine = build_engine()
        with pytest.raises(WeightsUnavailable, match="SCAIECHO_WHISPER_ENGINE=openai-whisper"):
            engine.load()


@pytest.mark.slow
def test_a_local_ctranslate2_folder_loads_by_path(tmp_path: Path) -> None:
    folder = packaged_ctranslate2_dir(name="tiny.en", cache_dir=tmp_path)

    with override_settings(
        SCAIECHO_WHISPER_ENGINE="ctranslate2", SCAIECHO_WHISPER_MODEL=str(folder), SCAIECHO_WHISPER_CACHE_DIR=str(tmp_path), **CPU
    ):
        engine = build_engine()
        engine.load()

    assert isinstance(engine, CTranslate2Engine)
    assert engine.model_path == folder
    assert not engine.load().model.is_multilingual  # it is tiny.en that was loaded


@pytest.mark.slow
@pytest.mark.parametrize("as_folder", [False, True], ids=["pt-file", "folder-with-pt"])
def test_openai_whisper_loads_a_local_checkpoint_by_path(tmp_path: Path, as_folder: bool) -> None:
    from speech.engines.weights import load_whisper_model

    checkpoint = load_whisper_model(name="tiny.en", cache_dir=tmp_path / "cache").checkpoint_path
    model_dir = tmp_path / "my-whisper"
    model_dir.mkdir()
    own = model_dir / "tiny-en.pt"
    own.write_bytes(checkpoint.read_bytes())

    with override_settings(
        SCAIECHO_WHISPER_ENGINE="openai-whisper", SCAIECHO_WHISPER_MODEL=str(model_dir if as_folder else own), **CPU
    ):
        engine = build_engine()
        loaded = engine.load()

    assert loaded.source == "openai"
    assert loaded.model.dims.n_audio_state == 384  # the checkpoint that was given
