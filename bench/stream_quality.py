"""Stream quality on the real-speech conversations, in this process, in minutes instead of hours.

    .venv/bin/python -m bench.stream_quality [--band wideband|phone|both] [--offsets 0,0.37,0.71]
                                             [--set NAME=VALUE ...] [--free] [--json PATH]

Each texted conversation of :mod:`tests.conversations` is fed to one :class:`StreamSession` (the
server's stream engine: CTranslate2, ``base``, one thread, the session's default beam) in 0.1 s
pieces at a simulated real-time clock: a piece is handed over when the clock reaches its end, and
every decode moves the clock on by the compute it really took (``--free``: by nothing), so a
session that falls behind sheds partials as it would on a worker. Finals are timed on that clock.

What a change to the stream did is easy to misread from one run: a decode that ends a few
milliseconds later can change which partials agree, and with them a few words of the finals.
Each conversation is therefore streamed once per ``--offsets`` entry, after that much silence,
and the figures are summed over them; the spread line gives the WER of each offset alone.

Per band: the stream's WER (Whisper's ``EnglishTextNormalizer`` and ``jiwer``, as
``bench.accuracy``), final latency per reference turn (the first final whose end reaches the turn's
end, less 0.25 s, minus the turn's end; the issue's p50 <= 1.5 s and p95 <= 3.0 s for one session),
turns no final reaches, and decode compute. ``--set`` passes a keyword to ``StreamSession``
(``--set partial_interval=0.5``), ``--json`` writes every final for comparing two runs.
Nothing here imports Django.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy import _normalizer, latencies

RATE = 16_000
PIECE = RATE // 10  # what a browser's capture sends at a time
DEFAULT_OFFSETS = "0,0.37,0.71"


@dataclass
class BandResult:
    errors: int = 0
    words: int = 0
    latencies: list[float] = field(default_factory=list)
    missed: int = 0
    lost: int = 0  # turns whose last word no final holds, even misheard (``lost_turns``)
    lost_turns: list[str] = field(default_factory=list)
    compute_s: float = 0.0
    errors_by_offset: dict[float, int] = field(default_factory=dict)
    words_by_offset: dict[float, int] = field(default_factory=dict)


def stream(
    engine: Any,
    samples: np.ndarray,
    *,
    session_options: dict[str, Any],
    free: bool,
    slowdown: float = 1.0,
    busy: float = 0.0,
) -> tuple[list[list[Any]], float]:
    """Every final of ``samples`` as ``[start, end, text, arrival]`` on the simulated clock, and
    the decode compute in seconds; each decode moves the clock on by ``slowdown`` times its compute,
    and each piece is handed over as finals only with probability ``busy`` (seeded by the length)."""
    from speech.transcriber import StreamSession

    session = StreamSession(engine, **session_options)
    clock = 0.0
    finals: list[list[Any]] = []

    def take(deltas: list[Any], spent_before: float) -> None:
        nonlocal clock
        if not free:
            clock += slowdown * (session.stats.seconds - spent_before)
        finals.extend([d.start, d.end, d.text, clock] for d in deltas if d.is_final)

    lane = random.Random(samples.size)
    for first in range(0, samples.size, PIECE):
        clock = max(clock, (first + PIECE) / RATE)
        spent = session.stats.seconds
        # A stream worker hands a feed over as finals only while its lane is busy (``now`` infinite).
        now = float("inf") if busy and lane.random() < busy else clock
        take(session.feed(samples[first : first + PIECE], now=now), spent)
    spent = session.stats.seconds
    take(session.close(), spent)
    return finals, session.stats.seconds


def errors_of(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) after Whisper's English normalizer."""
    import jiwer

    norm = _normalizer()
    ref, hyp = norm(reference), norm(hypothesis)
    out = jiwer.process_words(ref, hyp or "<empty>")
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def lost_turns(turns: list[Any], finals: list[list[Any]]) -> list[str]:
    """The texts of the turns whose last word is in no final: aligned with all the finals' words
    as for WER (``jiwer``), it is deleted, not matched or substituted, and no final near the turn
    holds it. A misheard last word is there; a final that dropped the turn's tail is not."""
    import jiwer

    normalizer = _normalizer()

    def norm(text: str) -> list[str]:  # the normalizer leaves "..." as "."
        return [word for word in normalizer(text).split() if any(c.isalnum() for c in word)]

    reference: list[str] = []
    lasts = []
    for turn in turns:
        reference += norm(turn.text or "")
        lasts.append(len(reference) - 1)
    said = " ".join(norm(" ".join(final[2] for final in finals))) or "<empty>"
    deleted: set[int] = set()
    for chunk in jiwer.process_words(" ".join(reference), said).alignments[0]:
        if chunk.type == "delete":
            deleted.update(range(chunk.ref_start_idx, chunk.ref_end_idx))
    lost = []
    for turn, last in zip(turns, lasts, strict=True):
        words = norm(turn.text or "")
        if not words or last not in deleted:
            continue
        near = norm(" ".join(f[2] for f in finals if f[1] >= turn.start - 0.5 and f[0] <= turn.end + 1.0))
        if words[-1] not in near:
            lost.append(turn.text)
    return lost


def run_band(engine: Any, band: str, offsets: list[float], args: argparse.Namespace, record: dict[str, Any]) -> BandResult:
    from tests.conversations import conversations

    result = BandResult()
    for conv in conversations(band=band):
        reference = " ".join(turn.text for turn in conv.turns if turn.text)
        line = []
        for offset in offsets:
            silence = np.zeros(int(offset * RATE), dtype=np.float32)
            turns = [replace(turn, start=turn.start + offset, end=turn.end + offset) for turn in conv.turns]
            finals, compute_s = stream(
                engine,
                np.concatenate([silence, conv.samples]),
                session_options=args.session_options,
                free=args.free,
                slowdown=args.slowdown,
                busy=args.busy,
            )
            errors, words = errors_of(reference, " ".join(final[2] for final in finals))
            waits, missed = latencies(turns, finals)
            result.errors += errors
            result.words += words
            result.latencies += waits
            result.missed += missed
            lost = lost_turns(turns, finals)
            result.lost += len(lost)
            result.lost_turns += [f"{conv.name}@{offset:g}: {text}" for text in lost]
            result.compute_s += compute_s
            result.errors_by_offset[offset] = result.errors_by_offset.get(offset, 0) + errors
            result.words_by_offset[offset] = result.words_by_offset.get(offset, 0) + words
            record[f"{band}/{conv.name}@{offset:g}"] = {"errors": errors, "words": words, "finals": finals}
            line.append(f"{errors:3d}")
        print(f"  {band:8s} {conv.name:18s} errors {' '.join(line)} of {words:3d} words", flush=True)
    return result


def report(band: str, result: BandResult) -> None:
    p50, p95 = (float(np.percentile(result.latencies, q)) for q in (50, 95))
    print(
        f"{band:8s} stream WER {100 * result.errors / result.words:5.2f} % ({result.errors}/{result.words})"
        f"  final latency p50 {p50:.2f} s p95 {p95:.2f} s over {len(result.latencies)} turns"
        f"  missed {result.missed}  lost {result.lost}  decode compute {result.compute_s:.0f} s"
    )
    for turn in result.lost_turns:
        print(f"{'':8s} lost: {turn}")
    spread = ", ".join(
        f"{offset:g} s: {100 * result.errors_by_offset[offset] / result.words_by_offset[offset]:.2f} %"
        for offset in result.errors_by_offset
    )
    print(f"{'':8s} WER by offset: {spread}")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--band", choices=["wideband", "phone", "both"], default="both")
    parser.add_argument("--offsets", default=DEFAULT_OFFSETS, help=f"seconds of silence before each run (default {DEFAULT_OFFSETS})")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a StreamSession keyword, e.g. partial_interval=0.5")
    parser.add_argument("--free", action="store_true", help="decodes cost no simulated time")
    parser.add_argument(
        "--slowdown", type=float, default=1.0, help="each decode costs this many times its compute (sessions sharing a core)"
    )
    parser.add_argument(
        "--busy", type=float, default=0.0, help="share of pieces handed over as finals only (a lane busy with other sessions)"
    )
    parser.add_argument("--json", help="write every final here")
    args = parser.parse_args(argv)
    args.session_options = {name: _value(value) for name, _, value in (item.partition("=") for item in args.set)}
    offsets = [float(x) for x in args.offsets.split(",")]

    from speech.engines.ctranslate2 import CTranslate2Engine

    engine = CTranslate2Engine(model_name="base", cpu_threads=1)
    engine.load()
    engine.warm_up()
    started = time.perf_counter()
    record: dict[str, Any] = {
        "options": args.session_options,
        "offsets": offsets,
        "free": args.free,
        "slowdown": args.slowdown,
        "busy": args.busy,
    }
    bands = ["wideband", "phone"] if args.band == "both" else [args.band]
    results = {band: run_band(engine, band, offsets, args, record) for band in bands}
    print(f"\nStreamSession options {args.session_options or 'default'}, offsets {offsets}, {time.perf_counter() - started:.0f} s")
    for band, result in results.items():
        report(band, result)
    if args.json:
        Path(args.json).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
