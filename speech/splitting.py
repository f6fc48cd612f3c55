"""Long files in pieces: where to cut them, and how the pieces' results join back into one.

A long job is cut at pauses, so that no word is split between two pieces, into pieces of about
``SCAIECHO_LONG_AUDIO_PIECE_SECONDS``; each piece is transcribed on its own (any free worker) and
its timestamps are shifted onto the whole file's clock. The services decide when to split and run
the pieces; this module (in the speech layer) is the arithmetic, and imports nothing from Django.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from speech.audio import SAMPLE_RATE
from speech.engines.base import Segment, TranscriptionResult, Word
from speech.vad import VAD_FRAME, Vad

# A frame whose speech probability is below this is taken for a pause.
PAUSE_PROBABILITY = 0.35
# How far from its target a cut may move to find a pause (at most 40% of a piece, so the pieces
# stay about the size asked for and the cuts keep their order).
SEARCH_SECONDS = 30.0
# Pauses longer than this are all as good as each other; among them the nearest to the target wins.
GOOD_PAUSE_SECONDS = 0.8
# The VAD is recurrent: it hears this much audio before the search window so its state has settled.
_PRIME_FRAMES = 16


def cut_points(samples: np.ndarray, *, piece_seconds: float) -> list[int]:
    """Sample indexes at which to cut ``samples`` into pieces of about ``piece_seconds``.

    Empty when the audio is not long enough for two pieces. Each cut is the quietest point of the
    best pause near its even-split target (see :func:`_quietest_point`), so pieces vary in length
    by at most :data:`SEARCH_SECONDS` either way.
    """
    total = samples.size
    count = round(total / (piece_seconds * SAMPLE_RATE))
    if count < 2:
        return []
    size = total / count
    reach = int(min(SEARCH_SECONDS * SAMPLE_RATE, 0.4 * size))
    cuts: list[int] = []
    for k in range(1, count):
        target = int(k * size)
        low = max(target - reach, cuts[-1] + VAD_FRAME if cuts else VAD_FRAME)
        high = min(target + reach, total - VAD_FRAME)
        if low < high:
            cuts.append(_quietest_point(samples, low=low, high=high, target=target))
    return cuts


def _quietest_point(samples: np.ndarray, *, low: int, high: int, target: int) -> int:
    """The sample in ``[low, high)`` to cut at near ``target``.

    Silero VAD marks the pauses (runs of frames below :data:`PAUSE_PROBABILITY`); the best pause
    is long (up to :data:`GOOD_PAUSE_SECONDS`) and close to the target, and the cut falls on its
    quietest frame. Where the window holds no pause at all (music, crosstalk), the quietest frame
    of the window is the least bad place.
    """
    first = max(0, low - _PRIME_FRAMES * VAD_FRAME)
    vad = Vad()
    probabilities: list[float] = []
    energies: list[float] = []
    starts: list[int] = []
    for start in range(first, high - VAD_FRAME + 1, VAD_FRAME):
        frame = samples[start : start + VAD_FRAME]
        probability = vad.probability(frame)
        if start >= low:
            starts.append(start)
            probabilities.append(probability)
            energies.append(float(np.mean(np.square(frame, dtype=np.float64))))
    if not starts:  # a window shorter than a frame
        return min(max(target, low), high - 1)
    energy = np.asarray(energies)
    best: tuple[float, int] | None = None
    reach = max(target - low, high - target, 1)
    for run_start, run_end in _runs(np.asarray(probabilities) < PAUSE_PROBABILITY):
        length_s = (run_end - run_start) * VAD_FRAME / SAMPLE_RATE
        centre = (starts[run_start] + starts[run_end - 1] + VAD_FRAME) / 2
        score = min(length_s, GOOD_PAUSE_SECONDS) - 0.5 * abs(centre - target) / reach
        if best is None or score > best[0]:
            best = (score, _quietest_frame(energy, start=run_start, end=run_end))
    index = best[1] if best is not None else _quietest_frame(energy, start=0, end=len(starts))
    return starts[index] + VAD_FRAME // 2


def _quietest_frame(energy: np.ndarray, *, start: int, end: int) -> int:
    """The frame in ``[start, end)`` with the least energy; among frames about as quiet (within
    6 dB), the one nearest the middle, farthest from the speech on either side."""
    window = energy[start:end]
    candidates = np.flatnonzero(window <= window.min() * 4 + 1e-10)
    middle = (len(window) - 1) / 2
    return start + int(candidates[np.argmin(np.abs(candidates - middle))])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of ``True`` in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def ranges(*, total: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` sample ranges of the pieces: contiguous, covering all ``total`` samples."""
    bounds = [0, *cuts, total]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shifted(
    result: TranscriptionResult, *, start_s: float, end_s: float, by_s: float | None = None
) -> TranscriptionResult:
    """``result`` of a piece moved onto the whole file's clock (kept inside the piece's span, so the
    joined timestamps never run backwards where a model stretched a last segment). ``by_s``: move
    by that much instead of ``start_s`` (a decode of context and a span, onto the span's clock)."""
    move = start_s if by_s is None else by_s

    def at(t: float) -> float:
        return round(min(max(t + move, start_s), end_s), 3)

    segments = [
        replace(
            segment,
            start=at(segment.start),
            end=at(segment.end),
            words=None if segment.words is None else [replace(w, start=at(w.start), end=at(w.end)) for w in segment.words],
        )
        for segment in result.segments
    ]
    return replace(result, segments=segments, duration_s=end_s - start_s)


def joined(results: Sequence[TranscriptionResult], *, duration_s: float) -> TranscriptionResult:
    """The pieces' (shifted) results, in order, as one result for the whole file.

    The language is the one most pieces detected (the first piece's on a tie): a multilingual
    model judges each piece on its own.
    """
    # most_common keeps first-seen order among equal counts.
    languages = Counter(result.language for result in results if result.language).most_common(1)
    return TranscriptionResult(
        text=" ".join(text for result in results if (text := result.text.strip())),
        language=languages[0][0] if languages else None,
        duration_s=duration_s,
        segments=[segment for result in results for segment in result.segments],
    )


def result_to_json(result: TranscriptionResult) -> dict[str, Any]:
    return asdict(result)


def result_from_json(data: dict[str, Any]) -> TranscriptionResult:
    segments = []
    for item in data["segments"]:
        words = item.get("words")
        segments.append(Segment(**{**item, "words": None if words is None else [Word(**word) for word in words]}))
    return TranscriptionResult(
        text=data["text"], language=data["language"], duration_s=data["duration_s"], segments=segments
    )
