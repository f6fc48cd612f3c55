"""Batched decoding gives the words one-at-a-time decoding gives (real recorded speech, CPU).

The LibriVox clips of ``pocketsphinx-testdata`` are real people reading, with transcripts beside
them; four of them are the four windows of a batch.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from speech.audio import SAMPLE_RATE
from speech.batching import BatchingEngine
from speech.engines.base import Engine, TranscribeOptions, TranscriptionResult
from speech.engines.whisper import WhisperEngine
from tests.voices import librivox_clips, word_error_rate

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, str]]:
    return librivox_clips()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> WhisperEngine:
    engine = WhisperEngine(model_name="base", device="cpu", cpu_threads=1, cache_dir=str(tmp_path_factory.mktemp("w")))
    engine.load()
    return engine


GREEDY = TranscribeOptions(language="en", temperature=0.0, word_timestamps=True)


def test_a_batch_of_four_windows_gives_the_same_words_as_one_at_a_time(engine, clips) -> None:
    windows = [samples for samples, _ in clips]

    one_by_one = [engine.transcribe_batch([window], options=GREEDY)[0] for window in windows]
    batched = engine.transcribe_batch(windows, options=GREEDY)

    assert [r.text for r in batched] == [r.text for r in one_by_one]
    for result, (samples, reference) in zip(batched, clips, strict=True):
        # Each window's own words came back (not a neighbour's), and they are what was read.
        assert word_error_rate(reference, result.text) <= 0.25, (reference, result.text)
        words = [w for segment in result.segments for w in segment.words or []]
        assert [w.word for w in words], result
        assert all(0.0 <= w.start <= w.end <= samples.size / SAMPLE_RATE for w in words)
        assert [w.start for w in words] == sorted(w.start for w in words)


def test_batched_windows_read_like_whole_file_whisper(engine, clips) -> None:
    """The batched path is not a worse decoder: its words match ``whisper.transcribe``'s."""
    windows = [samples for samples, _ in clips]
    batched = engine.transcribe_batch(windows, options=TranscribeOptions(language="en"))
    whole = [engine.transcribe(window, options=TranscribeOptions(language="en")) for window in windows]
    for a, b, (_, reference) in zip(batched, whole, clips, strict=True):
        assert word_error_rate(reference, a.text) <= word_error_rate(reference, b.text) + 0.1


class _Recording(Engine):
    """A real engine, recording the size of every batch it is handed."""

    name = "recording"

    def __init__(self, inner: Engine) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        return self.transcribe_batch([samples], options=options)[0]

    def transcribe_batch(self, windows, *, options):
        self.sizes.append(len(windows))
        return self.inner.transcribe_batch(windows, options=options)


def test_concurrent_callers_share_one_batched_pass(engine, clips) -> None:
    recording = _Recording(engine)
    batching = BatchingEngine(recording, max_batch=4, max_wait_s=0.5)
    results: dict[int, str] = {}
    start = threading.Barrier(len(clips))

    def call(index: int) -> None:
        start.wait()
        results[index] = batching.transcribe(clips[index][0], options=GREEDY).text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clips))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    batching.close()

    assert recording.sizes == [4]  # four callers, one pass
    expected = [engine.transcribe_batch([samples], options=GREEDY)[0].text for samples, _ in clips]
    assert [results[i] for i in range(len(clips))] == expected


def test_a_failing_batch_fails_each_caller_with_the_engines_error(engine) -> None:
    batching = BatchingEngine(engine, max_batch=2, max_wait_s=0.0)
    with pytest.raises(Exception, match="Whisper knows"):
        batching.transcribe(np.zeros(SAMPLE_RATE, np.float32), options=TranscribeOptions(language="klingon"))
    batching.close()
