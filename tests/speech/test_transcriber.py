"""StreamSession over the real Whisper base model and silero-vad, fed espeak-ng speech in 100 ms
chunks on a simulated clock: each chunk is handed over when it "arrives" or when the previous
chunk's work is done, whichever is later, so emission times include the real compute time."""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import av
import numpy as np
import pytest

from speech.audio import SAMPLE_RATE
from speech.engines.whisper import ShortWindowWhisper, WhisperEngine
from speech.transcriber import Delta, StreamSession
from tests.voices import synth_speech, word_error_rate

pytestmark = pytest.mark.slow

SENTENCES = [
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Please send the quarterly report to the finance team before Friday afternoon.",
    "The weather will be sunny tomorrow.",
]
LONG = (
    "the old lighthouse keeper climbed the narrow stairs every evening to light the lamp "
    "and watch the fishing boats return to the harbour before the storm arrived"
)
CHUNK = SAMPLE_RATE // 10


def to_samples(wav: bytes) -> np.ndarray:
    with av.open(io.BytesIO(wav)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


@dataclass
class Emitted:
    at: float  # simulated wall time, stream seconds
    delta: Delta


@dataclass
class Run:
    emitted: list[Emitted]
    closed_at: float
    session: StreamSession

    @property
    def finals(self) -> list[Delta]:
        return [e.delta for e in self.emitted if e.delta.is_final]


def stream(session: StreamSession, audio: np.ndarray, *, close: bool = True, decode_seconds: float | None = None) -> Run:
    """``decode_seconds``: every decode costs this much simulated time instead of what it took, so
    which partials are made (and so the text) does not depend on how loaded this machine is."""
    clock = 0.0
    emitted: list[Emitted] = []

    def spent_on(work: Callable[[], list[Delta]]) -> list[Delta]:
        nonlocal clock
        seconds, count = session.stats.seconds, session.stats.count
        deltas = work()
        clock += (session.stats.seconds - seconds) if decode_seconds is None else decode_seconds * (session.stats.count - count)
        return deltas

    for i in range(0, audio.size, CHUNK):
        chunk = audio[i : i + CHUNK]
        clock = max(clock, (i + chunk.size) / SAMPLE_RATE)
        emitted += [Emitted(clock, d) for d in spent_on(partial(session.feed, chunk, now=clock))]
    if close:
        emitted += [Emitted(clock, d) for d in spent_on(session.close)]
    return Run(emitted, clock, session)


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    engine = WhisperEngine(model_name="base", cpu_threads=1)
    ShortWindowWhisper(engine).warm_up()
    return engine


@pytest.fixture(scope="module")
def sentences() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Three sentences after 0.5 s of silence, each followed by 1 s of silence, and where each is."""
    parts, spans, t = [silence(0.5)], [], 0.5
    for text in SENTENCES:
        speech = to_samples(synth_speech(text))
        voiced = np.flatnonzero(np.abs(speech) > 0.01)
        spans.append((t + voiced[0] / SAMPLE_RATE, t + voiced[-1] / SAMPLE_RATE))
        parts += [speech, silence(1.0)]
        t += speech.size / SAMPLE_RATE + 1.0
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def sentences_run(engine: WhisperEngine, sentences: tuple[np.ndarray, list]) -> Run:
    # max_lag 5: on a CPU shared with other work, do not let load shedding drop the partials
    # this test wants to see.
    return stream(StreamSession(engine, language="en", max_lag=5.0), sentences[0])


def test_finals_transcribe_the_speech(sentences_run: Run) -> None:
    finals = " ".join(d.text for d in sentences_run.finals)
    assert word_error_rate(" ".join(SENTENCES), finals) <= 0.20, finals


def test_each_utterance_gets_a_partial_before_its_final(sentences_run: Run, sentences: tuple) -> None:
    for start, end in sentences[1]:
        mine = [e for e in sentences_run.emitted if e.delta.start < end and e.delta.end > start]
        assert mine, f"nothing for the utterance at {start:.1f}-{end:.1f} s"
        assert not mine[0].delta.is_final
        assert mine[-1].delta.is_final


def test_finals_are_ordered_disjoint_and_inside_the_stream(sentences_run: Run, sentences: tuple) -> None:
    duration = sentences[0].size / SAMPLE_RATE
    finals = sentences_run.finals
    assert len(finals) >= len(SENTENCES)
    for d in finals:
        assert 0 <= d.start < d.end <= duration
        assert d.confidence is None or 0 < d.confidence <= 1
    for before, after in zip(finals, finals[1:], strict=False):
        assert before.end <= after.start
    # A final is never sent twice, and no later partial repeats a span already final.
    assert len({(d.start, d.text) for d in finals}) == len(finals)
    for i, e in enumerate(sentences_run.emitted):
        if e.delta.is_final:
            later = [x.delta for x in sentences_run.emitted[i + 1 :] if not x.delta.is_final]
            assert all(p.start >= e.delta.end for p in later)


def test_latency_and_decode_cost(sentences_run: Run, sentences: tuple) -> None:
    # When did each utterance's final arrive, counted from the end of its speech?
    spans = sentences[1]
    final_lag, first_partial = [], []
    for start, end in spans:
        mine = [e for e in sentences_run.emitted if e.delta.start < end and e.delta.end > start]
        final_lag.append(max(e.at for e in mine if e.delta.is_final) - end)
        partials = [e.at for e in mine if not e.delta.is_final]
        first_partial.append(min(partials) - start if partials else float("inf"))
    cost = sentences_run.session.stats.samples
    print(
        f"\nfinal after speech end (s): {[round(x, 2) for x in final_lag]}, p50 {statistics.median(final_lag):.2f}"
        f"\nfirst partial after speech start (s): {[round(x, 2) for x in first_partial]}"
        f"\ndecodes (span s, compute s): {[(round(a, 1), round(b, 2)) for a, b in cost]}"
        f"\ncompute / audio: {sentences_run.session.stats.seconds / (sentences[0].size / SAMPLE_RATE):.2f}"
    )
    # Loose bounds: these machines' two cores are shared with other work, which can triple a
    # decode; the figures measured on a quiet machine are in the report.
    assert statistics.median(final_lag) <= 3.0
    assert max(first_partial) <= 3.0


def test_short_window_decode_cost(engine: WhisperEngine, sentences: tuple) -> None:
    decoder = ShortWindowWhisper(engine)
    audio = sentences[0]
    start = int(sentences[1][0][0] * SAMPLE_RATE)
    times = {}
    for seconds in (1, 3, 5):
        runs = []
        for _ in range(2):
            session = StreamSession(engine, decoder=decoder)
            session._decode(audio[start : start + seconds * SAMPLE_RATE], word_timestamps=False)
            runs.append(session.stats.seconds)
        times[seconds] = min(runs)
    print(f"\nshort-window decode, 1 thread: {({k: round(v, 2) for k, v in times.items()})}")
    # Faster than real time even for the 5 s span, else three sessions could never keep up.
    assert times[5] < 5.0 / 2


def test_finalize_flushes_the_pending_utterance(engine: WhisperEngine) -> None:
    session = StreamSession(engine, language="en")
    speech = to_samples(synth_speech(SENTENCES[2]))
    # Cut right after the last word: no pause has ended the utterance when finalize comes.
    speech = speech[: np.flatnonzero(np.abs(speech) > 0.01)[-1]]
    run = stream(session, np.concatenate([silence(0.3), speech]), close=False)
    assert run.finals == []
    spent = session.stats.seconds
    flushed = session.finalize()
    assert [d.is_final for d in flushed] == [True]
    assert word_error_rate(SENTENCES[2], flushed[0].text) <= 0.2
    assert session.stats.seconds - spent <= 1.5
    # Nothing more comes for that speech afterwards.
    assert session.feed(silence(1.0)) == []
    assert session.close() == []


@pytest.mark.parametrize("signal", ["silence", "white noise", "music"])
def test_no_speech_no_text(engine: WhisperEngine, signal: str) -> None:
    rng = np.random.default_rng(7)
    t = np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    audio = {
        "silence": silence(4.0),
        "white noise": (0.1 * rng.standard_normal(t.size)).astype(np.float32),
        # A chord of three tones pulsing twice a second.
        "music": (
            0.1 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
        ).astype(np.float32),
    }[signal]
    run = stream(StreamSession(engine, language="en"), audio)
    assert run.emitted == []


def test_long_utterance_is_finalized_while_it_is_spoken(engine: WhisperEngine) -> None:
    speech = to_samples(synth_speech(LONG))
    voiced = np.flatnonzero(np.abs(speech) > 0.01)
    speech_end = 0.5 + voiced[-1] / SAMPLE_RATE
    assert speech_end > 8
    # At a fixed 0.5 s a decode (this engine takes 0.6-0.8 s on an idle core) the partials, and so
    # the words committed from their agreement, are the same on every machine: a loaded CI machine
    # once made fewer of them and committed "club a" for "climbed the".
    audio = np.concatenate([silence(0.5), speech, silence(1.0)])
    run = stream(StreamSession(engine, language="en", chunk_seconds=4.0), audio, decode_seconds=0.5)
    early = [e for e in run.emitted if e.delta.is_final and e.at < speech_end]
    assert early, [(round(e.at, 1), e.delta) for e in run.emitted]
    assert word_error_rate(LONG, " ".join(d.text for d in run.finals)) <= 0.25
    for before, after in zip(run.finals, run.finals[1:], strict=False):
        assert before.end <= after.start


def test_language_detected_when_no_hint_and_audio_arrives_all_at_once(engine: WhisperEngine) -> None:
    """A client that sends a whole file in one frame and no language hint (websocat style)."""
    spoken = "Good morning everyone. Please send the report to the finance team before Friday."
    audio = np.concatenate([to_samples(synth_speech(spoken)), silence(1.0)])
    session = StreamSession(engine, language=None)
    deltas = session.feed(audio, now=0.1) + session.close()
    finals = [d for d in deltas if d.is_final]
    assert finals
    assert word_error_rate(spoken, " ".join(d.text for d in finals)) <= 0.2


# --- real speech: spans never too long, text never lost -------------------------------------------


@pytest.fixture(scope="module")
def reader() -> list[tuple[np.ndarray, str]]:
    """The LibriVox clips of one real reader with their transcripts (3-7 s each)."""
    from tests.voices import librivox_clips

    return librivox_clips(("0870", "0880", "0890", "0920", "0930"))


def test_a_worker_too_far_behind_for_partials_still_keeps_finals_under_30_s(engine: WhisperEngine, reader) -> None:
    # Given 40 s of a real reader with only short breaths between sentences, and a worker so far
    # behind real time that it makes no partials (nothing is confirmed, nothing cut at a clause)
    clips = reader + reader[:3]
    audio = np.concatenate([part for samples, _ in clips for part in (samples, silence(0.1))] + [silence(1.0)])
    assert audio.size / SAMPLE_RATE > 38
    session = StreamSession(engine, language="en", silence_seconds=1.5)
    deltas: list[Delta] = []
    for i in range(0, audio.size, CHUNK):
        deltas += session.feed(audio[i : i + CHUNK], now=i / SAMPLE_RATE + 100.0)
    deltas += session.close()
    finals = [d for d in deltas if d.is_final]
    # Then no final spans more than the decoder's window, and all of the speech is in them
    assert all(d.end - d.start <= 30.0 for d in finals), [(d.start, d.end) for d in finals]
    assert len(finals) >= 2
    reference = " ".join(text for _, text in clips)
    assert word_error_rate(reference, " ".join(d.text for d in finals)) <= 0.25


class LosesTheFinal:
    """The real short-window decoder, until ``broken``: then every decode answers "to", as Whisper
    did for a 20 s final under load in issue 10 while the partial before it held the full text."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.broken = False
        self.broken_decodes = 0

    def transcribe(self, samples: np.ndarray, *, options):
        from speech.engines.base import Segment, TranscriptionResult

        if not self.broken:
            return self.decoder.transcribe(samples, options=options)
        self.broken_decodes += 1
        seconds = samples.size / SAMPLE_RATE
        return TranscriptionResult(text="to", language="en", duration_s=seconds,
                                   segments=[Segment(0.0, seconds, " to", avg_logprob=-0.4, no_speech_prob=0.05)])


def test_a_final_that_comes_back_shorter_than_its_partial_keeps_the_partials_words(engine: WhisperEngine, reader) -> None:
    # Given a real sentence whose partials were decoded well
    samples, text = max(reader, key=lambda clip: clip[0].size)
    samples = samples[: np.flatnonzero(np.abs(samples) > 0.01)[-1]]  # ends as the last word does
    decoder = LosesTheFinal(ShortWindowWhisper(engine))
    session = StreamSession(engine, language="en", decoder=decoder, max_lag=100.0)
    tail = int(0.7 * SAMPLE_RATE)  # spoken while the worker is behind: no partial covers it
    deltas = stream(session, np.concatenate([silence(0.5), samples[:-tail]]), close=False).emitted
    partials = [e.delta for e in deltas if not e.delta.is_final]
    assert partials
    # When the decode that makes its final loses almost all of it
    decoder.broken = True
    behind = session.feed(samples[-tail:], now=1e9) + session.feed(silence(1.0), now=1e9) + session.close()
    deltas = [e.delta for e in deltas] + behind
    finals = [d for d in deltas if d.is_final]
    # Then the final still holds what the partial had heard, not just "to"
    assert decoder.broken_decodes >= 1
    assert finals
    assert len(" ".join(d.text for d in finals).split()) >= 0.6 * len(partials[-1].text.split())
    assert word_error_rate(text, " ".join(d.text for d in finals)) <= 0.5
