"""Every engine through the one interface: openai-whisper, CTranslate2 and the relay.

The same test body runs against each engine, on real recorded speech (LibriVox clips from
``pocketsphinx-testdata`` with their transcripts) and checks what a caller relies on: the words,
segments and word timings inside the audio, and nothing heard in silence. The relay is a real
local HTTP server (``tests.relay_server``) standing in for an OpenAI-compatible upstream that runs
Whisper: it answers with the ``verbose_json`` that upstream gives for the clip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from speech.audio import SAMPLE_RATE, decode_audio
from speech.engines.base import EncodedAudio, Engine, TranscribeOptions, language_name
from speech.engines.ctranslate2 import CTranslate2Engine
from speech.engines.relay import RelayClient
from speech.engines.whisper import WhisperEngine
from tests.relay_server import RelayServer
from tests.voices import POCKETSPHINX_DATA, word_error_rate

pytestmark = pytest.mark.slow

CLIP = "sense_and_sensibility_01_austen_64kb-0870"
KEY = "relay-secret-interface-41c2"


def _clip() -> tuple[bytes, str]:
    folder = POCKETSPHINX_DATA / "librivox"
    for line in (folder / "transcription").read_text().splitlines():
        text, _, name = line.rpartition("(")
        if name.strip(" )") == CLIP:
            reference = text.replace("<s>", "").replace("</s>", "").strip()
            return Path(folder / f"{CLIP}.wav").read_bytes(), reference
    raise LookupError(CLIP)


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, str, bytes]:
    data, reference = _clip()
    # A second of silence before the speech: timings must fall on the speech, not before it.
    samples = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), decode_audio(data).samples])
    return samples, reference, data


@pytest.fixture(scope="module")
def ctranslate2_engine(tmp_path_factory: pytest.TempPathFactory) -> CTranslate2Engine:
    engine = CTranslate2Engine(model_name="base", cpu_threads=1, cache_dir=tmp_path_factory.mktemp("ct2"))
    engine.load()
    return engine


def _upstream_answer(engine: Engine, samples: np.ndarray) -> dict:
    """The verbose_json an OpenAI-compatible Whisper server gives for ``samples``."""
    result = engine.transcribe(samples, options=TranscribeOptions(language="en", word_timestamps=True))
    return {
        "task": "transcribe",
        "language": language_name(result.language),
        "duration": result.duration_s,
        "text": result.text,
        "segments": [
            {"id": i, "start": s.start, "end": s.end, "text": " " + s.text, "avg_logprob": s.avg_logprob,
             "no_speech_prob": s.no_speech_prob}
            for i, s in enumerate(result.segments)
        ],
        "words": [{"word": w.word, "start": w.start, "end": w.end} for s in result.segments for w in s.words or []],
    }


@pytest.fixture(scope="module", params=["openai-whisper", "ctranslate2", "relay"])
def engine(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    ctranslate2_engine: CTranslate2Engine,
    clip: tuple[np.ndarray, str, bytes],
) -> Iterator[Engine]:
    if request.param == "openai-whisper":
        engine = WhisperEngine(model_name="base", cpu_threads=1, cache_dir=str(tmp_path_factory.mktemp("w")))
        engine.load()
        yield engine
    elif request.param == "ctranslate2":
        yield ctranslate2_engine
    else:
        with RelayServer(api_key=KEY, static_body=_upstream_answer(ctranslate2_engine, clip[0])) as relay:
            yield RelayClient(base_url=relay.base_url, api_key=KEY, model="whisper-1", timeout_s=10)


def _options(engine: Engine, clip: tuple[np.ndarray, str, bytes], **kwargs: object) -> TranscribeOptions:
    # The relay forwards the upload as the client sent it (here the WAV behind the samples).
    original = EncodedAudio(clip[2], "clip.wav") if isinstance(engine, RelayClient) else None
    return TranscribeOptions(original=original, **kwargs)  # type: ignore[arg-type]


def test_real_speech_reads_back_with_segments_and_word_timings_inside_the_audio(engine: Engine, clip) -> None:
    samples, reference, _ = clip

    result = engine.transcribe(samples, options=_options(engine, clip, language="en", word_timestamps=True))

    assert word_error_rate(reference, result.text) <= 0.2, result.text
    assert result.language == "en"
    assert result.duration_s == pytest.approx(samples.size / SAMPLE_RATE)
    assert result.segments
    assert all(0.0 <= s.start <= s.end <= result.duration_s for s in result.segments)
    words = [w for s in result.segments for w in s.words or []]
    assert len(words) >= len(reference.split()) - 3
    assert all(0.0 <= w.start <= w.end <= result.duration_s for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert words[0].start >= 0.5  # not placed in the second of silence before the speech


def test_words_come_only_when_asked_for(engine: Engine, clip) -> None:
    result = engine.transcribe(clip[0], options=_options(engine, clip, language="en"))

    assert result.text
    assert all(s.words is None for s in result.segments)


@pytest.mark.parametrize("engine", ["openai-whisper", "ctranslate2"], indirect=True)
def test_silence_gives_no_text(engine: Engine) -> None:
    quiet_room = (np.random.default_rng(7).standard_normal(3 * SAMPLE_RATE) * 1e-3).astype(np.float32)

    for samples in (np.zeros(2 * SAMPLE_RATE, np.float32), quiet_room):
        result = engine.transcribe(samples, options=TranscribeOptions())
        assert result.text == ""
        assert not any(s.text for s in result.segments)
