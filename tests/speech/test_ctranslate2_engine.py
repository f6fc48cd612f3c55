"""The CTranslate2 engine (faster-whisper) on the packaged weights: batching, streaming spans,
languages, and where its model comes from. Real models, real recorded speech, one CPU thread."""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from whisper.normalizers import EnglishTextNormalizer

from bench.accuracy import latencies
from bench.corpus import asterisk_prompt
from speech.audio import SAMPLE_RATE, decode_audio
from speech.batching import BatchingEngine
from speech.engines.base import TranscribeOptions, TranscriptionResult, Word
from speech.engines.ctranslate2 import CTranslate2Engine
from speech.engines.weights import PACKAGED, WeightsUnavailable, packaged_ctranslate2_dir
from speech.engines.windows import normalised_words
from speech.errors import ValidationError
from speech.transcriber import Delta, StreamSession
from tests.conversations import conversations
from tests.voices import assert_hyphenated_word_is_one_word, librivox_clips, synth_speech, word_error_rate

pytestmark = pytest.mark.slow

GREEDY_WORDS = TranscribeOptions(language="en", temperature=0.0, word_timestamps=True)


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, str]]:
    return librivox_clips()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ct2")


@pytest.fixture(scope="module")
def engine(cache: Path) -> CTranslate2Engine:
    engine = CTranslate2Engine(model_name="base", cpu_threads=1, cache_dir=cache)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def tiny_en(cache: Path) -> CTranslate2Engine:
    return CTranslate2Engine(model_name="tiny.en", cpu_threads=1, cache_dir=cache)


@pytest.fixture(scope="module")
def one_by_one(engine: CTranslate2Engine, clips) -> list[TranscriptionResult]:
    """The four windows decoded one call each: what batching must not change."""
    return [engine.transcribe_batch([samples], options=GREEDY_WORDS)[0] for samples, _ in clips]


def _words(result: TranscriptionResult) -> list[str]:
    return [w.word for s in result.segments for w in s.words or []]


def test_int8_on_the_cpu_by_default(engine: CTranslate2Engine) -> None:
    assert engine.device == "cpu"
    assert engine.compute_type == "int8"
    assert engine.load().model.compute_type.startswith("int8")  # int8 weights (float32 activations)


def test_a_batch_of_four_windows_gives_the_same_words_as_one_at_a_time(engine, clips, one_by_one) -> None:
    windows = [samples for samples, _ in clips]

    batched = engine.transcribe_batch(windows, options=GREEDY_WORDS)

    assert [_words(r) for r in batched] == [_words(r) for r in one_by_one]
    assert [r.text for r in batched] == [r.text for r in one_by_one]
    for result, (samples, reference) in zip(batched, clips, strict=True):
        # Each window's own words came back (not a neighbour's), and they are what was read.
        assert word_error_rate(reference, result.text) <= 0.25, (reference, result.text)
        words = [w for s in result.segments for w in s.words or []]
        assert words
        assert all(0.0 <= w.start <= w.end <= samples.size / SAMPLE_RATE for w in words)
        assert [w.start for w in words] == sorted(w.start for w in words)


def test_concurrent_callers_batched_by_the_batching_engine_get_their_own_words(engine, clips, one_by_one) -> None:
    windows = [samples for samples, _ in clips]
    batcher = BatchingEngine(engine, max_batch=4, max_wait_s=2.0)
    results: dict[int, TranscriptionResult] = {}

    def call(index: int) -> None:
        results[index] = batcher.transcribe_batch([windows[index]], options=GREEDY_WORDS)[0]

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(windows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        batcher.close()

    assert batcher.stats.sizes == [4]  # one batched pass for the four callers
    assert [_words(results[i]) for i in range(len(windows))] == [_words(r) for r in one_by_one]


def test_two_jobs_recordings_decode_their_windows_in_shared_batches(engine, clips) -> None:
    """What a GPU batch worker does with concurrent jobs: both recordings' VAD windows go into
    the same batched passes, and each job still gets exactly its own transcript."""
    gap = np.zeros(SAMPLE_RATE * 2, np.float32)
    recordings = [
        np.concatenate([gap, clips[0][0], gap, clips[1][0], gap, clips[2][0]]),
        np.concatenate([clips[3][0], gap, clips[1][0], gap]),
    ]
    options = TranscribeOptions(language="en", temperature=0.0)
    alone = [engine.transcribe(recording, options=options) for recording in recordings]
    windows = [len(engine.plan_windows(recording, options=options).windows) for recording in recordings]
    batcher = BatchingEngine(engine, max_batch=8, max_wait_s=1.0)
    results: dict[int, TranscriptionResult] = {}
    start = threading.Barrier(2)

    def job(index: int) -> None:
        start.wait()
        results[index] = batcher.transcribe(recordings[index], options=options)

    try:
        threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        batcher.close()

    assert batcher.stats.windows == sum(windows)
    assert max(batcher.stats.sizes) > max(windows)  # one pass held windows of both jobs
    for index in range(2):
        assert results[index].text == alone[index].text
        assert [(s.start, s.end) for s in results[index].segments] == [(s.start, s.end) for s in alone[index].segments]


def test_vad_batched_transcription_of_a_longer_recording(engine, clips) -> None:
    gap = np.zeros(SAMPLE_RATE, np.float32)
    samples = np.concatenate([part for clip, _ in clips for part in (gap, clip)])
    reference = " ".join(text for _, text in clips)

    result = engine.transcribe(samples, options=TranscribeOptions(word_timestamps=True))

    assert result.language == "en"  # detected
    assert word_error_rate(reference, result.text) <= 0.15, result.text
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)
    assert all(0.0 <= s.start <= s.end <= result.duration_s for s in result.segments)
    # The first word is heard after the leading second of silence, in the original time line.
    assert _words(result)
    assert result.segments[0].words[0].start >= 0.7
    assert all(s.avg_logprob is not None and s.no_speech_prob is not None for s in result.segments)


def test_sequential_decoding_without_batching_reads_the_same(cache: Path, clips) -> None:
    sequential = CTranslate2Engine(model_name="tiny.en", cpu_threads=1, cache_dir=cache, batch_size=1)
    samples, reference = clips[0]

    result = sequential.transcribe(samples, options=TranscribeOptions(word_timestamps=True, beam_size=2))

    assert word_error_rate(reference, result.text) <= 0.25, result.text
    assert all(0.0 <= w.start <= w.end <= result.duration_s for s in result.segments for w in s.words or [])


def test_the_stream_decoder_reads_a_short_span_as_one_segment(engine, clips) -> None:
    samples, reference = clips[2]
    decoder = engine.stream_decoder()

    result = decoder.transcribe(samples, options=TranscribeOptions(language="en", word_timestamps=True))

    assert decoder is not engine
    assert word_error_rate(reference, result.text) <= 0.25, result.text
    assert len(result.segments) == 1
    segment = result.segments[0]
    assert segment.avg_logprob is not None
    assert segment.avg_logprob > -1.0
    assert segment.no_speech_prob is not None
    assert segment.no_speech_prob < 0.5
    assert all(0.0 <= w.start <= w.end <= result.duration_s for w in segment.words or [])


@pytest.mark.parametrize("stream", [False, True])
def test_a_hyphenated_word_is_one_word_as_written(engine, stream: bool) -> None:
    """Whisper times "cold" and "-hearted" apart; a transcript built from the words (a stream's
    finals, a diarized segment) must read "cold-hearted", not "cold -hearted"."""
    assert_hyphenated_word_is_one_word(engine.stream_decoder() if stream else engine)


def test_a_prompt_conditions_the_decoder(engine, clips) -> None:
    samples, _ = clips[0]

    result = engine.transcribe(samples, options=TranscribeOptions(language="en", prompt="Mr. John Dashwood"))

    assert "dashwood" in result.text.lower()


def test_a_prefix_is_what_the_audio_begins_with_and_the_result_what_follows(engine) -> None:
    """A stream decodes a short turn after the audio of the final before it, whose text is the
    decode's forced beginning: the result is only the turn's words, timed on the samples' clock."""
    audio = _excerpt("ast-lib", 0.3, 4.4)  # "he might even have been made amiable himself" | "Thank you."

    result = engine.stream_decoder().transcribe(
        audio,
        options=TranscribeOptions(
            language="en", word_timestamps=True, beam_size=5, prefix="He might even have been made amiable himself."
        ),
    )

    assert result.text == "Thank you."
    assert _words(result) == ["Thank", "you."]
    thank = result.segments[0].words[0]  # said at 3.15-3.77 s of the excerpt
    assert 2.7 <= thank.start < 3.6, result.segments[0].words


def test_an_english_only_model_refuses_german(tiny_en: CTranslate2Engine) -> None:
    with pytest.raises(ValidationError) as excinfo:
        tiny_en.transcribe(np.zeros(SAMPLE_RATE, np.float32), options=TranscribeOptions(language="de"))

    assert excinfo.value.details == [{"field": "language", "code": "unsupported_language"}]


def test_an_unknown_language_is_refused(engine: CTranslate2Engine) -> None:
    with pytest.raises(ValidationError) as excinfo:
        engine.transcribe(np.zeros(SAMPLE_RATE, np.float32), options=TranscribeOptions(language="klingon"))

    assert excinfo.value.details == [{"field": "language", "code": "unsupported_language"}]


def test_packaged_weights_become_a_verified_model_folder_once(tmp_path: Path) -> None:
    folder = packaged_ctranslate2_dir(name="tiny.en", cache_dir=tmp_path)

    assert folder is not None
    assert {p.name for p in folder.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert (folder / "model.bin.sha256").read_text().strip() == PACKAGED["tiny.en"].sha256
    written = (folder / "model.bin").stat().st_mtime_ns
    assert packaged_ctranslate2_dir(name="tiny.en", cache_dir=tmp_path) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == written
    assert packaged_ctranslate2_dir(name="small", cache_dir=tmp_path) is None


def test_a_local_ctranslate2_folder_loads_by_path(cache: Path, tmp_path: Path, clips) -> None:
    packaged = packaged_ctranslate2_dir(name="tiny.en", cache_dir=cache)
    own = shutil.copytree(packaged, tmp_path / "my-model")

    engine = CTranslate2Engine(model_name=str(own), cpu_threads=1, cache_dir=tmp_path)
    samples, reference = clips[1]
    result = engine.transcribe(samples, options=TranscribeOptions())

    assert engine.model_path == own
    assert word_error_rate(reference, result.text) <= 0.3, result.text


def test_an_openai_whisper_checkpoint_is_refused_with_the_engine_to_use(tmp_path: Path) -> None:
    checkpoint = tmp_path / "base.pt"
    checkpoint.write_bytes(b"not really")

    with pytest.raises(WeightsUnavailable, match="SCAIECHO_WHISPER_ENGINE=openai-whisper"):
        CTranslate2Engine(model_name=str(checkpoint), cache_dir=tmp_path).load()


def test_a_model_that_is_neither_packaged_nor_downloadable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="no-such-model"):
        CTranslate2Engine(model_name="no-such-model", cache_dir=tmp_path).load()


def _excerpt(name: str, first: float, last: float) -> np.ndarray:
    """Seconds ``first`` to ``last`` of the wideband conversation ``name``."""
    call = next(c for c in conversations(band="wideband") if c.name == name)
    return call.samples[int(first * SAMPLE_RATE) : int(last * SAMPLE_RATE)]


def _stream_timed(
    engine: CTranslate2Engine,
    audio: np.ndarray,
    *,
    behind: bool | Callable[[], bool] = False,
    decode_seconds: float | Callable[[], float] = 0.0,
    **options: Any,
) -> list[tuple[float, Delta]]:
    """The deltas of ``audio`` streamed in 0.1 s chunks at real-time pace (simulated clock), or with
    the caller's clock far ahead of the audio (``behind``: a loaded worker, finals only; a callable:
    asked for each chunk, as a stream worker whose lane is busy with other sessions decides per
    feed), each with the stream second it came at. ``decode_seconds``: every decode costs this much
    simulated time, or what the callable returns for each (a loaded worker, deterministically), and
    the clock runs ahead of the audio by what they cost."""
    cost = decode_seconds if callable(decode_seconds) else lambda: decode_seconds
    session = StreamSession(engine, **options)
    step = SAMPLE_RATE // 10
    timed = []
    clock = 0.0
    for first in range(0, audio.size, step):
        clock = max(clock, (first + step) / SAMPLE_RATE)
        decodes = session.stats.count
        late = behind() if callable(behind) else behind
        deltas = session.feed(audio[first : first + step], now=1000.0 if late else clock)
        clock += sum(cost() for _ in range(session.stats.count - decodes))
        timed += [(clock, d) for d in deltas]
    timed += [(clock, d) for d in session.close()]
    return timed


def _final_wait(timed: list[tuple[float, Delta]], turn_end: float) -> tuple[float | None, list[str]]:
    """How long after ``turn_end`` the first final reaching it (within 0.25 s) came, ``None`` if
    none did, and the text of every final."""
    arrivals = [at for at, delta in timed if delta.is_final and delta.end >= turn_end - 0.25]
    finals = [delta.text for _, delta in timed if delta.is_final]
    return (arrivals[0] - turn_end if arrivals else None), finals


def _stream_finals(engine: CTranslate2Engine, audio: np.ndarray) -> list[str]:
    return [delta.text for _, delta in _stream_timed(engine, audio) if delta.is_final]


def test_a_short_turn_is_heard_after_the_words_before_it(engine: CTranslate2Engine) -> None:
    """Issue 10 (stream WER against batch): a short turn decoded alone has no context ("10 of
    clothes" here; wrong at all five start offsets of ``bench.stream_quality``); decoded after the
    last seconds of the final before it, as a batch window would hear it, it is "ten of clubs"
    (right at all five)."""
    audio = _excerpt("cards-ast-alsa", 0.0, 10.4)  # "... without prepending." | "ten of clubs" (9.21-9.97 s)

    finals = [delta for _, delta in _stream_timed(engine, audio, context_seconds=3.0) if delta.is_final]

    said = [d for d in finals if d.end > 9.2 and d.start < 10.0]
    assert said, finals
    assert "10 of clubs" in EnglishTextNormalizer()(" ".join(d.text for d in said)), finals


def test_a_voice_after_the_context_is_not_skipped(engine: CTranslate2Engine) -> None:
    """Regression (issue 10, no final loses text): after a reader's "... than he was.", the decode
    with that context went on with the reader and skipped the other voice between ("Press star to
    cancel the unless to be rather cold", "this message" lost); such a decode, whose word times
    leave speech unheard, is done again without the context."""
    audio = _excerpt("ast-lib", 9.0, 27.5)  # "... than he was." | "Press star to cancel this message." | "Unless ..."

    finals = [delta.text for _, delta in _stream_timed(engine, audio, context_seconds=3.0) if delta.is_final]

    words = normalised_words(" ".join(finals))
    between = words[words.index("cancel") + 1 : words.index("unless")]
    assert "this" in between, finals


def test_words_a_decode_with_context_heard_are_kept_when_alone_the_span_sounds_like_no_speech(
    engine: CTranslate2Engine,
) -> None:
    """Regression (issue 10, no final loses text; ``bench.stream_quality`` lost turns): a cut after
    the reader's "... is to be ill" left "-disposed." and another voice's "Agent login." in the span.
    With the reader's words as context the decode heard "-disposed." and skipped the other voice, so
    it was done again alone, which heard "All disposed." so unsure that it counted as no speech: the
    final of that span was empty and both words were lost. The decode with context now stands when
    the one alone hears fewer words. Since Whisper's "ill" and "-disposed" are one word
    ("ill-disposed"), no cut falls between them here any more; the words must still all arrive."""
    audio = np.concatenate([np.zeros(int(0.37 * SAMPLE_RATE), np.float32), _excerpt("ast-lib-long", 0.0, 19.5)])

    timed = _stream_timed(engine, audio, decode_seconds=0.5)

    finals = [delta.text for _, delta in timed if delta.is_final]
    words = normalised_words(" ".join(finals).replace("-", " "))  # "ill-disposed", or "ill" | "-disposed"
    assert "disposed" in words[words.index("ill") :], finals


@pytest.mark.parametrize(
    ("name", "first", "last", "turn_end", "decode_seconds", "bound", "word"),
    [
        # "... followed by the pound key." and 0.29 s later another voice ("And Mr. John Dashwood
        # ..."). Two decodes agreed on "key." as their last word, which was never final by
        # agreement (it may be cut off by the audio's end): it waited for the next voice's words,
        # 3 s after the turn. Said before a pause, well before the audio's end, it is final with
        # the rest of the turn.
        pytest.param("ast-lib-long", 14.0, 27.0, 7.09, 0.3, 2.5, "key", id="a-last-word-agreed-before-a-pause"),
        # "You are entering conference number" and 0.28 s later another voice's "four queen of
        # clubs": the turn waited for two decodes to agree on its words, 1.7 s after its end. The
        # decode made as the pause began ends the sentence ("number.") before the pause: the turn
        # is final there.
        pytest.param("ast-dhd-cards", 11.0, 20.0, 3.77, 0.2, 1.0, "number", id="a-sentence-ended-as-the-pause-began"),
    ],
)
def test_a_turn_the_next_voice_follows_within_a_short_pause_is_final_soon(
    engine: CTranslate2Engine,
    name: str,
    first: float,
    last: float,
    turn_end: float,
    decode_seconds: float,
    bound: float,
    word: str,
) -> None:
    """Issue 10 (stream final p95): a turn that the next voice follows within less than
    ``silence_seconds``, too short a pause to end the span, is final soon after its end, all of it."""
    audio = _excerpt(name, first, last)  # the turn ends at turn_end here

    timed = _stream_timed(engine, audio, decode_seconds=decode_seconds)

    wait, finals = _final_wait(timed, turn_end)
    assert wait is not None, finals
    assert wait <= bound, (wait, finals)
    assert word in normalised_words(" ".join(finals)), finals


def test_a_voice_the_final_decode_did_not_hear_under_another_is_kept_from_the_partial(
    engine: CTranslate2Engine,
) -> None:
    """Regression (issue 10, no final loses text; the three-session test lost this turn in about
    half its runs): "You are now muted." with "seven of clubs" said over its end, on a lane shared
    with other sessions (about half the feeds make finals only; which ones is seeded). The partial
    held "You are now muted."; the final decode at the pause heard only "7 of clothes", and the
    turn was lost. The partial's words that the final left out, said well before the final's words
    began, are kept. (Seed 6: since hyphenated words are one word, seed 1 no longer reaches this
    case; there no partial hears the turn at all, see the note of that change.)"""
    audio = np.concatenate([np.zeros(int(0.5 * SAMPLE_RATE), np.float32), _excerpt("ast-dhd-cards", 0.0, 14.0)])
    busy = random.Random(6)

    timed = _stream_timed(engine, audio, behind=lambda: busy.random() < 0.5, decode_seconds=0.2)

    finals = [delta.text for _, delta in timed if delta.is_final]
    words = normalised_words(" ".join(finals))
    assert "muted" in words, finals


def test_a_digit_string_written_two_ways_by_two_decodes_is_agreed_on(engine: CTranslate2Engine) -> None:
    """Issue 10 (stream final p95): "two nine three four zero", then a reader 0.29 s later. One
    decode wrote "29340.", the next "2 9 3 4 0 had he married", the next "29340. Had he married":
    compared word by word they never agreed, and the number was final 4.5 s after it was said.
    A number compares whole, however it is written."""
    audio = np.concatenate([np.zeros(int(0.71 * SAMPLE_RATE), np.float32), _excerpt("lib-cards-dhd", 0.0, 12.0)])
    turn_end = 0.71 + 3.60

    timed = _stream_timed(engine, audio, decode_seconds=0.3)

    wait, finals = _final_wait(timed, turn_end)
    assert wait is not None, finals
    assert wait <= 2.5, (wait, finals)
    said = normalised_words(" ".join(finals).replace("-", " "))
    assert said[said.index("clubs") + 1 : said.index("had")] in (["29340"], list("29340"), "two nine three four zero".split())


def test_a_decode_that_hears_nothing_after_words_agreed_before_does_not_stop_the_stream(engine: CTranslate2Engine) -> None:
    """Regression: in this real phone-band call a decode came back empty after a partial with
    words, and the check of a decode's last word looked for a word that was not there: the stream
    raised ``IndexError`` and ended (found with agreed words final after 2 s of span). It reads on
    to the end: a final reaches every turn's end, and the words are about as right as the phone
    band's at that span length (9.5 % over the set in ``bench.stream_quality``; this call alone
    9-16 % from one change of the stream to the next, all turns there)."""
    call = next(c for c in conversations(band="phone") if c.name == "ast-dhd-cards")
    reference = " ".join(turn.text for turn in call.turns if turn.text)

    deltas = [delta for _, delta in _stream_timed(engine, call.samples, chunk_seconds=2.0) if delta.is_final]

    finals = [delta.text for delta in deltas]
    _, missed = latencies(call.turns, [[d.start, d.end, d.text, 0.0] for d in deltas])
    assert missed == 0, finals
    assert word_error_rate(reference, " ".join(finals)) <= 0.2, finals


def test_a_stream_too_far_behind_for_partials_keeps_both_voices_of_its_final(engine: CTranslate2Engine) -> None:
    """Regression (issue 10, text lost under load): a worker too far behind makes a final of a span
    without partials. Whisper decodes this one (a reader's sentence, then another voice's "ten of
    clubs", from a real three-person call) as "Ten of close." alone; the reader's words must still
    reach the final."""
    deltas = [delta for _, delta in _stream_timed(engine, _excerpt("lib-cards-dhd", 5.26, 10.54), behind=True)]

    finals = " ".join(d.text for d in deltas if d.is_final)
    assert not any(not d.is_final for d in deltas)  # finals only: no partial could keep the words
    reference = "he might have been made still more respectable than he was ten of clubs"
    assert word_error_rate(reference, finals) <= 0.25, finals
    assert "respectable" in finals.lower(), finals
    assert "ten" in finals.lower(), finals


@pytest.mark.parametrize(("name", "until", "said_once"), [("lib-alsa-ast", 4.6, "left"), ("ast-lib", 4.5, "thank")])
def test_a_stream_final_does_not_say_its_last_words_twice(
    engine: CTranslate2Engine, name: str, until: float, said_once: str
) -> None:
    """Regression (issue 10, stream WER): decoding a short span of a real call, Whisper says its
    last words twice ("Rear | left left", "Thank you. Thank you.") where the speaker said them once."""
    finals = _stream_finals(engine, _excerpt(name, 0.0, until))
    assert normalised_words(" ".join(finals)).count(said_once) == 1, finals


@pytest.mark.parametrize(("prompt", "gap", "said_twice"), [("vm-no", 0.15, "no"), ("auth-thankyou", 0.25, "thank")])
def test_words_a_speaker_says_twice_stay_twice(
    engine: CTranslate2Engine, prompt: str, gap: float, said_twice: str
) -> None:
    """The other side of the echo guard: a real voice saying "No, no." or "Thank you. Thank you."
    keeps both."""
    clip = asterisk_prompt(prompt)
    first, last = clip.speech
    speech = clip.samples[int(max(0.0, first - 0.05) * SAMPLE_RATE) : int((last + 0.05) * SAMPLE_RATE)]
    pause = np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate(
        [np.zeros(SAMPLE_RATE // 2, dtype=np.float32), speech, pause, speech, np.zeros(SAMPLE_RATE, dtype=np.float32)]
    )
    finals = _stream_finals(engine, audio)
    assert normalised_words(" ".join(finals)).count(said_twice) == 2, finals


def test_a_short_turn_after_a_sentence_reaches_the_final(engine: CTranslate2Engine) -> None:
    """Regression (issue 10, no final loses text): in a real call, "front left" (a second voice, two
    words with a pause between them) follows a sentence; the decode made as the pause began, which
    the final reuses, said only the sentence. The final must hold both."""
    finals = normalised_words(" ".join(_stream_finals(engine, _excerpt("ast-alsa-dhd-lib", 17.9, 23.0))))
    assert "participant" in finals, finals
    assert finals[-2:] == ["front", "left"], finals


def test_a_decode_that_drops_a_sentence_does_not_lose_the_next_one(engine: CTranslate2Engine) -> None:
    """Regression (issue 10, no final loses text): a new decode of a real call's span heard only its
    second sentence ("There is currently one other participant in the conference") and dropped the
    first, which the partial before it held. Splitting the span inside the second sentence kept the
    first and lost the second's head; both sentences must reach the finals."""
    finals = normalised_words(" ".join(_stream_finals(engine, _excerpt("ast-alsa-dhd-lib", 14.0, 23.5))))
    for word in ("respectable", "currently", "participant", "conference"):
        assert word in finals, finals


def test_a_sentence_that_another_voice_follows_at_once_is_final_before_that_voice_is_done(
    engine: CTranslate2Engine,
) -> None:
    """Issue 10, final latency: in a real call, "Nobody is available to take your call at the
    moment." ends 0.17 s before another voice says "side left", too short a pause to end the span.
    The partial that ends with the sentence's full stop and the next one, which goes on past it,
    agree on the sentence: it is a final of its own, within 2 s of the sentence's end (4.35 s into
    this excerpt), not one final of both voices once the second one stops."""
    timed = _stream_timed(engine, _excerpt("cards-ast-alsa", 18.9, 25.2))

    finals = [(sent, delta.text) for sent, delta in timed if delta.is_final]
    sentence = [(sent, text) for sent, text in finals if "moment" in normalised_words(text)]
    assert len(sentence) == 1, finals
    sent, text = sentence[0]
    assert "side" not in normalised_words(text), finals
    assert sent <= 23.25 - 18.9 + 2.0, finals
    assert normalised_words(finals[-1][1]) == ["side", "left"], finals
    assert finals[-1][0] > sent, finals


def test_a_final_cut_between_two_voices_ends_in_the_pause_between_them(engine: CTranslate2Engine) -> None:
    """Issue 10, final timing: in a real call a reader stops at 9.31 s ("...than he was.") and
    another voice says "ten of clubs" from 9.48 s. Whisper's word times end "was" at 9.02 s; the
    final of the reader's words and the cut after it go on to the pause, so the final's times say
    when the reader really stopped and the second voice's final holds none of the reader's audio."""
    first = 3.7
    timed = _stream_timed(engine, _excerpt("lib-cards-dhd", first, 11.0))

    finals = [delta for _, delta in timed if delta.is_final]
    reader = [d for d in finals if normalised_words(d.text)[-3:] == ["than", "he", "was"]]
    assert len(reader) == 1, finals
    assert 9.31 - 0.1 <= first + reader[0].end <= 9.48 + 0.05, finals
    assert finals[-1].start == reader[0].end, finals
    assert normalised_words(finals[-1].text)[0] in ("10", "ten"), finals


@pytest.mark.parametrize("decode_seconds", [0.45, 0.5])
def test_a_number_and_the_sentence_after_it_both_reach_the_finals_on_a_loaded_worker(
    engine: CTranslate2Engine, decode_seconds: float
) -> None:
    """Issue 10, no final loses text: in a real call a voice reads a number ("two nine three four
    zero") and a reader's 5.4 s sentence begins as it ends. On a loaded worker (every decode
    costing about half a second) Whisper, with the call so far as its prompt, answered
    "2 -9 -3 -4 -0" for the whole span, or that number twice; the number was a final and the
    sentence was lost. A decode with too few words for its speech is retried without the prompt,
    and two partials that agree on a loop make no final."""
    timed = _stream_timed(engine, _excerpt("ast-alsa-dhd-lib", 0.0, 24.0), decode_seconds=decode_seconds)

    finals = [delta.text for _, delta in timed if delta.is_final]
    words = normalised_words(" ".join(finals))
    for word in ("amiable", "respectable", "currently", "participant"):
        assert word in words, finals
    for final in finals:
        keys = normalised_words(final)
        runs = [tuple(keys[i : i + 3]) for i in range(len(keys) - 2)]
        assert len(set(runs)) == len(runs), final


# Seeded decode costs: (generator seed, slowest decode in seconds). Measured on this project's CI
# machines (Xeon with AVX-512 and AMX), "folder" lost in 4 of these 7 before the drop checks below,
# in 1 (seed 800: "folder" said only under the other voice, left out at a span's head) after.
LOADED_WORKERS = [(800, 1.6), (10, 1.0), (110, 1.0), (210, 1.0), (16, 1.6), (116, 1.6), (216, 1.6)]


def test_an_overlapped_turn_a_later_decode_leaves_out_reaches_the_finals_on_a_loaded_worker(
    engine: CTranslate2Engine,
) -> None:
    """Issue 10, no final loses text: in a real call "Change to which folder?" begins while another
    voice is still saying "rear left". On a worker whose decodes cost 0.1 s to a few tenths more
    each (drawn from seeded generators, so the runs are repeatable), a partial holds the question
    and a later decode of the span leaves it out: it keeps most of the partial's words ("last.
    Four, queen of clothes."; three of the partial's words left out in a row count as dropped
    too), or answers "Rear, less." for "Rear. Lash. Change to Witch." (the split that keeps the
    partial must not be refused for missing "less.", a word Whisper gave probability 0.00), or
    "Last, four, queen of" for "La change to which folder? | 4. Queen of" ("four" and "4" are one
    word). The question's last word reaches the finals on all but at most one of the workers."""
    lost = []
    for seed, slowest in LOADED_WORKERS:
        draws = random.Random(seed)
        timed = _stream_timed(
            engine, _excerpt("cards-ast-alsa", 0.0, 20.0), decode_seconds=lambda d=draws, s=slowest: d.uniform(0.1, s)
        )
        finals = [delta.text for _, delta in timed if delta.is_final]
        words = normalised_words(" ".join(finals))
        if "folder" not in words:
            lost.append((seed, slowest, " | ".join(finals)))
        assert "queen" in words, finals
    assert len(lost) <= 1, lost


def test_speech_the_words_of_any_final_leave_out_is_heard_on_its_own(engine: CTranslate2Engine) -> None:
    """Issue 10, no final loses text: on a loaded worker two decodes of a span can agree in leaving
    out an overlapped voice ("last. Four, queen of clubs," where "Change to which folder?" was said
    between them), and their agreement made a final without it (seen in the three-session test).
    Every final, not only the one at a pause, has the speech its words leave out decoded on its
    own. Here the span holds the real call from 11.2 s, and the final is made of what those
    decodes heard, timed as Whisper timed them."""
    session = StreamSession(engine)
    session.feed(_excerpt("cards-ast-alsa", 11.2, 14.8), now=1000.0)  # behind real time: no decode yet
    assert session.stats.count == 0
    offset = 11.2 + session._span_start / SAMPLE_RATE
    heard = [("last.", 11.20, 11.46), ("Four,", 13.06, 13.50), ("queen", 13.80, 13.94), ("of", 13.94, 14.16), ("clubs,", 14.16, 14.60)]
    words = [Word(start=max(0.0, a - offset), end=b - offset, word=w) for w, a, b in heard]
    final = session._final(words, session._span_start + int((14.7 - 11.2) * SAMPLE_RATE), None)
    assert final is not None
    said = normalised_words(final.text)
    assert "folder" in said, final.text
    assert said.index("folder") < said.index("queen"), final.text  # in time order
    assert said.count("queen") == 1, final.text


def test_digits_heard_again_beside_the_number_that_holds_them_are_not_added(engine: CTranslate2Engine) -> None:
    """The other side: Whisper writes a digit string as one word ("29340") timed over part of its
    speech; the rest, decoded on its own, comes back as "3 4 0". Those digits are the number heard
    again, not words said twice."""
    session = StreamSession(engine)
    session.feed(_excerpt("lib-cards-dhd", 2.0, 3.8), now=1000.0)
    offset = 2.0 + session._span_start / SAMPLE_RATE
    number = Word(start=2.26 - offset, end=2.70 - offset, word="29340")
    final = session._final([number], session._span_start + int(1.75 * SAMPLE_RATE), None)
    assert session.stats.count >= 1  # the speech after "29340"'s time was decoded on its own
    assert final is not None
    assert normalised_words(final.text) == ["29340"], final.text


def test_a_partial_that_looped_does_not_become_a_final(engine: CTranslate2Engine) -> None:
    """A partial of a short span that says a phrase twice ("Today we will remove the quark. Today we
    will remove the qu") is a loop: when the next decode mends it, the mended text is the final, not
    the loop split off as a final of its own."""
    sentences = ["Good morning everyone.", "Today we will review the quarterly budget."]
    pause = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([piece for text in sentences for piece in (decode_audio(synth_speech(text)).samples, pause)])
    finals = _stream_finals(engine, audio)
    assert normalised_words(" ".join(finals)).count("today") == 1, finals
    assert word_error_rate(" ".join(sentences), " ".join(finals)) <= 0.2, finals
