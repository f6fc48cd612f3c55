"""Accuracy on real conversations: WER, DER, speaker count and stream final latency (issue 10, point 5).

The set is :mod:`tests.conversations`: two-to-four real people per conversation, exact reference
text and RTTM. Every engine runs in a child process of its own (one after another, never side by
side), on the same files in the same run:

- ``greedy`` / ``beam5``: bare ``whisper.transcribe`` (openai-whisper on the packaged weights,
  temperature 0, beam 1 or 5): the references the issue compares against;
- ``ctranslate2`` / ``openai-whisper``: our engines as the batch task calls them
  (``TranscribeOptions(language="en", word_timestamps=True)``, VAD-segmented by default), at each
  beam width of ``--beams`` (default: the batch task's, ``SCAIECHO_WHISPER_BEAM_SIZE``; ``1,5``
  lists greedy and beam 5 side by side, labelled ``ctranslate2 greedy`` / ``ctranslate2 beam 5``), then the
  service's diarization (:func:`diarize`, the one place that calls it), then a stream: the
  conversation fed to :class:`speech.transcriber.StreamSession` in 0.1 s chunks at real-time pace,
  in-process (the transport and the stream worker of ``bench.stream`` are not in this figure).

Measures (the parent computes them from what the children return):

- **WER**: ``jiwer`` over all reference words, after Whisper's ``EnglishTextNormalizer``;
- **repeated text**: a file whose transcript holds an 8-word run twice that the reference does not;
- **DER**: ``pyannote.metrics`` ``DiarizationErrorRate``, accumulated over conversations, with a
  0.25 s collar either side of each reference boundary (pyannote's ``collar=0.5`` is the total
  width, the same as NIST md-eval's ``-c 0.25``) and without a collar; overlap is scored;
- **speaker count**: conversations whose number of hypothesis labels equals the real number;
- **stream final latency** per reference turn: when the first final whose end reaches the turn's end
  (within 0.25 s) arrived, minus the turn's end, in stream seconds; p50 and p95. A turn no final
  covers counts as missed.

Run ``python -m bench.accuracy --help``. Nothing here imports Django except the diarization child
and, for the default of ``--beams``, the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RATE = 16_000
CHUNK_S = 0.1  # what a browser's capture sends at a time
COVER_TOLERANCE_S = 0.25
REPEAT_WORDS = 8


@dataclass(frozen=True)
class Spec:
    label: str
    kind: str  # "reference" | "openai-whisper" | "ctranslate2"
    model: str = "base"
    beam: int | None = None  # beam search width; None (or 1): greedy
    threads: int = 1
    device: str = "cpu"


def beam_label(beam: int) -> str:
    return "greedy" if beam <= 1 else f"beam {beam}"


def specs_for(engines: list[str], model: str, threads: int, device: str, beams: list[int]) -> list[Spec]:
    """The references, then each of our engines at each beam width."""
    out = [
        Spec("bare whisper greedy", "reference", model, None, threads, device),
        Spec("bare whisper beam 5", "reference", model, 5, threads, device),
    ]
    return out + [
        Spec(f"{name} {beam_label(beam)}", name, model, beam if beam > 1 else None, threads, device)
        for name in engines
        for beam in beams
    ]


def server_beam() -> int:
    """The batch task's beam width with this environment (``SCAIECHO_WHISPER_BEAM_SIZE``)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")
    from django.conf import settings

    return int(getattr(settings, "SCAIECHO_WHISPER_BEAM_SIZE", 1))


# --- The child ----------------------------------------------------------------------------------------


def diarize(audio: np.ndarray, segments: list[Any], *, encoder: Any, num_speakers: int | None) -> list[Any]:
    """The service's batch diarization: the one call to adapt when its signature changes."""
    from speakers.diarization import diarize_recording

    return diarize_recording(audio, segments, encoder=encoder, candidates=[], num_speakers=num_speakers)


def _stream(engine: Any, audio: np.ndarray) -> dict[str, Any]:
    """Feed ``audio`` at real-time pace; every final with its arrival time in stream seconds."""
    from speech.transcriber import StreamSession

    session = StreamSession(engine)
    chunk = int(CHUNK_S * RATE)
    finals: list[list[Any]] = []
    t0 = time.perf_counter()
    for i in range(0, audio.size, chunk):
        due = (i + chunk) / RATE
        ahead = due - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
        deltas = session.feed(audio[i : i + chunk], now=time.perf_counter() - t0)
        arrived = time.perf_counter() - t0
        finals += [[d.start, d.end, d.text, arrived] for d in deltas if d.is_final]
    deltas = session.close()
    arrived = time.perf_counter() - t0
    finals += [[d.start, d.end, d.text, arrived] for d in deltas if d.is_final]
    return {"finals": finals, "wall_s": time.perf_counter() - t0}


def _child(spec: Spec, data: Path, *, stream: bool, diarization: bool, oracle_speakers: bool) -> dict[str, Any]:
    import torch

    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    index = json.loads((data / "index.json").read_text())
    results: dict[str, Any] = {}
    if spec.kind == "reference":
        import whisper

        from bench.engines import reference_beam
        from speech.engines.weights import load_whisper_model

        model = load_whisper_model(name=spec.model, device=spec.device).model
        for item in index:
            audio = np.load(data / f"{item['key']}.npy")
            t0 = time.perf_counter()
            with torch.inference_mode():
                raw = whisper.transcribe(
                    model, audio, language="en", temperature=0.0, beam_size=reference_beam(spec.beam),
                    fp16=spec.device.startswith("cuda"), verbose=None,
                )  # fmt: skip
            results[item["key"]] = {"text": str(raw["text"]).strip(), "batch_s": time.perf_counter() - t0}
        return results

    from bench.engines import EngineSpec, build
    from speech.engines.base import TranscribeOptions

    engine = build(EngineSpec(spec.label, spec.kind, spec.model, spec.device, spec.threads))
    engine.load()
    engine.warm_up()
    encoder = None
    if diarization:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")
        import django

        django.setup()
        from speech.embedding import SpeakerEncoder

        encoder = SpeakerEncoder(device=spec.device, cpu_threads=spec.threads)
        encoder.load()
    options = TranscribeOptions(language="en", word_timestamps=True, beam_size=spec.beam)
    for item in index:
        audio = np.load(data / f"{item['key']}.npy")
        t0 = time.perf_counter()
        result = engine.transcribe(audio, options=options)
        out: dict[str, Any] = {"text": result.text, "batch_s": time.perf_counter() - t0}
        if encoder is not None:
            t0 = time.perf_counter()
            segments = diarize(
                audio, result.segments, encoder=encoder, num_speakers=item["speakers"] if oracle_speakers else None
            )
            out["diarization_s"] = time.perf_counter() - t0
            out["segments"] = [[s.start, s.end, s.speaker_label] for s in segments]
        if stream and item["has_text"]:
            out["stream"] = _stream(engine, audio)
        results[item["key"]] = out
    return results


# --- Measures -------------------------------------------------------------------------------------------


def _normalizer() -> Any:
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (errors over all reference words) after Whisper's English normalizer."""
    import jiwer

    norm = _normalizer()
    refs, hyps = [norm(r) for r in references], [norm(h) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    if not pairs:
        return float("nan")
    out = jiwer.process_words([r for r, _ in pairs], [h or "<empty>" for _, h in pairs])
    return (out.substitutions + out.deletions + out.insertions) / sum(len(r.split()) for r, _ in pairs)


def repeated(reference: str, hypothesis: str) -> bool:
    """The hypothesis holds a run of ``REPEAT_WORDS`` words twice, and the reference does not."""
    norm = _normalizer()

    def runs(text: str) -> dict[tuple[str, ...], int]:
        words = norm(text).split()
        counts: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - REPEAT_WORDS + 1):
            key = tuple(words[i : i + REPEAT_WORDS])
            counts[key] = counts.get(key, 0) + 1
        return counts

    ref = runs(reference)
    return any(n > 1 and ref.get(key, 0) < n for key, n in runs(hypothesis).items())


def _annotation(spans: list[tuple[float, float, str]]) -> Any:
    from pyannote.core import Annotation, Segment

    out = Annotation()
    for i, (start, end, label) in enumerate(spans):
        if end > start:
            out[Segment(start, end), i] = label
    return out


def latencies(turns: list[Any], finals: list[list[Any]]) -> tuple[list[float], int]:
    """Per reference turn: arrival of the first final reaching its end, minus that end."""
    out, missed = [], 0
    for turn in turns:
        arrivals = [arrived for _, end, text, arrived in finals if text.strip() and end >= turn.end - COVER_TOLERANCE_S]
        if arrivals:
            out.append(min(arrivals) - turn.end)
        else:
            missed += 1
    return out, missed


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- The parent ---------------------------------------------------------------------------------------


def run_child(spec: Spec, data: Path, args: argparse.Namespace) -> dict[str, Any] | str:
    from bench.engines import child_env

    out = data / "result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.accuracy", "--child", json.dumps(asdict(spec)), str(data), str(out)]
    cmd += ["--skip-stream"] if args.skip_stream else []
    cmd += ["--skip-diarization"] if args.skip_diarization else []
    cmd += ["--oracle-speakers"] if args.oracle_speakers else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(spec.threads), capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:] or [f"exit {done.returncode}"]
        return " | ".join(tail)[:500]
    print(f"  {spec.label:<22} done in {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(out.read_text())


def report(
    convs: list[Any], specs: list[Spec], results: dict[str, dict[str, Any] | str], args: argparse.Namespace
) -> None:
    from pyannote.metrics.diarization import DiarizationErrorRate

    texted = [c for c in convs if c.has_text]
    key = {id(c): f"{c.name}-{c.band}" for c in convs}
    rows: dict[str, dict[str, Any]] = {}
    print()
    header = f"{'engine':<22} {'batch WER':>9} {'stream WER':>10} {'repeats':>7} {'DER c.25':>8} {'DER c0':>7} {'#spk ok':>7} {'lat p50':>7} {'lat p95':>7} {'missed':>6} {'RTF':>5}"
    print(header)
    print("-" * len(header))
    for spec in specs:
        got = results[spec.label]
        if isinstance(got, str):
            print(f"{spec.label:<22} FAILED: {got}")
            continue
        row: dict[str, Any] = {}
        refs = [c.reference_text for c in texted]
        row["wer"] = wer(refs, [got[key[id(c)]]["text"] for c in texted])
        row["repeats"] = sum(repeated(c.reference_text, got[key[id(c)]]["text"]) for c in texted)
        row["rtf"] = sum(got[key[id(c)]]["batch_s"] for c in convs if key[id(c)] in got) / sum(
            c.duration_s for c in convs if key[id(c)] in got
        )
        if all("segments" in got.get(key[id(c)], {}) for c in convs):
            der_collar, der_none = DiarizationErrorRate(collar=0.5), DiarizationErrorRate(collar=0.0)
            exact = 0
            for c in convs:
                ref = _annotation([(t.start, t.end, t.speaker) for t in c.turns])
                hyp = _annotation([tuple(s) for s in got[key[id(c)]]["segments"]])
                der_collar(ref, hyp)
                der_none(ref, hyp)
                exact += len(set(hyp.labels())) == len(c.speakers)
            row["der_collar"], row["der_none"] = abs(der_collar), abs(der_none)
            row["count_ok"] = exact / len(convs)
        if all("stream" in got.get(key[id(c)], {}) for c in texted) and texted:
            finals = {key[id(c)]: got[key[id(c)]]["stream"]["finals"] for c in texted}
            row["stream_wer"] = wer(refs, [" ".join(f[2] for f in finals[key[id(c)]]) for c in texted])
            lats: list[float] = []
            missed = 0
            for c in texted:
                values, miss = latencies(c.turns, finals[key[id(c)]])
                lats += values
                missed += miss
            row["p50"], row["p95"], row["missed"] = _pct(lats, 50), _pct(lats, 95), missed
        rows[spec.label] = row

        def f(name: str, fmt: str, width: int, row: dict[str, Any] = row) -> str:
            return format(row[name], fmt).rjust(width) if name in row else "-".rjust(width)

        print(
            f"{spec.label:<22} {f('wer', '.1%', 9)} {f('stream_wer', '.1%', 10)} {f('repeats', 'd', 7)}"
            f" {f('der_collar', '.1%', 8)} {f('der_none', '.1%', 7)} {f('count_ok', '.0%', 7)}"
            f" {f('p50', '.2f', 6)}s {f('p95', '.2f', 6)}s {f('missed', 'd', 6)} {f('rtf', '.2f', 5)}"
        )
    _targets(rows, specs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _targets(rows: dict[str, dict[str, Any]], specs: list[Spec]) -> None:
    beam = rows.get("bare whisper beam 5", {}).get("wer")
    print("\nTargets (issue 10, 'Done when'), per engine of ours:")
    for spec in specs:
        if spec.kind == "reference" or spec.label not in rows:
            continue
        row = rows[spec.label]
        checks: list[tuple[str, bool | None]] = [
            ("DER <= 12 % (collar 0.25 s)", row["der_collar"] <= 0.12 if "der_collar" in row else None),
            ("speaker count exact on >= 90 %", row["count_ok"] >= 0.9 if "count_ok" in row else None),
            ("batch WER <= bare whisper beam 5", row["wer"] <= beam if beam is not None else None),
            (
                "stream WER within 10 % (relative) of batch",
                row["stream_wer"] <= row["wer"] * 1.1 if "stream_wer" in row else None,
            ),
            ("no file with repeated text", row["repeats"] == 0),
            ("stream final p50 <= 1.5 s, one session", row["p50"] <= 1.5 if "p50" in row else None),
            ("stream final p95 <= 3.0 s, one session", row["p95"] <= 3.0 if "p95" in row else None),
            ("every utterance reaches a final", row["missed"] == 0 if "missed" in row else None),
        ]
        for name, ok in checks:
            print(f"  {spec.label:<22} {name:<44} {'-' if ok is None else 'PASS' if ok else 'MISS'}")
    print(
        "  (not measured here: p50 with three concurrent sessions, the embedded server and the Redis"
        " worker — bench.stream; enrolled speakers named — bench.speakers)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N conversations of each band")
    parser.add_argument("--band", choices=["wideband", "phone", "both"], default="wideband")
    parser.add_argument("--texted-only", action="store_true", help="leave out the untranscribed (codec2) ones")
    parser.add_argument("--engines", default="ctranslate2,openai-whisper", help="ours, comma-separated")
    parser.add_argument(
        "--beams", "--beam", default=None,
        help="beam widths for our engines, comma-separated (1: greedy; '1,5': both, one row each);"
        " default: the batch task's (SCAIECHO_WHISPER_BEAM_SIZE)",
    )  # fmt: skip
    parser.add_argument("--skip-reference", action="store_true", help="no bare whisper.transcribe runs")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-diarization", action="store_true")
    parser.add_argument("--oracle-speakers", action="store_true", help="pass the true num_speakers")
    parser.add_argument("--model", default="base")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec_json, data, out = args.child
        result = _child(
            Spec(**json.loads(spec_json)), Path(data),
            stream=not args.skip_stream, diarization=not args.skip_diarization, oracle_speakers=args.oracle_speakers,
        )  # fmt: skip
        Path(out).write_text(json.dumps(result))
        return

    from tests.conversations import conversations

    bands = ["wideband", "phone"] if args.band == "both" else [args.band]
    convs = []
    for band in bands:
        chosen = conversations(band=band, with_text=args.texted_only)
        texted = [c for c in chosen if c.has_text]
        untexted = [c for c in chosen if not c.has_text]
        if args.limit is not None:  # mostly texted ones, one untexted per three
            n_untexted = min(len(untexted), args.limit // 3)
            chosen = texted[: args.limit - n_untexted] + untexted[:n_untexted]
        convs += chosen
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    beams = [int(b) for b in args.beams.split(",") if b.strip()] if args.beams else [server_beam()]
    if any(b < 1 for b in beams):
        parser.error(f"--beams {args.beams}: each width must be at least 1")
    specs = specs_for(engines, args.model, args.threads, args.device, beams)
    if args.skip_reference:
        specs = [s for s in specs if s.kind != "reference"]
    seconds = sum(c.duration_s for c in convs)
    print(
        f"Real-speech set: {len(convs)} conversations ({', '.join(bands)}), {seconds:.0f} s,"
        f" {sum(c.has_text for c in convs)} with reference text, speakers per conversation"
        f" {sorted({len(c.speakers) for c in convs})}; model {args.model}, {args.threads} thread(s), {args.device}",
        flush=True,
    )
    results: dict[str, dict[str, Any] | str] = {}
    with tempfile.TemporaryDirectory(prefix="scaiecho-bench-accuracy-") as tmp:
        data = Path(tmp)
        index = []
        for c in convs:
            name = f"{c.name}-{c.band}"
            np.save(data / f"{name}.npy", c.samples)
            index.append({"key": name, "speakers": len(c.speakers), "has_text": c.has_text})
        (data / "index.json").write_text(json.dumps(index))
        for spec in specs:
            results[spec.label] = run_child(spec, data, args)
    report(convs, specs, results, args)
    if any(isinstance(r, str) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
