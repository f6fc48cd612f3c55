"""Speech windows and the repetition guard, shared by the engines that decode a file window by window.

A recording is cut at its pauses by Silero VAD (the ONNX model inside the faster-whisper wheel, no
download) and its speech regions are joined into windows of at most 28 s, inside Whisper's own 30 s window.
Each window is decoded on its own, so a loop in one cannot run on into the next, and no window
holds long non-speech for Whisper to "hear" words in (a pause under ``KEEP_PAUSE_S`` stays: a turn
change is read better with its pause heard). The windows' times are mapped back to the
recording.

After decoding, :func:`guard_repetitions` reads the windows in order: a run of words heard before
(in an earlier window, or earlier in the same one) is a decoder loop, not speech, and is cut; a
window that looped is decoded again at the next temperatures of Whisper's fallback schedule, and if
every retry loops too only its non-repeating words are kept.

Engines import this module, never each other (import-linter ``engines-independent``). Nothing here
imports Django, torch or whisper.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from speech.audio import SAMPLE_RATE
from speech.engines.base import Segment, TranscribeOptions, TranscriptionResult, WindowPlan, Word

# openai-whisper's fallback schedule and loop threshold (the engines use the same numbers).
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4

# The speech in one window: Whisper's 30 s less 2 s, so that every window is encoded with at least
# 2 s of silence after its speech. A window whose speech runs to the very end of the 30 s tends to
# stop before its last sentence (whisper.transcribe would seek on and read it in the next window);
# such a window is read on from where it stopped (``continue_after_last_timestamp``), which costs
# another encoder pass. Measured on the 14 texted test conversations and 60 s + 300 s of real
# prompts (CTranslate2, base): 28 s windows took 8 % less time than 30 s windows on the 60 s
# recording (fewer windows read on) at WER 4.26 % against 4.21 % greedy and 4.02 % against 4.21 %
# at beam 5. Not reading on at all lost whole last sentences (earlier measure, four phone-band
# conversations and 121 s of prompts: WER 0.113 against 0.056 with 30 s windows read on).
WHISPER_WINDOW_S = 30.0
ENCODE_MARGIN_S = 2.0  # silence encoded after a window's speech (the CTranslate2 engine's margin too)
MAX_WINDOW_S = WHISPER_WINDOW_S - ENCODE_MARGIN_S
# A window whose decode stopped this long before its end is read on from there (see
# ``continue_after_last_timestamp``), at most this many times.
CONTINUE_MIN_S = 1.0
CONTINUE_ROUNDS = 2
# The read-on starts this much before the stop: a timestamp token often ends a little into the next
# word, whose start was then cut off ("less" for "unless"). Measured on the 14 texted conversations
# with the pauses kept (CTranslate2, base), errors at 0 / 0.1 / 0.2 / 0.3 s: beam 5 54 / 54 / 56 / 54,
# greedy 67 / 66 / 66 / 66; only 0.1 s reads "unless" in ast-lib in both bands at both widths. The
# openai-whisper engine, beam 5: 60 at 0.1 and at 0.2.
READ_ON_BACKOFF_S = 0.1
# Silero's pause between two regions: short, so that a conversation's turns can be cut apart.
_MIN_SILENCE_MS = 160
# A pause shorter than this between two regions stays in the window (the two regions are one, while
# the window stays within MAX_WINDOW_S); longer pauses are left out. Whisper reads speech with its
# natural pauses better than speech laid end to end: on the 14 texted test conversations
# (CTranslate2, base, int8) the pauses between turns (0.1-0.8 s) kept took the errors from 60 to 55
# of 1202 words at beam 5 (bare whisper.transcribe: 57) and from 65 to 62 greedy (bare: 65), all of
# it in the phone band, in the same time. Any value from 1 s to 3 s gave the same figures there.
KEEP_PAUSE_S = 1.0
# Silero's speech threshold. Its default (0.5) misses half of the speech of some real voices on a
# phone line (300-3400 Hz): measured on the test conversations, 0.35 finds 99-100 % of every
# turn in both bands, and wideband speech does not change.
_VAD_THRESHOLD = 0.35
# A run of this many words that was already heard is a loop. Shorter repeats ("thank you", "yes,
# yes") are ordinary speech; six identical words in a row across a conversation hardly ever are.
REPEAT_MIN_WORDS = 6
# A repeated run counts as a loop when it follows its earlier occurrence within this many words,
# or, wherever it is, when it is at least LONG_REPEAT_WORDS long. Measured on 121 s of real prompts
# (bench/batch): counting every 6-word repeat as a loop re-decoded and cut legitimate repeated
# phrases (WER 2.6 % -> 7.1 %, 1.6x slower).
LOOP_GAP_WORDS = 3
LONG_REPEAT_WORDS = 15
# Below this peak amplitude (about -80 dBFS) there is nothing a microphone could have picked up.
_SILENCE_PEAK = 1e-4

_NOT_A_WORD = re.compile(r"[^\w']+")


def compression_ratio(text: str) -> float:
    """Whisper's loop measure: looping text compresses well (above 2.4 is a loop)."""
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


def normalise(word: str) -> str:
    """A word as the guard compares it: lower case, punctuation gone."""
    return _NOT_A_WORD.sub("", word.lower()).strip("'")


def normalised_words(text: str) -> list[str]:
    return [w for w in (normalise(part) for part in text.split()) if w]


# --- Cutting a recording into speech windows -------------------------------------------------------


@dataclass(frozen=True)
class SpeechWindows:
    """The speech of a recording in windows of at most ``MAX_WINDOW_S``, and how to map times back.

    ``regions`` are the padded speech regions in samples of the recording, a short pause between
    two of them kept inside one (``KEEP_PAUSE_S``); the windows are those regions laid end to end
    (the longer pauses between them left out) and cut into windows, so a time on
    that speech-only time line maps to the recording through the region it falls in.
    """

    windows: list[np.ndarray]
    regions: list[dict[str, int]]
    duration_s: float

    @property
    def offsets(self) -> list[float]:
        """Where each window starts on the speech-only time line, in seconds."""
        return list(np.cumsum([0] + [window.size for window in self.windows])[:-1] / SAMPLE_RATE)

    def to_recording(self, results: Sequence[TranscriptionResult]) -> list[Segment]:
        """The windows' segments (times relative to their window) on the recording's time line.

        A word is placed by the region its middle falls in; a segment spans its first to its last
        word, or without words its own start and end mapped the same way.
        """
        from faster_whisper.vad import SpeechTimestampsMap

        if not self.regions:
            return []
        ts_map = SpeechTimestampsMap(self.regions, SAMPLE_RATE)
        segments: list[Segment] = []
        for offset, window in zip(self.offsets, results, strict=True):
            for segment in window.segments:
                words = None
                if segment.words is not None:
                    words = []
                    for w in segment.words:
                        start, end = offset + w.start, offset + w.end
                        region = ts_map.get_chunk_index((start + end) / 2)
                        words.append(
                            replace(
                                w,
                                start=ts_map.get_original_time(start, region),
                                end=ts_map.get_original_time(end, region),
                            )
                        )
                if words:
                    start, end = words[0].start, words[-1].end
                else:
                    start = ts_map.get_original_time(offset + segment.start)
                    end = ts_map.get_original_time(offset + segment.end, is_end=True)
                segments.append(replace(segment, start=start, end=max(start, end), words=words))
        return segments


def speech_windows(samples: np.ndarray, *, max_window_s: float = MAX_WINDOW_S) -> SpeechWindows:
    """Silero VAD's speech regions of ``samples`` joined into windows of at most ``max_window_s``."""
    from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    duration_s = samples.size / SAMPLE_RATE
    if samples.size == 0 or float(np.max(np.abs(samples))) < _SILENCE_PEAK:
        return SpeechWindows(windows=[], regions=[], duration_s=duration_s)
    regions = get_speech_timestamps(
        samples,
        VadOptions(
            threshold=_VAD_THRESHOLD, max_speech_duration_s=max_window_s, min_silence_duration_ms=_MIN_SILENCE_MS
        ),
    )
    if not regions:
        return SpeechWindows(windows=[], regions=[], duration_s=duration_s)
    limit = int(max_window_s * SAMPLE_RATE)
    regions = _keep_short_pauses(regions, max_samples=limit)
    windows = []
    for chunk in collect_chunks(samples, regions, max_duration=max_window_s)[0]:
        # Silero keeps a padded region within the limit; cut anyway rather than hand an engine
        # a window longer than Whisper's (the speech-only time line stays continuous).
        windows += [chunk[start : start + limit] for start in range(0, chunk.size, limit)]
    return SpeechWindows(windows=windows, regions=regions, duration_s=duration_s)


def _keep_short_pauses(regions: list[dict[str, int]], *, max_samples: int) -> list[dict[str, int]]:
    """Regions (samples) with each pause shorter than KEEP_PAUSE_S inside a region, as long as the
    region stays within ``max_samples``."""
    keep = int(KEEP_PAUSE_S * SAMPLE_RATE)
    joined = [dict(regions[0])]
    for region in regions[1:]:
        last = joined[-1]
        if region["start"] - last["end"] < keep and region["end"] - last["start"] <= max_samples:
            last["end"] = region["end"]
        else:
            joined.append(dict(region))
    return joined


def window_plan(
    samples: np.ndarray,
    *,
    options: TranscribeOptions,
    language: str | None,
    detect_language: Callable[[np.ndarray], str | None],
    decode: Callable[[list[np.ndarray], TranscribeOptions], list[TranscriptionResult]],
) -> WindowPlan:
    """An engine's :class:`WindowPlan` over the speech windows of ``samples``.

    ``language`` is the requested code (``None``: detected once, on the first window of speech,
    as ``whisper.transcribe`` does, and every window decoded in it). ``decode`` decodes windows
    with options; the join uses it to decode a looping window again at a higher temperature.
    """
    speech = speech_windows(samples)
    detected = language
    if speech.windows and detected is None:
        detected = detect_language(speech.windows[0])
    window_options = replace(options, language=detected)

    def redecode(index: int, temperature: float) -> TranscriptionResult:
        # Sampling, not beam search, at a temperature above 0 (as Whisper's fallback does).
        retry = replace(window_options, temperature=temperature, beam_size=None)
        return decode([speech.windows[index]], retry)[0]

    def join(results: list[TranscriptionResult]) -> TranscriptionResult:
        results = continue_after_last_timestamp(speech.windows, results, decode=lambda w: decode(w, window_options))
        guarded = guard_repetitions(results, redecode=redecode, temperature=options.temperature)
        return result_from_segments(
            speech.to_recording(guarded), duration_s=speech.duration_s, language=language, detected=detected
        )

    return WindowPlan(windows=speech.windows, options=window_options, join=join)


def continue_after_last_timestamp(
    windows: Sequence[np.ndarray],
    results: Sequence[TranscriptionResult],
    *,
    decode: Callable[[list[np.ndarray]], list[TranscriptionResult]],
) -> list[TranscriptionResult]:
    """Read on where a window's decode stopped early, as ``whisper.transcribe`` seeks on.

    Whisper often ends a window's text at a timestamp well before the window's end, expecting to
    read the rest in the next 30 s window; a window decoded on its own would lose that speech (a
    whole last sentence, measured on the test conversations). The rest of each such window, from its
    last timestamp, is decoded again (all of them in one batch, at most ``CONTINUE_ROUNDS`` times)
    and its segments are appended, shifted onto the window's time line.
    """
    results = list(results)
    pending = list(range(len(results)))
    for _ in range(CONTINUE_ROUNDS):
        tails: list[tuple[int, float]] = []
        for index in pending:
            segments = results[index].segments
            if not segments:
                continue
            stopped = max(0.0, max(segment.end for segment in segments) - READ_ON_BACKOFF_S)
            if windows[index].size / SAMPLE_RATE - stopped >= CONTINUE_MIN_S:
                tails.append((index, stopped))
        if not tails:
            break
        decoded = decode([windows[index][int(stopped * SAMPLE_RATE) :] for index, stopped in tails])
        pending = []
        for (index, stopped), tail in zip(tails, decoded, strict=True):
            if not tail.segments:
                continue
            shifted = [_shifted(segment, stopped) for segment in tail.segments]
            result = results[index]
            segments = result.segments + shifted
            results[index] = replace(
                result, text=" ".join(s.text for s in segments if s.text).strip(), segments=segments
            )
            pending.append(index)
    return results


def _shifted(segment: Segment, by: float) -> Segment:
    words = None if segment.words is None else [replace(w, start=w.start + by, end=w.end + by) for w in segment.words]
    return replace(segment, start=segment.start + by, end=segment.end + by, words=words)


def result_from_segments(
    segments: list[Segment], *, duration_s: float, language: str | None, detected: str | None
) -> TranscriptionResult:
    """Our result from segments: times clamped to the audio, empty segments dropped.

    When nothing was heard the detected language is noise, so only a requested one is reported.
    """

    def clamp(value: float) -> float:
        return round(min(max(float(value), 0.0), duration_s), 3)

    kept = []
    for segment in segments:
        if not segment.text:
            continue
        words = segment.words
        if words is not None:
            words = [Word(clamp(w.start), clamp(w.end), w.word, w.probability) for w in words if w.word]
        kept.append(
            Segment(
                start=clamp(segment.start),
                end=clamp(segment.end),
                text=segment.text,
                words=words,
                avg_logprob=segment.avg_logprob,
                no_speech_prob=segment.no_speech_prob,
            )
        )
    text = " ".join(segment.text for segment in kept).strip()
    return TranscriptionResult(
        text=text, language=(detected or language) if text else language, duration_s=duration_s, segments=kept
    )


# --- The repetition guard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """A window's result with its repeated runs taken out, and how many words that took."""

    result: TranscriptionResult
    removed: int
    total: int

    @property
    def looped(self) -> bool:
        return self.removed > 0 or compression_ratio(self.result.text) > COMPRESSION_RATIO_THRESHOLD


def cut_repeats(result: TranscriptionResult, history: Sequence[str]) -> Cut:
    """Take out of ``result`` every run of at least ``REPEAT_MIN_WORDS`` words that was heard
    before: in ``history`` (the normalised words of the windows before it) or earlier in itself.

    A loop repeating itself ("I'm Sheila and Texas ... I'm Sheila and Texas ...") keeps its
    first occurrence; text without such a run comes back unchanged (the same object).
    """
    n = REPEAT_MIN_WORDS
    # Units: the segment's words when it has word timings (so that they can be dropped with
    # their text), else its text split at spaces. Units that are only punctuation are carried.
    units: list[list[str]] = [
        [w.word for w in segment.words] if segment.words else segment.text.split() for segment in result.segments
    ]
    seq = list(history)
    where: list[tuple[int, int]] = []
    for s_index, segment_units in enumerate(units):
        for u_index, unit in enumerate(segment_units):
            word = normalise(unit)
            if word:
                seq.append(word)
                where.append((s_index, u_index))
    # The latest place each run was heard: a loop repeats what was just said.
    last_seen: dict[tuple[str, ...], int] = {}
    for i in range(len(history) - n + 1):
        last_seen[tuple(seq[i : i + n])] = i
    removed: set[tuple[int, int]] = set()
    j = len(history)
    while j <= len(seq) - n:
        key = tuple(seq[j : j + n])
        i = last_seen.get(key)
        length = n
        if i is not None:
            while j + length < len(seq) and seq[i + length] == seq[j + length]:
                length += 1
        # A decoder loop says the same run again right after it (or repeats a long stretch);
        # people and prompts repeat short phrases ("press the pound key") far apart, which is speech.
        if i is None or (j - (i + length) > LOOP_GAP_WORDS and length < LONG_REPEAT_WORDS):
            last_seen[key] = j
            j += 1
            continue
        removed.update(where[k - len(history)] for k in range(j, j + length))
        j += length
    total = len(seq) - len(history)
    if not removed:
        return Cut(result=result, removed=0, total=total)
    segments = []
    for s_index, segment in enumerate(result.segments):
        dropped = {u for s, u in removed if s == s_index}
        if not dropped:
            segments.append(segment)
            continue
        kept_units = [u for index, u in enumerate(units[s_index]) if index not in dropped]
        if not any(normalise(u) for u in kept_units):
            continue
        if segment.words:
            words = [w for index, w in enumerate(segment.words) if index not in dropped]
            segments.append(
                replace(segment, text=" ".join(kept_units), words=words, start=words[0].start, end=words[-1].end)
            )
        else:
            segments.append(replace(segment, text=" ".join(kept_units)))
    text = " ".join(segment.text for segment in segments).strip()
    return Cut(result=replace(result, text=text, segments=segments), removed=len(removed), total=total)


def guard_repetitions(
    results: Sequence[TranscriptionResult],
    *,
    redecode: Callable[[int, float], TranscriptionResult],
    temperature: float | None,
) -> list[TranscriptionResult]:
    """The windows' results, in order, with no window repeating text heard before.

    A window that looped (a repeated run cut out of it, or text that compresses like a loop) is
    decoded again with ``redecode(index, temperature)`` at the schedule's temperatures above the
    one it was decoded at, and the first retry that does not loop is kept. When every retry
    loops, the window keeps only its words that were not repeats, or nothing if what is left
    still compresses like a loop. With ``temperature`` ``None`` the engine has already tried the
    whole schedule against the compression ratio, so a window that only compresses like a loop
    (but repeats nothing) is not decoded again.
    """
    history: list[str] = []
    guarded: list[TranscriptionResult] = []
    for index, result in enumerate(results):
        cut = cut_repeats(result, history)
        if cut.looped:
            higher = [t for t in DEFAULT_TEMPERATURES if t > (temperature or 0.0)]
            if temperature is None and cut.removed == 0:
                higher = []
            for retry_temperature in higher:
                retry = cut_repeats(redecode(index, retry_temperature), history)
                if not retry.looped:
                    cut = retry
                    break
        kept = cut.result
        if compression_ratio(kept.text) > COMPRESSION_RATIO_THRESHOLD:
            kept = replace(kept, text="", segments=[])
        history += [w for segment in kept.segments for w in normalised_words(segment.text)]
        guarded.append(kept)
    return guarded
