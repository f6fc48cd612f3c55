"""GPU benchmark: batch real-time factor and live streams held, on a CUDA host.

    .venv/bin/python -m bench.gpu [--seconds 600] [--batch-sizes 4,16,32] [--sessions 8,16,32,64]

It drives the two CPU benchmarks with ``SCAIECHO_WHISPER_DEVICE=cuda``:

1. batch (:func:`bench.batch.run_engines`): ``--seconds`` of real speech through bare
   ``whisper.transcribe`` (fp16), our openai-whisper engine and our CTranslate2 engine (float16) at
   each ``--batch-sizes``, each in its own process: real-time factor and times faster than real
   time; target >= 300x real time (the fastest CTranslate2 row) on an H100-class GPU;
2. streaming (:func:`bench.stream.run`): rising ``--sessions`` levels of concurrent real-time
   sessions against one server on the GPU, stopping at the first level that does not hold (lag
   grows, a final is missing, or p95 final latency exceeds ``--max-p95``): the live streams held;
   target >= 64.

On a host without CUDA it says so and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

BATCH_TARGET_X = 300.0  # times faster than real time, batch, H100-class GPU
STREAMS_TARGET = 64  # live streams held by one server, H100-class GPU


def cuda_devices() -> tuple[int, str]:
    """(CUDA devices CTranslate2 or torch can use, a description of what was found)."""
    found = []
    count = 0
    try:
        import ctranslate2

        n = ctranslate2.get_cuda_device_count()
        count = max(count, n)
        found.append(f"CTranslate2 sees {n} CUDA device(s)")
    except Exception as exc:  # noqa: BLE001 - any failure to ask means "no CUDA here"
        found.append(f"CTranslate2 unavailable ({type(exc).__name__})")
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        count = max(count, n)
        name = f": {torch.cuda.get_device_name(0)}" if n else ""
        found.append(f"torch {torch.__version__} sees {n} CUDA device(s){name}")
    except Exception as exc:  # noqa: BLE001
        found.append(f"torch unavailable ({type(exc).__name__})")
    return count, "; ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="batch: length of the speech (default 600)")
    parser.add_argument("--runs", type=int, default=2, help="batch: rounds per engine (default 2); medians")
    parser.add_argument("--model", default="base", help="Whisper model (default base)")
    parser.add_argument("--batch-sizes", default="4,16,32", help="batch: CTranslate2 batch sizes (default 4,16,32)")
    parser.add_argument("--compute-type", default="float16", help="batch: CTranslate2 compute type (default float16)")
    parser.add_argument("--sessions", default="8,16,32,64", help="stream: rising levels (default 8,16,32,64)")
    parser.add_argument("--utterances", type=int, default=6, help="stream: utterances per session (default 6)")
    parser.add_argument("--engine", default=None, help="stream: SCAIECHO_WHISPER_ENGINE (default: the settings')")
    parser.add_argument("--max-p95", type=float, default=1.5, help="stream: p95 final latency bound (default 1.5 s)")
    parser.add_argument("--skip-batch", action="store_true", help="leave out the batch part")
    parser.add_argument("--skip-stream", action="store_true", help="leave out the streaming part")
    parser.add_argument("--verbose", action="store_true", help="stream: print every delta")
    args = parser.parse_args(argv)

    count, found = cuda_devices()
    if count == 0:
        print(f"bench.gpu needs a CUDA GPU, and this host has none ({found}). Run it on a CUDA host with a CUDA"
              " build of torch and CTranslate2; the CPU benchmarks are bench.batch and bench.stream.", file=sys.stderr)
        return 2
    print(f"CUDA: {found}")

    from bench import batch, corpus, stream

    best_x = None
    if not args.skip_batch:
        rec = corpus.recording(args.seconds, seed=0)
        print(f"\n=== batch: {rec.describe()} ===")
        batch_args = batch.parse_args([
            "--seconds", str(args.seconds), "--runs", str(args.runs), "--model", args.model, "--device", "cuda",
            "--batch-sizes", args.batch_sizes, "--compute-type", args.compute_type,
            "--skip-api", "--skip-long",
        ])
        rows, _default = batch.run_engines(batch_args, rec)
        ct2 = [row for row in rows.values() if row.label.startswith("ctranslate2") and not row.error]
        if ct2:
            fastest = min(ct2, key=lambda row: row.seconds)
            best_x = rec.seconds / fastest.seconds
            print(f"{'PASS' if best_x >= BATCH_TARGET_X else 'MISS'} target: batch >= {BATCH_TARGET_X:.0f}x real time:"
                  f" {best_x:.0f}x (RTF {fastest.seconds / rec.seconds:.4f}, {fastest.label})")
        else:
            print(f"MISS target: batch >= {BATCH_TARGET_X:.0f}x real time: no CTranslate2 row ran")

    held = None
    if not args.skip_stream:
        print(f"\n=== streaming: levels {args.sessions}, stop at the first that does not hold ===")
        stream_argv = [
            "--device", "cuda", "--sessions", args.sessions, "--utterances", str(args.utterances),
            "--model", args.model, "--max-p95", str(args.max_p95), "--target", str(STREAMS_TARGET),
            "--stop-when-lost", "--no-profile",
        ] + (["--engine", args.engine] if args.engine else []) + (["--verbose"] if args.verbose else [])
        levels = stream.run(stream.parse_args(stream_argv))
        if levels is None:
            return 130
        held = stream.largest(levels, stream.Level.holds)
        print(f"{'PASS' if held >= STREAMS_TARGET else 'MISS'} target: >= {STREAMS_TARGET} live streams held"
              f" (no growing lag, p95 final <= {args.max_p95} s): {held}")

    print("\nGPU summary: batch "
          + ("not run" if best_x is None else f"{best_x:.0f}x real time [target {BATCH_TARGET_X:.0f}x]")
          + "; live streams held " + ("not run" if held is None else f"{held} [target {STREAMS_TARGET}]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
