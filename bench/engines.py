"""Speech engines measured one child process each, so that time and peak memory are their own.

:func:`measure` starts ``python -m bench.engines`` once per engine and round: the child loads the
engine, warms it up on the first 4 s of the audio, transcribes the whole audio once, and reports its
wall and CPU time, the transcript, and its peak resident memory (``ru_maxrss``: everything that
process ever held, imports and model included). Children run one after another, never side by side.

Kinds of engine:

- ``reference``: bare ``whisper.transcribe`` (openai-whisper) on the packaged weights at
  temperature 0 (no fallback), greedy or at a beam width, ``fp16`` only on CUDA, everything else at
  openai-whisper's defaults;
- ``openai-whisper``: our :class:`speech.engines.whisper.WhisperEngine`, with the options the batch
  task passes by default (``TranscribeOptions(language="en")``), greedy or at a beam width
  (``SCAIECHO_WHISPER_BEAM_SIZE``);
- ``ctranslate2``: our :class:`speech.engines.ctranslate2.CTranslate2Engine` (faster-whisper on the
  same packaged weights), same options, with a compute type and a batch size.

Nothing here imports Django.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RATE = 16_000
WARM_UP_S = 4.0


@dataclass(frozen=True)
class EngineSpec:
    label: str
    kind: str  # "reference" | "openai-whisper" | "ctranslate2"
    model: str = "base"
    device: str = "cpu"
    threads: int = 1
    compute_type: str | None = None  # ctranslate2 only
    batch_size: int | None = None  # ctranslate2 only
    beam: int | None = None  # beam search width; None (or 1): greedy


@dataclass
class EngineRun:
    spec: EngineSpec
    seconds: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    error: str | None = None


def build(spec: EngineSpec):  # noqa: ANN201 - an Engine, imported lazily (torch only where needed)
    """Our engine for ``spec`` (not for the reference), constructed as the server would."""
    if spec.kind == "openai-whisper":
        from speech.engines.whisper import WhisperEngine

        return WhisperEngine(model_name=spec.model, device=spec.device, cpu_threads=spec.threads)
    if spec.kind == "ctranslate2":
        from speech.engines.ctranslate2 import CTranslate2Engine

        return CTranslate2Engine(
            model_name=spec.model,
            device=spec.device,
            compute_type=spec.compute_type,
            cpu_threads=spec.threads,
            batch_size=spec.batch_size or 1,
        )
    raise ValueError(f"unknown engine kind {spec.kind!r}")


def reference_beam(beam: int | None) -> int | None:
    """``whisper.transcribe``'s ``beam_size`` for a width: ``None`` is its greedy decoder (a width
    of 1 would run its beam search code with one beam, slower for the same text)."""
    return beam if (beam or 1) > 1 else None


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: BLAS/OpenMP pools pinned to ``threads``."""
    n = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "PYTHONUNBUFFERED": "1"}


def measure(
    specs: list[EngineSpec], samples: np.ndarray, *, rounds: int, seed: int = 0, verbose: bool = True
) -> list[EngineRun]:
    """``rounds`` rounds; in each every engine runs once in a fresh child process, in an order
    shuffled per round (the first round in the given order), so a slow spell on a shared machine
    does not land on one engine only. An engine that fails is reported, not fatal."""
    runs = {spec.label: EngineRun(spec) for spec in specs}
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="scaiecho-bench-engines-") as tmp:
        audio = Path(tmp) / "audio.npy"
        np.save(audio, np.asarray(samples, dtype=np.float32))
        for r in range(rounds):
            order = list(specs) if r == 0 else rng.sample(specs, len(specs))
            for spec in order:
                run = runs[spec.label]
                if run.error:
                    continue
                out = Path(tmp) / "result.json"
                out.unlink(missing_ok=True)
                done = subprocess.run(
                    [sys.executable, "-m", "bench.engines", json.dumps(asdict(spec)), str(audio), str(out)],
                    cwd=ROOT, env=child_env(spec.threads), capture_output=True, text=True, check=False,
                )
                if done.returncode != 0 or not out.is_file():
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                    run.error = tail[0][:300]
                    if verbose:
                        print(f"  round {r + 1} {spec.label:<28} FAILED: {run.error}", flush=True)
                    continue
                got = json.loads(out.read_text())
                run.seconds.append(got["seconds"])
                run.cpu_s.append(got["cpu_s"])
                run.load_s.append(got["load_s"])
                run.texts.append(got["text"])
                run.peak_rss_mb = max(run.peak_rss_mb, got["peak_rss_mb"])
                if verbose:
                    print(
                        f"  round {r + 1} {spec.label:<28} {got['seconds']:7.2f} s  cpu {got['cpu_s']:7.2f} s"
                        f"  load {got['load_s']:5.2f} s  peak RSS {got['peak_rss_mb']:6.0f} MB",
                        flush=True,
                    )
    return [runs[spec.label] for spec in specs]


# --- The child -------------------------------------------------------------------------------------


def _child(spec: EngineSpec, samples: np.ndarray) -> dict:
    warm = samples[: int(WARM_UP_S * RATE)]
    t0 = time.perf_counter()
    if spec.kind == "reference":
        import torch
        import whisper

        from speech.engines.weights import load_whisper_model

        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        model = load_whisper_model(name=spec.model, device=spec.device).model

        def run(audio: np.ndarray) -> str:
            with torch.inference_mode():
                raw = whisper.transcribe(
                    model, audio, language="en", temperature=0.0, beam_size=reference_beam(spec.beam),
                    fp16=spec.device.startswith("cuda"), verbose=None,
                )  # fmt: skip
            return str(raw["text"]).strip()
    else:
        from speech.engines.base import TranscribeOptions

        engine = build(spec)
        engine.load()
        options = TranscribeOptions(language="en", beam_size=spec.beam)

        def run(audio: np.ndarray) -> str:
            return engine.transcribe(audio, options=options).text

    load_s = time.perf_counter() - t0
    run(warm)  # first-call costs (allocators, kernels, mel filters) are not the engine's speed
    c0, t0 = time.process_time(), time.perf_counter()
    text = run(samples)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "text": text, "peak_rss_mb": peak_kb / 1024}


if __name__ == "__main__":
    spec_json, audio_path, out_path = sys.argv[1:4]
    result = _child(EngineSpec(**json.loads(spec_json)), np.load(audio_path))
    Path(out_path).write_text(json.dumps(result))
